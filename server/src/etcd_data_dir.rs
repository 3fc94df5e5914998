//! Taking over an etcd member's data dir: a keel member started with
//! `--data-dir` pointing at etcd's layout (`member/snap/db`, a bbolt
//! database, and `member/wal`, as `etcdctl snapshot restore` or an etcd
//! member leaves it) converts it in place on its first start.
//!
//! The member's id and the cluster id come from the WAL's metadata
//! record, the membership from the newest snapshot file's v2 store and
//! the WAL's committed configuration changes after it (as etcd 3.4
//! rebuilds it; learners become voters), the keys, their history, leases
//! and auth from the database (`etcd_format.rs`). `convert_to_etcd` goes
//! the other way for a stopped keel member.
//! The original `member` directory is kept beside the new one as
//! `member.etcd-original`. Anything unreadable stops the start with a
//! message and leaves the directory as it was.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context};
use prost::Message;

use crate::etcd_wal::{
    read_records, ConfChange, HardState, RaftEntry, WalMetadata, ADD_LEARNER, ADD_NODE, CONF_CHANGE_ENTRY,
    ENTRY_RECORD, METADATA_RECORD, NORMAL_ENTRY, REMOVE_NODE, STATE_RECORD, UPDATE_NODE,
};

/// A member as etcd records it: the context of a configuration change,
/// and the value of the backend's `members` bucket.
#[derive(serde::Serialize, serde::Deserialize)]
struct EtcdMember {
    id: u64,
    #[serde(rename = "peerURLs", default)]
    peer_urls: Vec<String>,
    #[serde(rename = "isLearner", default, skip_serializing_if = "std::ops::Not::not")]
    is_learner: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    name: String,
    #[serde(rename = "clientURLs", default, skip_serializing_if = "Vec::is_empty")]
    client_urls: Vec<String>,
}

/// What a WAL says about the member and its cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalIdentity {
    pub member_id: u64,
    pub cluster_id: u64,
    /// Membership changes committed in the WAL, in log order: log index,
    /// member id and its peer URLs (`None`: removed).
    pub changes: Vec<(u64, u64, Option<Vec<String>>)>,
    /// The newest committed log index holding a request whose apply moves
    /// the database's consistent index (0: none).
    pub last_committed_write: u64,
}

/// The files in `dir` named `*.<extension>`, in name order (etcd's names
/// sort by sequence, term and index).
fn files_with_extension(dir: &Path, extension: &str) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == extension))
        .collect();
    files.sort();
    Ok(files)
}

/// The identity, membership changes and committed requests recorded in a
/// member's WAL directory (every segment, the CRC chain checked across
/// them; an entry rewritten by a later leader replaces the old one, as
/// etcd's ReadAll does).
pub fn read_wal(wal_dir: &Path) -> anyhow::Result<WalIdentity> {
    let files = files_with_extension(wal_dir, "wal")?;
    if files.is_empty() {
        bail!("{} holds no WAL files", wal_dir.display());
    }
    let mut metadata = None;
    let mut commit = 0u64;
    let mut entries: Vec<RaftEntry> = Vec::new();
    let mut crc = 0u32;
    for file in files {
        let bytes = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
        read_records(&bytes, &mut crc, |r| {
            match r.r#type {
                METADATA_RECORD => metadata = Some(WalMetadata::decode(r.data.as_slice())?),
                STATE_RECORD => commit = commit.max(HardState::decode(r.data.as_slice())?.commit),
                ENTRY_RECORD => {
                    let entry = RaftEntry::decode(r.data.as_slice())?;
                    let keep = entries.partition_point(|e| e.index < entry.index);
                    entries.truncate(keep);
                    entries.push(entry);
                }
                _ => {}
            }
            Ok(())
        })
        .with_context(|| format!("{}", file.display()))?;
    }
    let m = metadata.ok_or_else(|| anyhow::anyhow!("the WAL has no metadata record"))?;
    if m.node_id == 0 || m.cluster_id == 0 {
        bail!("the WAL's metadata names no member or cluster");
    }
    let mut changes = Vec::new();
    let mut last_committed_write = 0;
    for entry in entries.into_iter().take_while(|e| e.index <= commit) {
        if entry.r#type == NORMAL_ENTRY && advances_consistent_index(&entry.data) {
            last_committed_write = entry.index;
        }
        if entry.r#type == CONF_CHANGE_ENTRY {
            let cc = ConfChange::decode(entry.data.as_slice())?;
            match cc.r#type {
                ADD_NODE | ADD_LEARNER | UPDATE_NODE => {
                    let m: EtcdMember =
                        serde_json::from_slice(&cc.context).context("undecodable member in a configuration change")?;
                    changes.push((entry.index, cc.node_id, Some(m.peer_urls)));
                }
                REMOVE_NODE => changes.push((entry.index, cc.node_id, None)),
                _ => {}
            }
        }
    }
    Ok(WalIdentity { member_id: m.node_id, cluster_id: m.cluster_id, changes, last_committed_write })
}

/// Whether applying a normal entry's request (an etcdserverpb.
/// InternalRaftRequest, or a bare v2 Request as etcd 3.4 proposes member
/// attributes) moves etcd 3.4's persisted consistent index: only key-value
/// writes (put, delete, txn, a revoke deleting a lease's keys) and
/// AuthDisable, UserAdd and UserDelete save it. Everything else (v2
/// requests, Authenticate, compaction, lease grants and checkpoints,
/// alarms, other auth changes) may legitimately lie past it after a clean
/// stop, so only the former can show that etcd stopped before applying
/// its log. An undecodable entry counts as one that moves it.
fn advances_consistent_index(data: &[u8]) -> bool {
    /// InternalRaftRequest fields whose apply saves the consistent index.
    const ADVANCING: [u64; 7] = [4, 5, 6, 9, 1011, 1100, 1101];
    const V2_METHODS: [&[u8]; 7] = [b"GET", b"QGET", b"PUT", b"POST", b"DELETE", b"SYNC", b"HEAD"];
    if data.is_empty() {
        return false;
    }
    let mut buf = data;
    while !buf.is_empty() {
        let Ok(key) = prost::encoding::decode_varint(&mut buf) else {
            return true;
        };
        let (field, wire) = (key >> 3, key & 7);
        let value: &[u8] = match wire {
            0 => match prost::encoding::decode_varint(&mut buf) {
                Ok(_) => &[],
                Err(_) => return true,
            },
            1 | 5 => {
                let n = if wire == 1 { 8 } else { 4 };
                let Some(rest) = buf.get(n..) else { return true };
                buf = rest;
                &[]
            }
            2 => {
                let Ok(len) = prost::encoding::decode_varint(&mut buf) else {
                    return true;
                };
                let Some(v) = usize::try_from(len).ok().and_then(|l| buf.get(..l)) else {
                    return true;
                };
                buf = &buf[v.len()..];
                v
            }
            _ => return true,
        };
        if field == 2 && V2_METHODS.contains(&value) {
            return false; // a bare v2 Request: field 2 is its method
        }
        if ADVANCING.contains(&field) {
            return true;
        }
    }
    false
}

/// The membership in the newest snapshot file under `snap_dir` and the
/// log index it was taken at; `(0, empty)` when there is none (a data dir
/// `etcdctl snapshot restore` made: its members are in the WAL).
fn snapshot_membership(snap_dir: &Path) -> anyhow::Result<(u64, BTreeMap<u64, Vec<String>>)> {
    let files = files_with_extension(snap_dir, "snap")?;
    // The newest readable one, as etcd skips a damaged newest file.
    let Some((newest, snapshot)) = files.iter().rev().find_map(|f| {
        let bytes = std::fs::read(f).ok()?;
        crate::etcd_wal::decode_snap_file(&bytes).ok().map(|s| (f.clone(), s))
    }) else {
        if let Some(f) = files.last() {
            bail!("no snapshot file in {} is readable (newest: {})", snap_dir.display(), f.display());
        }
        return Ok((0, BTreeMap::new()));
    };
    let index = snapshot.metadata.as_ref().map_or(0, |m| m.index);
    let store: serde_json::Value = serde_json::from_slice(&snapshot.data)
        .with_context(|| format!("{}: the v2 store is not JSON", newest.display()))?;
    let mut members = BTreeMap::new();
    let zero = &store["Root"]["Children"]["0"]["Children"];
    if let Some(nodes) = zero["members"]["Children"].as_object() {
        for (hex, node) in nodes {
            let id = u64::from_str_radix(hex, 16).with_context(|| format!("member id {hex:?}"))?;
            let raft = node["Children"]["raftAttributes"]["Value"].as_str().unwrap_or("{}");
            let attrs: serde_json::Value = serde_json::from_str(raft).context("undecodable raftAttributes")?;
            let urls = attrs["peerURLs"].as_array().into_iter().flatten().filter_map(|u| u.as_str().map(String::from));
            members.insert(id, urls.collect());
        }
    }
    Ok((index, members))
}

/// What a conversion takes from an etcd member, read before anything is
/// changed: bbolt's lock on its database (held until the swap), its
/// identity, its records in keel's tables, and its membership.
struct EtcdSource {
    db_lock: std::fs::File,
    identity: WalIdentity,
    records: Vec<crate::etcd_format::Record>,
    members: BTreeMap<u64, Vec<String>>,
}

/// Reads an etcd member dir (`member`, whose backend is `etcd_db`) for
/// [`convert_if_etcd`]; refuses one a running etcd holds, or whose WAL
/// committed writes its database does not reflect.
fn read_etcd_member(member: &Path, etcd_db: &Path) -> anyhow::Result<EtcdSource> {
    // A running etcd holds bbolt's lock on its database for as long as it
    // runs (a member stopping may still be handing over leadership).
    let db_lock = std::fs::File::open(etcd_db).with_context(|| format!("cannot open {}", etcd_db.display()))?;
    match db_lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            bail!("{} is locked: is etcd still running on it?", etcd_db.display())
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(anyhow::Error::from(e).context(format!("cannot lock {}", etcd_db.display())))
        }
    }
    let identity = read_wal(&member.join("wal"))?;
    let db = std::fs::read(etcd_db).with_context(|| format!("cannot read {}", etcd_db.display()))?;
    // Read everything before changing anything, in one pass: the records
    // and etcd's consistent index (the last log index the database
    // reflects).
    let mut records = Vec::new();
    let mut applied = 0u64;
    crate::bbolt::read(&db, &mut |bucket, pair| {
        if let Some((k, v)) = pair {
            if let (b"meta", b"consistent_index") = (bucket, k) {
                applied = v.try_into().map(u64::from_be_bytes).unwrap_or(0);
            }
            if let Some(r) = crate::etcd_format::to_keel(bucket, k, v)? {
                records.push(r);
            }
        }
        Ok(())
    })?;
    // The conversion starts from the database: committed requests it does
    // not reflect yet (etcd crashed instead of stopping) would be lost.
    if identity.last_committed_write > applied {
        bail!(
            "its WAL holds committed writes up to index {} that its database (consistent index {applied}) does not reflect yet (etcd stopped before applying them): start etcd on it and stop it cleanly, or restore a snapshot",
            identity.last_committed_write
        );
    }

    // Membership as etcd 3.4 rebuilds it: the newest snapshot file's v2
    // store, then the WAL's committed changes after it (the backend's
    // `members` bucket is not reliable: etcd 3.4's `snapshot restore`
    // leaves the source cluster's members in it).
    let (snap_index, mut members) = snapshot_membership(&member.join("snap"))?;
    for (_, id, urls) in identity.changes.iter().filter(|(index, _, _)| *index > snap_index) {
        match urls {
            Some(urls) => members.insert(*id, urls.clone()),
            None => members.remove(id),
        };
    }
    if members.is_empty() {
        bail!("neither its WAL nor its database records any cluster member");
    }

    Ok(EtcdSource { db_lock, identity, records, members })
}

/// Converts an etcd data dir in place; `Ok(false)` when `data_dir` is
/// not one (a keel data dir, or a new one).
pub fn convert_if_etcd(data_dir: &Path) -> anyhow::Result<bool> {
    let member = data_dir.join("member");
    let etcd_db = member.join("snap").join("db");
    let original = data_dir.join("member.etcd-original");
    // The keel member is built here and renamed into place when complete.
    let staging = data_dir.join("member.keel-staging");
    if !member.exists() && original.join("snap").join("db").exists() && staging.join("member").join("db").is_dir() {
        // Interrupted between the two renames: the staged member is whole.
        std::fs::rename(staging.join("member"), &member)?;
        std::fs::remove_dir_all(&staging)?;
        crate::raft::state_machine::fsync_dir(data_dir)?;
        tracing::info!(data_dir = %data_dir.display(), "finished an interrupted conversion of an etcd data dir");
        return Ok(true);
    }
    if member.join("db").exists() || !etcd_db.exists() {
        return Ok(false);
    }
    let refuse = |e: anyhow::Error| {
        e.context(format!(
            "{} looks like an etcd data dir but cannot be converted; it was left untouched",
            data_dir.display()
        ))
    };
    let EtcdSource { db_lock, identity, records, members } = read_etcd_member(&member, &etcd_db).map_err(refuse)?;
    if original.exists() {
        bail!(
            "{} exists: a previous conversion was interrupted; move it back to {} to retry",
            original.display(),
            member.display()
        );
    }
    let ids: Vec<(u64, Vec<String>)> = members.into_iter().collect();
    let mut local = crate::storage::WriteBatch::new();
    local.put(
        crate::storage::Table::RaftState,
        crate::storage::keys::LOCAL_IDENTITY,
        crate::raft::codec::encode(&(identity.member_id, identity.cluster_id))?,
    );
    local.put(
        crate::storage::Table::RaftState,
        crate::storage::keys::BOOTSTRAP_MEMBERS,
        crate::raft::codec::encode(&ids)?,
    );
    // A crash while filling leaves the etcd member as it was; a staging
    // dir left by one is started over.
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    crate::backup::fill_member(&staging, local, |put| {
        records.into_iter().try_for_each(|(table, k, v)| put(table, k, v))
    })
    .map_err(|e| {
        let _ = std::fs::remove_dir_all(&staging);
        refuse(e.context("building the keel member failed"))
    })?;
    drop(db_lock);
    std::fs::rename(&member, &original).with_context(|| format!("cannot move {} aside", member.display()))?;
    std::fs::rename(staging.join("member"), &member)
        .with_context(|| format!("cannot move the converted member into {}", member.display()))?;
    std::fs::remove_dir_all(&staging)?;
    crate::raft::state_machine::fsync_dir(data_dir)?;
    tracing::info!(
        data_dir = %data_dir.display(),
        member_id = %format!("{:x}", identity.member_id),
        cluster_id = %format!("{:x}", identity.cluster_id),
        members = ids.len(),
        original = %original.display(),
        "converted an etcd data dir to keel's"
    );
    Ok(true)
}

/// What [`convert_to_etcd`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exported {
    pub member_id: u64,
    pub cluster_id: u64,
    /// The log position the new etcd member starts from.
    pub index: u64,
    pub term: u64,
    pub members: usize,
}

/// The v2 store JSON etcd 3.4 keeps in its snapshot files, holding only
/// what it reads back from there: the membership (`/0/members`,
/// `/0/removed_members`), the cluster version, and the empty v2 key space
/// (`/1`).
fn v2_store(members: &[EtcdMember], removed: &[u64]) -> serde_json::Value {
    use serde_json::{json, Map, Value};
    let mut index = 0u64;
    let mut node = |path: &str, value: Option<String>, children: Option<Map<String, Value>>| {
        index += 1;
        json!({
            "Path": path, "CreatedIndex": index, "ModifiedIndex": index,
            "ExpireTime": "0001-01-01T00:00:00Z", "Value": value.unwrap_or_default(),
            "Children": children.map(Value::Object).unwrap_or(Value::Null),
        })
    };
    let mut member_nodes = Map::new();
    for m in members {
        let dir = format!("/0/members/{:x}", m.id);
        let mut raft = json!({ "peerURLs": m.peer_urls });
        if m.is_learner {
            raft["isLearner"] = json!(true);
        }
        let mut children = Map::new();
        children.insert("raftAttributes".into(), node(&format!("{dir}/raftAttributes"), Some(raft.to_string()), None));
        if !m.name.is_empty() || !m.client_urls.is_empty() {
            let attrs = json!({ "name": m.name, "clientURLs": m.client_urls });
            children.insert("attributes".into(), node(&format!("{dir}/attributes"), Some(attrs.to_string()), None));
        }
        member_nodes.insert(format!("{:x}", m.id), node(&dir, None, Some(children)));
    }
    let mut removed_nodes = Map::new();
    for id in removed {
        removed_nodes.insert(format!("{id:x}"), node(&format!("/0/removed_members/{id:x}"), None, None));
    }
    let mut zero = Map::new();
    zero.insert("members".into(), node("/0/members", None, Some(member_nodes)));
    if !removed_nodes.is_empty() {
        zero.insert("removed_members".into(), node("/0/removed_members", None, Some(removed_nodes)));
    }
    zero.insert("version".into(), node("/0/version", Some("3.4.0".into()), None));
    let mut root = Map::new();
    root.insert("0".into(), node("/0", None, Some(zero)));
    root.insert("1".into(), node("/1", None, Some(Map::new())));
    let root = node("/", None, Some(root));
    json!({ "Root": root, "CurrentIndex": index, "CurrentVersion": 2 })
}

/// Writes `bytes` to a new file at `path` and makes it durable.
fn write_synced(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

/// Converts a stopped keel member's data dir in place into the data dir
/// of an etcd 3.4 member with the same member id, cluster id, membership
/// and data: `member/snap/db` (the backend, as Maintenance.Snapshot
/// writes it, with etcd's member records), a snapshot file at the
/// member's applied log position holding the membership, and a WAL that
/// starts from it. keel's `member` directory is kept beside it as
/// `member.keel-original`.
///
/// Every member of a stopped cluster can be converted and started as
/// etcd. Safety rests on each member having applied every entry its log
/// holds: an entry committed by the cluster is then in the state of a
/// majority, and etcd's election rule only lets a member of that majority
/// lead. So a member whose log holds requests or membership changes past
/// what it applied is refused (start the cluster as keel again and stop
/// it once idle); trailing blank entries (a new leader's no-op) change no
/// state and are taken as applied.
/// The etcd release a converted member is for: 3.4 and 3.5 read the
/// files as keel always wrote them; 3.6 and 3.7 also find their storage
/// version (3.7 no longer upgrades a file from 3.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EtcdTarget {
    pub minor: u32,
}

impl EtcdTarget {
    /// The newest release keel hands data dirs to.
    pub const NEWEST: EtcdTarget = EtcdTarget { minor: 7 };

    /// "3.4" to "3.7" (a patch release is accepted and ignored).
    pub fn parse(s: &str) -> Result<Self, String> {
        let minor = crate::version::minor(&format!("{s}.0"));
        match (s.split('.').next(), minor) {
            (Some("3"), 4..=7) => Ok(Self { minor }),
            _ => Err(format!("{s:?}: keel converts to etcd 3.4, 3.5, 3.6 or 3.7")),
        }
    }

    fn cluster_version(self) -> Option<String> {
        (self.minor > 4).then(|| format!("3.{}", self.minor))
    }
}

pub fn convert_to_etcd(data_dir: &Path, target: EtcdTarget) -> anyhow::Result<Exported> {
    let member = data_dir.join("member");
    let original = data_dir.join("member.keel-original");
    let staging = data_dir.join("member.etcd-staging");
    if !member.exists() && original.join("db").is_dir() && staging.join("wal").is_dir() {
        // Interrupted between the two renames: the staged etcd member is
        // complete (written and synced before the first rename).
        std::fs::rename(&staging, &member)?;
        crate::raft::state_machine::fsync_dir(data_dir)?;
        bail!("finished an interrupted conversion of {}: it is an etcd data dir now", data_dir.display());
    }
    if !member.join("db").is_dir() {
        bail!("{} is not a keel data dir (no member/db)", data_dir.display());
    }
    if original.exists() {
        bail!("{} exists: move it away first", original.display());
    }
    let engine = crate::storage::rocks::RocksEngine::open(&member.join("db"))
        .with_context(|| format!("cannot open {} (is the member still running?)", member.display()))?;
    let engine: crate::storage::SharedEngine = std::sync::Arc::new(engine);
    // After a crash, the last appended entries may be only in the journal;
    // a member that would refuse to start (lost acknowledged entries) is
    // not converted either.
    crate::raft::log_store::LogStore::open_checked(engine.clone(), &member.join("journal"), &member.join("raft.ack"))?;
    let source = read_keel_member(&engine)?;
    write_etcd_member(&staging, engine, &source, target)?;
    std::fs::rename(&member, &original).with_context(|| format!("cannot move {} aside", member.display()))?;
    if let Err(e) = std::fs::rename(&staging, &member) {
        let _ = std::fs::rename(&original, &member);
        return Err(
            anyhow::Error::from(e).context("cannot move the etcd member dir in place; the keel one was put back")
        );
    }
    crate::raft::state_machine::fsync_dir(data_dir)?;
    let KeelSource { member_id, cluster_id, position, members, .. } = source;
    Ok(Exported { member_id, cluster_id, index: position.index, term: position.leader_id.term, members: members.len() })
}

/// What a conversion takes from a stopped keel member.
struct KeelSource {
    member_id: u64,
    cluster_id: u64,
    /// The log position etcd starts from.
    position: crate::raft::LogId,
    vote: Option<openraft::Vote<crate::raft::NodeId>>,
    members: Vec<EtcdMember>,
    removed: Vec<u64>,
}

/// Reads a keel member for [`convert_to_etcd`]; refuses one whose log
/// holds entries it has not applied.
fn read_keel_member(engine: &crate::storage::SharedEngine) -> anyhow::Result<KeelSource> {
    use crate::raft::{codec, LogId, NodeId, StoredMembership};
    use crate::storage::keys::{decode_u64, log_key, META_APPLIED, META_MEMBERSHIP, RAFT_VOTE};
    use crate::storage::Table;

    let get = |table, key: &[u8]| engine.get(table, key).map_err(|e| anyhow::anyhow!("reading the data dir: {e}"));

    let (member_id, cluster_id): (u64, u64) = match get(Table::RaftState, crate::storage::keys::LOCAL_IDENTITY)? {
        Some(v) => codec::decode(&v)?,
        None => bail!("the data dir records no member identity (was the member ever started?)"),
    };
    let applied: LogId = match get(Table::Meta, META_APPLIED)? {
        Some(v) => codec::decode(&v)?,
        None => bail!("the member has not applied anything yet: start it once as keel"),
    };
    // The position etcd starts from: the applied entry, or the last of
    // the blank entries after it.
    let mut position = applied;
    let mut unapplied = None;
    engine
        .scan(Table::RaftLog, &log_key(applied.index + 1), None, &mut |k, v| {
            let index = decode_u64(k).unwrap_or_default();
            let entry = crate::raft::log_store::decode_entry(index, v)?;
            if matches!(entry.payload, openraft::EntryPayload::Blank) && unapplied.is_none() {
                position = entry.log_id;
                Ok(true)
            } else {
                unapplied = Some(index);
                Ok(false)
            }
        })
        .map_err(|e| anyhow::anyhow!("reading the raft log: {e}"))?;
    if let Some(index) = unapplied {
        bail!(
            "its log holds an entry at index {index} that it has not applied (it has applied up to {}); converting it could lose a write the cluster committed: start the keel cluster again, let it settle, stop it, and convert again",
            applied.index
        );
    }
    let vote: Option<openraft::Vote<NodeId>> =
        get(Table::RaftState, RAFT_VOTE)?.map(|v| codec::decode(&v)).transpose()?;
    let stored: StoredMembership = match get(Table::Meta, META_MEMBERSHIP)? {
        Some(v) => codec::decode(&v)?,
        None => bail!("the data dir records no membership"),
    };
    let membership = stored.membership();
    let registry = crate::cluster::MemberRegistry::load(engine)?;
    let members: Vec<EtcdMember> = registry
        .members(membership)
        .into_iter()
        .map(|m| EtcdMember {
            id: m.id,
            peer_urls: m.peer_ur_ls,
            is_learner: m.is_learner,
            name: m.name,
            client_urls: m.client_ur_ls,
        })
        .collect();
    let removed = registry.removed_ids();

    Ok(KeelSource { member_id, cluster_id, position, vote, members, removed })
}

/// Writes the etcd member (backend, snapshot file, WAL) into `staging`,
/// every file and directory synced; closes `engine` once the backend is
/// written.
fn write_etcd_member(
    staging: &Path,
    engine: crate::storage::SharedEngine,
    source: &KeelSource,
    target: EtcdTarget,
) -> anyhow::Result<()> {
    let KeelSource { member_id, cluster_id, position, vote, members, removed } = source;
    let (member_id, cluster_id) = (*member_id, *cluster_id);
    let records = crate::etcd_format::MemberRecords {
        members: members
            .iter()
            .map(|m| Ok((format!("{:x}", m.id).into_bytes(), serde_json::to_vec(m)?)))
            .collect::<anyhow::Result<_>>()?,
        removed: removed.iter().map(|id| (format!("{id:x}").into_bytes(), b"removed".to_vec())).collect(),
        cluster_version: target.cluster_version(),
    };
    // Everything is written beside the keel member first; two renames
    // then swap it in.
    if staging.exists() {
        std::fs::remove_dir_all(staging)?;
    }
    std::fs::create_dir_all(staging.join("snap"))?;
    std::fs::create_dir_all(staging.join("wal"))?;
    let db_path = staging.join("snap").join("db");
    let db = std::fs::File::create(&db_path).with_context(|| format!("cannot create {}", db_path.display()))?;
    let (db, _) = crate::etcd_format::write_db(engine.as_ref(), records, std::io::BufWriter::new(db))?;
    db.into_inner().map_err(|e| anyhow::anyhow!("writing {}: {e}", db_path.display()))?.sync_all()?;
    engine.close()?;
    drop(engine);

    let (index, term) = (position.index, position.leader_id.term);
    // etcd's HardState: the member's current term and whom it voted for
    // in it, so it cannot vote twice in a term after the swap.
    let (current_term, voted_for) = match vote {
        Some(v) if v.leader_id().term >= term => (v.leader_id().term, v.leader_id().voted_for().unwrap_or_default()),
        _ => (term, 0),
    };
    let (voters, learners): (Vec<u64>, Vec<u64>) = {
        let (l, v): (Vec<&EtcdMember>, Vec<&EtcdMember>) = members.iter().partition(|m| m.is_learner);
        (v.iter().map(|m| m.id).collect(), l.iter().map(|m| m.id).collect())
    };
    let snapshot = crate::etcd_wal::RaftSnapshot {
        data: serde_json::to_vec(&v2_store(members, removed))?,
        metadata: Some(crate::etcd_wal::SnapshotMetadata {
            conf_state: Some(crate::etcd_wal::ConfState { voters, learners }),
            index,
            term,
        }),
    };
    let mut wal = crate::etcd_wal::WalEncoder::new(0);
    wal.record(METADATA_RECORD, WalMetadata { node_id: member_id, cluster_id }.encode_to_vec());
    wal.record(crate::etcd_wal::SNAPSHOT_RECORD, crate::etcd_wal::WalSnapshot { index: 0, term: 0 }.encode_to_vec());
    wal.record(crate::etcd_wal::SNAPSHOT_RECORD, crate::etcd_wal::WalSnapshot { index, term }.encode_to_vec());
    wal.record(STATE_RECORD, HardState { term: current_term, vote: voted_for, commit: index }.encode_to_vec());
    let (wal, _) = wal.finish();

    write_synced(
        &staging.join("snap").join(crate::etcd_wal::snap_file_name(term, index)),
        &crate::etcd_wal::encode_snap_file(&snapshot),
    )?;
    write_synced(&staging.join("wal").join(crate::etcd_wal::wal_file_name(0, 0)), &wal)?;
    for dir in [staging.join("snap"), staging.join("wal"), staging.to_path_buf()] {
        crate::raft::state_machine::fsync_dir(&dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcd_wal::{WalEncoder, SNAPSHOT_RECORD};

    fn conf_entry(index: u64, kind: i32, id: u64, url: &str) -> Vec<u8> {
        let cc = ConfChange {
            id: 0,
            r#type: kind,
            node_id: id,
            context: format!(r#"{{"id":{id},"peerURLs":["{url}"],"name":"n"}}"#).into_bytes(),
        };
        RaftEntry { term: 1, index, r#type: CONF_CHANGE_ENTRY, data: cc.encode_to_vec() }.encode_to_vec()
    }

    #[test]
    fn identity_and_membership_come_from_the_wal() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut wal = WalEncoder::new(0);
        wal.record(METADATA_RECORD, WalMetadata { node_id: 0xaa, cluster_id: 0xcc }.encode_to_vec());
        wal.record(ENTRY_RECORD, conf_entry(1, ADD_NODE, 0xaa, "http://a:2380"));
        wal.record(ENTRY_RECORD, conf_entry(2, ADD_NODE, 0xbb, "http://b:2380"));
        wal.record(ENTRY_RECORD, conf_entry(3, ADD_NODE, 0xdd, "http://d:2380"));
        // A later leader rewrote index 3; index 4 was never committed.
        wal.record(ENTRY_RECORD, conf_entry(3, REMOVE_NODE, 0xbb, ""));
        wal.record(ENTRY_RECORD, conf_entry(4, ADD_NODE, 0xee, "http://e:2380"));
        wal.record(STATE_RECORD, HardState { term: 1, vote: 0xaa, commit: 3 }.encode_to_vec());
        let (mut bytes, _) = wal.finish();
        bytes.extend(vec![0u8; 64]);
        std::fs::write(dir.path().join("0000000000000000-0000000000000000.wal"), &bytes)?;
        let id = read_wal(dir.path())?;
        assert_eq!(id.member_id, 0xaa);
        assert_eq!(id.cluster_id, 0xcc);
        assert_eq!(
            id.changes,
            vec![
                (1, 0xaa, Some(vec!["http://a:2380".to_string()])),
                (2, 0xbb, Some(vec!["http://b:2380".to_string()])),
                (3, 0xbb, None)
            ]
        );
        Ok(())
    }

    #[test]
    fn a_locked_database_and_committed_requests_it_lacks_are_refused() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let wal_dir = dir.path().join("member/wal");
        std::fs::create_dir_all(&wal_dir)?;
        std::fs::create_dir_all(dir.path().join("member/snap"))?;
        let mut wal = WalEncoder::new(0);
        wal.record(METADATA_RECORD, WalMetadata { node_id: 1, cluster_id: 2 }.encode_to_vec());
        wal.record(ENTRY_RECORD, conf_entry(1, ADD_NODE, 1, "http://a:2380"));
        // A put at 5; an Authenticate at 6 (no database write).
        let put = RaftEntry { term: 2, index: 5, r#type: NORMAL_ENTRY, data: vec![0x22, 0x02, 0x0a, 0x00] };
        wal.record(ENTRY_RECORD, put.encode_to_vec());
        let auth = RaftEntry { term: 2, index: 6, r#type: NORMAL_ENTRY, data: vec![0xa2, 0x3f, 0x00] };
        wal.record(ENTRY_RECORD, auth.encode_to_vec());
        wal.record(STATE_RECORD, HardState { term: 2, vote: 1, commit: 6 }.encode_to_vec());
        std::fs::write(wal_dir.join("0000000000000000-0000000000000000.wal"), wal.finish().0)?;
        let mut db = Vec::new();
        let meta_bucket = (b"meta".to_vec(), vec![(b"consistent_index".to_vec(), 4u64.to_be_bytes().to_vec())]);
        crate::bbolt::write(&[meta_bucket], &mut db)?;
        std::fs::write(dir.path().join("member/snap/db"), &db)?;
        let running = std::fs::File::open(dir.path().join("member/snap/db"))?;
        running.lock()?;
        let refused = convert_if_etcd(dir.path()).err().map(|e| format!("{e:#}")).unwrap_or_default();
        assert!(refused.contains("is etcd still running on it?"), "{refused}");
        running.unlock()?;
        let refused = convert_if_etcd(dir.path()).err().map(|e| format!("{e:#}")).unwrap_or_default();
        assert!(refused.contains("up to index 5"), "{refused}");
        assert!(dir.path().join("member/snap/db").exists() && !dir.path().join("member/db").exists());
        Ok(())
    }

    #[test]
    fn a_dir_that_is_neither_is_left_alone() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        assert!(!convert_if_etcd(dir.path())?);
        std::fs::create_dir_all(dir.path().join("member/snap"))?;
        std::fs::write(dir.path().join("member/snap/db"), b"not a database")?;
        std::fs::create_dir_all(dir.path().join("member/wal"))?;
        assert!(convert_if_etcd(dir.path()).is_err());
        assert!(dir.path().join("member/snap/db").exists(), "a refused dir is left as it was");
        assert!(convert_to_etcd(dir.path(), EtcdTarget::NEWEST).is_err(), "not a keel dir either");
        Ok(())
    }

    #[test]
    fn requests_that_move_the_consistent_index_are_told_apart() {
        let field = |n: u64, body: &[u8]| {
            let mut out = Vec::new();
            prost::encoding::encode_key(n as u32, prost::encoding::WireType::LengthDelimited, &mut out);
            prost::encoding::encode_varint(body.len() as u64, &mut out);
            out.extend_from_slice(body);
            out
        };
        let with_id = |rest: Vec<u8>| [vec![0x08, 0x2a], rest].concat();
        assert!(advances_consistent_index(&with_id(field(4, b"\x0a\x01k"))), "put");
        assert!(advances_consistent_index(&with_id(field(6, b""))), "txn");
        assert!(advances_consistent_index(&with_id(field(1100, b""))), "user add");
        assert!(advances_consistent_index(&with_id(field(9, b"\x08\x07"))), "lease revoke");
        assert!(!advances_consistent_index(&with_id(field(7, b"\x08\x07"))), "compaction");
        assert!(!advances_consistent_index(&with_id(field(8, b"\x08\x3c"))), "lease grant");
        assert!(!advances_consistent_index(&with_id(field(1200, b""))), "role add");
        assert!(advances_consistent_index(&[0xff]), "undecodable: assumed to write");
        assert!(!advances_consistent_index(&with_id(field(1012, b"\x0a\x04root"))), "authenticate");
        assert!(!advances_consistent_index(&with_id([field(100, b"\x08\x01"), field(3, b"")].concat())), "range");
        assert!(!advances_consistent_index(&with_id(field(2, b"\x08\x01\x12\x03PUT"))), "v2 inside");
        let bare_v2 = [vec![0x08, 0x07], field(2, b"PUT"), field(3, b"/0/members/1/attributes"), field(4, b"{}")];
        assert!(!advances_consistent_index(&bare_v2.concat()), "bare v2 Request (member attributes)");
        assert!(!advances_consistent_index(b""), "empty entry (leader's no-op)");
    }

    /// A keel data dir whose member applied index 5 (term 2) of a
    /// one-member cluster and holds `tail` entries after it.
    fn keel_dir(tail: &[crate::raft::Entry]) -> anyhow::Result<tempfile::TempDir> {
        use crate::raft::{codec, log_store, LogId, MemberNode, Membership, StoredMembership};
        use crate::storage::keys::{log_key, META_APPLIED, META_MEMBERSHIP};
        use crate::storage::{Engine, Table, WriteBatch};
        let dir = tempfile::tempdir()?;
        std::fs::create_dir_all(dir.path().join("member/db"))?;
        let engine = crate::storage::rocks::RocksEngine::open(&dir.path().join("member/db"))?;
        let applied = LogId::new(openraft::CommittedLeaderId::new(2, 1), 5);
        let nodes = std::collections::BTreeMap::from([(1u64, MemberNode { peer_urls: vec!["http://a:2380".into()] })]);
        let membership = StoredMembership::new(Some(applied), Membership::new(vec![[1u64].into()], nodes));
        let mut b = WriteBatch::new();
        b.put(Table::RaftState, crate::storage::keys::LOCAL_IDENTITY, codec::encode(&(1u64, 9u64))?);
        b.put(Table::Meta, META_APPLIED, codec::encode(&applied)?);
        b.put(Table::Meta, META_MEMBERSHIP, codec::encode(&membership)?);
        for e in tail {
            b.put(Table::RaftLog, log_key(e.log_id.index), log_store::encode_entry(e)?);
        }
        engine.write(b, true)?;
        engine.close()?;
        Ok(dir)
    }

    fn entry(index: u64, payload: openraft::EntryPayload<crate::raft::TypeConfig>) -> crate::raft::Entry {
        crate::raft::Entry { log_id: crate::raft::LogId::new(openraft::CommittedLeaderId::new(3, 1), index), payload }
    }

    #[test]
    fn converting_to_etcd_refuses_unapplied_requests_and_skips_trailing_blanks() -> anyhow::Result<()> {
        let request = crate::raft::Command(keel_proto::keelpb::InternalRequest::default());
        let dir =
            keel_dir(&[entry(6, openraft::EntryPayload::Blank), entry(7, openraft::EntryPayload::Normal(request))])?;
        let refused =
            convert_to_etcd(dir.path(), EtcdTarget::NEWEST).err().map(|e| format!("{e:#}")).unwrap_or_default();
        assert!(refused.contains("entry at index 7 that it has not applied"), "{refused}");
        assert!(dir.path().join("member/db").is_dir(), "a refused dir is left as it was");

        let dir = keel_dir(&[entry(6, openraft::EntryPayload::Blank)])?;
        let done = convert_to_etcd(dir.path(), EtcdTarget::NEWEST)?;
        assert_eq!((done.member_id, done.cluster_id, done.index, done.term, done.members), (1, 9, 6, 3, 1));
        let wal = read_wal(&dir.path().join("member/wal"))?;
        assert_eq!((wal.member_id, wal.cluster_id), (1, 9));
        let (index, members) = snapshot_membership(&dir.path().join("member/snap"))?;
        assert_eq!(index, 6);
        assert_eq!(members.get(&1), Some(&vec!["http://a:2380".to_string()]));
        assert!(dir.path().join("member.keel-original/db").is_dir());
        assert!(convert_to_etcd(dir.path(), EtcdTarget::NEWEST).is_err(), "not a keel dir any more");
        Ok(())
    }

    /// The membership etcd 3.4 reads back from a snapshot's v2 store.
    #[test]
    fn the_v2_store_holds_the_membership_as_etcd_lays_it_out() {
        let members = [EtcdMember {
            id: 0x886b_03c4_ae67_9a15,
            peer_urls: vec!["http://127.0.0.1:24800".into()],
            is_learner: false,
            name: "a".into(),
            client_urls: vec!["http://127.0.0.1:24790".into()],
        }];
        let store = v2_store(&members, &[0x12]);
        let member = &store["Root"]["Children"]["0"]["Children"]["members"]["Children"]["886b03c4ae679a15"];
        assert_eq!(member["Path"], "/0/members/886b03c4ae679a15");
        assert_eq!(member["Children"]["raftAttributes"]["Value"], r#"{"peerURLs":["http://127.0.0.1:24800"]}"#);
        assert_eq!(
            member["Children"]["attributes"]["Value"],
            r#"{"name":"a","clientURLs":["http://127.0.0.1:24790"]}"#
        );
        assert!(member["Children"]["raftAttributes"]["Children"].is_null(), "a value node has no children");
        assert_eq!(
            store["Root"]["Children"]["0"]["Children"]["removed_members"]["Children"]["12"]["Path"],
            "/0/removed_members/12"
        );
        assert_eq!(store["Root"]["Children"]["1"]["Children"], serde_json::json!({}), "/1 is an empty directory");
        assert_eq!(store["Root"]["Children"]["0"]["Children"]["version"]["Value"], "3.4.0");
    }

    #[test]
    fn membership_is_read_back_from_the_newest_snapshot_file() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        assert_eq!(snapshot_membership(dir.path())?, (0, BTreeMap::new()), "no snapshot file");
        let member = |id: u64, url: &str| EtcdMember {
            id,
            peer_urls: vec![url.into()],
            is_learner: false,
            name: String::new(),
            client_urls: Vec::new(),
        };
        for (index, members) in
            [(5, vec![member(1, "http://a:1")]), (9, vec![member(1, "http://a:1"), member(2, "http://b:1")])]
        {
            let snap = crate::etcd_wal::RaftSnapshot {
                data: serde_json::to_vec(&v2_store(&members, &[]))?,
                metadata: Some(crate::etcd_wal::SnapshotMetadata { conf_state: None, index, term: 2 }),
            };
            let name = crate::etcd_wal::snap_file_name(2, index);
            std::fs::write(dir.path().join(name), crate::etcd_wal::encode_snap_file(&snap))?;
        }
        let (index, members) = snapshot_membership(dir.path())?;
        assert_eq!(index, 9);
        assert_eq!(members.get(&2), Some(&vec!["http://b:1".to_string()]));
        assert_eq!(members.len(), 2);
        Ok(())
    }

    #[test]
    fn a_snapshot_record_in_the_wal_is_skipped_by_the_reader() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut wal = WalEncoder::new(0);
        wal.record(METADATA_RECORD, WalMetadata { node_id: 1, cluster_id: 2 }.encode_to_vec());
        wal.record(SNAPSHOT_RECORD, crate::etcd_wal::WalSnapshot { index: 9, term: 3 }.encode_to_vec());
        wal.record(STATE_RECORD, HardState { term: 3, vote: 0, commit: 9 }.encode_to_vec());
        std::fs::write(dir.path().join("0000000000000000-0000000000000000.wal"), wal.finish().0)?;
        let id = read_wal(dir.path())?;
        assert_eq!((id.member_id, id.cluster_id, id.changes.len(), id.last_committed_write), (1, 2, 0, 0));
        Ok(())
    }
}
