//! A member whose Raft the test drives: it sets who leads and whether the
//! leader has a quorum, the membership and each member's progress, the
//! hashes peers answer and a failure every proposal returns; the duties'
//! proposals and membership changes are recorded instead of replicated.
//! Also the in-memory stores the duties' tests run on.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use keel_proto::keelpb::{internal_request, InternalRequest, InternalResponse};

use crate::error::{Error, Result};
use crate::mvcc::MvccStore;
use crate::raft_types::{MemberNode, Membership, NodeId};
use crate::server::{MembershipSeam, RaftMembers, RaftSeam};
use crate::storage::memory::MemoryEngine;
use crate::storage::SharedEngine;

/// The id of the member under test.
pub const ME: NodeId = 1;

/// How a duty proposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// `propose`: from any member, forwarded to the leader.
    Forwarded,
    /// `propose_as_leader`: on this member only.
    AsLeader,
}

#[derive(Default)]
pub struct FakeRaft {
    named_leader: AtomicBool,
    has_quorum: AtomicBool,
    other_leader: Mutex<Option<NodeId>>,
    failure: Mutex<Option<Error>>,
    proposed: Mutex<Vec<(Path, internal_request::Request)>>,
    members: Mutex<Option<RaftMembers>>,
    made_voters: Mutex<Vec<NodeId>>,
    peer_hashes: Mutex<BTreeMap<NodeId, Result<(u32, i64)>>>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl FakeRaft {
    /// Raft names this member leader (`named`), with or without a quorum.
    pub fn lead(&self, named: bool, quorum: bool) {
        self.named_leader.store(named, Ordering::SeqCst);
        self.has_quorum.store(quorum, Ordering::SeqCst);
        *locked(&self.other_leader) = None;
    }

    /// Another member leads.
    pub fn follow(&self, leader: NodeId) {
        self.lead(false, false);
        *locked(&self.other_leader) = Some(leader);
    }

    /// Every proposal and membership change fails with `failure` (none:
    /// they succeed).
    pub fn fail_with(&self, failure: Option<Error>) {
        *locked(&self.failure) = failure;
    }

    pub fn proposed(&self) -> Vec<(Path, internal_request::Request)> {
        locked(&self.proposed).clone()
    }

    /// Voters `voters` and learners `learners` (each reachable at a made-up
    /// URL); the leader's log ends at `last_log_index`, and `matched` is
    /// how far each member's log matches it.
    pub fn set_members(&self, voters: &[NodeId], learners: &[NodeId], last_log_index: u64, matched: &[(NodeId, u64)]) {
        let node = |id: &NodeId| (*id, MemberNode { peer_urls: vec![format!("http://127.0.0.1:{}", 2380 + id)] });
        let nodes: BTreeMap<NodeId, MemberNode> = voters.iter().chain(learners).map(node).collect();
        let membership = Membership::new(vec![voters.iter().copied().collect()], nodes);
        *locked(&self.members) =
            Some(RaftMembers { membership, last_log_index, matched: matched.iter().copied().collect() });
    }

    pub fn made_voters(&self) -> Vec<NodeId> {
        locked(&self.made_voters).clone()
    }

    /// What peer `id` answers to HashKV.
    pub fn peer_answers(&self, id: NodeId, answer: Result<(u32, i64)>) {
        locked(&self.peer_hashes).insert(id, answer);
    }

    fn outcome(&self) -> Result<()> {
        locked(&self.failure).clone().map_or(Ok(()), Err)
    }

    fn record(&self, path: Path, req: InternalRequest) -> Result<()> {
        if let Some(r) = req.request {
            locked(&self.proposed).push((path, r));
        }
        self.outcome()
    }
}

impl RaftSeam for FakeRaft {
    fn member_id(&self) -> NodeId {
        ME
    }

    fn raft_names_me_leader(&self) -> bool {
        self.named_leader.load(Ordering::SeqCst)
    }

    fn leader(&self) -> Option<NodeId> {
        if self.raft_names_me_leader() {
            return self.has_quorum.load(Ordering::SeqCst).then_some(ME);
        }
        *locked(&self.other_leader)
    }

    async fn propose(&self, req: InternalRequest) -> Result<InternalResponse> {
        self.record(Path::Forwarded, req).map(|()| InternalResponse::default())
    }

    async fn propose_as_leader(&self, req: InternalRequest) -> Result<(InternalResponse, u64)> {
        self.record(Path::AsLeader, req).map(|()| (InternalResponse::default(), 1))
    }
}

impl MembershipSeam for FakeRaft {
    fn raft_members(&self) -> RaftMembers {
        locked(&self.members).clone().unwrap_or_else(|| RaftMembers {
            membership: Membership::new(
                vec![[ME].into()],
                BTreeMap::from([(ME, MemberNode { peer_urls: Vec::new() })]),
            ),
            last_log_index: 0,
            matched: BTreeMap::new(),
        })
    }

    async fn make_voter(&self, id: NodeId) -> Result<()> {
        self.outcome()?;
        locked(&self.made_voters).push(id);
        Ok(())
    }

    async fn peer_hash_kv(&self, id: NodeId, _node: &MemberNode, _revision: i64) -> Result<(u32, i64)> {
        locked(&self.peer_hashes).get(&id).cloned().unwrap_or(Err(Error::Unhealthy))
    }
}

/// A store at revision `rev` (one put per revision).
pub fn store_at(rev: i64) -> Arc<MvccStore> {
    let engine: SharedEngine = Arc::new(MemoryEngine::new());
    let mvcc = Arc::new(MvccStore::open(engine).expect("mvcc"));
    advance(&mvcc, rev);
    mvcc
}

/// Puts until `mvcc` is at revision `to`.
pub fn advance(mvcc: &MvccStore, to: i64) {
    while mvcc.current_rev() < to {
        let mut txn = mvcc.write().expect("write txn");
        txn.put(b"k", bytes::Bytes::from_static(b"v"), 0);
        txn.seal_request();
        txn.commit().expect("commit");
    }
}
