//! Hostile and malformed client input gets a clean gRPC error, the same
//! code real etcd 3.4 gives, and the member keeps serving: undecodable
//! protobufs, messages above the gRPC size limit, txns nested deeper than
//! a decoder will follow, ranges returning megabytes, and thousands of
//! watchers on one stream.

use bytes::{Buf, BufMut, Bytes};
use keel_proto::etcdserverpb::{
    kv_client::KvClient, request_op, watch_client::WatchClient, watch_request, PutRequest, RangeRequest, RequestOp,
    TxnRequest, WatchCreateRequest, WatchRequest,
};
use keel_tests::{etcd_bin, Cluster, ClusterOptions};
use tokio_stream::StreamExt;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// Sends bytes as they are, so a request can be anything on the wire.
#[derive(Debug, Clone, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// The status code of a unary call to `path` with `body` as its message.
async fn raw_call(url: &str, path: &'static str, body: Bytes) -> anyhow::Result<tonic::Code> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())?.connect().await?;
    let mut grpc = tonic::client::Grpc::new(channel).max_encoding_message_size(usize::MAX);
    grpc.ready().await?;
    let answer = grpc
        .unary(tonic::Request::new(body), tonic::codegen::http::uri::PathAndQuery::from_static(path), RawCodec)
        .await;
    Ok(match answer {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    })
}

/// Byte strings no protobuf decoder accepts as a RangeRequest.
fn malformed_messages() -> Vec<(&'static str, Bytes)> {
    vec![
        ("a length far past the end", Bytes::from_static(&[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f, b'k'])),
        ("a truncated varint", Bytes::from_static(&[0x18, 0xff, 0xff])),
        (
            "a varint of eleven bytes",
            Bytes::from_static(&[0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]),
        ),
        ("wire type 7", Bytes::from_static(&[0x0f, 0x00])),
        ("field number 0", Bytes::from_static(&[0x00, 0x01])),
        ("a wrong wire type for key", Bytes::from_static(&[0x08, 0x01])),
        ("an unterminated group", Bytes::from_static(&[0x0b, 0x08, 0x01])),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_and_oversized_messages_get_etcds_status_codes() -> anyhow::Result<()> {
    let etcd = etcd_bin().ok_or_else(|| anyhow::anyhow!("real etcd not found at /usr/bin/etcd: run `make deps`"))?;
    let keel = Cluster::start(1)?;
    let reference = Cluster::start_with(ClusterOptions { binary: etcd, ..ClusterOptions::keel(1) })?;
    let (k, e) = (&keel.members[0].client_url, &reference.members[0].client_url);

    for (what, body) in malformed_messages() {
        let got = raw_call(k, "/etcdserverpb.KV/Range", body.clone()).await?;
        let want = raw_call(e, "/etcdserverpb.KV/Range", body).await?;
        assert_ne!(got, tonic::Code::Ok, "{what} was accepted");
        assert_eq!(got, want, "{what}: keel and etcd differ");
    }

    // Above the gRPC limit (--max-request-bytes plus etcd's 512 KiB of
    // headroom): refused before it is decoded.
    let huge = PutRequest { key: vec![b'x'; 8 << 20].into(), ..Default::default() };
    let huge = Bytes::from(prost::Message::encode_to_vec(&huge));
    let got = raw_call(k, "/etcdserverpb.KV/Put", huge.clone()).await?;
    let want = raw_call(e, "/etcdserverpb.KV/Put", huge).await?;
    assert_eq!((got, want), (tonic::Code::ResourceExhausted, tonic::Code::ResourceExhausted));

    // The same on a stream: the watch ends with that status.
    for url in [k, e] {
        let mut watch = WatchClient::connect(url.clone()).await?.max_encoding_message_size(usize::MAX);
        let create = WatchCreateRequest { key: vec![b'x'; 8 << 20].into(), ..Default::default() };
        let req = WatchRequest { request_union: Some(watch_request::RequestUnion::CreateRequest(create)) };
        let code = match watch.watch(tokio_stream::iter([req]).chain(tokio_stream::pending())).await {
            Err(status) => status.code(),
            Ok(resp) => match resp.into_inner().message().await {
                Err(status) => status.code(),
                Ok(other) => panic!("{url}: the oversized watch got {other:?}"),
            },
        };
        assert_eq!(code, tonic::Code::ResourceExhausted, "{url}");
    }

    // Still serving.
    let mut kv = KvClient::connect(k.clone()).await?;
    kv.put(PutRequest { key: "after".into(), value: "ok".into(), ..Default::default() }).await?;
    Ok(())
}

/// A txn whose success branch holds a txn, `depth` times over, encoded
/// without recursion (encoding, or even dropping, such a value with prost
/// would overflow this test's own stack).
fn nested_txn(depth: usize) -> Bytes {
    use prost::Message;
    let put = PutRequest { key: "deep".into(), value: "v".into(), ..Default::default() };
    let innermost = TxnRequest {
        success: vec![RequestOp { request: Some(request_op::Request::RequestPut(put)) }],
        ..Default::default()
    };
    // Built back to front: each level prepends its tag and length.
    let mut reversed: Vec<u8> = innermost.encode_to_vec().into_iter().rev().collect();
    for _ in 1..depth {
        // RequestOp.request_txn = 4, then TxnRequest.success = 2.
        for tag in [0x22u8, 0x12] {
            let mut varint = Vec::new();
            prost::encoding::encode_varint(reversed.len() as u64, &mut varint);
            reversed.extend(varint.iter().rev());
            reversed.push(tag);
        }
    }
    reversed.reverse();
    Bytes::from(reversed)
}

#[tokio::test(flavor = "multi_thread")]
async fn deeply_nested_txns_run_or_get_a_clean_error() -> anyhow::Result<()> {
    let c = Cluster::start(1)?;
    let url = &c.members[0].client_url;
    let mut kv = KvClient::connect(url.clone()).await?;
    let version = |resp: keel_proto::etcdserverpb::RangeResponse| resp.kvs.first().map(|kv| kv.version);

    // 40 levels run, as in etcd: the innermost put lands once.
    assert_eq!(raw_call(url, "/etcdserverpb.KV/Txn", nested_txn(40)).await?, tonic::Code::Ok);
    let got = kv.range(RangeRequest { key: "deep".into(), ..Default::default() }).await?.into_inner();
    assert_eq!(version(got), Some(1));

    // Far deeper than any decoder should follow (a recursive decoder
    // without a limit overflows its stack here): refused, nothing applied.
    let code = raw_call(url, "/etcdserverpb.KV/Txn", nested_txn(100_000)).await?;
    assert!(matches!(code, tonic::Code::Internal | tonic::Code::InvalidArgument), "{code:?}");
    let got = kv.range(RangeRequest { key: "deep".into(), ..Default::default() }).await?.into_inner();
    assert_eq!(version(got), Some(1), "the refused txn must not have applied");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_range_of_many_megabytes_is_served_whole() -> anyhow::Result<()> {
    let c = Cluster::start(1)?;
    let mut kv = KvClient::connect(c.members[0].client_url.clone()).await?.max_decoding_message_size(usize::MAX);
    let value = Bytes::from(vec![b'v'; 64 << 10]);
    // 200 keys of 64 KiB: a 12.5 MiB response, three times gRPC's
    // default message limit.
    for i in 0..200 {
        let key = Bytes::from(format!("big/{i:04}"));
        kv.put(PutRequest { key, value: value.clone(), ..Default::default() }).await?;
    }
    let all = kv
        .range(RangeRequest { key: "big/".into(), range_end: "big0".into(), ..Default::default() })
        .await?
        .into_inner();
    assert_eq!(all.count, 200);
    assert_eq!(all.kvs.len(), 200);
    assert!(all.kvs.iter().all(|kv| kv.value.len() == 64 << 10));
    // A client keeping gRPC's default 4 MiB limit gets a clean error of
    // its own, and the member goes on serving it.
    let mut small = KvClient::connect(c.members[0].client_url.clone()).await?;
    let err = small
        .range(RangeRequest { key: "big/".into(), range_end: "big0".into(), ..Default::default() })
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("a 12.5 MiB response fit in 4 MiB"))?;
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{}", err.message());
    let one = small.range(RangeRequest { key: "big/0000".into(), ..Default::default() }).await?.into_inner();
    assert_eq!(one.kvs.len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn five_thousand_watchers_on_one_stream() -> anyhow::Result<()> {
    const WATCHERS: usize = 5_000;
    let c = Cluster::start(1)?;
    let url = c.members[0].client_url.clone();
    let (tx, rx) = tokio::sync::mpsc::channel::<WatchRequest>(WATCHERS);
    let mut watch = WatchClient::connect(url.clone()).await?;
    let mut events = watch.watch(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
    for i in 0..WATCHERS {
        let create = WatchCreateRequest { key: format!("w/{i:05}").into(), ..Default::default() };
        tx.send(WatchRequest { request_union: Some(watch_request::RequestUnion::CreateRequest(create)) }).await?;
    }
    let mut ids = std::collections::HashSet::new();
    for _ in 0..WATCHERS {
        let resp = events.message().await?.ok_or_else(|| anyhow::anyhow!("stream ended"))?;
        assert!(resp.created && !resp.canceled, "{resp:?}");
        ids.insert(resp.watch_id);
    }
    assert_eq!(ids.len(), WATCHERS, "every watcher has its own id");
    // The last one created gets its key.
    let mut kv = KvClient::connect(url).await?;
    kv.put(PutRequest { key: format!("w/{:05}", WATCHERS - 1).into(), value: "x".into(), ..Default::default() })
        .await?;
    let resp = events.message().await?.ok_or_else(|| anyhow::anyhow!("stream ended"))?;
    assert_eq!(resp.events.len(), 1);
    assert_eq!(resp.watch_id, (WATCHERS - 1) as i64);
    Ok(())
}
