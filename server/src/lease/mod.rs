//! Leases (etcd's lessor).
//!
//! The replicated part is deterministic and runs in the apply loop:
//! granting, revoking (deleting every attached key in one revision) and
//! checkpointing remaining TTLs, plus tracking which keys are attached
//! (from every KV write's lease changes). It lives in the `lease` table.
//!
//! The timed part runs only on the leader: expiry times, keepalive
//! renewals, expiry detection (which proposes a revocation through Raft,
//! so every member deletes the same keys at the same revision) and
//! periodic checkpoints. A new leader gives every lease its remaining
//! TTL (checkpointed, or the full TTL) plus an election timeout, so a
//! leader change never expires a lease early. The leader's side of that
//! (the expiry and checkpoint loops, keepalives) is `duties::lease`.

mod ids;

pub use ids::LeaseIdGen;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use keel_proto::keelpb::LeaseRecord;
use prost::Message;

use crate::error::{Error, Result};
use crate::mvcc::MvccStore;
use crate::storage::{SharedEngine, StorageError, Table, WriteBatch};

/// etcd's maximum lease TTL (MaxLeaseTTL), in seconds.
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;

#[derive(Debug, Clone)]
struct Lease {
    ttl: i64,
    remaining_ttl: i64,
    /// When the lease expires; only the leader keeps one.
    expiry: Option<Instant>,
    keys: BTreeSet<Bytes>,
}

impl Lease {
    /// Seconds until expiry, rounded up, as etcd reports it.
    fn remaining(&self, now: Instant) -> i64 {
        match self.expiry {
            Some(e) if e > now => {
                let d = e - now;
                (d.as_secs() as i64) + i64::from(d.subsec_nanos() > 0)
            }
            Some(_) => 0,
            None => self.ttl,
        }
    }
}

#[derive(Default)]
struct State {
    leases: HashMap<i64, Lease>,
    primary: bool,
}

/// Snapshot of one lease for LeaseTimeToLive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseInfo {
    pub ttl: i64,
    pub granted_ttl: i64,
    pub keys: Vec<Bytes>,
}

pub struct Lessor {
    state: Mutex<State>,
}

fn lease_key(id: i64) -> [u8; 8] {
    (id as u64).to_be_bytes()
}

fn record(id: i64, l: &Lease) -> Vec<u8> {
    LeaseRecord { id, ttl: l.ttl, remaining_ttl: l.remaining_ttl }.encode_to_vec()
}

impl Lessor {
    /// Loads leases from the engine and attachments from the MVCC store.
    pub fn load(engine: &SharedEngine, mvcc: &MvccStore) -> std::result::Result<Self, StorageError> {
        let lessor = Self { state: Mutex::new(State::default()) };
        lessor.reload(engine, mvcc)?;
        Ok(lessor)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Rebuilds from storage (after a snapshot install). Expiry times are
    /// reset as for a new leader if this member leads.
    pub fn reload(&self, engine: &SharedEngine, mvcc: &MvccStore) -> std::result::Result<(), StorageError> {
        let mut leases = HashMap::new();
        engine.scan(Table::Lease, &[], None, &mut |_, v| {
            let r = LeaseRecord::decode(v).map_err(|e| StorageError::Corruption(format!("lease record: {e}")))?;
            leases.insert(
                r.id,
                Lease { ttl: r.ttl, remaining_ttl: r.remaining_ttl, expiry: None, keys: BTreeSet::new() },
            );
            Ok(true)
        })?;
        let live = mvcc.live_keys_with_lease(b"\0", Some(&[])).map_err(|e| StorageError::Io(e.to_string()))?;
        for (key, lease) in live {
            if let Some(l) = leases.get_mut(&lease) {
                l.keys.insert(key);
            }
        }
        let mut st = self.lock();
        st.leases = leases;
        if st.primary {
            let now = Instant::now();
            for l in st.leases.values_mut() {
                l.expiry = Some(now + Duration::from_secs(l.ttl.max(0) as u64));
            }
        }
        Ok(())
    }

    pub fn exists(&self, id: i64) -> bool {
        self.lock().leases.contains_key(&id)
    }

    // ---- replicated operations (apply loop) ----

    /// Grants lease `id` with `ttl` (already raised to the minimum TTL by
    /// the proposer). Adds the record to `batch`.
    pub fn grant(&self, id: i64, ttl: i64, batch: &mut WriteBatch) -> Result<()> {
        let mut st = self.lock();
        if st.leases.contains_key(&id) {
            return Err(Error::LeaseExists);
        }
        let expiry = st.primary.then(|| Instant::now() + Duration::from_secs(ttl.max(0) as u64));
        let lease = Lease { ttl, remaining_ttl: 0, expiry, keys: BTreeSet::new() };
        batch.put(Table::Lease, lease_key(id), record(id, &lease));
        st.leases.insert(id, lease);
        Ok(())
    }

    /// The keys a revocation deletes, in key order (etcd deletes them
    /// sorted), or `LeaseNotFound`.
    pub fn keys_to_revoke(&self, id: i64) -> Result<Vec<Bytes>> {
        let st = self.lock();
        let l = st.leases.get(&id).ok_or(Error::LeaseNotFound)?;
        Ok(l.keys.iter().cloned().collect())
    }

    /// Forgets a revoked lease; adds the record's removal to `batch`.
    pub fn remove(&self, id: i64, batch: &mut WriteBatch) {
        batch.delete(Table::Lease, lease_key(id));
        self.lock().leases.remove(&id);
    }

    /// Records checkpointed remaining TTLs.
    pub fn checkpoint(&self, checkpoints: &[(i64, i64)], batch: &mut WriteBatch) {
        let mut st = self.lock();
        for (id, remaining) in checkpoints {
            if let Some(l) = st.leases.get_mut(id) {
                l.remaining_ttl = *remaining;
                batch.put(Table::Lease, lease_key(*id), record(*id, l));
            }
        }
    }

    /// Applies the lease changes of a committed KV write.
    pub fn apply_key_changes(&self, changes: &[(Bytes, i64, i64)]) {
        if changes.is_empty() {
            return;
        }
        let mut st = self.lock();
        for (key, old, new) in changes {
            if *old != 0 {
                if let Some(l) = st.leases.get_mut(old) {
                    l.keys.remove(key);
                }
            }
            if *new != 0 {
                if let Some(l) = st.leases.get_mut(new) {
                    l.keys.insert(key.clone());
                }
            }
        }
    }

    // ---- leader-only timing ----

    /// This member became leader: every lease gets its remaining TTL
    /// (checkpointed or full) plus `extend`.
    pub fn promote(&self, extend: Duration) {
        let mut st = self.lock();
        st.primary = true;
        let now = Instant::now();
        for l in st.leases.values_mut() {
            let remaining = if l.remaining_ttl > 0 { l.remaining_ttl } else { l.ttl };
            l.expiry = Some(now + extend + Duration::from_secs(remaining.max(0) as u64));
        }
    }

    /// This member stopped leading: it no longer times leases.
    pub fn demote(&self) {
        let mut st = self.lock();
        st.primary = false;
        for l in st.leases.values_mut() {
            l.expiry = None;
        }
    }

    pub fn is_primary(&self) -> bool {
        self.lock().primary
    }

    /// Renews a lease on the leader; returns its TTL, or `LeaseNotFound`
    /// (also for a lease that expired and awaits revocation). The second
    /// value tells whether a checkpoint must be cleared.
    pub fn renew(&self, id: i64) -> Result<(i64, bool)> {
        let mut st = self.lock();
        if !st.primary {
            return Err(Error::NotLeader);
        }
        let now = Instant::now();
        let l = st.leases.get_mut(&id).ok_or(Error::LeaseNotFound)?;
        if l.expiry.is_some_and(|e| e <= now) {
            return Err(Error::LeaseNotFound);
        }
        l.expiry = Some(now + Duration::from_secs(l.ttl.max(0) as u64));
        Ok((l.ttl, l.remaining_ttl > 0))
    }

    /// LeaseTimeToLive on the leader (remaining) or anywhere (granted).
    pub fn time_to_live(&self, id: i64, with_keys: bool) -> Option<LeaseInfo> {
        let st = self.lock();
        let l = st.leases.get(&id)?;
        Some(LeaseInfo {
            ttl: l.remaining(Instant::now()),
            granted_ttl: l.ttl,
            keys: if with_keys { l.keys.iter().cloned().collect() } else { Vec::new() },
        })
    }

    /// Every lease id, ascending.
    pub fn leases(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = self.lock().leases.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Leases whose expiry has passed (leader only), oldest first.
    pub fn expired(&self, limit: usize) -> Vec<i64> {
        let st = self.lock();
        let now = Instant::now();
        let mut due: Vec<(Instant, i64)> =
            st.leases.iter().filter_map(|(id, l)| l.expiry.filter(|e| *e <= now).map(|e| (e, *id))).collect();
        due.sort_unstable();
        due.into_iter().take(limit).map(|(_, id)| id).collect()
    }

    /// Remaining TTLs worth checkpointing (leader only): leases whose
    /// remaining time differs from what was last recorded.
    pub fn checkpoints(&self, limit: usize) -> Vec<(i64, i64)> {
        let st = self.lock();
        let now = Instant::now();
        let mut out: Vec<(i64, i64)> = st
            .leases
            .iter()
            .filter(|(_, l)| l.expiry.is_some())
            .map(|(id, l)| (*id, l.remaining(now)))
            .filter(|(id, rem)| st.leases.get(id).is_some_and(|l| *rem < l.ttl && *rem != l.remaining_ttl))
            .collect();
        out.sort_unstable();
        out.truncate(limit);
        out
    }

    pub fn count(&self) -> usize {
        self.lock().leases.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::memory::MemoryEngine;
    use std::sync::Arc;

    fn lessor() -> Lessor {
        let engine: SharedEngine = Arc::new(MemoryEngine::new());
        let mvcc = MvccStore::open(engine.clone()).unwrap();
        Lessor::load(&engine, &mvcc).unwrap()
    }

    #[test]
    fn grant_revoke_and_attachments() {
        let l = lessor();
        let mut b = WriteBatch::new();
        l.grant(5, 10, &mut b).unwrap();
        assert_eq!(l.grant(5, 10, &mut b), Err(Error::LeaseExists));
        l.apply_key_changes(&[(Bytes::from_static(b"b"), 0, 5), (Bytes::from_static(b"a"), 0, 5)]);
        assert_eq!(l.keys_to_revoke(5).unwrap(), vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")]);
        l.apply_key_changes(&[(Bytes::from_static(b"a"), 5, 0)]);
        assert_eq!(l.keys_to_revoke(5).unwrap(), vec![Bytes::from_static(b"b")]);
        l.remove(5, &mut b);
        assert_eq!(l.keys_to_revoke(5), Err(Error::LeaseNotFound));
    }

    #[test]
    fn only_the_leader_times_leases_and_promotion_extends() {
        let l = lessor();
        let mut b = WriteBatch::new();
        l.grant(1, 1, &mut b).unwrap();
        assert_eq!(l.renew(1), Err(Error::NotLeader));
        assert!(l.expired(10).is_empty(), "a follower expires nothing");
        l.promote(Duration::from_secs(2));
        assert_eq!(l.time_to_live(1, false).map(|i| i.ttl), Some(3), "TTL plus the election extension");
        assert_eq!(l.renew(1), Ok((1, false)));
        assert_eq!(l.time_to_live(1, false).map(|i| i.ttl), Some(1));
        assert_eq!(l.renew(42), Err(Error::LeaseNotFound));
        l.demote();
        assert!(l.expired(10).is_empty());
    }

    #[test]
    fn checkpointed_remaining_ttl_survives_promotion() {
        let l = lessor();
        let mut b = WriteBatch::new();
        l.grant(1, 100, &mut b).unwrap();
        l.checkpoint(&[(1, 7)], &mut b);
        l.promote(Duration::ZERO);
        assert_eq!(l.time_to_live(1, false).map(|i| i.ttl), Some(7), "not the full 100");
    }
}
