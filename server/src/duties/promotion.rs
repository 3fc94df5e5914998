//! Learner promotion: a member added as a voter joins Raft as a learner
//! (see `membership`), and the leader makes it a Raft voter once its log
//! has caught up, so that a new member never counts toward the quorum
//! before it can vote. Members added as learners wait for MemberPromote.

use std::sync::Arc;
use std::time::Duration;

use crate::cluster::MemberRegistry;
use crate::raft_types::NodeId;
use crate::server::{MembershipSeam, RaftMembers};

/// How often the leader looks for members ready to vote.
pub const PROMOTION_INTERVAL: Duration = Duration::from_millis(200);

pub struct LearnerPromotion<R> {
    raft: Arc<R>,
    members: Arc<MemberRegistry>,
}

impl<R: MembershipSeam> LearnerPromotion<R> {
    pub fn new(raft: Arc<R>, members: Arc<MemberRegistry>) -> Self {
        Self { raft, members }
    }

    /// Members added as voters that Raft still treats as learners.
    fn pending(&self, view: &RaftMembers) -> Vec<NodeId> {
        view.membership
            .nodes()
            .map(|(id, _)| *id)
            .filter(|id| !view.is_voter(*id) && self.members.get(*id).is_some_and(|a| !a.is_learner))
            .collect()
    }

    /// One pass, on the leader only: promotes every pending member that
    /// caught up. Returns the members promoted; one that could not be is
    /// tried again on the next pass.
    pub async fn pass(&self) -> Vec<NodeId> {
        if !self.raft.leads() {
            return Vec::new();
        }
        let view = self.raft.raft_members();
        let mut promoted = Vec::new();
        for id in self.pending(&view) {
            if !view.caught_up(id) {
                continue;
            }
            match self.raft.make_voter(id).await {
                Ok(()) => {
                    tracing::info!(member_id = %format!("{id:x}"), "new member caught up; it now votes");
                    promoted.push(id);
                }
                Err(e) => tracing::debug!(member_id = %format!("{id:x}"), error = %e, "promotion not done yet"),
            }
        }
        promoted
    }
}

/// Runs learner promotion until the member stops.
pub async fn run_learner_promotion<R: MembershipSeam>(raft: Arc<R>, members: Arc<MemberRegistry>) {
    let promotion = LearnerPromotion::new(raft, members);
    let mut ticker = tokio::time::interval(PROMOTION_INTERVAL);
    loop {
        ticker.tick().await;
        promotion.pass().await;
    }
}

#[cfg(test)]
mod tests {
    use keel_proto::keelpb::MemberAttributes;

    use super::*;
    use crate::duties::fake_raft::{FakeRaft, ME};
    use crate::error::Error;
    use crate::storage::memory::MemoryEngine;
    use crate::storage::{SharedEngine, WriteBatch};

    /// Records of members 2 (added as a voter) and 3 (added as a learner).
    fn registry() -> Arc<MemberRegistry> {
        let engine: SharedEngine = Arc::new(MemoryEngine::new());
        let members = Arc::new(MemberRegistry::load(&engine).expect("registry"));
        let mut batch = WriteBatch::new();
        for (id, is_learner) in [(2, false), (3, true)] {
            members.put(&MemberAttributes { member_id: id, is_learner, ..Default::default() }, &mut batch);
        }
        engine.write(batch, false).expect("write");
        members.reload(&engine).expect("reload");
        members
    }

    #[tokio::test]
    async fn a_new_voter_votes_once_it_caught_up() {
        let raft = Arc::new(FakeRaft::default());
        raft.lead(true, true);
        let promotion = LearnerPromotion::new(raft.clone(), registry());
        raft.set_members(&[ME], &[2, 3], 1000, &[(2, 500), (3, 1000)]);
        assert!(promotion.pass().await.is_empty(), "promoted a member at half the log");
        // 90% of the leader's log is enough (etcd's rule). Member 3 was
        // added as a learner: it waits for MemberPromote.
        raft.set_members(&[ME], &[2, 3], 1000, &[(2, 900), (3, 1000)]);
        assert_eq!(promotion.pass().await, vec![2]);
        assert_eq!(raft.made_voters(), vec![2]);
        raft.set_members(&[ME, 2], &[3], 1000, &[(2, 1000), (3, 1000)]);
        assert!(promotion.pass().await.is_empty(), "promoted a voter again");
    }

    #[tokio::test]
    async fn only_a_leader_with_a_quorum_promotes() {
        let raft = Arc::new(FakeRaft::default());
        let promotion = LearnerPromotion::new(raft.clone(), registry());
        raft.set_members(&[ME], &[2], 1000, &[(2, 1000)]);
        raft.follow(4);
        assert!(promotion.pass().await.is_empty());
        raft.lead(true, false);
        assert!(promotion.pass().await.is_empty());
        assert!(raft.made_voters().is_empty(), "promoted {:?}", raft.made_voters());
    }

    #[tokio::test]
    async fn a_failed_promotion_is_tried_again_on_the_next_pass() {
        let raft = Arc::new(FakeRaft::default());
        raft.lead(true, true);
        let promotion = LearnerPromotion::new(raft.clone(), registry());
        raft.set_members(&[ME], &[2], 1000, &[(2, 1000)]);
        raft.fail_with(Some(Error::NotLeader));
        assert!(promotion.pass().await.is_empty());
        raft.fail_with(None);
        assert_eq!(promotion.pass().await, vec![2]);
    }
}
