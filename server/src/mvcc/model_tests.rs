//! Property test: the MVCC store (through etcd's request semantics in
//! `apply::kv`) against a deliberately simple model of etcd: a full copy
//! of the key space after every revision. Random puts, deletes, txns,
//! compactions, historical ranges, and store re-opens (index rebuild) must
//! give identical answers.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use keel_proto::etcdserverpb::{
    compare, request_op, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use keel_proto::mvccpb::KeyValue;
use proptest::prelude::*;

use crate::apply::kv::{self, LeaseLookup};
use crate::error::Error;
use crate::mvcc::MvccStore;
use crate::storage::memory::MemoryEngine;
use crate::storage::{SharedEngine, WriteBatch};

struct AnyLease;
impl LeaseLookup for AnyLease {
    fn lease_exists(&self, _id: i64) -> bool {
        true
    }
}

#[derive(Debug, Clone)]
enum Op {
    Put {
        key: u8,
        value: u8,
        lease: i64,
    },
    Delete {
        key: u8,
        end: Option<u8>,
    },
    /// If version(key) == version then put(a) else delete(b).
    Txn {
        key: u8,
        version: i64,
        put: u8,
        del: u8,
    },
    Compact {
        back: i64,
    },
    Range {
        key: u8,
        end: Option<u8>,
        back: i64,
        limit: i64,
    },
    Reopen,
}

fn key(k: u8) -> Bytes {
    Bytes::from(format!("k{k}"))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..6, any::<u8>(), 0i64..3).prop_map(|(key, value, lease)| Op::Put { key, value, lease }),
        2 => (0u8..6, proptest::option::of(0u8..7)).prop_map(|(key, end)| Op::Delete { key, end }),
        2 => (0u8..6, 0i64..4, 0u8..6, 0u8..6).prop_map(|(key, version, put, del)| Op::Txn { key, version, put, del }),
        1 => (0i64..8).prop_map(|back| Op::Compact { back }),
        4 => (0u8..6, proptest::option::of(0u8..7), -1i64..10, 0i64..4)
            .prop_map(|(key, end, back, limit)| Op::Range { key, end, back, limit }),
        1 => Just(Op::Reopen),
    ]
}

/// etcd as a list of snapshots: `states[r]` is the key space at revision r.
struct Model {
    states: Vec<BTreeMap<Bytes, KeyValue>>,
    compact: i64,
}

impl Model {
    fn new() -> Self {
        // Revision 0 does not exist; a new store is at revision 1.
        Self { states: vec![BTreeMap::new(), BTreeMap::new()], compact: -1 }
    }

    fn rev(&self) -> i64 {
        self.states.len() as i64 - 1
    }

    fn cur(&self) -> &BTreeMap<Bytes, KeyValue> {
        &self.states[self.states.len() - 1]
    }

    fn in_range(k: &Bytes, start: &Bytes, end: &Option<Bytes>) -> bool {
        match end {
            None => k == start,
            Some(e) => k >= start && k < e,
        }
    }

    /// Applies one revision's worth of changes (None: no change).
    fn commit(&mut self, next: BTreeMap<Bytes, KeyValue>, changed: bool) {
        if changed {
            self.states.push(next);
        }
    }

    fn put(&self, state: &mut BTreeMap<Bytes, KeyValue>, k: Bytes, v: Bytes, lease: i64) {
        let rev = self.rev() + 1;
        let kv = match state.get(&k) {
            Some(old) => KeyValue {
                key: k.clone(),
                create_revision: old.create_revision,
                mod_revision: rev,
                version: old.version + 1,
                value: v,
                lease,
            },
            None => KeyValue { key: k.clone(), create_revision: rev, mod_revision: rev, version: 1, value: v, lease },
        };
        state.insert(k, kv);
    }

    fn range(
        &self,
        start: &Bytes,
        end: &Option<Bytes>,
        rev: i64,
        limit: i64,
    ) -> Result<(Vec<KeyValue>, i64, bool), Error> {
        if rev > self.rev() {
            return Err(Error::FutureRevision);
        }
        let at = if rev <= 0 { self.rev() } else { rev };
        if at < self.compact {
            return Err(Error::Compacted);
        }
        let all: Vec<KeyValue> = self.states[at as usize]
            .iter()
            .filter(|(k, _)| Self::in_range(k, start, end))
            .map(|(_, v)| v.clone())
            .collect();
        let count = all.len() as i64;
        let more = limit > 0 && all.len() > limit as usize;
        let kvs = if limit > 0 { all.into_iter().take(limit as usize).collect() } else { all };
        Ok((kvs, count, more))
    }
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let engine: SharedEngine = Arc::new(MemoryEngine::new());
    let mut store = MvccStore::open(engine.clone()).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut model = Model::new();
    for op in ops {
        match op {
            Op::Put { key: k, value, lease } => {
                let req = PutRequest { key: key(k), value: Bytes::from(vec![value]), lease, ..Default::default() };
                let mut txn = store.write().map_err(|e| TestCaseError::fail(e.to_string()))?;
                let resp = kv::put(&mut txn, &req).map_err(|e| TestCaseError::fail(e.to_string()))?;
                txn.commit().map_err(|e| TestCaseError::fail(e.to_string()))?;
                let mut next = model.cur().clone();
                model.put(&mut next, key(k), Bytes::from(vec![value]), lease);
                model.commit(next, true);
                prop_assert_eq!(resp.header.map(|h| h.revision), Some(model.rev()));
            }
            Op::Delete { key: k, end } => {
                let req =
                    DeleteRangeRequest { key: key(k), range_end: end.map(key).unwrap_or_default(), prev_kv: true };
                let mut txn = store.write().map_err(|e| TestCaseError::fail(e.to_string()))?;
                let resp = kv::delete_range(&mut txn, &req).map_err(|e| TestCaseError::fail(e.to_string()))?;
                txn.commit().map_err(|e| TestCaseError::fail(e.to_string()))?;
                let mut next = model.cur().clone();
                let doomed: Vec<Bytes> =
                    next.keys().filter(|kk| Model::in_range(kk, &key(k), &end.map(key))).cloned().collect();
                let prev: Vec<KeyValue> = doomed.iter().filter_map(|d| next.remove(d)).collect();
                model.commit(next, !prev.is_empty());
                prop_assert_eq!(resp.deleted, prev.len() as i64);
                prop_assert_eq!(resp.prev_kvs, prev);
                prop_assert_eq!(resp.header.map(|h| h.revision), Some(model.rev()));
            }
            Op::Txn { key: k, version, put, del } => {
                let req = TxnRequest {
                    compare: vec![keel_proto::etcdserverpb::Compare {
                        result: compare::CompareResult::Equal as i32,
                        target: compare::CompareTarget::Version as i32,
                        key: key(k),
                        target_union: Some(compare::TargetUnion::Version(version)),
                        range_end: Bytes::new(),
                    }],
                    success: vec![RequestOp {
                        request: Some(request_op::Request::RequestPut(PutRequest {
                            key: key(put),
                            value: Bytes::from_static(b"t"),
                            ..Default::default()
                        })),
                    }],
                    failure: vec![RequestOp {
                        request: Some(request_op::Request::RequestDeleteRange(DeleteRangeRequest {
                            key: key(del),
                            ..Default::default()
                        })),
                    }],
                };
                let mut txn = store.write().map_err(|e| TestCaseError::fail(e.to_string()))?;
                let resp = kv::txn_write(&mut txn, &req, &AnyLease).map_err(|e| TestCaseError::fail(e.to_string()))?;
                txn.commit().map_err(|e| TestCaseError::fail(e.to_string()))?;
                let cur_version = model.cur().get(&key(k)).map_or(0, |kv| kv.version);
                let mut next = model.cur().clone();
                let ok = cur_version == version;
                let changed = if ok {
                    model.put(&mut next, key(put), Bytes::from_static(b"t"), 0);
                    true
                } else {
                    next.remove(&key(del)).is_some()
                };
                model.commit(next, changed);
                prop_assert_eq!(resp.succeeded, ok);
                prop_assert_eq!(resp.header.map(|h| h.revision), Some(model.rev()));
            }
            Op::Compact { back } => {
                let at = model.rev() - back;
                let mut b = WriteBatch::new();
                let got = store.compact(at, &mut b);
                let want = if at <= model.compact { Err(Error::Compacted) } else { Ok(()) };
                match got {
                    Ok(job) => {
                        prop_assert_eq!(want, Ok(()));
                        engine.write(b, false).map_err(|e| TestCaseError::fail(e.to_string()))?;
                        store.finish_compaction(job).map_err(|e| TestCaseError::fail(e.to_string()))?;
                        model.compact = at;
                    }
                    Err(e) => prop_assert_eq!(want, Err(e)),
                }
            }
            Op::Range { key: k, end, back, limit } => {
                let rev = if back < 0 {
                    model.rev() + 1
                } else if back == 0 {
                    0
                } else {
                    model.rev() - back + 1
                };
                let req = RangeRequest {
                    key: key(k),
                    range_end: end.map(key).unwrap_or_default(),
                    revision: rev,
                    limit,
                    ..Default::default()
                };
                let got = kv::range(&store.read().map_err(|e| TestCaseError::fail(e.to_string()))?, &req);
                let want = model.range(&key(k), &end.map(key), rev, limit);
                match (got, want) {
                    (Ok(g), Ok((kvs, count, more))) => {
                        prop_assert_eq!(g.kvs, kvs);
                        prop_assert_eq!(g.count, count);
                        prop_assert_eq!(g.more, more);
                        prop_assert_eq!(g.header.map(|h| h.revision), Some(model.rev()));
                    }
                    (Err(g), Err(w)) => prop_assert_eq!(g, w),
                    (g, w) => prop_assert!(false, "store {:?} vs model {:?}", g.map(|r| r.count), w.map(|r| r.1)),
                }
            }
            Op::Reopen => {
                drop(store);
                store = MvccStore::open(engine.clone()).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(store.current_rev(), model.rev());
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn mvcc_matches_model(ops in proptest::collection::vec(op(), 1..80)) {
        run(ops)?;
    }
}
