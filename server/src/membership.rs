//! etcd's Cluster service semantics on top of openraft's membership
//! changes, run on the leader (other members forward to it):
//!
//! - MemberAdd records the member, then adds it to Raft as a learner. A
//!   member added as a voter is promoted to a Raft voter automatically once
//!   it has caught up (`duties::promotion`); until then etcd's API
//!   already shows it as a voter. (etcd counts a new voter toward quorum at
//!   once, which stalls a one-member cluster until the new member starts;
//!   openraft's joint consensus cannot commit that, and a voter that cannot
//!   vote yet adds nothing to safety.)
//! - MemberRemove, MemberUpdate, MemberPromote map to `change_membership`.
//! - MoveLeader lets the target catch up, silences the leader's heartbeats
//!   until the followers' leader lease lapses, and asks the target to
//!   campaign: openraft 0.9 has no leadership-transfer message.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use keel_proto::etcdserverpb::Member;
use keel_proto::keelpb::{
    cluster_change_request::Change, internal_request, ClusterChangeRequest, InternalRequest, MemberAttributes,
};
use openraft::ChangeMembers;

use crate::cluster::{member_id, parse_url};
use crate::error::{Error, Result};
use crate::raft::{MemberNode, NodeId};
use crate::server::{
    client_write_error, retry_until_leader_answers, LeaderRef, MembershipSeam, Server, LEADER_RETRY_PAUSE,
};

/// How many election timeouts a leader without a quorum stays silent
/// (`check_quorum`): the longest a follower waits to campaign, 4, plus one.
const STEP_DOWN_PAUSE: u32 = 5;

impl Server {
    fn membership(&self) -> crate::raft::Membership {
        self.raft.metrics().borrow().membership_config.membership().clone()
    }

    /// Voters as etcd counts them (including members added as voters that
    /// are still catching up), and how many of them have started.
    fn etcd_voters(&self) -> (usize, usize) {
        let m = self.membership();
        let mut voters = 0;
        let mut started = 0;
        for (id, _) in m.nodes() {
            if !self.members.is_learner(*id, &m) {
                voters += 1;
                if self.members.get(*id).is_some_and(|a| !a.name.is_empty()) {
                    started += 1;
                }
            }
        }
        (voters, started)
    }

    /// etcd 3.5+'s `isConnectedToQuorumAfterAddingNewMemberSince`: this
    /// member and the voters it has heard from without a break for the
    /// last five seconds must be a quorum of the voters plus the new
    /// member, which counts as down (a one-member cluster may always grow).
    fn check_quorum_after_adding(&self) -> Result<()> {
        const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
        let m = self.membership();
        let active = self.peers.active_for(HEALTH_INTERVAL);
        let voters: Vec<u64> = m.nodes().map(|(id, _)| *id).filter(|id| !self.members.is_learner(*id, &m)).collect();
        let connected = voters.iter().filter(|id| **id == self.id || active.contains(id)).count();
        let quorum = |n: usize| n / 2 + 1;
        if voters.len() > 1 && connected < quorum(voters.len() + 1) {
            return Err(Error::Unhealthy);
        }
        Ok(())
    }

    /// Runs a Cluster-service change on the leader, forwarding if needed.
    /// Returns the added member (for MemberAdd).
    pub async fn cluster_change(&self, req: ClusterChangeRequest) -> Result<Option<Member>> {
        let deadline = Instant::now() + self.request_timeout();
        retry_until_leader_answers(deadline, LEADER_RETRY_PAUSE, |remaining| {
            let req = req.clone();
            async move {
                match self.leader_ref()? {
                    LeaderRef::Local => self.cluster_change_local(req).await.map(|(member, _)| member),
                    LeaderRef::Peer(leader, node) => {
                        let (member, index) = self.peers.cluster_change(leader, &node, req, remaining).await?;
                        self.wait_applied(index, deadline).await?;
                        Ok(member)
                    }
                }
            }
        })
        .await
    }

    /// The leader side of [`Server::cluster_change`]: returns the added
    /// member and the log index the change was committed at.
    pub async fn cluster_change_local(&self, req: ClusterChangeRequest) -> Result<(Option<Member>, u64)> {
        if self.leader() != Some(self.id) {
            return Err(Error::NotLeader);
        }
        match req.change {
            Some(Change::Add(add)) => self.member_add(add.peer_ur_ls, add.is_learner).await,
            Some(Change::Remove(r)) => self.member_remove(r.id).await.map(|i| (None, i)),
            Some(Change::Update(u)) => self.member_update(u.id, u.peer_ur_ls).await.map(|i| (None, i)),
            Some(Change::Promote(p)) => self.member_promote(p.id).await.map(|i| (None, i)),
            None => Err(Error::InvalidArgument("empty cluster change".into())),
        }
    }

    fn check_urls(&self, urls: &[String], except: Option<NodeId>) -> Result<Vec<String>> {
        let urls: Vec<String> = urls
            .iter()
            .map(|u| parse_url(u))
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| Error::MemberBadUrls)?;
        if urls.is_empty() {
            return Err(Error::MemberBadUrls);
        }
        let m = self.membership();
        for (id, node) in m.nodes() {
            if Some(*id) != except && node.peer_urls.iter().any(|u| urls.contains(u)) {
                return Err(Error::PeerUrlExists);
            }
        }
        Ok(urls)
    }

    async fn member_add(&self, peer_urls: Vec<String>, is_learner: bool) -> Result<(Option<Member>, u64)> {
        let urls = self.check_urls(&peer_urls, None)?;
        let m = self.membership();
        if self.settings.strict_reconfig_check && crate::version::minor(&self.settings.etcd_version) >= 5 {
            self.check_quorum_after_adding()?;
        }
        if is_learner {
            let learners = m.nodes().filter(|(id, _)| self.members.is_learner(**id, &m)).count();
            if learners >= self.settings.max_learners {
                return Err(Error::TooManyLearners);
            }
        } else if self.settings.strict_reconfig_check {
            // etcd's IsReadyToAddVotingMember.
            let (voters, started) = self.etcd_voters();
            let n = voters + 1;
            if !(started == 1 && n == 2) && started < n / 2 + 1 {
                return Err(Error::MemberNotEnoughStarted);
            }
        }
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        let id = member_id(&urls, &self.settings.initial_cluster_token, Some(now));
        if m.get_node(&id).is_some() {
            return Err(Error::MemberExists);
        }
        if self.members.is_removed(id) {
            return Err(Error::MemberExists);
        }
        let record = MemberAttributes { member_id: id, is_learner, ..Default::default() };
        self.propose(InternalRequest { header: None, request: Some(internal_request::Request::AddMember(record)) })
            .await?;
        let written = self
            .raft
            .add_learner(id, MemberNode { peer_urls: urls.clone() }, false)
            .await
            .map_err(client_write_error)?;
        tracing::info!(member_id = %format!("{id:x}"), peer_urls = ?urls, is_learner, "added member to the cluster");
        let member = Member { id, name: String::new(), peer_ur_ls: urls, client_ur_ls: Vec::new(), is_learner };
        Ok((Some(member), written.log_id.index))
    }

    async fn member_remove(&self, id: NodeId) -> Result<u64> {
        let m = self.membership();
        if m.get_node(&id).is_none() {
            return Err(Error::MemberNotFound);
        }
        let is_raft_voter = m.voter_ids().any(|v| v == id);
        if self.settings.strict_reconfig_check && !self.members.is_learner(id, &m) {
            // etcd's IsReadyToRemoveVotingMember.
            let (voters, mut started) = self.etcd_voters();
            if self.members.get(id).is_some_and(|a| !a.name.is_empty()) {
                started -= 1;
            }
            let n = voters - 1;
            if started < n / 2 + 1 {
                return Err(Error::MemberNotEnoughStarted);
            }
        }
        let change = if is_raft_voter {
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        let written = self.raft.change_membership(change, false).await.map_err(client_write_error)?;
        tracing::info!(member_id = %format!("{id:x}"), "removed member from the cluster");
        Ok(written.log_id.index)
    }

    async fn member_update(&self, id: NodeId, peer_urls: Vec<String>) -> Result<u64> {
        if self.membership().get_node(&id).is_none() {
            return Err(Error::MemberNotFound);
        }
        let urls = self.check_urls(&peer_urls, Some(id))?;
        let change = ChangeMembers::SetNodes(BTreeMap::from([(id, MemberNode { peer_urls: urls.clone() })]));
        let written = self.raft.change_membership(change, false).await.map_err(client_write_error)?;
        tracing::info!(member_id = %format!("{id:x}"), peer_urls = ?urls, "updated member peer URLs");
        Ok(written.log_id.index)
    }

    async fn member_promote(&self, id: NodeId) -> Result<u64> {
        let view = self.raft_members();
        if view.membership.get_node(&id).is_none() {
            return Err(Error::MemberNotFound);
        }
        if !self.members.is_learner(id, &view.membership) {
            return Err(Error::MemberNotLearner);
        }
        if !view.caught_up(id) {
            return Err(Error::LearnerNotReady);
        }
        let record = self.members.get(id).unwrap_or(MemberAttributes { member_id: id, ..Default::default() });
        self.propose(InternalRequest { header: None, request: Some(internal_request::Request::PromoteMember(record)) })
            .await?;
        let written = self
            .raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
            .map_err(client_write_error)?;
        tracing::info!(member_id = %format!("{id:x}"), "promoted learner to voter");
        Ok(written.log_id.index)
    }

    /// etcd's CheckQuorum. An openraft 0.9 leader cut off from a quorum
    /// stays leader (and keeps the members it still reaches believing in
    /// it). Here such a leader stops its heartbeats for `STEP_DOWN_PAUSE`
    /// election timeouts: the followers it reaches then start elections,
    /// nobody names a leader until a quorum is back, and
    /// `WithRequireLeader` requests fail fast, as in etcd. Heartbeats
    /// resume afterwards so a returning quorum is noticed.
    ///
    /// The pause must outlast the longest wait of a follower before it
    /// campaigns. openraft waits its leader lease (election_timeout_max)
    /// plus a random timeout below election_timeout_max, and a follower
    /// that lost an earlier election to a member with a longer log adds
    /// `smaller_log_timeout` (2 x election_timeout_max) until it campaigns
    /// again: up to 4 election timeouts (`node::raft_config` sets
    /// election_timeout_max to etcd's election timeout). A shorter pause
    /// let such a follower keep naming the cut-off leader on every round
    /// (seen in CI, twice, in a five-member test).
    pub async fn check_quorum(&self) {
        let timeout = self.settings.election_timeout;
        let mut ticker = tokio::time::interval(self.settings.heartbeat_interval);
        loop {
            ticker.tick().await;
            let lost = {
                let rx = self.raft.metrics();
                let m = rx.borrow();
                m.current_leader == Some(self.id)
                    && m.millis_since_quorum_ack.is_some_and(|ms| ms > timeout.as_millis() as u64)
            };
            if lost {
                let _gate = self.transfer_gate.write().await;
                tracing::warn!("leader lost contact with a quorum; stepping down");
                self.raft.runtime_config().heartbeat(false);
                tokio::time::sleep(timeout * STEP_DOWN_PAUSE).await;
                self.raft.runtime_config().heartbeat(true);
            }
        }
    }

    /// Sets etcd_server_has_leader / is_leader from the current view (also
    /// on every scrape, so a scrape right after an election is not a tick
    /// behind); returns the leader.
    pub fn export_leader_gauges(&self) -> Option<NodeId> {
        let leader = self.leader();
        crate::metrics::HAS_LEADER.set(i64::from(leader.is_some()));
        crate::metrics::IS_LEADER.set(i64::from(leader == Some(self.id)));
        leader
    }

    /// Keeps the server gauges current: leader, proposals, size, watchers.
    pub async fn export_metrics(&self) {
        use crate::metrics as m;
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        let mut last_leader = None;
        loop {
            ticker.tick().await;
            let leader = self.export_leader_gauges();
            if leader.is_some() && leader != last_leader {
                if last_leader.is_some() {
                    m::LEADER_CHANGES.inc();
                }
                let term = self.term();
                tracing::info!(leader = %format!("{:x}", leader.unwrap_or(0)), term, "leader changed");
                last_leader = leader;
            }
            let metrics = self.raft.metrics().borrow().clone();
            let applied = metrics.last_applied.map_or(0, |l| l.index) as i64;
            let last_log = metrics.last_log_index.unwrap_or(0) as i64;
            m::PROPOSALS_APPLIED.set(applied);
            m::PROPOSALS_COMMITTED.set(applied.max(self.state_machine.applied_index() as i64));
            m::PROPOSALS_PENDING.set((last_log - applied).max(0));
            m::IS_LEARNER.set(i64::from(self.members.is_learner(self.id, metrics.membership_config.membership())));
            m::WATCHERS.set(self.hub.watcher_count() as i64);
            self.refresh_db_size();
        }
    }

    /// Hands leadership to `target` (etcd's MoveLeader; call on the leader).
    pub async fn move_leader(&self, target: NodeId) -> Result<()> {
        if self.leader() != Some(self.id) {
            return Err(Error::NotLeader);
        }
        if target == self.id {
            return Ok(());
        }
        let m = self.membership();
        let Some(node) = m.get_node(&target).cloned() else {
            return Err(Error::BadLeaderTransferee);
        };
        if !m.voter_ids().any(|v| v == target) {
            return Err(Error::BadLeaderTransferee);
        }
        let deadline = Instant::now() + self.request_timeout();
        // Let the target catch up first.
        loop {
            let metrics = self.raft.metrics().borrow().clone();
            let last = metrics.last_log_index.unwrap_or(0);
            let matched =
                metrics.replication.as_ref().and_then(|r| r.get(&target).cloned().flatten()).map_or(0, |l| l.index);
            if matched >= last {
                break;
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Hold new writes and reads, stop heartbeats, and wait until the
        // followers' leader lease (election_timeout_max) has lapsed.
        let gate = self.transfer_gate.write().await;
        self.raft.runtime_config().heartbeat(false);
        let lease = Duration::from_millis(self.raft.config().election_timeout_max) + Duration::from_millis(50);
        tokio::time::sleep(lease).await;
        let campaign = self.peers.campaign(target, &node, deadline.saturating_duration_since(Instant::now())).await;
        let mut outcome = campaign.map(|_| ());
        if outcome.is_ok() {
            outcome = Err(Error::Timeout);
            let give_up = Instant::now() + self.settings.election_timeout * 3;
            while Instant::now() < give_up {
                if self.leader() == Some(target) {
                    outcome = Ok(());
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        self.raft.runtime_config().heartbeat(true);
        drop(gate);
        if outcome.is_ok() {
            tracing::info!(from = %format!("{:x}", self.id), to = %format!("{target:x}"), "leadership transferred");
        }
        outcome
    }
}
