//! The corruption check: the leader compares its hash of the key space
//! with every peer's at the same revision (`--experimental-corrupt-check-
//! time`), and raises the CORRUPT alarm, which stops writes cluster-wide,
//! for a member that differs. A member started with
//! `--experimental-initial-corrupt-check` runs the comparison once before
//! it serves.

use std::sync::Arc;
use std::time::Duration;

use keel_proto::etcdserverpb::{alarm_request::AlarmAction, AlarmRequest, AlarmType};
use keel_proto::keelpb::{internal_request, InternalRequest};

use crate::error::{Error, Result};
use crate::mvcc::MvccStore;
use crate::raft_types::NodeId;
use crate::server::MembershipSeam;

pub struct CorruptionCheck<R> {
    raft: Arc<R>,
    mvcc: Arc<MvccStore>,
}

impl<R: MembershipSeam> CorruptionCheck<R> {
    pub fn new(raft: Arc<R>, mvcc: Arc<MvccStore>) -> Self {
        Self { raft, mvcc }
    }

    /// Compares this member's HashKV with every peer's at the same
    /// revision; returns the members that disagree. A peer that cannot
    /// answer, or has compacted differently, is not comparable now and is
    /// skipped.
    pub async fn mismatched_members(&self) -> Result<Vec<NodeId>> {
        let mvcc = self.mvcc.clone();
        let (hash, compact, _, rev) = tokio::task::spawn_blocking(move || mvcc.hash_kv(0))
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
        let me = self.raft.member_id();
        let members = self.raft.raft_members();
        let mut mismatched = Vec::new();
        for (id, node) in members.membership.nodes() {
            if *id == me {
                continue;
            }
            match self.raft.peer_hash_kv(*id, node, rev).await {
                Ok((peer_hash, peer_compact)) if peer_compact == compact && peer_hash != hash => {
                    tracing::error!(
                        member_id = %format!("{id:x}"),
                        revision = rev,
                        local_hash = hash,
                        peer_hash,
                        "found data inconsistency with a peer"
                    );
                    mismatched.push(*id);
                }
                Ok(_) => {}
                // Behind or ahead of our compaction: not comparable now.
                Err(Error::FutureRevision) | Err(Error::Compacted) => {}
                Err(e) => {
                    tracing::debug!(member_id = %format!("{id:x}"), error = %e, "corruption check skipped a peer")
                }
            }
        }
        Ok(mismatched)
    }

    /// One periodic pass, on the leader only: a member whose hash differs
    /// gets the CORRUPT alarm. Returns the members alarmed.
    pub async fn pass(&self) -> Vec<NodeId> {
        if !self.raft.leads() {
            return Vec::new();
        }
        let bad = match self.mismatched_members().await {
            Ok(bad) => bad,
            Err(e) => {
                tracing::warn!(error = %e, "corruption check failed");
                return Vec::new();
            }
        };
        let mut alarmed = Vec::new();
        for member_id in bad {
            let alarm =
                AlarmRequest { action: AlarmAction::Activate as i32, member_id, alarm: AlarmType::Corrupt as i32 };
            let req = InternalRequest { header: None, request: Some(internal_request::Request::Alarm(alarm)) };
            match self.raft.propose(req).await {
                Ok(_) => alarmed.push(member_id),
                Err(e) => tracing::warn!(error = %e, "failed to raise the CORRUPT alarm"),
            }
        }
        alarmed
    }
}

/// Runs the periodic check until the member stops; the first pass comes
/// one interval after start.
pub async fn run_corruption_check<R: MembershipSeam>(raft: Arc<R>, mvcc: Arc<MvccStore>, every: Duration) {
    let check = CorruptionCheck::new(raft, mvcc);
    let mut ticker = tokio::time::interval(every);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        check.pass().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::duties::fake_raft::{store_at, FakeRaft, Path, ME};

    /// A leader of members 1 to 4, its hash and compacted revision.
    fn leader_of_four() -> (Arc<FakeRaft>, CorruptionCheck<FakeRaft>, u32, i64) {
        let raft = Arc::new(FakeRaft::default());
        raft.lead(true, true);
        raft.set_members(&[ME, 2, 3, 4], &[], 10, &[]);
        let mvcc = store_at(2);
        let (hash, compact, ..) = mvcc.hash_kv(0).expect("hash");
        (raft.clone(), CorruptionCheck::new(raft, mvcc), hash, compact)
    }

    fn alarms(raft: &FakeRaft) -> Vec<(Path, u64)> {
        raft.proposed()
            .into_iter()
            .filter_map(|(path, r)| match r {
                internal_request::Request::Alarm(a) if a.alarm == AlarmType::Corrupt as i32 => {
                    Some((path, a.member_id))
                }
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn a_member_with_another_hash_gets_the_corrupt_alarm() {
        let (raft, check, hash, compact) = leader_of_four();
        raft.peer_answers(2, Ok((hash, compact)));
        raft.peer_answers(3, Ok((hash ^ 1, compact)));
        // Compacted elsewhere: hashes of different histories, not comparable.
        raft.peer_answers(4, Ok((hash ^ 1, compact + 5)));
        assert_eq!(check.pass().await, vec![3]);
        assert_eq!(alarms(&raft), vec![(Path::Forwarded, 3)]);
    }

    #[tokio::test]
    async fn peers_that_cannot_answer_are_skipped() {
        let (raft, check, hash, compact) = leader_of_four();
        raft.peer_answers(2, Err(Error::FutureRevision));
        raft.peer_answers(3, Err(Error::Compacted));
        raft.peer_answers(4, Err(Error::Timeout));
        assert_eq!(check.mismatched_members().await, Ok(Vec::new()));
        raft.peer_answers(4, Ok((hash ^ 1, compact)));
        assert_eq!(check.mismatched_members().await, Ok(vec![4]));
    }

    #[tokio::test]
    async fn only_a_leader_with_a_quorum_checks() {
        let (raft, check, hash, compact) = leader_of_four();
        raft.peer_answers(2, Ok((hash ^ 1, compact)));
        raft.lead(true, false);
        assert!(check.pass().await.is_empty(), "a leader without a quorum raised an alarm");
        raft.follow(2);
        assert!(check.pass().await.is_empty(), "a follower raised an alarm");
        assert!(raft.proposed().is_empty());
        // The start-up check runs on any member.
        assert_eq!(check.mismatched_members().await, Ok(vec![2]));
    }

    #[tokio::test]
    async fn an_alarm_that_fails_to_commit_is_raised_on_the_next_pass() {
        let (raft, check, hash, compact) = leader_of_four();
        raft.peer_answers(3, Ok((hash ^ 1, compact)));
        raft.fail_with(Some(Error::Timeout));
        assert!(check.pass().await.is_empty());
        raft.fail_with(None);
        assert_eq!(check.pass().await, vec![3]);
    }
}
