//! Compiles the .proto files with protox (a pure-Rust protobuf compiler), so
//! building keel needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/mvccpb/kv.proto",
        "proto/authpb/auth.proto",
        "proto/etcdserverpb/rpc.proto",
        "proto/v3lockpb/v3lock.proto",
        "proto/v3electionpb/v3election.proto",
        "proto/keelpb/keel.proto",
    ];
    let descriptors = protox::compile(files, ["proto"])?;
    let encoded = prost::Message::encode_to_vec(&descriptors);
    tonic_prost_build::configure().bytes(".").compile_fds(descriptors)?;
    // JSON for etcd's HTTP gateway: grpc-gateway's mapping with the .proto
    // field names (etcd runs it with OrigName), int64 as strings, bytes as
    // base64, default values left out.
    pbjson_build::Builder::new().register_descriptors(&encoded)?.preserve_proto_field_names().build(&[
        ".mvccpb",
        ".authpb",
        ".etcdserverpb",
        ".v3lockpb",
        ".v3electionpb",
    ])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
