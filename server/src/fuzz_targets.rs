//! Hostile-input tests: property-based fuzzing of the paths that take
//! bytes or requests from outside (or from disk) and must answer with an
//! error, never a panic, a hang or unbounded allocation.
//!
//! Each target runs 256 inputs in `make test`; `make fuzz` runs each for a
//! bounded time (`KEEL_FUZZ_SECONDS`) and prints how many inputs it ran.
//! proptest, not cargo-fuzz: the machine's toolchain is stable Rust, and
//! proptest shrinks a failure to a minimal input.
//!
//! - `apply_*`: arbitrary KV and lease requests (nested txns, empty and
//!   inverted ranges, out-of-range enum values, huge revisions) through
//!   validation and apply; as one entry each and as batch entries, which
//!   must agree;
//! - `log_entry_decoder`, `peer_message_decoder`: Raft log records and
//!   peer messages from arbitrary bytes, and from valid ones with damage;
//! - `auth_store_survives_any_change_sequence`: arbitrary auth changes
//!   from arbitrary senders; the cached state always equals what a reload
//!   from storage gives;
//! - `snapshot_reader`: snapshot streams from arbitrary bytes;
//! - `http2_shim`: the inbound HTTP/2 frame rewriter on arbitrary frames;
//! - `client_request_decoder`: KV, watch, lease, auth and member requests
//!   decoded from arbitrary bytes and from damaged valid encodings, the KV
//!   ones then validated as the API layer does;
//! - `gateway_json_decoder`: the JSON gateway's request bodies from
//!   arbitrary text and from damaged valid JSON.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use keel_proto::etcdserverpb::compare::TargetUnion;
use keel_proto::etcdserverpb::{
    request_op, Compare, DeleteRangeRequest, LeaseGrantRequest, LeaseRevokeRequest, PutRequest, RangeRequest,
    RequestOp, TxnRequest,
};
use keel_proto::keelpb::{internal_request::Request, internal_response::Response, InternalBatch, InternalRequest};
use proptest::prelude::*;

use crate::apply::{Applier, CommitObserver, Compactor};
use crate::mvcc::CompactionJob;
use crate::raft::LogId;

/// Runs `test` on inputs drawn from `strategy`: `KEEL_FUZZ_CASES` of them
/// (default 256, what `make test` runs), or, with `KEEL_FUZZ_SECONDS`, in
/// rounds of that many until the time is up (what `make fuzz` runs for
/// each target). Prints how many inputs ran; a failure is shrunk to a
/// minimal input and fails the test.
fn fuzz<S: Strategy>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>) {
    let cases = std::env::var("KEEL_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    let budget = std::env::var("KEEL_FUZZ_SECONDS").ok().and_then(|v| v.parse().ok()).map(Duration::from_secs);
    let config = ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() };
    let start = Instant::now();
    let mut inputs: u64 = 0;
    loop {
        let mut runner = proptest::test_runner::TestRunner::new(config.clone());
        if let Err(failure) = runner.run(&strategy, &test) {
            panic!("fuzz target {name} failed after {inputs} inputs: {failure}");
        }
        inputs += u64::from(cases);
        if budget.is_none_or(|budget| start.elapsed() >= budget) {
            break;
        }
    }
    println!("fuzz target {name}: {inputs} inputs in {:.1} s", start.elapsed().as_secs_f64());
}

struct Ignore;

impl CommitObserver for Ignore {
    fn committed(&self, _rev: i64, _events: &[keel_proto::mvccpb::Event]) {}
}

impl Compactor for Ignore {
    fn schedule(&self, _job: CompactionJob) {}
}

fn applier() -> Result<Applier, TestCaseError> {
    crate::apply::in_memory_applier(Arc::new(Ignore), Arc::new(Ignore))
        .map(|(applier, _)| applier)
        .map_err(|e| TestCaseError::fail(e.to_string()))
}

fn key() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        Just(Bytes::new()),
        Just(Bytes::from_static(b"\0")),
        "[a-d]{1,2}".prop_map(Bytes::from),
        prop::collection::vec(any::<u8>(), 0..6).prop_map(Bytes::from),
    ]
}

fn revision() -> impl Strategy<Value = i64> {
    prop_oneof![Just(0i64), -2i64..40, Just(i64::MAX), Just(i64::MIN)]
}

fn compare() -> impl Strategy<Value = Compare> {
    let target = prop_oneof![
        Just(None),
        revision().prop_map(|v| Some(TargetUnion::Version(v))),
        revision().prop_map(|v| Some(TargetUnion::CreateRevision(v))),
        revision().prop_map(|v| Some(TargetUnion::ModRevision(v))),
        key().prop_map(|v| Some(TargetUnion::Value(v))),
        (-1i64..4).prop_map(|v| Some(TargetUnion::Lease(v))),
    ];
    (-1i32..6, -1i32..7, key(), key(), target).prop_map(|(result, target, key, range_end, target_union)| Compare {
        result,
        target,
        key,
        range_end,
        target_union,
    })
}

fn range() -> impl Strategy<Value = RangeRequest> {
    (key(), key(), -2i64..5, revision(), -1i32..4, -1i32..7, any::<[bool; 3]>(), revision(), revision()).prop_map(
        |(key, range_end, limit, revision, sort_order, sort_target, [serializable, keys_only, count_only], lo, hi)| {
            RangeRequest {
                key,
                range_end,
                limit,
                revision,
                sort_order,
                sort_target,
                serializable,
                keys_only,
                count_only,
                min_mod_revision: lo,
                max_mod_revision: hi,
                min_create_revision: lo,
                max_create_revision: hi,
            }
        },
    )
}

fn put() -> impl Strategy<Value = PutRequest> {
    (key(), key(), -1i64..4, any::<[bool; 3]>()).prop_map(
        |(key, value, lease, [prev_kv, ignore_value, ignore_lease])| PutRequest {
            key,
            value,
            lease,
            prev_kv,
            ignore_value,
            ignore_lease,
        },
    )
}

fn delete() -> impl Strategy<Value = DeleteRangeRequest> {
    (key(), key(), any::<bool>()).prop_map(|(key, range_end, prev_kv)| DeleteRangeRequest { key, range_end, prev_kv })
}

fn txn() -> impl Strategy<Value = TxnRequest> {
    let leaf = prop_oneof![
        Just(RequestOp { request: None }),
        range().prop_map(|r| RequestOp { request: Some(request_op::Request::RequestRange(r)) }),
        put().prop_map(|r| RequestOp { request: Some(request_op::Request::RequestPut(r)) }),
        delete().prop_map(|r| RequestOp { request: Some(request_op::Request::RequestDeleteRange(r)) }),
    ];
    let ops = leaf.prop_recursive(3, 24, 4, |inner| {
        (
            prop::collection::vec(compare(), 0..3),
            prop::collection::vec(inner.clone(), 0..4),
            prop::collection::vec(inner, 0..4),
        )
            .prop_map(|(compare, success, failure)| RequestOp {
                request: Some(request_op::Request::RequestTxn(TxnRequest { compare, success, failure })),
            })
    });
    (prop::collection::vec(compare(), 0..3), prop::collection::vec(ops.clone(), 0..4), prop::collection::vec(ops, 0..4))
        .prop_map(|(compare, success, failure)| TxnRequest { compare, success, failure })
}

fn request() -> impl Strategy<Value = InternalRequest> {
    prop_oneof![
        put().prop_map(Request::Put),
        delete().prop_map(Request::DeleteRange),
        txn().prop_map(Request::Txn),
        (1i64..4, -5i64..100).prop_map(|(id, ttl)| Request::LeaseGrant(LeaseGrantRequest { id, ttl })),
        (-1i64..4).prop_map(|id| Request::LeaseRevoke(LeaseRevokeRequest { id })),
    ]
    .prop_map(|r| InternalRequest { header: None, request: Some(r) })
}

fn auth_change() -> impl Strategy<Value = (Option<(String, u64)>, Request)> {
    use keel_proto::authpb::{Permission, UserAddOptions};
    use keel_proto::etcdserverpb::*;
    let name = || prop::sample::select(vec!["", "root", "a", "b"]).prop_map(String::from);
    let bytes = || prop::collection::vec(prop::sample::select(vec![0u8, b'a', b'b', 0xff]), 0..3).prop_map(Bytes::from);
    let perm =
        (-1i32..4, bytes(), bytes()).prop_map(|(perm_type, key, range_end)| Permission { perm_type, key, range_end });
    let change = prop_oneof![
        Just(Request::AuthEnable(AuthEnableRequest {})),
        Just(Request::AuthDisable(AuthDisableRequest {})),
        name().prop_map(|name| Request::Authenticate(keel_proto::keelpb::AuthenticateInternal {
            name,
            simple_token: "tok".into()
        })),
        (name(), any::<bool>()).prop_map(|(name, no_password)| Request::AuthUserAdd(AuthUserAddRequest {
            name,
            hashed_password: "$2b$04$invalidinvalidinvalidinvalidinvalidinvalidinvalidinval".into(),
            options: Some(UserAddOptions { no_password }),
            ..Default::default()
        })),
        name().prop_map(|name| Request::AuthUserDelete(AuthUserDeleteRequest { name })),
        name().prop_map(|name| Request::AuthUserChangePassword(AuthUserChangePasswordRequest {
            name,
            ..Default::default()
        })),
        (name(), name()).prop_map(|(user, role)| Request::AuthUserGrantRole(AuthUserGrantRoleRequest { user, role })),
        (name(), name()).prop_map(|(name, role)| Request::AuthUserRevokeRole(AuthUserRevokeRoleRequest { name, role })),
        name().prop_map(|name| Request::AuthRoleAdd(AuthRoleAddRequest { name })),
        name().prop_map(|role| Request::AuthRoleDelete(AuthRoleDeleteRequest { role })),
        (name(), prop::option::of(perm))
            .prop_map(|(name, perm)| Request::AuthRoleGrantPermission(AuthRoleGrantPermissionRequest { name, perm })),
        (name(), bytes(), bytes()).prop_map(|(role, key, range_end)| Request::AuthRoleRevokePermission(
            AuthRoleRevokePermissionRequest { role, key, range_end }
        )),
    ];
    (prop::option::of((name(), 0u64..12)), change)
}

fn log_id(index: u64) -> LogId {
    LogId::new(openraft::CommittedLeaderId::new(1, 1), index)
}

/// Validation never panics; apply never panics and never fails with a
/// storage error on a healthy engine, whatever it is given; batching
/// changes nothing.
#[test]
fn apply_survives_any_request_and_batches_agree() {
    fuzz("apply_survives_any_request_and_batches_agree", prop::collection::vec(request(), 1..12), |reqs| {
        for r in &reqs {
            if let Some(Request::Txn(t)) = &r.request {
                let _ = crate::api::kv::check_txn(t, 128);
            }
        }
        let single = applier()?;
        let mut expected = Vec::new();
        for (i, r) in reqs.iter().enumerate() {
            let resp = single.apply(&log_id(i as u64 + 1), r).map_err(|e| TestCaseError::fail(e.to_string()))?;
            expected.push(resp);
        }
        let batched = applier()?;
        let batch =
            InternalRequest { header: None, request: Some(Request::Batch(InternalBatch { requests: reqs.clone() })) };
        let resp = batched.apply(&log_id(1), &batch).map_err(|e| TestCaseError::fail(e.to_string()))?;
        match resp.response {
            Some(Response::Batch(b)) => prop_assert_eq!(b.responses, expected),
            other => prop_assert!(false, "batch answered {:?}", other),
        }
        prop_assert_eq!(batched.mvcc().current_rev(), single.mvcc().current_rev());
        Ok(())
    });
}

/// Log records: arbitrary bytes and damaged valid records are refused
/// (a damaged record never decodes to a different entry).
#[test]
fn log_entry_decoder() {
    fuzz(
        "log_entry_decoder",
        (prop::collection::vec(any::<u8>(), 0..256), any::<usize>(), 0u8..8),
        |(bytes, at, bit)| {
            let _ = crate::raft::log_store::decode_entry(1, &bytes);
            let entry = crate::raft::Entry {
                log_id: log_id(7),
                payload: openraft::EntryPayload::Normal(crate::raft::Command(InternalRequest {
                    header: None,
                    request: Some(Request::Put(PutRequest {
                        key: Bytes::from_static(b"k"),
                        value: Bytes::from(bytes.clone()),
                        ..Default::default()
                    })),
                })),
            };
            let mut record =
                crate::raft::log_store::encode_entry(&entry).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let at = at % record.len();
            record[at] ^= 1 << bit;
            prop_assert!(crate::raft::log_store::decode_entry(7, &record).is_err());
            Ok(())
        },
    );
}

/// Peer messages from arbitrary bytes: an error, not a panic or a huge
/// allocation (length prefixes are not trusted).
#[test]
fn peer_message_decoder() {
    fuzz("peer_message_decoder", prop::collection::vec(any::<u8>(), 0..512), |bytes| {
        let _ = crate::raft::codec::decode::<openraft::raft::AppendEntriesRequest<crate::raft::TypeConfig>>(&bytes);
        let _ = crate::raft::codec::decode::<openraft::raft::VoteRequest<u64>>(&bytes);
        let _ = crate::raft::codec::decode::<openraft::raft::InstallSnapshotRequest<crate::raft::TypeConfig>>(&bytes);
        let _ = <InternalRequest as prost::Message>::decode(bytes.as_slice());
        Ok(())
    });
}

/// Any sequence of auth changes from any sender applies without a
/// panic or storage error, and the cache always matches storage.
#[test]
fn auth_store_survives_any_change_sequence() {
    fuzz("auth_store_survives_any_change_sequence", prop::collection::vec(auth_change(), 1..24), |changes| {
        use crate::auth::tokens::TokenProvider;
        use crate::auth::{AuthInfo, AuthStore};
        use crate::storage::{SharedEngine, WriteBatch};
        let fail = |e: &dyn std::fmt::Display| TestCaseError::fail(e.to_string());
        let tokens = || TokenProvider::from_flag("simple", std::time::Duration::from_secs(60));
        let engine: SharedEngine = Arc::new(crate::storage::memory::MemoryEngine::new());
        let store = AuthStore::load(&engine, tokens().map_err(|e| fail(&e))?).map_err(|e| fail(&e))?;
        let probes: [(&[u8], &[u8]); 4] = [(b"a", b""), (b"a", b"b"), (b"\0", b"\0"), (b"b", b"\xff")];
        for (i, (sender, change)) in changes.iter().enumerate() {
            let who = sender
                .as_ref()
                .map(|(username, revision)| AuthInfo { username: username.clone(), revision: *revision })
                .unwrap_or_default();
            let mut batch = WriteBatch::new();
            if let Ok((_, update)) = store.apply(&who, change, i as u64 + 1, &mut batch) {
                engine.write(batch, false).map_err(|e| fail(&e))?;
                store.install(update);
            }
            let reloaded = AuthStore::load(&engine, tokens().map_err(|e| fail(&e))?).map_err(|e| fail(&e))?;
            prop_assert_eq!(reloaded.revision(), store.revision());
            prop_assert_eq!(reloaded.is_enabled(), store.is_enabled());
            for user in ["", "root", "a", "b"] {
                let who = AuthInfo { username: user.to_string(), revision: store.revision() };
                for (key, end) in probes {
                    prop_assert_eq!(reloaded.check_read(&who, key, end), store.check_read(&who, key, end));
                    prop_assert_eq!(reloaded.check_write(&who, key, end), store.check_write(&who, key, end));
                }
            }
        }
        Ok(())
    });
}

/// Snapshot streams from arbitrary bytes are refused cleanly.
#[test]
fn snapshot_reader() {
    fuzz("snapshot_reader", prop::collection::vec(any::<u8>(), 0..1024), |bytes| {
        let _ = crate::raft::snapshot_file::verify(bytes.as_slice());
        Ok(())
    });
}

/// The HTTP/2 shim on arbitrary frames after a valid preface: it
/// passes them on or fails the connection, never panics.
#[test]
fn http2_shim() {
    fuzz(
        "http2_shim",
        prop::collection::vec((any::<u8>(), any::<u8>(), 0u32..4, prop::collection::vec(any::<u8>(), 0..64)), 0..8),
        |frames| {
            let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
            for (ty, flags, stream, payload) in frames {
                let ty = ty % 10;
                input.extend_from_slice(&[
                    (payload.len() >> 16) as u8,
                    (payload.len() >> 8) as u8,
                    payload.len() as u8,
                    ty,
                    flags,
                ]);
                input.extend_from_slice(&stream.to_be_bytes());
                input.extend_from_slice(&payload);
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            rt.block_on(async {
                use tokio::io::AsyncReadExt;
                let mut shim = crate::transport::h2_authority::AuthorityFix::new(
                    input.as_slice(),
                    std::time::Duration::from_secs(5),
                );
                let mut out = Vec::new();
                let _ = shim.read_to_end(&mut out).await;
            });
            Ok(())
        },
    );
}

/// Valid client request bytes: an encoded txn (with every op kind)
/// followed by an encoded range request.
fn valid_client_request() -> impl Strategy<Value = Vec<u8>> {
    use prost::Message;
    (txn(), range()).prop_map(|(txn, range)| {
        let mut bytes = txn.encode_to_vec();
        bytes.extend(range.encode_to_vec());
        bytes
    })
}

/// Bytes as a client may send them: arbitrary, or a valid encoding with a
/// few bytes overwritten and the tail cut anywhere.
fn client_bytes(valid: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        (valid, prop::collection::vec((any::<usize>(), any::<u8>()), 0..4), any::<usize>()).prop_map(
            |(mut bytes, edits, cut)| {
                for (at, byte) in edits {
                    if !bytes.is_empty() {
                        let at = at % bytes.len();
                        bytes[at] = byte;
                    }
                }
                bytes.truncate(cut % (bytes.len() + 1));
                bytes
            }
        ),
    ]
}

/// Client requests from arbitrary bytes decode to an error or to a
/// request the API layer's validation answers, never a panic or a huge
/// allocation (declared lengths are not trusted).
#[test]
fn client_request_decoder() {
    use keel_proto::etcdserverpb::*;
    use prost::Message;
    fuzz("client_request_decoder", client_bytes(valid_client_request()), |bytes| {
        let bytes = bytes.as_slice();
        if let Ok(r) = RangeRequest::decode(bytes) {
            let _ = crate::api::kv::check_range(&r);
        }
        if let Ok(r) = PutRequest::decode(bytes) {
            let _ = crate::api::kv::check_put(&r);
        }
        if let Ok(r) = DeleteRangeRequest::decode(bytes) {
            let _ = crate::api::kv::check_delete(&r);
        }
        if let Ok(r) = TxnRequest::decode(bytes) {
            let _ = crate::api::kv::check_txn(&r, 128);
        }
        let _ = WatchRequest::decode(bytes);
        let _ = CompactionRequest::decode(bytes);
        let _ = LeaseGrantRequest::decode(bytes);
        let _ = LeaseKeepAliveRequest::decode(bytes);
        let _ = AuthenticateRequest::decode(bytes);
        let _ = AuthRoleGrantPermissionRequest::decode(bytes);
        let _ = MemberAddRequest::decode(bytes);
        Ok(())
    });
}

/// The gateway's JSON bodies: arbitrary text and damaged valid requests
/// give an error or a request, never a panic (serde_json's recursion
/// limit bounds nesting).
#[test]
fn gateway_json_decoder() {
    use keel_proto::etcdserverpb::*;
    let valid = (txn(), range()).prop_map(|(txn, range)| {
        let mut json = serde_json::to_vec(&txn).unwrap_or_default();
        json.extend(serde_json::to_vec(&range).unwrap_or_default());
        json
    });
    let text = prop_oneof!["[\\[\\]{}:,\"a-z0-9 .eE+-]{0,256}".prop_map(String::into_bytes), client_bytes(valid),];
    fuzz("gateway_json_decoder", text, |body| {
        if let Ok(t) = crate::http::gateway::decode::<TxnRequest>(&body) {
            let _ = crate::api::kv::check_txn(&t, 128);
        }
        let _ = crate::http::gateway::decode::<RangeRequest>(&body);
        let _ = crate::http::gateway::decode::<PutRequest>(&body);
        let _ = crate::http::gateway::decode_all::<WatchRequest>(&body);
        let _ = crate::http::gateway::decode_all::<LeaseKeepAliveRequest>(&body);
        let _ = crate::http::gateway::decode::<AuthenticateRequest>(&body);
        Ok(())
    });
}
