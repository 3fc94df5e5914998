//! Scheduled compaction (`--auto-compaction-mode`,
//! `--auto-compaction-retention`): the leader proposes compactions that
//! keep a number of revisions, or a span of time, of history.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_proto::etcdserverpb::CompactionRequest;
use keel_proto::keelpb::{internal_request, InternalRequest, RequestHeader};

use crate::error::{Error, Result};
use crate::go_duration::parse_go_duration;
use crate::mvcc::MvccStore;
use crate::server::RaftSeam;

/// etcd's revision-mode compactor checks every five minutes.
const REVISION_CHECK_INTERVAL: Duration = Duration::from_secs(300);

/// How `--auto-compaction-retention` is read (`--auto-compaction-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompactionMode {
    /// A duration: keep that much history.
    Periodic,
    /// A number of revisions to keep.
    Revision,
}

/// What auto compaction keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Keep this much history by time.
    Period(Duration),
    /// Keep this many revisions.
    Revisions(i64),
}

/// Parses `--auto-compaction-retention` for a mode ("0" disables). In
/// periodic mode a bare number means hours, as in etcd.
pub fn parse_retention(mode: CompactionMode, s: &str) -> std::result::Result<Option<Retention>, String> {
    let s = s.trim();
    match mode {
        CompactionMode::Revision => {
            let n: i64 = s.parse().map_err(|_| format!("invalid revision retention {s:?}"))?;
            Ok((n > 0).then_some(Retention::Revisions(n)))
        }
        CompactionMode::Periodic => {
            let d = match s.parse::<u64>() {
                Ok(hours) => Duration::from_secs(hours * 3600),
                Err(_) => parse_go_duration(s)?,
            };
            Ok((!d.is_zero()).then_some(Retention::Period(d)))
        }
    }
}

/// Schedules compactions on the leader. Every member samples its
/// revision (periodic mode), so a new leader compacts on time; only the
/// leader proposes.
pub struct AutoCompactor<R> {
    raft: Arc<R>,
    mvcc: Arc<MvccStore>,
    retention: Retention,
    /// (when, revision) samples younger than the period, oldest first.
    samples: VecDeque<(Instant, i64)>,
}

impl<R: RaftSeam> AutoCompactor<R> {
    pub fn new(raft: Arc<R>, mvcc: Arc<MvccStore>, retention: Retention) -> Self {
        Self { raft, mvcc, retention, samples: VecDeque::new() }
    }

    /// How often [`AutoCompactor::tick`] runs: etcd's revision-mode
    /// compactor checks every five minutes; periodic mode samples every
    /// tenth of the period.
    pub fn interval(&self) -> Duration {
        match self.retention {
            Retention::Revisions(_) => REVISION_CHECK_INTERVAL,
            Retention::Period(period) => (period / 10).max(Duration::from_secs(1)),
        }
    }

    /// One check at `now`: samples the revision, and, on the leader,
    /// proposes the compaction the retention calls for. Returns the
    /// revision compacted to. A failed proposal is tried again on the
    /// next tick (the target only grows).
    pub async fn tick(&mut self, now: Instant) -> Option<i64> {
        let target = match self.retention {
            Retention::Revisions(keep) => Some(self.mvcc.current_rev() - keep),
            Retention::Period(period) => {
                // The newest sample that is a whole period old.
                self.samples.push_back((now, self.mvcc.current_rev()));
                let mut target = None;
                while let Some(&(at, rev)) = self.samples.front() {
                    if now.duration_since(at) < period {
                        break;
                    }
                    target = Some(rev);
                    self.samples.pop_front();
                }
                target
            }
        };
        let target = target.filter(|rev| *rev > 0 && *rev > self.mvcc.compact_rev())?;
        if !self.raft.leads() {
            return None;
        }
        match self.compact_to(target).await {
            Ok(()) => Some(target),
            Err(e) => {
                tracing::warn!(revision = target, error = %e, "auto compaction failed");
                None
            }
        }
    }

    async fn compact_to(&self, rev: i64) -> Result<()> {
        let req = InternalRequest {
            // The member's own request: no user's permission applies.
            header: Some(RequestHeader { internal: true, ..Default::default() }),
            request: Some(internal_request::Request::Compaction(CompactionRequest { revision: rev, physical: false })),
        };
        match self.raft.propose(req).await {
            Ok(_) => {
                crate::metrics::COMPACTIONS.inc();
                tracing::info!(revision = rev, "auto compaction");
                Ok(())
            }
            // Someone compacted further meanwhile.
            Err(Error::Compacted) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Runs scheduled compaction until the member stops.
pub async fn run_auto_compaction<R: RaftSeam>(raft: Arc<R>, mvcc: Arc<MvccStore>, retention: Retention) {
    let mut compactor = AutoCompactor::new(raft, mvcc, retention);
    let mut ticker = tokio::time::interval(compactor.interval());
    loop {
        ticker.tick().await;
        compactor.tick(Instant::now()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::duties::fake_raft::{advance, store_at, FakeRaft, Path};

    #[test]
    fn retention_follows_etcd() {
        let p = CompactionMode::Periodic;
        assert_eq!(parse_retention(p, "0"), Ok(None));
        assert_eq!(parse_retention(p, "1"), Ok(Some(Retention::Period(Duration::from_secs(3600)))));
        assert_eq!(parse_retention(p, "30m"), Ok(Some(Retention::Period(Duration::from_secs(1800)))));
        assert_eq!(parse_retention(CompactionMode::Revision, "1000"), Ok(Some(Retention::Revisions(1000))));
        assert!(parse_retention(CompactionMode::Revision, "1h").is_err());
    }

    fn compactions(raft: &FakeRaft) -> Vec<(Path, i64)> {
        raft.proposed()
            .into_iter()
            .filter_map(|(path, r)| match r {
                internal_request::Request::Compaction(c) => Some((path, c.revision)),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn revision_retention_compacts_on_the_leader_only() {
        let raft = Arc::new(FakeRaft::default());
        let mvcc = store_at(1500);
        let mut compactor = AutoCompactor::new(raft.clone(), mvcc.clone(), Retention::Revisions(1000));
        raft.follow(2);
        assert_eq!(compactor.tick(Instant::now()).await, None);
        raft.lead(true, false);
        assert_eq!(compactor.tick(Instant::now()).await, None, "a leader without a quorum compacted");
        assert!(raft.proposed().is_empty(), "proposed {:?}", raft.proposed());

        raft.lead(true, true);
        assert_eq!(compactor.tick(Instant::now()).await, Some(500));
        // Through the forwarding path: compaction is an ordinary write.
        assert_eq!(compactions(&raft), vec![(Path::Forwarded, 500)]);
    }

    #[tokio::test]
    async fn revision_retention_waits_until_there_is_history_to_drop() {
        let raft = Arc::new(FakeRaft::default());
        raft.lead(true, true);
        let mvcc = store_at(800);
        let mut compactor = AutoCompactor::new(raft.clone(), mvcc.clone(), Retention::Revisions(1000));
        assert_eq!(compactor.tick(Instant::now()).await, None);
        advance(&mvcc, 1001);
        assert_eq!(compactor.tick(Instant::now()).await, Some(1));
    }

    #[tokio::test]
    async fn a_failed_compaction_is_tried_again_on_the_next_tick() {
        let raft = Arc::new(FakeRaft::default());
        raft.lead(true, true);
        let mvcc = store_at(20);
        let mut compactor = AutoCompactor::new(raft.clone(), mvcc.clone(), Retention::Revisions(10));
        raft.fail_with(Some(Error::Timeout));
        assert_eq!(compactor.tick(Instant::now()).await, None);
        raft.fail_with(None);
        advance(&mvcc, 25);
        assert_eq!(compactor.tick(Instant::now()).await, Some(15));
        assert_eq!(compactions(&raft), vec![(Path::Forwarded, 10), (Path::Forwarded, 15)]);

        // Compacted further by someone else: done, not an error.
        raft.fail_with(Some(Error::Compacted));
        advance(&mvcc, 30);
        assert_eq!(compactor.tick(Instant::now()).await, Some(20));
    }

    #[tokio::test]
    async fn periodic_retention_compacts_to_the_revision_of_a_period_ago() {
        let raft = Arc::new(FakeRaft::default());
        raft.follow(2);
        let mvcc = store_at(10);
        let hour = Duration::from_secs(3600);
        let mut compactor = AutoCompactor::new(raft.clone(), mvcc.clone(), Retention::Period(hour));
        assert_eq!(compactor.interval(), Duration::from_secs(360));
        let start = Instant::now();
        // A follower samples too, so that it compacts on time once it leads.
        assert_eq!(compactor.tick(start).await, None);
        advance(&mvcc, 40);
        assert_eq!(compactor.tick(start + hour / 2).await, None);
        advance(&mvcc, 70);
        raft.lead(true, true);
        // An hour after the first sample: back to revision 10, not 40.
        assert_eq!(compactor.tick(start + hour).await, Some(10));
        assert_eq!(compactor.tick(start + hour + hour / 4).await, None, "nothing a whole period old yet");
        assert_eq!(compactor.tick(start + hour + hour / 2).await, Some(40));
    }
}
