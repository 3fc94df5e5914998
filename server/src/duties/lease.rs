//! The leader's lease work: the lease clocks ([`LeaseClocks`], over the
//! [`RaftSeam`]: follow leadership by promoting and demoting the lessor,
//! revoke expired leases and checkpoint remaining TTLs through Raft), and
//! keepalives and TTL queries (forwarded from followers).

use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_proto::etcdserverpb::{
    LeaseCheckpoint, LeaseCheckpointRequest, LeaseKeepAliveRequest, LeaseRevokeRequest, LeaseTimeToLiveRequest,
};
use keel_proto::keelpb::{internal_request, internal_response::Response as Applied, InternalRequest, RequestHeader};

use crate::error::{Error, Result};
use crate::lease::{LeaseInfo, Lessor};
use crate::server::{retry_until_leader_answers, LeaderRef, RaftSeam, Server};

/// Revocations proposed per expiry pass (etcd: leaseRevokeRate).
const REVOKE_BATCH: usize = 1000;
const CHECKPOINT_BATCH: usize = 1000;
/// How often a keepalive or TTL query that found no leader looks again.
const LEASE_RETRY_PAUSE: Duration = Duration::from_millis(50);

fn internal(r: internal_request::Request) -> InternalRequest {
    InternalRequest { header: None, request: Some(r) }
}

/// The leader's lease clocks. Only a member that Raft names leader times
/// leases; it proposes the revocations and checkpoints its own clocks
/// decide, on itself, never forwarded: a deposed leader (paused,
/// partitioned) that still believes it leads must not have its stale
/// expiries applied by its successor, which runs its own clocks (found by
/// the Jepsen lease workload: a lease renewed on the new leader vanished
/// anyway).
pub struct LeaseClocks<R> {
    raft: Arc<R>,
    leases: Arc<Lessor>,
    /// What a new leader adds to every lease, so that an election never
    /// expires one early.
    election_timeout: Duration,
}

impl<R: RaftSeam> LeaseClocks<R> {
    pub fn new(raft: Arc<R>, leases: Arc<Lessor>, election_timeout: Duration) -> Self {
        Self { raft, leases, election_timeout }
    }

    /// Follows Raft's leadership: the lessor starts timing leases when this
    /// member becomes leader (each gets its remaining TTL plus an election
    /// timeout) and stops when it no longer is (the lessor being primary
    /// is these clocks running). Returns whether it leads.
    pub fn follow_leadership(&mut self) -> bool {
        let leading = self.raft.raft_names_me_leader();
        if leading != self.leases.is_primary() {
            if leading {
                self.leases.promote(self.election_timeout);
                tracing::info!(leases = self.leases.count(), "became leader; lease expiry clocks restarted");
            } else {
                self.leases.demote();
            }
        }
        leading
    }

    /// Proposes revocations of the leases these clocks expired, oldest
    /// first, until one fails (a leader that lost its quorum tries once per
    /// pass, not once per lease).
    pub async fn revoke_expired(&self) {
        if !self.leases.is_primary() || !self.raft.leads() {
            return;
        }
        for id in self.leases.expired(REVOKE_BATCH) {
            let mut req = internal(internal_request::Request::LeaseRevoke(LeaseRevokeRequest { id }));
            req.header = Some(RequestHeader { internal: true, ..Default::default() });
            let outcome = self.raft.propose_as_leader(req).await.and_then(|(resp, _)| match resp.response {
                Some(Applied::Error(e)) => Err(Error::from_apply_code(e.kind, e.detail)),
                _ => Ok(()),
            });
            match outcome {
                Ok(()) => tracing::debug!(lease = id, "revoked expired lease"),
                Err(Error::LeaseNotFound) | Err(Error::NotLeader) => return,
                Err(e) => {
                    tracing::warn!(lease = id, error = %e, "failed to revoke expired lease");
                    return;
                }
            }
        }
    }

    /// Proposes the remaining TTLs that changed since the last checkpoint,
    /// so a new leader does not restart them from the full TTL.
    pub async fn checkpoint(&self) {
        if !self.leases.is_primary() {
            return;
        }
        let checkpoints = self.leases.checkpoints(CHECKPOINT_BATCH);
        if checkpoints.is_empty() {
            return;
        }
        let checkpoints =
            checkpoints.into_iter().map(|(id, remaining_ttl)| LeaseCheckpoint { id, remaining_ttl }).collect();
        let req = internal(internal_request::Request::LeaseCheckpoint(LeaseCheckpointRequest { checkpoints }));
        if let Err(e) = self.raft.propose_as_leader(req).await {
            tracing::warn!(error = %e, "lease checkpoint failed");
        }
    }
}

/// Runs `server`'s lease clocks until the member stops: expiry every
/// 500 ms, checkpoints every `--experimental-lease-checkpoint-interval`,
/// and leadership followed at every change of Raft's state.
pub async fn run_lease_clocks(server: Arc<Server>) {
    let mut metrics = server.raft.metrics();
    let mut expiry_tick = tokio::time::interval(Duration::from_millis(500));
    let mut checkpoint_tick =
        tokio::time::interval(server.settings.lease_checkpoint_interval.max(Duration::from_millis(100)));
    checkpoint_tick.tick().await;
    let mut clocks = LeaseClocks::new(server.clone(), server.leases.clone(), server.settings.election_timeout);
    loop {
        tokio::select! {
            changed = metrics.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = expiry_tick.tick() => clocks.revoke_expired().await,
            _ = checkpoint_tick.tick() => clocks.checkpoint().await,
        }
        clocks.follow_leadership();
    }
}

impl Server {
    /// The smallest TTL etcd grants: 1.5 election timeouts, in whole
    /// seconds, so a lease survives a leader election.
    pub fn min_lease_ttl(&self) -> i64 {
        let min = self.settings.election_timeout.as_secs_f64() * 1.5;
        min.ceil() as i64
    }

    /// Renews a lease on the leader (forwarding if needed); returns its
    /// TTL, 0 when the lease does not exist or already expired.
    pub async fn lease_renew(&self, id: i64) -> Result<i64> {
        let deadline = Instant::now() + self.request_timeout();
        retry_until_leader_answers(deadline, LEASE_RETRY_PAUSE, |remaining| async move {
            match self.leader_ref()? {
                LeaderRef::Local => self.lease_renew_local(id).await,
                LeaderRef::Peer(leader, node) => {
                    self.peers.lease_keep_alive(leader, &node, LeaseKeepAliveRequest { id }, remaining).await
                }
            }
        })
        .await
    }

    /// The leader side of a renewal.
    pub async fn lease_renew_local(&self, id: i64) -> Result<i64> {
        let deadline = Instant::now() + self.request_timeout();
        // Expired here, but its revocation is not applied yet. Like etcd,
        // wait for the outcome instead of answering TTL 0: a leader that
        // lost its quorum cannot revoke, and its successor may keep the
        // lease alive (found by the Jepsen lease workload: a keepalive
        // answered 0, the next one 3).
        let (ttl, clear_checkpoint) = loop {
            match self.leases.renew(id) {
                Ok(renewed) => break renewed,
                Err(Error::LeaseNotFound) if self.leases.exists(id) => {
                    if Instant::now() >= deadline {
                        return Err(Error::Timeout);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(Error::LeaseNotFound) => return Ok(0),
                Err(e) => return Err(e),
            }
        };
        if clear_checkpoint {
            let cp = LeaseCheckpoint { id, remaining_ttl: 0 };
            let req =
                internal(internal_request::Request::LeaseCheckpoint(LeaseCheckpointRequest { checkpoints: vec![cp] }));
            self.propose(req).await?;
        }
        Ok(ttl)
    }

    /// LeaseTimeToLive, answered by the leader (which keeps expiry times).
    pub async fn lease_time_to_live(&self, id: i64, keys: bool) -> Result<Option<LeaseInfo>> {
        let deadline = Instant::now() + self.request_timeout();
        retry_until_leader_answers(deadline, LEASE_RETRY_PAUSE, |remaining| async move {
            match self.leader_ref()? {
                // A new leader answers once its lessor took over the expiry
                // clocks.
                LeaderRef::Local if self.leases.is_primary() => Ok(self.leases.time_to_live(id, keys)),
                LeaderRef::Local => Err(Error::NotLeader),
                LeaderRef::Peer(leader, node) => {
                    let req = LeaseTimeToLiveRequest { id, keys };
                    self.peers.lease_time_to_live(leader, &node, req, remaining).await
                }
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::duties::fake_raft::{FakeRaft, Path};
    use crate::mvcc::MvccStore;
    use crate::storage::memory::MemoryEngine;
    use crate::storage::{SharedEngine, WriteBatch};

    /// The leases revoked, each proposed on this member, never forwarded.
    fn revoked(raft: &FakeRaft) -> Vec<i64> {
        raft.proposed()
            .into_iter()
            .filter_map(|(path, r)| match r {
                internal_request::Request::LeaseRevoke(r) => {
                    assert_eq!(path, Path::AsLeader, "a revocation was forwarded");
                    Some(r.id)
                }
                _ => None,
            })
            .collect()
    }

    /// Leases 1 to `n`, each with a TTL of zero, so they are due as soon as
    /// a leader times them (with no election extension).
    fn clocks(n: i64) -> (Arc<FakeRaft>, Arc<Lessor>, LeaseClocks<FakeRaft>) {
        let engine: SharedEngine = Arc::new(MemoryEngine::new());
        let mvcc = MvccStore::open(engine.clone()).expect("mvcc");
        let leases = Arc::new(Lessor::load(&engine, &mvcc).expect("lessor"));
        let mut batch = WriteBatch::new();
        for id in 1..=n {
            leases.grant(id, 0, &mut batch).expect("grant");
        }
        let raft = Arc::new(FakeRaft::default());
        let clocks = LeaseClocks::new(raft.clone(), leases.clone(), Duration::ZERO);
        (raft, leases, clocks)
    }

    #[tokio::test]
    async fn expired_leases_are_revoked_only_while_this_member_leads() {
        let (raft, leases, mut clocks) = clocks(2);
        assert!(!clocks.follow_leadership());
        clocks.revoke_expired().await;
        assert!(raft.proposed().is_empty(), "a follower proposed {:?}", raft.proposed());

        raft.lead(true, true);
        assert!(clocks.follow_leadership());
        assert!(leases.is_primary(), "the new leader's lessor was not promoted");
        clocks.revoke_expired().await;
        assert_eq!(revoked(&raft), vec![1, 2]);

        // Leadership moves away between two passes: the clocks stop, and
        // nothing more is proposed.
        raft.lead(false, false);
        assert!(!clocks.follow_leadership());
        assert!(!leases.is_primary(), "the old leader's lessor still times leases");
        clocks.revoke_expired().await;
        clocks.checkpoint().await;
        assert_eq!(revoked(&raft), vec![1, 2]);
    }

    #[tokio::test]
    async fn a_leader_without_quorum_proposes_nothing() {
        let (raft, _leases, mut clocks) = clocks(3);
        raft.lead(true, false);
        clocks.follow_leadership();
        clocks.revoke_expired().await;
        assert!(raft.proposed().is_empty(), "proposed {:?} without a quorum", raft.proposed());
    }

    #[tokio::test]
    async fn a_failed_revocation_ends_the_pass_and_the_next_pass_retries() {
        let (raft, _leases, mut clocks) = clocks(3);
        raft.lead(true, true);
        clocks.follow_leadership();
        raft.fail_with(Some(Error::Timeout));
        clocks.revoke_expired().await;
        assert_eq!(revoked(&raft), vec![1], "one failed proposal per pass, not one per lease");
        raft.fail_with(None);
        clocks.revoke_expired().await;
        assert_eq!(revoked(&raft), vec![1, 1, 2, 3], "the next pass retries every expired lease");
    }

    #[tokio::test]
    async fn only_a_leader_checkpoints_and_only_what_changed() {
        let engine: SharedEngine = Arc::new(MemoryEngine::new());
        let mvcc = MvccStore::open(engine.clone()).expect("mvcc");
        let leases = Arc::new(Lessor::load(&engine, &mvcc).expect("lessor"));
        leases.grant(7, 100, &mut WriteBatch::new()).expect("grant");
        leases.checkpoint(&[(7, 50)], &mut WriteBatch::new());
        let raft = Arc::new(FakeRaft::default());
        let mut clocks = LeaseClocks::new(raft.clone(), leases.clone(), Duration::ZERO);
        clocks.checkpoint().await;
        assert!(raft.proposed().is_empty(), "a follower checkpointed");

        // The new leader restarts the lease from its checkpoint (50 s
        // left), which is what was recorded: nothing to checkpoint yet.
        raft.lead(true, true);
        clocks.follow_leadership();
        clocks.checkpoint().await;
        assert!(raft.proposed().is_empty(), "checkpointed an unchanged TTL: {:?}", raft.proposed());

        // Once the recorded value differs from the clock, it is proposed.
        leases.checkpoint(&[(7, 40)], &mut WriteBatch::new());
        clocks.checkpoint().await;
        let proposed = raft.proposed();
        let [(Path::AsLeader, internal_request::Request::LeaseCheckpoint(cp))] = proposed.as_slice() else {
            panic!("expected one checkpoint, got {proposed:?}");
        };
        assert_eq!(cp.checkpoints.len(), 1);
        assert_eq!(cp.checkpoints[0].id, 7);
        assert!((49..=50).contains(&cp.checkpoints[0].remaining_ttl), "{cp:?}");
    }
}
