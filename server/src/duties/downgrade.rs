//! The end of a cluster downgrade (etcd 3.5+): while a downgrade is
//! enabled, the leader checks every `--downgrade-check-time` whether every
//! member now runs the target release (the version each published), and
//! then turns the downgrade off, logging etcd's "the cluster has been
//! downgraded". The cluster version itself needs no step: it is the lowest
//! release the members published (`MemberRegistry::cluster_version`).

use std::sync::Arc;
use std::time::Duration;

use keel_proto::keelpb::{internal_request, DowngradeInfoSet, InternalRequest};

use crate::cluster::MemberRegistry;
use crate::server::MembershipSeam;
use crate::version::minor;

pub struct DowngradeMonitor<R> {
    raft: Arc<R>,
    members: Arc<MemberRegistry>,
}

impl<R: MembershipSeam> DowngradeMonitor<R> {
    pub fn new(raft: Arc<R>, members: Arc<MemberRegistry>) -> Self {
        Self { raft, members }
    }

    /// One pass, on the leader only: true when it finished a downgrade.
    pub async fn pass(&self) -> bool {
        if !self.raft.leads() {
            return false;
        }
        let Some(target) = self.members.downgrade_target() else {
            return false;
        };
        let view = self.raft.raft_members();
        let all_downgraded = view.membership.nodes().all(|(id, _)| {
            self.members.get(*id).is_some_and(|a| !a.version.is_empty() && minor(&a.version) == minor(&target))
        });
        if !all_downgraded {
            return false;
        }
        let done = DowngradeInfoSet { enabled: false, target_version: String::new() };
        let req = InternalRequest { header: None, request: Some(internal_request::Request::DowngradeInfoSet(done)) };
        match self.raft.propose(req).await {
            Ok(_) => {
                let line = target.rsplit_once('.').map_or(target.as_str(), |(line, _)| line);
                tracing::info!(cluster_version = %line, "the cluster has been downgraded");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not end the downgrade; trying again");
                false
            }
        }
    }
}

/// Runs the downgrade monitor every `interval` until the member stops.
pub async fn run_downgrade_monitor<R: MembershipSeam>(raft: Arc<R>, members: Arc<MemberRegistry>, interval: Duration) {
    let monitor = DowngradeMonitor::new(raft, members);
    let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(10)));
    loop {
        ticker.tick().await;
        monitor.pass().await;
    }
}

#[cfg(test)]
mod tests {
    use keel_proto::keelpb::MemberAttributes;

    use super::*;
    use crate::duties::fake_raft::{FakeRaft, Path, ME};
    use crate::storage::memory::MemoryEngine;
    use crate::storage::{SharedEngine, WriteBatch};

    /// Members 1 and 2 published `versions`; a downgrade to 3.5 is on.
    fn registry(versions: [&str; 2]) -> Arc<MemberRegistry> {
        let engine: SharedEngine = Arc::new(MemoryEngine::new());
        let members = Arc::new(MemberRegistry::load(&engine).expect("registry"));
        let mut batch = WriteBatch::new();
        for (id, version) in [ME, 2].into_iter().zip(versions) {
            members.put(&MemberAttributes { member_id: id, version: version.into(), ..Default::default() }, &mut batch);
        }
        members.set_downgrade(Some("3.5.0"), &mut batch);
        engine.write(batch, false).expect("write");
        members.reload(&engine).expect("reload");
        members
    }

    fn monitor(versions: [&str; 2]) -> (Arc<FakeRaft>, DowngradeMonitor<FakeRaft>) {
        let raft = Arc::new(FakeRaft::default());
        raft.set_members(&[ME, 2], &[], 10, &[]);
        (raft.clone(), DowngradeMonitor::new(raft, registry(versions)))
    }

    #[tokio::test]
    async fn ends_the_downgrade_once_every_member_runs_the_target() {
        let (raft, monitor) = monitor(["3.5.21", "3.5.21"]);
        raft.lead(true, true);
        assert!(monitor.pass().await);
        let proposed = raft.proposed();
        assert_eq!(proposed.len(), 1);
        assert!(matches!(
            &proposed[0],
            (Path::Forwarded, internal_request::Request::DowngradeInfoSet(d)) if !d.enabled
        ));
    }

    #[tokio::test]
    async fn waits_for_every_member_and_only_the_leader_acts() {
        let (raft, monitor) = monitor(["3.5.21", "3.6.17"]);
        raft.lead(true, true);
        assert!(!monitor.pass().await, "member 2 still runs 3.6");
        let (raft, monitor) = monitor_following(["3.5.21", "3.5.21"]);
        assert!(!monitor.pass().await, "a follower leaves it to the leader");
        assert!(raft.proposed().is_empty());
    }

    fn monitor_following(versions: [&str; 2]) -> (Arc<FakeRaft>, DowngradeMonitor<FakeRaft>) {
        let (raft, monitor) = monitor(versions);
        raft.follow(2);
        (raft, monitor)
    }
}
