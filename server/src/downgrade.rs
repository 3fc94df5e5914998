//! `Maintenance.Downgrade` (etcd 3.5+): VALIDATE checks that the cluster
//! may go to the previous minor release, ENABLE records that it is going
//! there (through Raft, so every member and `Status.downgradeInfo` see it),
//! CANCEL takes it back. While a downgrade is enabled, members may restart
//! as the target release (`--advertise-etcd-version`, or etcd's own
//! binary); the cluster version follows the lowest release the members
//! publish, and `duties::downgrade` ends the downgrade once all run it.
//! Outside one, a member refuses to start below the cluster version.

use keel_proto::etcdserverpb::downgrade_request::DowngradeAction;
use keel_proto::keelpb::{internal_request, DowngradeInfoSet, InternalRequest};

use crate::error::{Error, Result};
use crate::server::Server;
use crate::version::minor;

/// etcd's `convertToClusterVersion`: "3.5", "3.5.0" or "3.5.9" name the
/// cluster version 3.5 (the patch is dropped); anything else is refused.
pub fn parse_target(version: &str) -> Result<(u64, u64)> {
    let parts: Vec<&str> = version.split('.').collect();
    let number = |p: &str| p.parse::<u64>().ok().filter(|_| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    let numbers: Option<Vec<u64>> = parts.iter().map(|p| number(p)).collect();
    match numbers.as_deref() {
        Some([major, minor]) | Some([major, minor, _]) => Ok((*major, *minor)),
        _ => Err(Error::DowngradeWrongVersionFormat),
    }
}

impl Server {
    /// The cluster version ("3.6"): the lowest release any member of the
    /// Raft membership published, this member's included.
    pub fn cluster_version(&self) -> String {
        let metrics = self.raft.metrics();
        let ids: Vec<u64> = metrics.borrow().membership_config.membership().nodes().map(|(id, _)| *id).collect();
        self.members.cluster_version(ids, &self.settings.etcd_version)
    }

    /// The storage version etcd reports from 3.6 on ("3.6.0", that of the
    /// cluster version); None before 3.6, which has none.
    pub fn storage_version(&self) -> Option<String> {
        let cluster = self.cluster_version();
        (minor(&cluster) >= 6).then(|| format!("{cluster}.0"))
    }

    /// Answers a Downgrade request with the cluster version ("3.6").
    pub async fn downgrade(&self, action: DowngradeAction, version: &str) -> Result<String> {
        match action {
            DowngradeAction::Validate => self.downgrade_validate(version).await.map(|(cluster, _)| cluster),
            DowngradeAction::Enable => {
                let (cluster, target) = self.downgrade_validate(version).await?;
                self.propose_downgrade(DowngradeInfoSet { enabled: true, target_version: target.clone() }).await?;
                tracing::info!(target_version = %target, "the cluster is downgrading");
                Ok(cluster)
            }
            DowngradeAction::Cancel => {
                self.linearizable_barrier().await?;
                if self.members.downgrade_target().is_some() {
                    self.propose_downgrade(DowngradeInfoSet { enabled: false, target_version: String::new() }).await?;
                    tracing::info!("the downgrade is cancelled");
                } else {
                    // etcd answers success here too, and only warns.
                    tracing::warn!("no inflight downgrade job to cancel");
                }
                Ok(self.cluster_version())
            }
        }
    }

    /// etcd's rules, in its order: a well-formed target, a known cluster
    /// version, a linearizable view, the target one minor below, no
    /// downgrade already under way. Returns the cluster version and the
    /// target release ("3.5.0").
    async fn downgrade_validate(&self, version: &str) -> Result<(String, String)> {
        let target = parse_target(version)?;
        let cluster = self.cluster_version();
        let cluster_minor = u64::from(minor(&cluster));
        if cluster_minor == 0 {
            return Err(Error::ClusterVersionUnavailable);
        }
        self.linearizable_barrier().await?;
        if target != (3, cluster_minor - 1) {
            return Err(Error::DowngradeInvalidVersion);
        }
        if self.members.downgrade_target().is_some() {
            return Err(Error::DowngradeInProgress);
        }
        let (major, target_minor) = target;
        Ok((cluster, format!("{major}.{target_minor}.0")))
    }

    async fn propose_downgrade(&self, info: DowngradeInfoSet) -> Result<()> {
        let req = InternalRequest { header: None, request: Some(internal_request::Request::DowngradeInfoSet(info)) };
        self.propose(req).await.map(|_| ())
    }
}

/// Whether a member reporting `own` may start in a cluster whose members
/// (itself before this start included) published `published` (etcd's
/// `mustDetectDowngrade`): not below the cluster version, unless a
/// downgrade to its release is enabled.
pub fn check_start_version(
    own: &str,
    published: &[String],
    downgrade_target: Option<&str>,
) -> std::result::Result<(), String> {
    let Some(cluster) = published.iter().filter(|v| !v.is_empty()).map(|v| minor(v)).min() else {
        return Ok(());
    };
    let own_minor = minor(own);
    if own_minor >= cluster {
        return Ok(());
    }
    if downgrade_target.is_some_and(|t| minor(t) == own_minor) {
        return Ok(());
    }
    Err(format!("invalid downgrade; server version is lower than determined cluster version (server {own}, cluster 3.{cluster})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_as_etcd_converts_them() {
        assert_eq!(parse_target("3.5"), Ok((3, 5)));
        assert_eq!(parse_target("3.5.9"), Ok((3, 5)));
        for bad in ["", "3", "three.5", "3.5.x", "3.5.0.1", "-3.5"] {
            assert_eq!(parse_target(bad), Err(Error::DowngradeWrongVersionFormat), "{bad:?}");
        }
    }

    #[test]
    fn a_member_below_the_cluster_starts_only_while_downgrading_to_it() {
        let others = ["3.6.17".to_string(), "3.6.17".to_string()];
        assert!(check_start_version("3.6.17", &others, None).is_ok());
        assert!(check_start_version("3.7.4", &others, None).is_ok());
        assert!(check_start_version("3.5.21", &others, None).is_err());
        assert!(check_start_version("3.5.21", &others, Some("3.5.0")).is_ok());
        assert!(check_start_version("3.4.23", &others, Some("3.5.0")).is_err());
        assert!(check_start_version("3.4.23", &[], None).is_ok());
    }
}
