//! Applying committed Raft entries to the state machine. Every member runs
//! the same entries through this code in the same order and must reach
//! the same state and the same answer, so nothing here may depend on time,
//! randomness or local configuration that differs between members.
//!
//! Each entry's effects and the "applied" log id are one engine write
//! batch: after a crash the state machine is exactly at some entry
//! boundary, and Raft re-applies the rest from the log.

pub mod gosort;
pub mod kv;

use std::sync::Arc;

use keel_proto::etcdserverpb::{
    alarm_request::AlarmAction, request_op, AlarmResponse, AlarmType, CompactionResponse, LeaseCheckpointResponse,
    LeaseGrantResponse, LeaseRevokeResponse, ResponseHeader, TxnRequest,
};
use keel_proto::keelpb::{
    internal_request::Request, internal_response::Response, ApplyError, Empty, InternalBatchResponse, InternalRequest,
    InternalResponse, MemberAttributes,
};
use keel_proto::mvccpb::Event;

use crate::alarm::AlarmStore;
use crate::auth::{is_auth_request, AuthInfo, AuthStore};
use crate::cluster::MemberRegistry;
use crate::error::Error;
use crate::lease::Lessor;
use crate::mvcc::{Committed, CompactionJob, MvccStore, WriteTxn};
use crate::raft_types::{codec, LogId, StoredMembership};
use crate::storage::keys::{META_APPLIED, META_MEMBERSHIP};
use crate::storage::{SharedEngine, StorageError, Table, WriteBatch};

/// Told about every committed revision, in order (the watch hub).
pub trait CommitObserver: Send + Sync {
    fn committed(&self, rev: i64, events: &[Event]);
}

/// Runs background work the apply loop must not wait for.
pub trait Compactor: Send + Sync {
    fn schedule(&self, job: CompactionJob);
}

pub struct Applier {
    engine: SharedEngine,
    mvcc: Arc<MvccStore>,
    members: Arc<MemberRegistry>,
    leases: Arc<Lessor>,
    alarms: Arc<AlarmStore>,
    auth: Arc<AuthStore>,
    observer: Arc<dyn CommitObserver>,
    compactor: Arc<dyn Compactor>,
}

/// The in-memory state the applier keeps current, each over the engine.
#[derive(Clone)]
pub struct Stores {
    pub mvcc: Arc<MvccStore>,
    pub members: Arc<MemberRegistry>,
    pub leases: Arc<Lessor>,
    pub alarms: Arc<AlarmStore>,
    pub auth: Arc<AuthStore>,
}

/// Whether any branch of a txn (nested ones included) puts a key.
pub fn txn_has_puts(t: &TxnRequest) -> bool {
    t.success.iter().chain(&t.failure).any(|op| match &op.request {
        Some(request_op::Request::RequestPut(_)) => true,
        Some(request_op::Request::RequestTxn(inner)) => txn_has_puts(inner),
        _ => false,
    })
}

/// Requests applied inside an MVCC write transaction (KV writes, and lease
/// grants and revocations, whose records and key deletions go in the same
/// engine write). Only these may share a batch entry.
pub fn runs_in_write_txn(req: &Request) -> bool {
    matches!(
        req,
        Request::Put(_) | Request::DeleteRange(_) | Request::Txn(_) | Request::LeaseGrant(_) | Request::LeaseRevoke(_)
    )
}

/// Who a request acts for; `None` when a member proposed it for itself.
fn requester(req: &InternalRequest) -> Option<AuthInfo> {
    match &req.header {
        Some(h) if h.internal => None,
        h => Some(AuthInfo::from_header(h.as_ref())),
    }
}

pub(crate) fn error_response(e: &Error, rev: i64) -> InternalResponse {
    let (kind, detail) = e.apply_code();
    InternalResponse { response: Some(Response::Error(ApplyError { kind, detail })), revision: rev }
}

fn storage_fatal(e: Error) -> StorageError {
    match e {
        Error::Storage(m) => StorageError::Io(m),
        other => StorageError::Io(other.to_string()),
    }
}

fn applied_put(batch: &mut WriteBatch, log_id: &LogId) -> Result<(), StorageError> {
    let v = codec::encode(log_id).map_err(|e| StorageError::Io(e.to_string()))?;
    batch.put(Table::Meta, META_APPLIED, v);
    Ok(())
}

impl Applier {
    pub fn new(
        engine: SharedEngine,
        stores: Stores,
        observer: Arc<dyn CommitObserver>,
        compactor: Arc<dyn Compactor>,
    ) -> Self {
        let Stores { mvcc, members, leases, alarms, auth } = stores;
        Self { engine, mvcc, members, leases, alarms, auth, observer, compactor }
    }

    /// etcd's authApplierV3 for KV and lease writes: the sender needs
    /// write permission on what a request changes (including every key
    /// attached to a lease it uses or revokes) and read permission on what
    /// it returns or compares.
    fn check_permission(&self, who: Option<&AuthInfo>, req: &Request) -> Result<(), Error> {
        let Some(who) = who else {
            return Ok(());
        };
        if !self.auth.is_enabled() {
            return Ok(());
        }
        let lease_keys_writable = |id: i64| -> Result<(), Error> {
            for key in self.leases.keys_to_revoke(id).unwrap_or_default() {
                self.auth.check_write(who, &key, &[])?;
            }
            Ok(())
        };
        match req {
            Request::Put(p) => {
                self.auth.check_write(who, &p.key, &[])?;
                lease_keys_writable(p.lease)?;
                if p.prev_kv {
                    self.auth.check_read(who, &p.key, &[])?;
                }
                Ok(())
            }
            Request::DeleteRange(d) => {
                self.auth.check_write(who, &d.key, &d.range_end)?;
                if d.prev_kv {
                    self.auth.check_read(who, &d.key, &d.range_end)?;
                }
                Ok(())
            }
            Request::Txn(t) => self.auth.check_txn(who, t),
            Request::LeaseRevoke(r) => lease_keys_writable(r.id),
            _ => Ok(()),
        }
    }

    /// What an active alarm forbids (etcd's capped and corrupt appliers):
    /// under CORRUPT every KV and lease change; under NOSPACE whatever
    /// adds data (puts, txns with puts, lease grants).
    fn refused_by_alarm(&self, req: &Request) -> Option<Error> {
        let kv_or_lease = matches!(
            req,
            Request::Put(_)
                | Request::DeleteRange(_)
                | Request::Txn(_)
                | Request::Compaction(_)
                | Request::LeaseGrant(_)
                | Request::LeaseRevoke(_)
        );
        if kv_or_lease && self.alarms.is_active(AlarmType::Corrupt) {
            return Some(Error::Corrupt);
        }
        if self.alarms.is_active(AlarmType::Nospace) {
            let adds = match req {
                Request::Put(_) | Request::LeaseGrant(_) => true,
                Request::Txn(t) => txn_has_puts(t),
                _ => false,
            };
            if adds {
                return Some(Error::NoSpace);
            }
        }
        None
    }

    pub fn mvcc(&self) -> &Arc<MvccStore> {
        &self.mvcc
    }

    /// Records `log_id` as applied with nothing else changed.
    pub fn apply_noop(&self, log_id: &LogId) -> Result<(), StorageError> {
        let mut b = WriteBatch::new();
        applied_put(&mut b, log_id)?;
        self.engine.write(b, false)
    }

    /// Applies a membership entry: members that left it are recorded as
    /// removed (and lose their records) in the same batch.
    pub fn apply_membership(&self, log_id: &LogId, m: &StoredMembership) -> Result<(), StorageError> {
        let previous: Option<StoredMembership> = match self.engine.get(Table::Meta, META_MEMBERSHIP)? {
            Some(v) => Some(codec::decode(&v).map_err(|e| StorageError::Corruption(e.to_string()))?),
            None => None,
        };
        let mut b = WriteBatch::new();
        applied_put(&mut b, log_id)?;
        b.put(Table::Meta, META_MEMBERSHIP, codec::encode(m).map_err(|e| StorageError::Io(e.to_string()))?);
        let removed: Vec<u64> = match &previous {
            Some(prev) => prev
                .membership()
                .nodes()
                .map(|(id, _)| *id)
                .filter(|id| m.membership().get_node(id).is_none())
                .collect(),
            None => Vec::new(),
        };
        self.members.record_removed(&removed, &mut b);
        self.engine.write(b, false)?;
        if !removed.is_empty() {
            let ids: Vec<String> = removed.iter().map(|id| format!("{id:x}")).collect();
            tracing::info!(removed = ?ids, "removed members from the cluster");
        }
        self.members.reload(&self.engine)
    }

    /// Writes a member record change (publish, add, promote) with the
    /// entry's applied id.
    fn apply_member_record(&self, log_id: &LogId, attrs: MemberAttributes) -> Result<InternalResponse, StorageError> {
        let mut b = WriteBatch::new();
        applied_put(&mut b, log_id)?;
        self.members.put(&attrs, &mut b);
        self.engine.write(b, false)?;
        self.members.reload(&self.engine)?;
        Ok(InternalResponse { response: Some(Response::Empty(Empty {})), revision: self.mvcc.current_rev() })
    }

    /// Runs a KV write inside one write transaction; an etcd error leaves
    /// the store unchanged but still records the entry as applied.
    fn kv_write<F>(&self, log_id: &LogId, f: F) -> Result<InternalResponse, StorageError>
    where
        F: FnOnce(&mut WriteTxn<'_>) -> Result<Response, Error>,
    {
        let mut txn = self.mvcc.write().map_err(storage_fatal)?;
        let outcome = f(&mut txn);
        if let Err(Error::Storage(m)) = &outcome {
            return Err(StorageError::Io(m.clone()));
        }
        if let (Err(e), true) = (&outcome, txn.has_changes()) {
            // Checks run before writes, so this should not happen; if an op
            // fails midway, nothing of the txn may be committed: drop it and
            // rebuild the index from storage, which never saw its writes.
            tracing::error!(error = %e, "txn failed after writing; rolling it back");
            drop(txn);
            self.mvcc.reload().map_err(storage_fatal)?;
            let mut b = WriteBatch::new();
            applied_put(&mut b, log_id)?;
            self.engine.write(b, false)?;
            return Ok(error_response(e, self.mvcc.current_rev()));
        }
        applied_put(txn.batch_mut(), log_id)?;
        let committed = self.commit(txn)?;
        Ok(match outcome {
            Ok(resp) => InternalResponse { response: Some(resp), revision: committed.rev },
            Err(e) => error_response(&e, committed.rev),
        })
    }

    /// Commits a write transaction and tells leases and watchers.
    fn commit(&self, txn: WriteTxn<'_>) -> Result<Committed, StorageError> {
        let committed = txn.commit().map_err(storage_fatal)?;
        self.leases.apply_key_changes(&committed.lease_changes);
        for (rev, events) in &committed.revisions {
            self.observer.committed(*rev, events);
        }
        Ok(committed)
    }

    /// One request of the kinds [`runs_in_write_txn`] accepts, inside
    /// `txn`.
    /// `who` is `None` for a member's own requests (no permission check).
    fn kv_op(&self, txn: &mut WriteTxn<'_>, who: Option<&AuthInfo>, req: &Request) -> Result<Response, Error> {
        self.check_permission(who, req)?;
        match req {
            Request::LeaseGrant(g) => {
                self.leases.grant(g.id, g.ttl, txn.batch_mut())?;
                Ok(Response::LeaseGrant(LeaseGrantResponse {
                    header: Some(ResponseHeader { revision: txn.write_rev(), ..Default::default() }),
                    id: g.id,
                    ttl: g.ttl,
                    error: String::new(),
                }))
            }
            Request::LeaseRevoke(r) => {
                let keys = self.leases.keys_to_revoke(r.id)?;
                // Every attached key goes in one revision, in key order.
                for key in &keys {
                    txn.delete_range(key, None);
                }
                self.leases.remove(r.id, txn.batch_mut());
                Ok(Response::LeaseRevoke(LeaseRevokeResponse {
                    header: Some(ResponseHeader { revision: txn.write_rev(), ..Default::default() }),
                }))
            }
            Request::Put(p) => {
                // A plain put checks its lease before anything else (a txn
                // checks keys first: see kv::check_put).
                if p.lease != 0 && !self.leases.exists(p.lease) {
                    return Err(Error::LeaseNotFound);
                }
                Ok(Response::Put(kv::put(txn, p)?))
            }
            Request::DeleteRange(d) => Ok(Response::DeleteRange(kv::delete_range(txn, d)?)),
            Request::Txn(t) => Ok(Response::Txn(kv::txn_write(txn, t, &*self.leases)?)),
            _ => Err(Error::Unimplemented("this request in a write transaction")),
        }
    }

    /// Applies a batch entry: each request at its own revision, as if
    /// they were consecutive entries, but with their effects and the
    /// applied id in one engine write, so a crash never keeps part of a
    /// batch.
    fn apply_batch(&self, log_id: &LogId, reqs: &[InternalRequest]) -> Result<InternalResponse, StorageError> {
        // Requests that failed after writing (see kv_write): on a retry of
        // the whole batch they fail without running.
        let mut failed: Vec<(usize, Error)> = Vec::new();
        'attempt: loop {
            let mut txn = self.mvcc.write().map_err(storage_fatal)?;
            let mut outcomes = Vec::with_capacity(reqs.len());
            for (i, req) in reqs.iter().enumerate() {
                let outcome = match (failed.iter().find(|(at, _)| *at == i), req.request.as_ref()) {
                    (Some((_, e)), _) => Err(e.clone()),
                    (None, None) => Err(Error::Unimplemented("empty request")),
                    (None, Some(r)) => match self.refused_by_alarm(r) {
                        Some(refused) => Err(refused),
                        None => self.kv_op(&mut txn, requester(req).as_ref(), r),
                    },
                };
                if let Err(Error::Storage(m)) = &outcome {
                    return Err(StorageError::Io(m.clone()));
                }
                if let (Err(e), true) = (&outcome, txn.has_changes()) {
                    tracing::error!(error = %e, "txn failed after writing; rolling the batch back and retrying without it");
                    failed.push((i, e.clone()));
                    drop(txn);
                    self.mvcc.reload().map_err(storage_fatal)?;
                    self.leases.reload(&self.engine, &self.mvcc)?;
                    continue 'attempt;
                }
                self.leases.apply_key_changes(&txn.take_lease_changes());
                let rev = txn.seal_request();
                outcomes.push((outcome, rev));
            }
            applied_put(txn.batch_mut(), log_id)?;
            let committed = self.commit(txn)?;
            let responses = outcomes
                .into_iter()
                .map(|(outcome, rev)| match outcome {
                    Ok(resp) => InternalResponse { response: Some(resp), revision: rev },
                    Err(e) => error_response(&e, rev),
                })
                .collect();
            return Ok(InternalResponse {
                response: Some(Response::Batch(InternalBatchResponse { responses })),
                revision: committed.rev,
            });
        }
    }

    /// Applies one normal entry. `Err` means the member's storage failed
    /// and it must stop; etcd-level failures are in the response.
    pub fn apply(&self, log_id: &LogId, req: &InternalRequest) -> Result<InternalResponse, StorageError> {
        if let Some(refused) = req.request.as_ref().and_then(|r| self.refused_by_alarm(r)) {
            self.apply_noop(log_id)?;
            return Ok(error_response(&refused, self.mvcc.current_rev()));
        }
        match &req.request {
            Some(r) if runs_in_write_txn(r) => {
                let who = requester(req);
                self.kv_write(log_id, |txn| self.kv_op(txn, who.as_ref(), r))
            }
            Some(r) if is_auth_request(r) => {
                let who = AuthInfo::from_header(req.header.as_ref());
                let mut b = WriteBatch::new();
                applied_put(&mut b, log_id)?;
                let rev = self.mvcc.current_rev();
                match self.auth.apply(&who, r, log_id.index, &mut b) {
                    Ok((response, update)) => {
                        self.engine.write(b, false)?;
                        self.auth.install(update);
                        Ok(InternalResponse { response: Some(response), revision: rev })
                    }
                    Err(e) => {
                        self.apply_noop(log_id)?;
                        Ok(error_response(&e, rev))
                    }
                }
            }
            Some(Request::Batch(b)) => self.apply_batch(log_id, &b.requests),
            Some(Request::Compaction(c)) => {
                if let Some(who) = requester(req) {
                    if let Err(e) = self.auth.check_authenticated(&who) {
                        self.apply_noop(log_id)?;
                        return Ok(error_response(&e, self.mvcc.current_rev()));
                    }
                }
                let mut b = WriteBatch::new();
                applied_put(&mut b, log_id)?;
                let outcome = self.mvcc.compact(c.revision, &mut b);
                self.engine.write(b, false)?;
                let rev = self.mvcc.current_rev();
                Ok(match outcome {
                    Ok(job) => {
                        self.compactor.schedule(job);
                        InternalResponse {
                            response: Some(Response::Compaction(CompactionResponse {
                                header: Some(ResponseHeader { revision: rev, ..Default::default() }),
                            })),
                            revision: rev,
                        }
                    }
                    Err(Error::Storage(m)) => return Err(StorageError::Io(m)),
                    Err(e) => error_response(&e, rev),
                })
            }
            Some(Request::LeaseCheckpoint(c)) => {
                let mut b = WriteBatch::new();
                applied_put(&mut b, log_id)?;
                let cps: Vec<(i64, i64)> = c.checkpoints.iter().map(|cp| (cp.id, cp.remaining_ttl)).collect();
                self.leases.checkpoint(&cps, &mut b);
                self.engine.write(b, false)?;
                let rev = self.mvcc.current_rev();
                Ok(InternalResponse {
                    response: Some(Response::LeaseCheckpoint(LeaseCheckpointResponse {
                        header: Some(ResponseHeader { revision: rev, ..Default::default() }),
                    })),
                    revision: rev,
                })
            }
            Some(Request::Alarm(a)) => {
                let mut b = WriteBatch::new();
                applied_put(&mut b, log_id)?;
                let alarms = match AlarmAction::try_from(a.action).unwrap_or(AlarmAction::Get) {
                    AlarmAction::Get => self.alarms.members(a.alarm),
                    AlarmAction::Activate => {
                        let raised = self.alarms.activate(a.member_id, a.alarm, &mut b);
                        if raised.is_some() {
                            tracing::warn!(member_id = %format!("{:x}", a.member_id), alarm = a.alarm, "alarm raised");
                        }
                        raised.into_iter().collect()
                    }
                    AlarmAction::Deactivate => {
                        let cleared = self.alarms.deactivate(a.member_id, a.alarm, &mut b);
                        if cleared.is_some() {
                            tracing::info!(member_id = %format!("{:x}", a.member_id), alarm = a.alarm, "alarm cleared");
                        }
                        cleared.into_iter().collect()
                    }
                };
                self.engine.write(b, false)?;
                let rev = self.mvcc.current_rev();
                Ok(InternalResponse {
                    response: Some(Response::Alarm(AlarmResponse {
                        header: Some(ResponseHeader { revision: rev, ..Default::default() }),
                        alarms,
                    })),
                    revision: rev,
                })
            }
            Some(Request::PublishMember(attrs)) => {
                // Publishing sets name and client URLs; the learner flag
                // stays what MemberAdd/MemberPromote made it.
                let is_learner = self.members.get(attrs.member_id).is_some_and(|a| a.is_learner);
                self.apply_member_record(log_id, MemberAttributes { is_learner, ..attrs.clone() })
            }
            Some(Request::AddMember(attrs)) => self.apply_member_record(log_id, attrs.clone()),
            Some(Request::DowngradeInfoSet(d)) => {
                let mut b = WriteBatch::new();
                applied_put(&mut b, log_id)?;
                self.members.set_downgrade(d.enabled.then_some(d.target_version.as_str()), &mut b);
                self.engine.write(b, false)?;
                self.members.reload(&self.engine)?;
                Ok(InternalResponse { response: Some(Response::Empty(Empty {})), revision: self.mvcc.current_rev() })
            }
            Some(Request::PromoteMember(attrs)) => {
                let current = self.members.get(attrs.member_id).unwrap_or_else(|| attrs.clone());
                self.apply_member_record(log_id, MemberAttributes { is_learner: false, ..current })
            }
            other => {
                self.apply_noop(log_id)?;
                let name = match other {
                    None => "empty request",
                    Some(_) => "this request",
                };
                Ok(error_response(&Error::Unimplemented(name), self.mvcc.current_rev()))
            }
        }
    }
}

/// An applier over a fresh in-memory engine, for tests.
#[cfg(test)]
pub(crate) fn in_memory_applier(
    observer: Arc<dyn CommitObserver>,
    compactor: Arc<dyn Compactor>,
) -> anyhow::Result<(Applier, SharedEngine)> {
    let engine: SharedEngine = Arc::new(crate::storage::memory::MemoryEngine::new());
    let mvcc = Arc::new(MvccStore::open(engine.clone())?);
    let members = Arc::new(MemberRegistry::load(&engine)?);
    let leases = Arc::new(Lessor::load(&engine, &mvcc)?);
    let alarms = Arc::new(AlarmStore::load(&engine)?);
    let tokens = crate::auth::tokens::TokenProvider::from_flag("simple", std::time::Duration::from_secs(300))?;
    let auth = Arc::new(AuthStore::load(&engine, tokens)?);
    let applier = Applier::new(engine.clone(), Stores { mvcc, members, leases, alarms, auth }, observer, compactor);
    Ok((applier, engine))
}

#[cfg(test)]
mod batch_tests {
    use std::sync::Mutex;

    use keel_proto::etcdserverpb::{
        compare, request_op, Compare, DeleteRangeRequest, LeaseGrantRequest, LeaseRevokeRequest, PutRequest, RequestOp,
        TxnRequest,
    };
    use keel_proto::keelpb::InternalBatch;

    use super::*;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(i64, Vec<Event>)>>);

    impl CommitObserver for Recorder {
        fn committed(&self, rev: i64, events: &[Event]) {
            if let Ok(mut seen) = self.0.lock() {
                seen.push((rev, events.to_vec()));
            }
        }
    }

    impl Compactor for Recorder {
        fn schedule(&self, _job: CompactionJob) {}
    }

    struct Member {
        applier: Applier,
        engine: SharedEngine,
        recorder: Arc<Recorder>,
        next_index: u64,
    }

    fn member() -> Result<Member, Box<dyn std::error::Error>> {
        let recorder = Arc::new(Recorder::default());
        let (applier, engine) = in_memory_applier(recorder.clone(), recorder.clone())?;
        Ok(Member { applier, engine, recorder, next_index: 1 })
    }

    impl Member {
        fn apply(&mut self, req: InternalRequest) -> Result<InternalResponse, StorageError> {
            let log_id = LogId::new(openraft::CommittedLeaderId::new(1, 1), self.next_index);
            self.next_index += 1;
            self.applier.apply(&log_id, &req)
        }
    }

    fn req(r: Request) -> InternalRequest {
        InternalRequest { header: None, request: Some(r) }
    }

    /// A deterministic mix of puts, deletes, txns, lease grants and
    /// revocations over a few keys and leases, including requests that
    /// fail (unknown lease, duplicate grant).
    fn workload(n: usize) -> Vec<InternalRequest> {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        (0..n)
            .map(|i| {
                let key = format!("k{}", next() % 5).into_bytes();
                let lease = 100 + (next() % 3) as i64;
                let r = match next() % 8 {
                    5 => Request::LeaseGrant(LeaseGrantRequest { id: lease, ttl: 60 }),
                    6 => Request::LeaseRevoke(LeaseRevokeRequest { id: lease }),
                    7 => Request::Put(PutRequest {
                        key: key.into(),
                        value: b"l".to_vec().into(),
                        lease,
                        ..Default::default()
                    }),
                    0 => Request::DeleteRange(DeleteRangeRequest {
                        key: b"k".to_vec().into(),
                        range_end: b"k2".to_vec().into(),
                        prev_kv: true,
                    }),
                    1 => Request::Txn(TxnRequest {
                        compare: vec![Compare {
                            key: key.clone().into(),
                            result: compare::CompareResult::Greater as i32,
                            target: compare::CompareTarget::Version as i32,
                            target_union: Some(compare::TargetUnion::Version(1)),
                            ..Default::default()
                        }],
                        success: vec![RequestOp {
                            request: Some(request_op::Request::RequestDeleteRange(DeleteRangeRequest {
                                key: key.clone().into(),
                                ..Default::default()
                            })),
                        }],
                        failure: vec![RequestOp {
                            request: Some(request_op::Request::RequestPut(PutRequest {
                                key: key.clone().into(),
                                value: format!("t{i}").into_bytes().into(),
                                ..Default::default()
                            })),
                        }],
                    }),
                    2 => Request::Put(PutRequest {
                        key: key.into(),
                        value: b"x".to_vec().into(),
                        lease: 77,
                        ..Default::default()
                    }),
                    _ => Request::Put(PutRequest {
                        key: key.into(),
                        value: format!("v{i}").into_bytes().into(),
                        prev_kv: true,
                        ..Default::default()
                    }),
                };
                req(r)
            })
            .collect()
    }

    /// Applying requests in batch entries must be indistinguishable from
    /// applying them one entry each: same responses, same revisions, same
    /// watch events, same stored history.
    #[test]
    fn a_batch_applies_like_consecutive_entries() -> Result<(), Box<dyn std::error::Error>> {
        let requests = workload(300);
        let mut single = member()?;
        let mut batched = member()?;
        let mut expected = Vec::new();
        for r in &requests {
            expected.push(single.apply(r.clone())?);
        }
        let mut got = Vec::new();
        let mut sizes = [1usize, 7, 2, 31, 64].iter().cycle();
        let mut rest = requests.as_slice();
        while !rest.is_empty() {
            let n = (*sizes.next().ok_or("sizes")?).min(rest.len());
            let (chunk, tail) = rest.split_at(n);
            rest = tail;
            let resp = batched.apply(req(Request::Batch(InternalBatch { requests: chunk.to_vec() })))?;
            match resp.response {
                Some(Response::Batch(b)) => {
                    assert_eq!(b.responses.len(), n);
                    got.extend(b.responses);
                }
                other => panic!("batch answered with {other:?}"),
            }
        }
        assert_eq!(got, expected);
        assert!(expected.iter().any(|r| matches!(r.response, Some(Response::Error(_)))), "workload has failures");
        let events = |m: &Member| m.recorder.0.lock().map(|e| e.clone()).unwrap_or_default();
        assert_eq!(events(&batched), events(&single));
        let rev = single.applier.mvcc().current_rev();
        assert!(rev > 100, "workload wrote {rev} revisions");
        assert_eq!(batched.applier.mvcc().current_rev(), rev);
        assert_eq!(batched.applier.mvcc().hash_kv(0)?, single.applier.mvcc().hash_kv(0)?);
        let leases = |m: &Member| {
            let mut ids = m.applier.leases.leases();
            ids.sort();
            ids.into_iter().map(|id| m.applier.leases.time_to_live(id, true).map(|l| l.keys)).collect::<Vec<_>>()
        };
        assert_eq!(leases(&batched), leases(&single));
        // Some revocation deleted keys attached earlier in the same batch
        // or before it.
        let deleting_revocations = (1..requests.len())
            .filter(|&i| {
                matches!(requests[i].request, Some(Request::LeaseRevoke(_)))
                    && matches!(expected[i].response, Some(Response::LeaseRevoke(_)))
                    && expected[i].revision > expected[i - 1].revision
            })
            .count();
        assert!(deleting_revocations > 0, "no revocation deleted a key");
        Ok(())
    }

    /// A batch is one engine write: its requests' records and the applied
    /// id land together (a crash keeps all of it or none).
    #[test]
    fn a_batch_is_one_engine_write_with_its_applied_id() -> Result<(), Box<dyn std::error::Error>> {
        let mut m = member()?;
        let before = m.engine.get(Table::Meta, META_APPLIED)?;
        assert!(before.is_none());
        let puts: Vec<_> = (0..10)
            .map(|i| req(Request::Put(PutRequest { key: format!("b{i}").into_bytes().into(), ..Default::default() })))
            .collect();
        let resp = m.apply(req(Request::Batch(InternalBatch { requests: puts })))?;
        let Some(Response::Batch(b)) = resp.response else { panic!("not a batch response") };
        let revs: Vec<i64> = b.responses.iter().map(|r| r.revision).collect();
        assert_eq!(revs, (2..12).collect::<Vec<_>>());
        assert_eq!(resp.revision, 11);
        let applied: LogId = codec::decode(&m.engine.get(Table::Meta, META_APPLIED)?.ok_or("no applied id")?)?;
        assert_eq!(applied.index, 1);
        let reopened = MvccStore::open(m.engine.clone())?;
        assert_eq!(reopened.current_rev(), 11);
        Ok(())
    }
}
