//! Cluster identity and membership as etcd presents it: member and cluster
//! ids derived exactly as etcd derives them (so the same flags give the
//! same ids), URL validation, and the registry of published member
//! attributes (name, client URLs) that MemberList combines with Raft's
//! membership.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::RwLock;

use keel_proto::etcdserverpb::Member;
use keel_proto::keelpb::MemberAttributes;
use prost::Message;
use sha1::{Digest, Sha1};

use crate::raft_types::Membership;
use crate::storage::keys::{member_key, META_DOWNGRADE, META_MEMBER_PREFIX, META_REMOVED_PREFIX};
use crate::storage::{keys::prefix_end, SharedEngine, StorageError, Table, WriteBatch};

/// etcd's member id: SHA-1 over the sorted peer URLs, the cluster token and
/// (for members added at runtime) the Unix time of the addition.
pub fn member_id(peer_urls: &[String], token: &str, unix_time: Option<i64>) -> u64 {
    let mut urls = peer_urls.to_vec();
    urls.sort();
    let mut h = Sha1::new();
    for u in &urls {
        h.update(u.as_bytes());
    }
    h.update(token.as_bytes());
    if let Some(t) = unix_time {
        h.update(t.to_string().as_bytes());
    }
    let digest = h.finalize();
    u64::from_be_bytes(digest[..8].try_into().unwrap_or([0; 8]))
}

/// etcd's cluster id: SHA-1 over the sorted member ids (big-endian).
pub fn cluster_id(member_ids: &[u64]) -> u64 {
    let mut ids = member_ids.to_vec();
    ids.sort();
    let mut h = Sha1::new();
    for id in ids {
        h.update(id.to_be_bytes());
    }
    let digest = h.finalize();
    u64::from_be_bytes(digest[..8].try_into().unwrap_or([0; 8]))
}

/// Validates and normalizes a URL the way etcd's types.NewURLs does:
/// scheme http/https/unix/unixs, a host:port, no path.
pub fn parse_url(raw: &str) -> Result<String, String> {
    let s = raw.trim();
    let (scheme, rest) =
        s.split_once("://").ok_or_else(|| format!("URL scheme must be http, https, unix, or unixs: {s}"))?;
    if !matches!(scheme, "http" | "https" | "unix" | "unixs") {
        return Err(format!("URL scheme must be http, https, unix, or unixs: {s}"));
    }
    let host = rest.strip_suffix('/').unwrap_or(rest);
    if host.contains('/') {
        return Err(format!("URL must not contain a path: {s}"));
    }
    let (h, port) =
        host.rsplit_once(':').ok_or_else(|| format!(r#"URL address does not have the form "host:port": {s}"#))?;
    if h.is_empty() && !host.starts_with(':') || port.parse::<u16>().is_err() && !port.is_empty() {
        return Err(format!(r#"URL address does not have the form "host:port": {s}"#));
    }
    Ok(format!("{scheme}://{host}"))
}

/// Parses a comma-separated URL list (a flag value).
pub fn parse_urls(list: &str) -> Result<Vec<String>, String> {
    let urls: Vec<String> =
        list.split(',').filter(|s| !s.trim().is_empty()).map(parse_url).collect::<Result<_, _>>()?;
    if urls.is_empty() {
        return Err("no valid URLs given".into());
    }
    Ok(urls)
}

/// Member records replicated through the state machine: published
/// attributes (name, client URLs), etcd's learner flag, and the ids of
/// members that were removed (a removed member may never rejoin).
#[derive(Default)]
pub struct MemberRegistry {
    attrs: RwLock<BTreeMap<u64, MemberAttributes>>,
    removed: RwLock<BTreeSet<u64>>,
    /// Bumped whenever a member is removed.
    removals: tokio::sync::watch::Sender<u64>,
    /// The target version ("3.5.0") while a downgrade is enabled.
    downgrade: RwLock<Option<String>>,
}

fn removed_key(id: u64) -> Vec<u8> {
    let mut k = META_REMOVED_PREFIX.to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

impl MemberRegistry {
    /// Loads every member record from the engine.
    pub fn load(engine: &SharedEngine) -> Result<Self, StorageError> {
        let reg = Self::default();
        reg.reload(engine)?;
        Ok(reg)
    }

    /// Re-reads the records (after they changed in the engine).
    pub fn reload(&self, engine: &SharedEngine) -> Result<(), StorageError> {
        let mut map = BTreeMap::new();
        let end = prefix_end(META_MEMBER_PREFIX).unwrap_or_default();
        engine.scan(Table::Meta, META_MEMBER_PREFIX, Some(&end), &mut |_, v| {
            let a = MemberAttributes::decode(v).map_err(|e| StorageError::Corruption(e.to_string()))?;
            map.insert(a.member_id, a);
            Ok(true)
        })?;
        let mut removed = BTreeSet::new();
        let end = prefix_end(META_REMOVED_PREFIX).unwrap_or_default();
        engine.scan(Table::Meta, META_REMOVED_PREFIX, Some(&end), &mut |k, _| {
            if let Some(id) = k.get(META_REMOVED_PREFIX.len()..).and_then(crate::storage::keys::decode_u64) {
                removed.insert(id);
            }
            Ok(true)
        })?;
        let grew = match self.removed.write() {
            Ok(mut r) => {
                let grew = removed.len() > r.len();
                *r = removed;
                grew
            }
            Err(_) => false,
        };
        if let Ok(mut attrs) = self.attrs.write() {
            *attrs = map;
        }
        let downgrade = engine.get(Table::Meta, META_DOWNGRADE)?.map(|v| String::from_utf8_lossy(&v).into_owned());
        if let Ok(mut d) = self.downgrade.write() {
            *d = downgrade;
        }
        if grew {
            self.removals.send_modify(|n| *n += 1);
        }
        Ok(())
    }

    /// Adds the write of a member record to `batch`.
    pub fn put(&self, attrs: &MemberAttributes, batch: &mut WriteBatch) {
        batch.put(Table::Meta, member_key(attrs.member_id), attrs.encode_to_vec());
    }

    /// Adds the bookkeeping for members that left the membership to
    /// `batch`: their records go, their ids are remembered as removed.
    pub fn record_removed(&self, ids: &[u64], batch: &mut WriteBatch) {
        for id in ids {
            batch.delete(Table::Meta, member_key(*id));
            batch.put(Table::Meta, removed_key(*id), Vec::new());
        }
    }

    /// Adds the start (a target version) or end (None) of a downgrade to
    /// `batch`.
    pub fn set_downgrade(&self, target: Option<&str>, batch: &mut WriteBatch) {
        match target {
            Some(t) => batch.put(Table::Meta, META_DOWNGRADE.to_vec(), t.as_bytes().to_vec()),
            None => batch.delete(Table::Meta, META_DOWNGRADE.to_vec()),
        }
    }

    /// The target version ("3.5.0") while a downgrade is enabled.
    pub fn downgrade_target(&self) -> Option<String> {
        self.downgrade.read().ok()?.clone()
    }

    /// The cluster version ("3.6"): the lowest minor release among the
    /// versions `members` published, and `own` (this member's).
    pub fn cluster_version(&self, members: impl IntoIterator<Item = u64>, own: &str) -> String {
        let own_minor = crate::version::minor(own);
        let Ok(attrs) = self.attrs.read() else { return format!("3.{own_minor}") };
        let published = members.into_iter().filter_map(|id| attrs.get(&id)).filter(|a| !a.version.is_empty());
        let lowest = published.map(|a| crate::version::minor(&a.version)).fold(own_minor, u32::min);
        format!("3.{lowest}")
    }

    /// The versions members published, each member's latest (this
    /// member's from before a restart included).
    pub fn published_versions(&self) -> Vec<String> {
        let attrs = self.attrs.read().map(|a| a.clone()).unwrap_or_default();
        attrs.values().map(|a| a.version.clone()).collect()
    }

    pub fn get(&self, id: u64) -> Option<MemberAttributes> {
        self.attrs.read().ok()?.get(&id).cloned()
    }

    /// Every member id ever removed, ascending.
    pub fn removed_ids(&self) -> Vec<u64> {
        self.removed.read().map(|r| r.iter().copied().collect()).unwrap_or_default()
    }

    pub fn is_removed(&self, id: u64) -> bool {
        self.removed.read().map(|r| r.contains(&id)).unwrap_or(false)
    }

    /// Changes whenever some member is removed.
    pub fn subscribe_removals(&self) -> tokio::sync::watch::Receiver<u64> {
        self.removals.subscribe()
    }

    /// Whether etcd's API shows the member as a learner.
    pub fn is_learner(&self, id: u64, membership: &Membership) -> bool {
        match self.get(id) {
            Some(a) => a.is_learner,
            None => !membership.voter_ids().any(|v| v == id),
        }
    }

    /// etcd's member list: every voter and learner, ordered by id.
    pub fn members(&self, membership: &Membership) -> Vec<Member> {
        let mut out: Vec<Member> = membership
            .nodes()
            .map(|(id, node)| {
                let attrs = self.get(*id).unwrap_or_default();
                Member {
                    id: *id,
                    name: attrs.name,
                    peer_ur_ls: node.peer_urls.clone(),
                    client_ur_ls: attrs.client_urls,
                    is_learner: self.is_learner(*id, membership),
                }
            })
            .collect();
        out.sort_by_key(|m| m.id);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ids etcd reports when started with its default flags
    /// (initial cluster default=http://localhost:2380, token etcd-cluster).
    #[test]
    fn ids_match_etcd() {
        let m = member_id(&["http://localhost:2380".to_string()], "etcd-cluster", None);
        assert_eq!(format!("{m:x}"), "8e9e05c52164694d");
        assert_eq!(format!("{:x}", cluster_id(&[m])), "cdf818194e3a8c32");
    }

    #[test]
    fn url_validation_follows_etcd() {
        assert_eq!(parse_url("http://localhost:2379"), Ok("http://localhost:2379".into()));
        assert_eq!(parse_url(" https://127.0.0.1:1/ "), Ok("https://127.0.0.1:1".into()));
        assert!(parse_url("ftp://x:1").is_err());
        assert!(parse_url("http://host").is_err());
        assert!(parse_url("http://host:1/path").is_err());
        assert!(parse_urls("").is_err());
        assert_eq!(parse_urls("http://a:1,http://b:2").map(|v| v.len()), Ok(2));
    }
}
