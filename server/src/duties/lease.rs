//! The leader's lease work: follow leadership (promote/demote the
//! lessor), revoke expired leases through Raft, checkpoint remaining TTLs,
//! and serve keepalives and TTL queries (forwarding from followers).

use std::time::{Duration, Instant};

use keel_proto::etcdserverpb::{
    LeaseCheckpoint, LeaseCheckpointRequest, LeaseKeepAliveRequest, LeaseRevokeRequest, LeaseTimeToLiveRequest,
};
use keel_proto::keelpb::{internal_request, internal_response::Response as Applied, InternalRequest, RequestHeader};

use crate::error::{Error, Result};
use crate::lease::LeaseInfo;
use crate::server::{retry_until_leader_answers, LeaderRef, Server};

/// Revocations proposed per expiry pass (etcd: leaseRevokeRate).
const REVOKE_BATCH: usize = 1000;
const CHECKPOINT_BATCH: usize = 1000;
/// How often a keepalive or TTL query that found no leader looks again.
const LEASE_RETRY_PAUSE: Duration = Duration::from_millis(50);

fn internal(r: internal_request::Request) -> InternalRequest {
    InternalRequest { header: None, request: Some(r) }
}

impl Server {
    /// The smallest TTL etcd grants: 1.5 election timeouts, in whole
    /// seconds, so a lease survives a leader election.
    pub fn min_lease_ttl(&self) -> i64 {
        let min = self.settings.election_timeout.as_secs_f64() * 1.5;
        min.ceil() as i64
    }

    /// Runs the leader's lease duties until the member stops.
    pub async fn lease_duties(&self) {
        let mut metrics = self.raft.metrics();
        let mut expiry_tick = tokio::time::interval(Duration::from_millis(500));
        let mut checkpoint_tick =
            tokio::time::interval(self.settings.lease_checkpoint_interval.max(Duration::from_millis(100)));
        checkpoint_tick.tick().await;
        let mut leading = false;
        loop {
            tokio::select! {
                changed = metrics.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = expiry_tick.tick() => {
                    if leading {
                        self.revoke_expired().await;
                    }
                }
                _ = checkpoint_tick.tick() => {
                    if leading {
                        self.checkpoint_leases().await;
                    }
                }
            }
            let now_leading = metrics.borrow().current_leader == Some(self.id);
            if now_leading != leading {
                leading = now_leading;
                if leading {
                    self.leases.promote(self.settings.election_timeout);
                    tracing::info!(leases = self.leases.count(), "became leader; lease expiry clocks restarted");
                } else {
                    self.leases.demote();
                }
            }
        }
    }

    /// Proposes revocations of the leases this leader's clocks expired.
    /// Never forwarded: a deposed leader (paused, partitioned) that still
    /// believes it leads must not have its stale expiries applied by its
    /// successor, which runs its own clocks (found by the Jepsen lease
    /// workload: a lease renewed on the new leader vanished anyway).
    async fn revoke_expired(&self) {
        if self.leader() != Some(self.id) {
            return;
        }
        for id in self.leases.expired(REVOKE_BATCH) {
            let mut req = internal(internal_request::Request::LeaseRevoke(LeaseRevokeRequest { id }));
            req.header = Some(RequestHeader { internal: true, ..Default::default() });
            let outcome = self.propose_local(req).await.and_then(|(resp, _)| match resp.response {
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

    async fn checkpoint_leases(&self) {
        let checkpoints = self.leases.checkpoints(CHECKPOINT_BATCH);
        if checkpoints.is_empty() {
            return;
        }
        let checkpoints =
            checkpoints.into_iter().map(|(id, remaining_ttl)| LeaseCheckpoint { id, remaining_ttl }).collect();
        let req = internal(internal_request::Request::LeaseCheckpoint(LeaseCheckpointRequest { checkpoints }));
        // Like revocations, checkpoints come from this leader's clocks only.
        if let Err(e) = self.propose_local(req).await.map(|_| ()) {
            tracing::warn!(error = %e, "lease checkpoint failed");
        }
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
