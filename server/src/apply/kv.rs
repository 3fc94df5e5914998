//! etcd's KV request semantics (etcdserver/apply.go) over an MVCC view:
//! Range with its sort/filter/limit rules, Put with ignore_value /
//! ignore_lease / prev_kv, DeleteRange, and Txn with compares, nested txns
//! and the "one revision per txn" rule. Used by the Raft apply loop for
//! writes and by the API layer for reads, so both follow one code path.

use std::cmp::Ordering;

use bytes::Bytes;
use keel_proto::etcdserverpb::{
    compare::{CompareResult, CompareTarget, TargetUnion},
    range_request::{SortOrder, SortTarget},
    request_op::Request,
    response_op::Response,
    Compare, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse, RangeRequest, RangeResponse, RequestOp,
    ResponseHeader, ResponseOp, TxnRequest, TxnResponse,
};
use keel_proto::mvccpb::KeyValue;

use crate::error::{Error, Result};
use crate::mvcc::{RangeOptions, ReadView, WriteTxn};

/// Whether a lease exists; the one place Put checks "requested lease not
/// found".
pub trait LeaseLookup {
    fn lease_exists(&self, id: i64) -> bool;
}

impl LeaseLookup for crate::lease::Lessor {
    fn lease_exists(&self, id: i64) -> bool {
        self.exists(id)
    }
}

/// etcd's range_end convention: absent -> single key; "\0" -> every key
/// from `key` (represented as an empty end).
pub fn range_end(end: &[u8]) -> Option<&[u8]> {
    match end {
        [] => None,
        [0] => Some(&[]),
        e => Some(e),
    }
}

fn header(rev: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader { revision: rev, ..Default::default() })
}

/// Serves a RangeRequest from `view` exactly as etcd's applier does.
pub fn range(view: &impl ReadView, r: &RangeRequest) -> Result<RangeResponse> {
    crate::metrics::RANGE_TOTAL.inc();
    let sort_order = SortOrder::try_from(r.sort_order).unwrap_or(SortOrder::None);
    let sort_target = SortTarget::try_from(r.sort_target).unwrap_or(SortTarget::Key);
    let filtered =
        r.min_mod_revision != 0 || r.max_mod_revision != 0 || r.min_create_revision != 0 || r.max_create_revision != 0;
    // Results come back in ascending key order; anything else needs every
    // key before truncating. One extra key tells whether there is `more`.
    let fetch_all = sort_order != SortOrder::None || filtered;
    let limit = if fetch_all || r.limit <= 0 { 0 } else { r.limit as usize + 1 };

    let mut rr =
        view.range(&r.key, range_end(&r.range_end), RangeOptions { limit, rev: r.revision, count_only: r.count_only })?;

    if r.max_mod_revision != 0 {
        rr.kvs.retain(|kv| kv.mod_revision <= r.max_mod_revision);
    }
    if r.min_mod_revision != 0 {
        rr.kvs.retain(|kv| kv.mod_revision >= r.min_mod_revision);
    }
    if r.max_create_revision != 0 {
        rr.kvs.retain(|kv| kv.create_revision <= r.max_create_revision);
    }
    if r.min_create_revision != 0 {
        rr.kvs.retain(|kv| kv.create_revision >= r.min_create_revision);
    }

    let order =
        if sort_target != SortTarget::Key && sort_order == SortOrder::None { SortOrder::Ascend } else { sort_order };
    if order != SortOrder::None {
        let cmp = |a: &KeyValue, b: &KeyValue| -> Ordering {
            match sort_target {
                SortTarget::Key => a.key.cmp(&b.key),
                SortTarget::Version => a.version.cmp(&b.version),
                SortTarget::Create => a.create_revision.cmp(&b.create_revision),
                SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
                SortTarget::Value => a.value.cmp(&b.value),
            }
        };
        crate::apply::gosort::sort(&mut rr.kvs, |a, b| match order {
            SortOrder::Descend => cmp(b, a) == Ordering::Less,
            _ => cmp(a, b) == Ordering::Less,
        });
    }

    let mut more = false;
    if r.limit > 0 && rr.kvs.len() > r.limit as usize {
        rr.kvs.truncate(r.limit as usize);
        more = true;
    }
    if r.keys_only {
        for kv in &mut rr.kvs {
            kv.value = Bytes::new();
        }
    }
    Ok(RangeResponse { header: header(rr.rev), kvs: rr.kvs, more, count: rr.count })
}

/// The latest value of a single key as the view sees it.
fn current(view: &impl ReadView, key: &[u8]) -> Result<Option<KeyValue>> {
    Ok(view.range(key, None, RangeOptions::default())?.kvs.into_iter().next())
}

/// Applies a PutRequest inside `txn`. Lease existence must be checked by
/// the caller (see [`check_put`]) before anything is written.
pub fn put(txn: &mut WriteTxn<'_>, p: &PutRequest) -> Result<PutResponse> {
    let mut value = p.value.clone();
    let mut lease = p.lease;
    let prev = if p.ignore_value || p.ignore_lease || p.prev_kv { current(txn, &p.key)? } else { None };
    if p.ignore_value || p.ignore_lease {
        let Some(prev) = &prev else {
            return Err(Error::KeyNotFound);
        };
        if p.ignore_value {
            value = prev.value.clone();
        }
        if p.ignore_lease {
            lease = prev.lease;
        }
    }
    txn.put(&p.key, value, lease);
    Ok(PutResponse { header: header(txn.write_rev()), prev_kv: if p.prev_kv { prev } else { None } })
}

pub fn delete_range(txn: &mut WriteTxn<'_>, d: &DeleteRangeRequest) -> Result<DeleteRangeResponse> {
    let end = range_end(&d.range_end);
    let prev_kvs = if d.prev_kv { txn.range(&d.key, end, RangeOptions::default())?.kvs } else { Vec::new() };
    let deleted = txn.delete_range(&d.key, end);
    Ok(DeleteRangeResponse { header: header(txn.write_rev()), deleted, prev_kvs })
}

/// The checks etcd makes before applying a put: ignore_* need an existing
/// key, and an attached lease must exist.
pub fn check_put(view: &impl ReadView, p: &PutRequest, leases: &impl LeaseLookup) -> Result<()> {
    if (p.ignore_value || p.ignore_lease) && current(view, &p.key)?.is_none() {
        return Err(Error::KeyNotFound);
    }
    if p.lease != 0 && !leases.lease_exists(p.lease) {
        return Err(Error::LeaseNotFound);
    }
    Ok(())
}

fn check_range(view: &impl ReadView, r: &RangeRequest) -> Result<()> {
    if r.revision == 0 {
        Ok(())
    } else if r.revision > view.rev() {
        Err(Error::FutureRevision)
    } else if r.revision < view.first_rev() {
        Err(Error::Compacted)
    } else {
        Ok(())
    }
}

/// Whether a txn can only read (etcd's isTxnReadonly: both branches).
pub fn is_txn_readonly(t: &TxnRequest) -> bool {
    t.success.iter().chain(&t.failure).all(|op| matches!(op.request, Some(Request::RequestRange(_))))
}

/// Whether every range of a read-only txn is serializable.
pub fn is_txn_serializable(t: &TxnRequest) -> bool {
    t.success.iter().chain(&t.failure).all(|op| match &op.request {
        Some(Request::RequestRange(r)) => r.serializable,
        _ => false,
    })
}

fn compare_kv(c: &Compare, kv: &KeyValue) -> bool {
    let target = CompareTarget::try_from(c.target).unwrap_or(CompareTarget::Version);
    let int_target = |v: Option<i64>| v.unwrap_or(0);
    let ord = match target {
        CompareTarget::Value => {
            let want: &[u8] = match &c.target_union {
                Some(TargetUnion::Value(v)) => v,
                _ => &[],
            };
            kv.value.as_ref().cmp(want)
        }
        CompareTarget::Create => kv.create_revision.cmp(&int_target(match c.target_union {
            Some(TargetUnion::CreateRevision(v)) => Some(v),
            _ => None,
        })),
        CompareTarget::Mod => kv.mod_revision.cmp(&int_target(match c.target_union {
            Some(TargetUnion::ModRevision(v)) => Some(v),
            _ => None,
        })),
        CompareTarget::Version => kv.version.cmp(&int_target(match c.target_union {
            Some(TargetUnion::Version(v)) => Some(v),
            _ => None,
        })),
        CompareTarget::Lease => kv.lease.cmp(&int_target(match c.target_union {
            Some(TargetUnion::Lease(v)) => Some(v),
            _ => None,
        })),
    };
    match CompareResult::try_from(c.result) {
        Ok(CompareResult::Equal) => ord == Ordering::Equal,
        Ok(CompareResult::NotEqual) => ord != Ordering::Equal,
        Ok(CompareResult::Greater) => ord == Ordering::Greater,
        Ok(CompareResult::Less) => ord == Ordering::Less,
        Err(_) => true,
    }
}

fn apply_compare(view: &impl ReadView, c: &Compare) -> bool {
    let Ok(rr) = view.range(&c.key, range_end(&c.range_end), RangeOptions::default()) else {
        return false;
    };
    if rr.kvs.is_empty() {
        // A missing key has no value to compare; everything else compares
        // against zero.
        if c.target == CompareTarget::Value as i32 {
            return false;
        }
        return compare_kv(c, &KeyValue::default());
    }
    rr.kvs.iter().all(|kv| compare_kv(c, kv))
}

/// The branch taken at each txn level, depth first (etcd's txnPath).
fn compare_path(view: &impl ReadView, t: &TxnRequest, path: &mut Vec<bool>) {
    let ok = t.compare.iter().all(|c| apply_compare(view, c));
    path.push(ok);
    let ops = if ok { &t.success } else { &t.failure };
    for op in ops {
        if let Some(Request::RequestTxn(inner)) = &op.request {
            compare_path(view, inner, path);
        }
    }
}

/// Visits the requests on the taken path; returns how many path entries
/// (nested txns) were consumed.
fn visit_path(t: &TxnRequest, path: &[bool], f: &mut dyn FnMut(&RequestOp) -> Result<()>) -> Result<usize> {
    let ops = if path[0] { &t.success } else { &t.failure };
    let mut used = 1;
    for op in ops {
        if let Some(Request::RequestTxn(inner)) = &op.request {
            used += visit_path(inner, &path[used..], f)?;
        } else {
            f(op)?;
        }
    }
    Ok(used)
}

/// Applies a read-only txn against a read view.
pub fn txn_read(view: &impl ReadView, t: &TxnRequest) -> Result<TxnResponse> {
    crate::metrics::TXN_TOTAL.inc();
    let mut path = Vec::new();
    compare_path(view, t, &mut path);
    visit_path(t, &path, &mut |op| match &op.request {
        Some(Request::RequestRange(r)) => check_range(view, r),
        _ => Ok(()),
    })?;
    let (resp, _) = exec_read(view, t, &path)?;
    Ok(TxnResponse { header: header(view.rev()), ..resp })
}

fn exec_read(view: &impl ReadView, t: &TxnRequest, path: &[bool]) -> Result<(TxnResponse, usize)> {
    let ops = if path[0] { &t.success } else { &t.failure };
    let mut used = 1;
    let mut responses = Vec::with_capacity(ops.len());
    for op in ops {
        let response = match &op.request {
            Some(Request::RequestRange(r)) => Some(Response::ResponseRange(range(view, r)?)),
            Some(Request::RequestTxn(inner)) => {
                let (resp, n) = exec_read(view, inner, &path[used..])?;
                used += n;
                Some(Response::ResponseTxn(TxnResponse { header: Some(ResponseHeader::default()), ..resp }))
            }
            _ => None,
        };
        responses.push(ResponseOp { response });
    }
    Ok((TxnResponse { header: None, succeeded: path[0], responses }, used))
}

/// Applies a txn that may write, inside the write transaction of its log
/// entry. Every check runs before the first write, so a failing txn
/// changes nothing.
pub fn txn_write(txn: &mut WriteTxn<'_>, t: &TxnRequest, leases: &impl LeaseLookup) -> Result<TxnResponse> {
    crate::metrics::TXN_TOTAL.inc();
    let mut path = Vec::new();
    compare_path(txn, t, &mut path);
    if !is_txn_readonly(t) {
        let view = &*txn;
        visit_path(t, &path, &mut |op| match &op.request {
            Some(Request::RequestPut(p)) => check_put(view, p, leases),
            _ => Ok(()),
        })?;
    }
    {
        let view = &*txn;
        visit_path(t, &path, &mut |op| match &op.request {
            Some(Request::RequestRange(r)) => check_range(view, r),
            _ => Ok(()),
        })?;
    }
    let (resp, _) = exec_write(txn, t, &path)?;
    Ok(TxnResponse { header: header(txn.write_rev()), ..resp })
}

fn exec_write(txn: &mut WriteTxn<'_>, t: &TxnRequest, path: &[bool]) -> Result<(TxnResponse, usize)> {
    let ops = if path[0] { &t.success } else { &t.failure };
    let mut used = 1;
    let mut responses = Vec::with_capacity(ops.len());
    for op in ops {
        let response = match &op.request {
            Some(Request::RequestRange(r)) => Some(Response::ResponseRange(range(txn, r)?)),
            Some(Request::RequestPut(p)) => Some(Response::ResponsePut(put(txn, p)?)),
            Some(Request::RequestDeleteRange(d)) => Some(Response::ResponseDeleteRange(delete_range(txn, d)?)),
            Some(Request::RequestTxn(inner)) => {
                let (resp, n) = exec_write(txn, inner, &path[used..])?;
                used += n;
                Some(Response::ResponseTxn(TxnResponse { header: Some(ResponseHeader::default()), ..resp }))
            }
            None => None,
        };
        responses.push(ResponseOp { response });
    }
    Ok((TxnResponse { header: None, succeeded: path[0], responses }, used))
}
