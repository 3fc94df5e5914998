//! The member's core (etcd's EtcdServer): identity, the Raft handle, the
//! MVCC store, and the two things every API needs from Raft: proposing a
//! write (forwarded to the leader when this member is not it) and waiting
//! for a linearizable read point.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_proto::etcdserverpb::ResponseHeader;
use keel_proto::keelpb::{internal_response::Response, InternalRequest, InternalResponse};
use openraft::error::{ClientWriteError, RaftError};
use prost::Message;

use crate::alarm::AlarmStore;
use crate::auth::AuthStore;
use crate::cluster::MemberRegistry;
use crate::error::{Error, Result};
use crate::lease::LeaseIdGen;
use crate::lease::Lessor;
use crate::mvcc::MvccStore;
use crate::raft::batcher::Batcher;
use crate::raft::log_store::LogStore;
use crate::raft::network::PeerClients;
use crate::raft::read_index::ReadIndex;
use crate::raft::state_machine::StateMachine;
use crate::raft::{NodeId, Raft};
use crate::storage::SharedEngine;
use crate::watch::WatchHub;

/// What the member core, and every layer above it, reads of the member's
/// configuration; `config` builds it from the flags.
#[derive(Debug, Clone)]
pub struct Settings {
    pub name: String,
    pub data_dir: std::path::PathBuf,
    pub heartbeat_interval: Duration,
    pub election_timeout: Duration,
    pub advertise_client_urls: Vec<String>,
    pub initial_cluster_token: String,
    pub strict_reconfig_check: bool,
    pub quota_backend_bytes: u64,
    pub max_txn_ops: usize,
    pub max_request_bytes: usize,
    pub max_concurrent_streams: u32,
    /// The etcd server version reported to clients ("3.4.23").
    pub etcd_version: String,
    pub watch_progress_notify_interval: Duration,
    pub lease_checkpoint_interval: Duration,
    pub bcrypt_cost: u32,
    /// The common name of a verified client certificate names the user
    /// when a request carries no token (`--client-cert-auth`).
    pub client_cert_auth: bool,
}

impl Settings {
    /// The cluster version line ("3.4") of the reported etcd version.
    pub fn etcd_cluster_version(&self) -> String {
        self.etcd_version.rsplit_once('.').map_or_else(|| self.etcd_version.clone(), |(line, _)| line.to_string())
    }
}

pub struct Server {
    pub id: NodeId,
    pub cluster_id: u64,
    pub settings: Settings,
    pub raft: Raft,
    /// Proposes writes; concurrent KV writes share a Raft entry.
    pub proposals: Batcher,
    /// Leadership confirmations, shared by concurrent linearizable reads.
    pub read_index: ReadIndex,
    pub engine: SharedEngine,
    pub mvcc: Arc<MvccStore>,
    pub state_machine: StateMachine,
    pub log_store: LogStore,
    pub members: Arc<MemberRegistry>,
    pub leases: Arc<Lessor>,
    pub alarms: Arc<AlarmStore>,
    pub auth: Arc<AuthStore>,
    pub hub: Arc<WatchHub>,
    /// Backend size as of the last refresh (the quota check reads it on
    /// every write; see [`Server::refresh_db_size`]).
    pub db_size: std::sync::atomic::AtomicU64,
    pub lease_ids: LeaseIdGen,
    pub peers: Arc<PeerClients>,
    /// Held for writing while leadership moves to another member: new
    /// proposals and read-index requests on this member wait meanwhile.
    pub transfer_gate: tokio::sync::RwLock<()>,
}

impl Server {
    /// How long a request may wait for Raft (etcd: 5s + 2 x election timeout).
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(5) + 2 * self.settings.election_timeout
    }

    pub fn term(&self) -> u64 {
        self.raft.metrics().borrow().current_term
    }

    /// The member this one believes leads. A leader that has not heard
    /// from a quorum for an election timeout reports no leader, as an etcd
    /// leader steps down under CheckQuorum (openraft 0.9 leaders do not);
    /// so does a leader that removed itself, which the metrics keep naming
    /// until the next election.
    pub fn leader(&self) -> Option<NodeId> {
        let rx = self.raft.metrics();
        let m = rx.borrow();
        let leader = m.current_leader?;
        if leader == self.id {
            let quorum_lost =
                m.millis_since_quorum_ack.is_some_and(|ms| ms > self.settings.election_timeout.as_millis() as u64);
            return (!quorum_lost).then_some(leader);
        }
        m.membership_config.membership().get_node(&leader).is_some().then_some(leader)
    }

    /// etcd's response header: cluster, member, revision, term.
    pub fn header(&self, revision: i64) -> ResponseHeader {
        ResponseHeader { cluster_id: self.cluster_id, member_id: self.id, revision, raft_term: self.term() }
    }

    /// Fills the identity fields of a header an apply produced; a zero
    /// revision becomes the current one.
    pub fn fill_header(&self, header: &mut Option<ResponseHeader>) {
        let h = header.get_or_insert_with(ResponseHeader::default);
        h.cluster_id = self.cluster_id;
        h.member_id = self.id;
        h.raft_term = self.term();
        if h.revision == 0 {
            h.revision = self.mvcc.current_rev();
        }
    }

    /// Waits until the local state machine applied `index`.
    pub async fn wait_applied(&self, index: u64, deadline: Instant) -> Result<()> {
        let mut rx = self.state_machine.subscribe_applied();
        loop {
            if *rx.borrow_and_update() >= index {
                return Ok(());
            }
            match tokio::time::timeout_at(deadline.into(), rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(Error::Stopped),
                Err(_) => return Err(Error::Timeout),
            }
        }
    }

    /// Re-reads the backend size (quota, Status, metrics).
    pub fn refresh_db_size(&self) -> u64 {
        // Like etcd's backend size, the Raft log is not counted.
        match self.engine.size(&crate::storage::Table::STATE_MACHINE) {
            Ok(size) => {
                self.db_size.store(size.total_bytes, std::sync::atomic::Ordering::Relaxed);
                crate::metrics::DB_TOTAL_SIZE.set(size.total_bytes as i64);
                crate::metrics::DB_IN_USE.set(size.live_bytes as i64);
                size.total_bytes
            }
            Err(_) => self.db_size.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// etcd's quota check: a request that would add data past
    /// `--quota-backend-bytes` raises the NOSPACE alarm and fails.
    async fn check_quota(&self, req: &InternalRequest) -> Result<()> {
        use keel_proto::keelpb::internal_request::Request as R;
        let cost = match &req.request {
            Some(R::Put(p)) => p.key.len() + p.value.len() + 16,
            Some(R::Txn(t)) if crate::apply::txn_has_puts(t) => t.encoded_len(),
            Some(R::LeaseGrant(_)) => 32,
            _ => return Ok(()),
        } as u64;
        // The cached size grows with every write until the next refresh,
        // so a burst of writes cannot overshoot the quota unseen.
        let size = self.db_size.fetch_add(cost, std::sync::atomic::Ordering::Relaxed);
        if size + cost <= self.settings.quota_backend_bytes {
            return Ok(());
        }
        if self.refresh_db_size() + cost <= self.settings.quota_backend_bytes {
            return Ok(());
        }
        let alarm = keel_proto::etcdserverpb::AlarmRequest {
            action: keel_proto::etcdserverpb::alarm_request::AlarmAction::Activate as i32,
            member_id: self.id,
            alarm: keel_proto::etcdserverpb::AlarmType::Nospace as i32,
        };
        let activate = InternalRequest { header: None, request: Some(R::Alarm(alarm)) };
        Box::pin(self.propose(activate)).await?;
        Err(Error::NoSpace)
    }

    /// Replicates `req` through Raft and returns what applying it produced
    /// on this member. Works on any member: a follower forwards to the
    /// leader, then waits for its own state machine to catch up.
    pub async fn propose(&self, req: InternalRequest) -> Result<InternalResponse> {
        if req.encoded_len() > self.settings.max_request_bytes {
            return Err(Error::RequestTooLarge);
        }
        self.check_quota(&req).await?;
        let deadline = Instant::now() + self.request_timeout();
        let resp = loop {
            let written = {
                let _gate = self.transfer_gate.read().await;
                tokio::time::timeout_at(deadline.into(), self.proposals.write(req.clone())).await
            };
            match written {
                Err(_) => return Err(Error::Timeout),
                Ok(Ok((resp, _))) => break resp,
                Ok(Err(RaftError::Fatal(_))) => return Err(Error::Stopped),
                Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(fwd)))) => {
                    let (Some(leader), Some(node)) = (fwd.leader_id, fwd.leader_node) else {
                        // Election in progress: wait for a leader.
                        self.wait_for_leader(deadline).await?;
                        continue;
                    };
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    match self.peers.forward(leader, &node, req.clone(), remaining).await {
                        Ok((resp, index)) => {
                            self.wait_applied(index, deadline).await?;
                            break resp;
                        }
                        Err(Error::NotLeader) | Err(Error::Unhealthy) => {
                            // Leadership moved or the leader is unreachable; retry
                            // until the deadline.
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            if Instant::now() >= deadline {
                                return Err(Error::Timeout);
                            }
                            continue;
                        }
                        Err(e) => return Err(e),
                    }
                }
                Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => {
                    return Err(Error::Internal(e.to_string()))
                }
            }
        };
        match resp.response {
            Some(Response::Error(e)) => Err(Error::from_apply_code(e.kind, e.detail)),
            _ => Ok(resp),
        }
    }

    /// Proposes on behalf of a peer (the leader side of forwarding):
    /// returns the apply result and its log index.
    pub async fn propose_local(&self, req: InternalRequest) -> Result<(InternalResponse, u64)> {
        let deadline = Instant::now() + self.request_timeout();
        let _gate = self.transfer_gate.read().await;
        match tokio::time::timeout_at(deadline.into(), self.proposals.write(req)).await {
            Err(_) => Err(Error::Timeout),
            Ok(Ok((resp, log_id))) => Ok((resp, log_id.index)),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => Err(Error::NotLeader),
            Ok(Err(RaftError::Fatal(_))) => Err(Error::Stopped),
            Ok(Err(RaftError::APIError(e))) => Err(Error::Internal(e.to_string())),
        }
    }

    async fn wait_for_leader(&self, deadline: Instant) -> Result<()> {
        // The same notion of leadership as `leader()`: a leader that lost
        // its quorum counts as none. Poll with a sleep rather than waiting
        // on metrics changes: the metrics change many times a second, and
        // a loop woken by each of them (or one that returned without
        // waiting) kept the runtime's threads busy while requests piled
        // up, starving the very Raft messages that would elect a leader.
        loop {
            if self.leader().is_some() {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout);
            }
            tokio::time::sleep_until(deadline.min(now + Duration::from_millis(20)).into()).await;
        }
    }

    /// The index a linearizable read must wait for, decided by the leader
    /// after confirming its leadership with a quorum.
    pub async fn read_index_local(&self) -> Result<u64> {
        let _gate = self.transfer_gate.read().await;
        self.read_index.get().await
    }

    /// Blocks until a read served from local state is linearizable.
    pub async fn linearizable_barrier(&self) -> Result<()> {
        let deadline = Instant::now() + self.request_timeout();
        loop {
            let leader = match self.leader() {
                Some(l) => l,
                None => {
                    self.wait_for_leader(deadline).await?;
                    continue;
                }
            };
            let index = if leader == self.id {
                match self.read_index_local().await {
                    Ok(i) => i,
                    Err(Error::NotLeader) => {
                        if Instant::now() >= deadline {
                            return Err(Error::Timeout);
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            } else {
                let node = self.raft.metrics().borrow().membership_config.membership().get_node(&leader).cloned();
                let Some(node) = node else {
                    self.wait_for_leader(deadline).await?;
                    continue;
                };
                match self.read_index.from_leader(leader, node, deadline).await {
                    Ok(i) => i,
                    Err(Error::NotLeader) | Err(Error::Unhealthy) => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        if Instant::now() >= deadline {
                            return Err(Error::Timeout);
                        }
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            };
            return self.wait_applied(index, deadline).await;
        }
    }
}
