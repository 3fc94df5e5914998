//! Version numbers keel reports.

/// The etcd release keel is measured against (its e2e suite, Debian's
/// etcd-server), and so the version it reports by default (Status,
/// /version, metrics). `--advertise-etcd-version` changes it: the
/// Kubernetes API server serves consistent lists from its watch cache only
/// from etcd 3.4.31 / 3.5.13 on (releases with RequestProgress fixed, as it
/// is in keel), and falls back to quorum reads for older ones.
pub const ETCD_API_VERSION: &str = "3.4.23";

/// keel's own version (the crate's).
pub const KEEL_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The minor release of a "3.MINOR.PATCH" version (0 when it has none).
pub fn minor(version: &str) -> u32 {
    version.split('.').nth(1).and_then(|m| m.parse().ok()).unwrap_or(0)
}
