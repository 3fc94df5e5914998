//! The member's core (etcd's EtcdServer): identity, the Raft handle, the
//! MVCC store, and the two things every API needs from Raft: proposing a
//! write (forwarded to the leader when this member is not it) and waiting
//! for a linearizable read point.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_proto::etcdserverpb::ResponseHeader;
use keel_proto::keelpb::{internal_response::Response, InternalRequest, InternalResponse};
use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
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
use crate::raft::{MemberNode, Membership, NodeId, Raft};
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
    /// The most learners the cluster may have (`--max-learners`).
    pub max_learners: usize,
    /// A unary request slower than this is logged ("request stats").
    pub warning_unary_request_duration: Duration,
}

impl Settings {
    /// The cluster version line ("3.4") of the reported etcd version.
    pub fn etcd_cluster_version(&self) -> String {
        self.etcd_version.rsplit_once('.').map_or_else(|| self.etcd_version.clone(), |(line, _)| line.to_string())
    }
}

/// How often a request that found no leader, or a leader that could not
/// answer, looks again. A sleep rather than a wait on Raft's metrics: they
/// change many times a second, and a loop woken by each of them kept the
/// runtime's threads busy while requests piled up, starving the very Raft
/// messages that would elect a leader.
pub const LEADER_RETRY_PAUSE: Duration = Duration::from_millis(20);

/// Runs `attempt` until it answers something other than "not the leader"
/// (`NotLeader`: no leader, or leadership moved) or "the leader is
/// unreachable" (`Unhealthy`), pausing `pause` between attempts; past
/// `deadline` those two become `Timeout`. `attempt` gets the time left.
/// Every request that must reach the leader (forwarded writes, read
/// index, lease keepalives and TTL queries) goes through this one loop.
pub async fn retry_until_leader_answers<T, F, Fut>(deadline: Instant, pause: Duration, mut attempt: F) -> Result<T>
where
    F: FnMut(Duration) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    loop {
        match attempt(deadline.saturating_duration_since(Instant::now())).await {
            Err(Error::NotLeader) | Err(Error::Unhealthy) => {
                let now = Instant::now();
                if now >= deadline {
                    return Err(Error::Timeout);
                }
                tokio::time::sleep_until(deadline.min(now + pause).into()).await;
            }
            other => return other,
        }
    }
}

/// What the member's own work (`duties/`) needs from Raft, and no more,
/// so that it runs against a fake in unit tests; [`Server`] is the real
/// one. (The duties need no read index of their own: `propose` returns
/// once the entry applied here.) Invariants a duty relies on: `propose_as_leader`
/// never forwards (a deposed leader's proposal fails with `NotLeader` or
/// never commits, it is not applied by the next leader); `leader` names
/// no leader while this member leads without a quorum; `propose` returns
/// only after the entry applied on this member.
pub trait RaftSeam: Send + Sync + 'static {
    /// This member's id.
    fn member_id(&self) -> NodeId;
    /// Whether Raft names this member leader (with or without a quorum).
    fn raft_names_me_leader(&self) -> bool;
    /// The member believed to lead ([`Server::leader`]).
    fn leader(&self) -> Option<NodeId>;
    /// Whether this member leads with a quorum.
    fn leads(&self) -> bool {
        self.leader() == Some(self.member_id())
    }
    /// Replicates `req` from this member, forwarded to the leader when
    /// another member leads ([`Server::propose`]); an apply error comes
    /// back as the error.
    fn propose(&self, req: InternalRequest) -> impl std::future::Future<Output = Result<InternalResponse>> + Send;
    /// Proposes `req` on this member as leader: the apply result and its
    /// log index ([`Server::propose_local`]).
    fn propose_as_leader(
        &self,
        req: InternalRequest,
    ) -> impl std::future::Future<Output = Result<(InternalResponse, u64)>> + Send;
}

/// A learner counts as caught up at 90% of the leader's log (etcd).
const CAUGHT_UP_PERCENT: f64 = 0.9;

/// The Raft membership as the leader sees it, with how far each member's
/// log matches the leader's.
#[derive(Debug, Clone)]
pub struct RaftMembers {
    pub membership: Membership,
    pub last_log_index: u64,
    /// The leader's view of each member's last matching log index (empty
    /// on a follower).
    pub matched: BTreeMap<NodeId, u64>,
}

impl RaftMembers {
    /// Whether `id`'s log is close enough to the leader's to vote.
    pub fn caught_up(&self, id: NodeId) -> bool {
        let matched = self.matched.get(&id).copied().unwrap_or(0);
        matched as f64 >= self.last_log_index as f64 * CAUGHT_UP_PERCENT
    }

    pub fn is_voter(&self, id: NodeId) -> bool {
        self.membership.voter_ids().any(|v| v == id)
    }
}

/// What the membership duties (learner promotion, the corruption check)
/// need beyond [`RaftSeam`]: the membership, the one change they make,
/// and a peer's hash of its key space.
pub trait MembershipSeam: RaftSeam {
    fn raft_members(&self) -> RaftMembers;
    /// Makes a learner of the Raft membership a voter.
    fn make_voter(&self, id: NodeId) -> impl std::future::Future<Output = Result<()>> + Send;
    /// A peer's HashKV at `revision`: its hash and compacted revision.
    fn peer_hash_kv(
        &self,
        id: NodeId,
        node: &MemberNode,
        revision: i64,
    ) -> impl std::future::Future<Output = Result<(u32, i64)>> + Send;
}

impl RaftSeam for Server {
    fn member_id(&self) -> NodeId {
        self.id
    }

    fn raft_names_me_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.id)
    }

    fn leader(&self) -> Option<NodeId> {
        Server::leader(self)
    }

    fn propose(&self, req: InternalRequest) -> impl std::future::Future<Output = Result<InternalResponse>> + Send {
        Server::propose(self, req)
    }

    fn propose_as_leader(
        &self,
        req: InternalRequest,
    ) -> impl std::future::Future<Output = Result<(InternalResponse, u64)>> + Send {
        self.propose_local(req)
    }
}

impl MembershipSeam for Server {
    fn raft_members(&self) -> RaftMembers {
        let rx = self.raft.metrics();
        let metrics = rx.borrow();
        let matched =
            metrics.replication.iter().flatten().map(|(id, log_id)| (*id, log_id.map_or(0, |l| l.index))).collect();
        RaftMembers {
            membership: metrics.membership_config.membership().clone(),
            last_log_index: metrics.last_log_index.unwrap_or(0),
            matched,
        }
    }

    async fn make_voter(&self, id: NodeId) -> Result<()> {
        let change = openraft::ChangeMembers::AddVoterIds(std::collections::BTreeSet::from([id]));
        self.raft.change_membership(change, false).await.map(|_| ()).map_err(client_write_error)
    }

    fn peer_hash_kv(
        &self,
        id: NodeId,
        node: &MemberNode,
        revision: i64,
    ) -> impl std::future::Future<Output = Result<(u32, i64)>> + Send {
        self.peers.hash_kv(id, node, revision, PEER_HASH_TIMEOUT)
    }
}

/// How long the corruption check waits for a peer's hash.
const PEER_HASH_TIMEOUT: Duration = Duration::from_secs(5);

/// The error of a failed Raft write or membership change.
pub fn client_write_error(e: RaftError<NodeId, ClientWriteError<NodeId, MemberNode>>) -> Error {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => Error::NotLeader,
        RaftError::APIError(ClientWriteError::ChangeMembershipError(ChangeMembershipError::LearnerNotFound(_))) => {
            Error::MemberNotFound
        }
        RaftError::APIError(e) => Error::Internal(e.to_string()),
        RaftError::Fatal(_) => Error::Stopped,
    }
}

/// The current leader as a request to it sees it.
pub enum LeaderRef {
    /// This member leads.
    Local,
    /// Another member leads, reached at this address.
    Peer(NodeId, crate::raft::MemberNode),
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
    /// Where files in progress (backups being streamed) are written.
    pub scratch: crate::scratch::ScratchDir,
}

impl Server {
    /// How long a request may wait for Raft (etcd: 5s + 2 x election timeout).
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(5) + 2 * self.settings.election_timeout
    }

    pub fn term(&self) -> u64 {
        self.raft.metrics().borrow().current_term
    }

    /// The index of the last entry in this member's log.
    pub fn last_log_index(&self) -> u64 {
        self.raft.metrics().borrow().last_log_index.unwrap_or(0)
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
        let req = &req;
        let resp = retry_until_leader_answers(deadline, LEADER_RETRY_PAUSE, move |remaining| {
            async move {
                // Without a leader, wait here rather than in Raft: every
                // attempt that reached Raft would cost its core a message
                // while it elects.
                if self.leader().is_none() {
                    return Err(Error::NotLeader);
                }
                let written = {
                    let _gate = self.transfer_gate.read().await;
                    tokio::time::timeout(remaining, self.proposals.write(req.clone())).await
                };
                match written {
                    Err(_) => Err(Error::Timeout),
                    Ok(Ok((resp, _))) => Ok(resp),
                    Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(fwd)))) => {
                        // No leader named: an election is in progress.
                        let (Some(leader), Some(node)) = (fwd.leader_id, fwd.leader_node) else {
                            return Err(Error::NotLeader);
                        };
                        let remaining = deadline.saturating_duration_since(Instant::now());
                        let (resp, index) = self.peers.forward(leader, &node, req.clone(), remaining).await?;
                        self.wait_applied(index, deadline).await?;
                        Ok(resp)
                    }
                    Ok(Err(e)) => Err(client_write_error(e)),
                }
            }
        })
        .await?;
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
            Ok(Err(e)) => Err(client_write_error(e)),
        }
    }

    /// The current leader, and how to reach it; `NotLeader` when there is
    /// none (see [`Server::leader`]) or it is not in the membership.
    pub fn leader_ref(&self) -> Result<LeaderRef> {
        let leader = self.leader().ok_or(Error::NotLeader)?;
        if leader == self.id {
            return Ok(LeaderRef::Local);
        }
        let node = self.raft.metrics().borrow().membership_config.membership().get_node(&leader).cloned();
        node.map(|n| LeaderRef::Peer(leader, n)).ok_or(Error::NotLeader)
    }

    /// The index a linearizable read must wait for, decided by the leader
    /// after confirming its leadership with a quorum.
    pub async fn read_index_local(&self) -> Result<u64> {
        let _gate = self.transfer_gate.read().await;
        self.read_index.get().await
    }

    /// The index a linearizable read must wait for, from the leader
    /// (asked by a follower), giving up at `deadline`; see
    /// [`Server::linearizable_barrier`].
    pub async fn read_index_until(&self, deadline: Instant) -> Result<u64> {
        retry_until_leader_answers(deadline, LEADER_RETRY_PAUSE, |_| async move {
            match self.leader_ref()? {
                LeaderRef::Local => self.read_index_local().await,
                LeaderRef::Peer(leader, node) => self.read_index.from_leader(leader, node, deadline).await,
            }
        })
        .await
    }

    /// Blocks until a read served from local state is linearizable.
    pub async fn linearizable_barrier(&self) -> Result<()> {
        let deadline = Instant::now() + self.request_timeout();
        let index = self.read_index_until(deadline).await?;
        self.wait_applied(index, deadline).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn the_leader_loop_retries_until_the_leader_answers() {
        let attempts = AtomicUsize::new(0);
        let deadline = Instant::now() + Duration::from_secs(30);
        let answer = retry_until_leader_answers(deadline, Duration::from_millis(1), |_| async {
            match attempts.fetch_add(1, Ordering::SeqCst) {
                0 => Err(Error::NotLeader),
                1 => Err(Error::Unhealthy),
                n => Ok(n),
            }
        })
        .await;
        assert_eq!(answer.ok(), Some(2));
        assert_eq!(attempts.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn the_leader_loop_returns_other_errors_at_once() {
        let attempts = AtomicUsize::new(0);
        let deadline = Instant::now() + Duration::from_secs(30);
        let answer: Result<()> = retry_until_leader_answers(deadline, Duration::from_millis(1), |_| async {
            attempts.fetch_add(1, Ordering::SeqCst);
            Err(Error::LeaseNotFound)
        })
        .await;
        assert!(matches!(answer, Err(Error::LeaseNotFound)));
        assert_eq!(attempts.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn the_leader_loop_times_out_at_the_deadline() {
        let attempts = AtomicUsize::new(0);
        let deadline = Instant::now() + Duration::from_millis(50);
        let answer: Result<()> = retry_until_leader_answers(deadline, Duration::from_millis(5), |remaining| {
            attempts.fetch_add(1, Ordering::SeqCst);
            assert!(remaining <= Duration::from_millis(50));
            async { Err(Error::NotLeader) }
        })
        .await;
        assert!(matches!(answer, Err(Error::Timeout)));
        assert!(Instant::now() >= deadline);
        assert!(attempts.load(Ordering::SeqCst) > 1, "it never retried");
    }
}
