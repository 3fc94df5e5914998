//! Periodic maintenance a member runs by itself: auto compaction (leader,
//! `--auto-compaction-mode/-retention`) and the corruption check (leader,
//! `--experimental-corrupt-check-time`; once at start-up with
//! `--experimental-initial-corrupt-check`).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use keel_proto::etcdserverpb::{alarm_request::AlarmAction, AlarmRequest, AlarmType, CompactionRequest};
use keel_proto::keelpb::{internal_request, InternalRequest};

use crate::error::{Error, Result};
use crate::go_duration::parse_go_duration;
use crate::server::Server;

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

impl Server {
    async fn compact_to(&self, rev: i64) -> Result<()> {
        let req = InternalRequest {
            // The member's own request: no user's permission applies.
            header: Some(keel_proto::keelpb::RequestHeader { internal: true, ..Default::default() }),
            request: Some(internal_request::Request::Compaction(CompactionRequest { revision: rev, physical: false })),
        };
        match self.propose(req).await {
            Ok(_) => {
                crate::metrics::COMPACTIONS.inc();
                tracing::info!(revision = rev, "auto compaction");
                Ok(())
            }
            Err(Error::Compacted) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Runs auto compaction on the leader until the member stops.
    pub async fn auto_compact(&self, retention: Retention) {
        match retention {
            Retention::Revisions(keep) => {
                let mut ticker = tokio::time::interval(REVISION_CHECK_INTERVAL);
                loop {
                    ticker.tick().await;
                    if self.leader() != Some(self.id) {
                        continue;
                    }
                    let target = self.mvcc.current_rev() - keep;
                    if target > self.mvcc.compact_rev() && target > 0 {
                        if let Err(e) = self.compact_to(target).await {
                            tracing::warn!(error = %e, "auto compaction failed");
                        }
                    }
                }
            }
            Retention::Period(period) => {
                // Sample the revision every tenth of the period; compact to
                // the newest sample that is a whole period old.
                let step = (period / 10).max(Duration::from_secs(1));
                let mut samples: VecDeque<(Instant, i64)> = VecDeque::new();
                let mut ticker = tokio::time::interval(step);
                loop {
                    ticker.tick().await;
                    let now = Instant::now();
                    samples.push_back((now, self.mvcc.current_rev()));
                    let mut target = None;
                    while let Some(&(t, rev)) = samples.front() {
                        if now.duration_since(t) >= period {
                            target = Some(rev);
                            samples.pop_front();
                        } else {
                            break;
                        }
                    }
                    if self.leader() != Some(self.id) {
                        continue;
                    }
                    if let Some(rev) = target.filter(|r| *r > self.mvcc.compact_rev()) {
                        if let Err(e) = self.compact_to(rev).await {
                            tracing::warn!(error = %e, "auto compaction failed");
                        }
                    }
                }
            }
        }
    }

    /// Compares this member's HashKV with every peer's at the same
    /// revision; returns the members that disagree.
    pub async fn corrupt_check(&self) -> Result<Vec<u64>> {
        let mvcc = self.mvcc.clone();
        let (hash, compact, _, rev) = tokio::task::spawn_blocking(move || mvcc.hash_kv(0))
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
        let membership = self.raft.metrics().borrow().membership_config.membership().clone();
        let mut mismatched = Vec::new();
        for (id, node) in membership.nodes() {
            if *id == self.id {
                continue;
            }
            match self.peers.hash_kv(*id, node, rev, Duration::from_secs(5)).await {
                Ok((peer_hash, peer_compact)) => {
                    if peer_compact == compact && peer_hash != hash {
                        tracing::error!(
                            member_id = %format!("{id:x}"),
                            revision = rev,
                            local_hash = hash,
                            peer_hash,
                            "found data inconsistency with a peer"
                        );
                        mismatched.push(*id);
                    }
                }
                // Behind or ahead of our compaction: not comparable now.
                Err(Error::FutureRevision) | Err(Error::Compacted) => {}
                Err(e) => {
                    tracing::debug!(member_id = %format!("{id:x}"), error = %e, "corruption check skipped a peer")
                }
            }
        }
        Ok(mismatched)
    }

    /// The leader's periodic corruption check: a member whose hash differs
    /// gets the CORRUPT alarm, which stops writes cluster-wide.
    pub async fn periodic_corrupt_check(&self, every: Duration) {
        let mut ticker = tokio::time::interval(every);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            if self.leader() != Some(self.id) {
                continue;
            }
            match self.corrupt_check().await {
                Ok(bad) => {
                    for member_id in bad {
                        let alarm = AlarmRequest {
                            action: AlarmAction::Activate as i32,
                            member_id,
                            alarm: AlarmType::Corrupt as i32,
                        };
                        let req =
                            InternalRequest { header: None, request: Some(internal_request::Request::Alarm(alarm)) };
                        if let Err(e) = self.propose(req).await {
                            tracing::warn!(error = %e, "failed to raise the CORRUPT alarm");
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "corruption check failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_follows_etcd() {
        let p = CompactionMode::Periodic;
        assert_eq!(parse_retention(p, "0"), Ok(None));
        assert_eq!(parse_retention(p, "1"), Ok(Some(Retention::Period(Duration::from_secs(3600)))));
        assert_eq!(parse_retention(p, "30m"), Ok(Some(Retention::Period(Duration::from_secs(1800)))));
        assert_eq!(parse_retention(CompactionMode::Revision, "1000"), Ok(Some(Retention::Revisions(1000))));
        assert!(parse_retention(CompactionMode::Revision, "1h").is_err());
    }
}
