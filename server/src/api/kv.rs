//! etcdserverpb.KV: validation as etcd's v3rpc layer does it, reads from
//! local state (after a linearizable barrier unless serializable), writes
//! through Raft.

use std::sync::Arc;

use keel_proto::etcdserverpb::kv_server::Kv;
use keel_proto::etcdserverpb::{
    request_op::Request, CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, RequestOp, TxnRequest, TxnResponse,
};
use keel_proto::keelpb::{internal_request, internal_response::Response as Applied, InternalRequest};
use tonic::{Request as GrpcRequest, Response, Status};

use super::credentials::{self, authorized_read};
use crate::apply::kv as semantics;
use crate::auth::AuthInfo;
use crate::error::Error;

type Result<T, E = Error> = std::result::Result<T, E>;
use crate::server::Server;

pub struct KvService {
    server: Arc<Server>,
}

impl KvService {
    pub fn new(server: Arc<Server>) -> Self {
        Self { server }
    }
}

pub(crate) fn check_range(r: &RangeRequest) -> Result<()> {
    if r.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    Ok(())
}

pub(crate) fn check_put(r: &PutRequest) -> Result<()> {
    if r.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    if r.ignore_value && !r.value.is_empty() {
        return Err(Error::ValueProvided);
    }
    if r.ignore_lease && r.lease != 0 {
        return Err(Error::LeaseProvided);
    }
    Ok(())
}

pub(crate) fn check_delete(r: &DeleteRangeRequest) -> Result<()> {
    if r.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    Ok(())
}

fn check_op(op: &RequestOp, max_ops: i64) -> Result<()> {
    match &op.request {
        Some(Request::RequestRange(r)) => check_range(r),
        Some(Request::RequestPut(r)) => check_put(r),
        Some(Request::RequestDeleteRange(r)) => check_delete(r),
        Some(Request::RequestTxn(t)) => check_txn(t, max_ops),
        None => Err(Error::KeyNotFound),
    }
}

/// etcd's checkTxnRequest: op count against --max-txn-ops (nested txns
/// get what their parent did not use), keys present.
pub fn check_txn(t: &TxnRequest, max_ops: i64) -> Result<()> {
    let opc = t.compare.len().max(t.success.len()).max(t.failure.len()) as i64;
    if opc > max_ops {
        return Err(Error::TooManyOps);
    }
    if t.compare.iter().any(|c| c.key.is_empty()) {
        return Err(Error::EmptyKey);
    }
    for op in t.success.iter().chain(&t.failure) {
        check_op(op, max_ops - opc)?;
    }
    Ok(())
}

/// A half-open key interval; no `end` means a single key, an empty end
/// every key from `start`.
struct Interval<'a> {
    start: &'a [u8],
    end: Option<&'a [u8]>,
}

impl Interval<'_> {
    fn contains(&self, key: &[u8]) -> bool {
        match self.end {
            None => key == self.start,
            Some([]) => self.start <= key,
            Some(end) => self.start <= key && key < end,
        }
    }
}

/// etcd's checkIntervals: within one branch no two puts of the same key
/// and no put inside a deleted range, counting nested txns (whose two
/// branches may put the same key since only one runs).
fn check_intervals<'a>(ops: &'a [RequestOp]) -> Result<(Vec<&'a [u8]>, Vec<Interval<'a>>)> {
    let mut dels: Vec<Interval<'a>> = ops
        .iter()
        .filter_map(|op| match &op.request {
            Some(Request::RequestDeleteRange(d)) => {
                Some(Interval { start: &d.key, end: if d.range_end.is_empty() { None } else { Some(&d.range_end) } })
            }
            _ => None,
        })
        .collect();
    let mut puts: Vec<&'a [u8]> = Vec::new();
    let in_dels = |dels: &[Interval<'_>], k: &[u8]| dels.iter().any(|d| d.contains(k));
    for op in ops {
        let Some(Request::RequestTxn(t)) = &op.request else {
            continue;
        };
        let (puts_then, dels_then) = check_intervals(&t.success)?;
        let (puts_else, dels_else) = check_intervals(&t.failure)?;
        for k in &puts_then {
            if puts.contains(k) || in_dels(&dels, k) {
                return Err(Error::DuplicateKey);
            }
            puts.push(k);
        }
        for k in &puts_else {
            if (puts.contains(k) && !puts_then.contains(k)) || in_dels(&dels, k) {
                return Err(Error::DuplicateKey);
            }
            puts.push(k);
        }
        dels.extend(dels_then);
        dels.extend(dels_else);
    }
    for op in ops {
        let Some(Request::RequestPut(p)) = &op.request else {
            continue;
        };
        let k: &[u8] = &p.key;
        if puts.contains(&k) || in_dels(&dels, k) {
            return Err(Error::DuplicateKey);
        }
        puts.push(k);
    }
    Ok((puts, dels))
}

fn internal(who: Option<&AuthInfo>, req: internal_request::Request) -> InternalRequest {
    InternalRequest { header: who.and_then(AuthInfo::header), request: Some(req) }
}

/// Runs a read on the blocking pool, so a long range does not hold one of
/// the runtime's few worker threads; a `point` read (one key: an index
/// lookup and an engine get) runs in place, since the hand-off to the pool
/// and back cost more than the read (a third of the serializable one-key
/// read rate on two cores). The price: a point read arriving while the
/// apply loop holds the MVCC write lock (one write transaction, or a
/// compaction's index walk) waits for it on a runtime worker.
async fn read_off_the_runtime<T: Send + 'static>(
    point: bool,
    read: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    if point {
        return read();
    }
    tokio::task::spawn_blocking(read).await.map_err(|e| Error::Internal(e.to_string()))?
}

/// The KV operations with etcd's validation, for this service and for the
/// server-side lock and election recipes.
impl KvService {
    pub async fn range_inner(&self, r: RangeRequest, who: Option<&AuthInfo>) -> Result<RangeResponse> {
        check_range(&r)?;
        if self.server.alarms.is_active(keel_proto::etcdserverpb::AlarmType::Corrupt) {
            return Err(Error::Corrupt);
        }
        if !r.serializable {
            self.server.linearizable_barrier().await?;
        }
        let auth = self.server.auth.clone();
        let (key, end) = (r.key.clone(), r.range_end.clone());
        let mvcc = self.server.mvcc.clone();
        let mut resp = authorized_read(
            &self.server,
            who,
            |who| auth.check_read(who, &key, &end),
            || read_off_the_runtime(r.range_end.is_empty(), move || semantics::range(&mvcc.read()?, &r)),
        )
        .await?;
        self.server.fill_header(&mut resp.header);
        Ok(resp)
    }

    pub async fn txn_inner(&self, t: TxnRequest, who: Option<&AuthInfo>) -> Result<TxnResponse> {
        check_txn(&t, self.server.settings.max_txn_ops as i64)?;
        check_intervals(&t.success)?;
        check_intervals(&t.failure)?;
        if semantics::is_txn_readonly(&t) {
            if !semantics::is_txn_serializable(&t) {
                self.server.linearizable_barrier().await?;
            }
            let mvcc = self.server.mvcc.clone();
            let auth = self.server.auth.clone();
            let checked = t.clone();
            let mut resp = authorized_read(
                &self.server,
                who,
                |who| auth.check_txn(who, &checked),
                || read_off_the_runtime(false, move || semantics::txn_read(&mvcc.read()?, &t)),
            )
            .await?;
            self.server.fill_header(&mut resp.header);
            return Ok(resp);
        }
        match self.server.propose(internal(who, internal_request::Request::Txn(t))).await?.response {
            Some(Applied::Txn(mut resp)) => {
                self.server.fill_header(&mut resp.header);
                Ok(resp)
            }
            other => Err(Error::Internal(format!("unexpected apply result {other:?}"))),
        }
    }
}

impl KvService {
    pub async fn put_inner(&self, p: PutRequest, who: Option<&AuthInfo>) -> Result<PutResponse> {
        check_put(&p)?;
        match self.server.propose(internal(who, internal_request::Request::Put(p))).await?.response {
            Some(Applied::Put(mut resp)) => {
                self.server.fill_header(&mut resp.header);
                Ok(resp)
            }
            other => Err(Error::Internal(format!("unexpected apply result {other:?}"))),
        }
    }

    pub async fn delete_inner(&self, d: DeleteRangeRequest, who: Option<&AuthInfo>) -> Result<DeleteRangeResponse> {
        check_delete(&d)?;
        match self.server.propose(internal(who, internal_request::Request::DeleteRange(d))).await?.response {
            Some(Applied::DeleteRange(mut resp)) => {
                self.server.fill_header(&mut resp.header);
                Ok(resp)
            }
            other => Err(Error::Internal(format!("unexpected apply result {other:?}"))),
        }
    }
}

#[tonic::async_trait]
impl Kv for KvService {
    type RangeStreamStream = super::range_stream::ChunkStream;

    async fn range_stream(&self, req: GrpcRequest<RangeRequest>) -> Result<Response<Self::RangeStreamStream>, Status> {
        if crate::version::minor(&self.server.settings.etcd_version) < 7 {
            return Err(Status::unimplemented("unknown method RangeStream for service etcdserverpb.KV"));
        }
        let who = credentials::auth_info(&self.server, &req).await?;
        let r = req.into_inner();
        super::range_stream::check(&r)?;
        Ok(Response::new(super::range_stream::start(self.server.clone(), r, who)))
    }

    async fn range(&self, req: GrpcRequest<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let who = credentials::auth_info(&self.server, &req).await?;
        Ok(Response::new(self.range_inner(req.into_inner(), who.as_ref()).await?))
    }

    async fn put(&self, req: GrpcRequest<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let who = credentials::auth_info(&self.server, &req).await?;
        Ok(Response::new(self.put_inner(req.into_inner(), who.as_ref()).await?))
    }

    async fn delete_range(
        &self,
        req: GrpcRequest<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let who = credentials::auth_info(&self.server, &req).await?;
        Ok(Response::new(self.delete_inner(req.into_inner(), who.as_ref()).await?))
    }

    async fn txn(&self, req: GrpcRequest<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let who = credentials::auth_info(&self.server, &req).await?;
        Ok(Response::new(self.txn_inner(req.into_inner(), who.as_ref()).await?))
    }

    async fn compact(&self, req: GrpcRequest<CompactionRequest>) -> Result<Response<CompactionResponse>, Status> {
        let who = credentials::auth_info(&self.server, &req).await?;
        let c = req.into_inner();
        let physical = c.physical;
        match self.server.propose(internal(who.as_ref(), internal_request::Request::Compaction(c))).await?.response {
            Some(Applied::Compaction(mut resp)) => {
                if physical {
                    let mvcc = self.server.mvcc.clone();
                    let rev = c.revision;
                    tokio::task::spawn_blocking(move || mvcc.wait_compaction(rev))
                        .await
                        .map_err(|e| Status::internal(e.to_string()))?;
                }
                self.server.fill_header(&mut resp.header);
                Ok(Response::new(resp))
            }
            other => Err(Error::Internal(format!("unexpected apply result {other:?}")).into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_proto::etcdserverpb::Compare;

    fn put(k: &str) -> RequestOp {
        RequestOp { request: Some(Request::RequestPut(PutRequest { key: k.to_string().into(), ..Default::default() })) }
    }

    fn del(k: &str, end: &str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                key: k.to_string().into(),
                range_end: end.to_string().into(),
                ..Default::default()
            })),
        }
    }

    fn txn(success: Vec<RequestOp>, failure: Vec<RequestOp>) -> RequestOp {
        RequestOp { request: Some(Request::RequestTxn(TxnRequest { compare: vec![], success, failure })) }
    }

    #[test]
    fn duplicate_puts_and_put_in_deleted_range_are_rejected() {
        assert_eq!(check_intervals(&[put("a"), put("a")]).err(), Some(Error::DuplicateKey));
        assert_eq!(check_intervals(&[del("a", "c"), put("b")]).err(), Some(Error::DuplicateKey));
        assert!(check_intervals(&[del("a", "c"), put("c")]).is_ok());
        assert_eq!(check_intervals(&[put("a"), txn(vec![put("a")], vec![])]).err(), Some(Error::DuplicateKey));
        // Both branches of a nested txn may write the same key.
        assert!(check_intervals(&[txn(vec![put("a")], vec![put("a")])]).is_ok());
        assert_eq!(check_intervals(&[del("a", ""), txn(vec![put("a")], vec![])]).err(), Some(Error::DuplicateKey));
    }

    #[test]
    fn op_count_limit_counts_the_widest_branch() {
        let t = TxnRequest { compare: vec![], success: (0..3).map(|i| put(&i.to_string())).collect(), failure: vec![] };
        assert!(check_txn(&t, 3).is_ok());
        assert_eq!(check_txn(&t, 2).err(), Some(Error::TooManyOps));
        let empty_compare = TxnRequest { compare: vec![Compare::default()], ..Default::default() };
        assert_eq!(check_txn(&empty_compare, 10).err(), Some(Error::EmptyKey));
    }
}
