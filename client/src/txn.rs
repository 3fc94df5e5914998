//! A small builder for etcd transactions.

use bytes::Bytes;
use keel_proto::etcdserverpb::{
    compare::{CompareResult, CompareTarget, TargetUnion},
    request_op::Request,
    Compare as PbCompare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};

/// One condition of a txn.
#[derive(Debug, Clone)]
pub struct Compare(pub PbCompare);

fn result(op: &str) -> CompareResult {
    match op {
        "!=" => CompareResult::NotEqual,
        ">" => CompareResult::Greater,
        "<" => CompareResult::Less,
        _ => CompareResult::Equal,
    }
}

impl Compare {
    fn new(key: impl Into<Bytes>, op: &str, target: CompareTarget, union: TargetUnion) -> Self {
        Compare(PbCompare {
            result: result(op) as i32,
            target: target as i32,
            key: key.into(),
            target_union: Some(union),
            range_end: Bytes::new(),
        })
    }

    /// `op` is one of "=", "!=", ">", "<".
    pub fn value(key: impl Into<Bytes>, op: &str, value: impl Into<Bytes>) -> Self {
        Self::new(key, op, CompareTarget::Value, TargetUnion::Value(value.into()))
    }

    pub fn version(key: impl Into<Bytes>, op: &str, version: i64) -> Self {
        Self::new(key, op, CompareTarget::Version, TargetUnion::Version(version))
    }

    pub fn create_revision(key: impl Into<Bytes>, op: &str, rev: i64) -> Self {
        Self::new(key, op, CompareTarget::Create, TargetUnion::CreateRevision(rev))
    }

    pub fn mod_revision(key: impl Into<Bytes>, op: &str, rev: i64) -> Self {
        Self::new(key, op, CompareTarget::Mod, TargetUnion::ModRevision(rev))
    }

    pub fn lease(key: impl Into<Bytes>, op: &str, lease: i64) -> Self {
        Self::new(key, op, CompareTarget::Lease, TargetUnion::Lease(lease))
    }
}

/// One operation of a txn branch.
#[derive(Debug, Clone)]
pub struct Op(pub RequestOp);

impl Op {
    pub fn get(key: impl Into<Bytes>) -> Self {
        Op(RequestOp { request: Some(Request::RequestRange(RangeRequest { key: key.into(), ..Default::default() })) })
    }

    pub fn range(req: RangeRequest) -> Self {
        Op(RequestOp { request: Some(Request::RequestRange(req)) })
    }

    pub fn put(key: impl Into<Bytes>, value: impl Into<Bytes>) -> Self {
        Op(RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: key.into(),
                value: value.into(),
                ..Default::default()
            })),
        })
    }

    pub fn put_with_lease(key: impl Into<Bytes>, value: impl Into<Bytes>, lease: i64) -> Self {
        Op(RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: key.into(),
                value: value.into(),
                lease,
                ..Default::default()
            })),
        })
    }

    pub fn delete(key: impl Into<Bytes>) -> Self {
        Op(RequestOp {
            request: Some(Request::RequestDeleteRange(DeleteRangeRequest { key: key.into(), ..Default::default() })),
        })
    }

    pub fn txn(t: Txn) -> Self {
        Op(RequestOp { request: Some(Request::RequestTxn(t.0)) })
    }
}

/// `if compares then success else failure`, applied atomically in one
/// revision.
#[derive(Debug, Clone, Default)]
pub struct Txn(pub TxnRequest);

impl Txn {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn when(mut self, compares: impl IntoIterator<Item = Compare>) -> Self {
        self.0.compare.extend(compares.into_iter().map(|c| c.0));
        self
    }

    pub fn and_then(mut self, ops: impl IntoIterator<Item = Op>) -> Self {
        self.0.success.extend(ops.into_iter().map(|o| o.0));
        self
    }

    pub fn or_else(mut self, ops: impl IntoIterator<Item = Op>) -> Self {
        self.0.failure.extend(ops.into_iter().map(|o| o.0));
        self
    }

    /// Whether the txn can only read (then it is safe to retry).
    pub fn is_read_only(&self) -> bool {
        self.0.success.iter().chain(&self.0.failure).all(|op| matches!(op.request, Some(Request::RequestRange(_))))
    }
}
