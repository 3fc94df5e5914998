//! Taking over an etcd member's data dir: a keel member started with
//! `--data-dir` pointing at etcd's layout (`member/snap/db`, a bbolt
//! database, and `member/wal`, as `etcdctl snapshot restore` or an etcd
//! member leaves it) converts it in place on its first start.
//!
//! The member's id, the cluster id and the membership come from the WAL
//! (its metadata record and the configuration-change entries); the keys,
//! their history, leases and auth from the database (`etcd_format.rs`).
//! The original `member` directory is kept beside the new one as
//! `member.etcd-original`. Anything unreadable stops the start with a
//! message and leaves the directory as it was.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context};
use prost::Message;

/// walpb.Record.
#[derive(Clone, PartialEq, prost::Message)]
struct WalRecord {
    #[prost(int64, tag = "1")]
    r#type: i64,
    #[prost(uint32, tag = "2")]
    crc: u32,
    #[prost(bytes = "vec", tag = "3")]
    data: Vec<u8>,
}

/// etcdserverpb.Metadata.
#[derive(Clone, PartialEq, prost::Message)]
struct WalMetadata {
    #[prost(uint64, tag = "1")]
    node_id: u64,
    #[prost(uint64, tag = "2")]
    cluster_id: u64,
}

/// raftpb.Entry.
#[derive(Clone, PartialEq, prost::Message)]
struct RaftEntry {
    #[prost(uint64, tag = "2")]
    term: u64,
    #[prost(uint64, tag = "3")]
    index: u64,
    #[prost(int32, tag = "1")]
    r#type: i32,
    #[prost(bytes = "vec", tag = "4")]
    data: Vec<u8>,
}

/// raftpb.ConfChange.
#[derive(Clone, PartialEq, prost::Message)]
struct ConfChange {
    #[prost(uint64, tag = "1")]
    id: u64,
    #[prost(int32, tag = "2")]
    r#type: i32,
    #[prost(uint64, tag = "3")]
    node_id: u64,
    #[prost(bytes = "vec", tag = "4")]
    context: Vec<u8>,
}

/// raftpb.HardState.
#[derive(Clone, PartialEq, prost::Message)]
struct HardState {
    #[prost(uint64, tag = "1")]
    term: u64,
    #[prost(uint64, tag = "2")]
    vote: u64,
    #[prost(uint64, tag = "3")]
    commit: u64,
}

/// The member record etcd puts in a configuration change's context.
#[derive(serde::Deserialize)]
struct EtcdMember {
    #[serde(rename = "peerURLs", default)]
    peer_urls: Vec<String>,
}

const METADATA_RECORD: i64 = 1;
const ENTRY_RECORD: i64 = 2;
const STATE_RECORD: i64 = 3;
const NORMAL_ENTRY: i32 = 0;
const CONF_CHANGE_ENTRY: i32 = 1;
const ADD_NODE: i32 = 0;
const REMOVE_NODE: i32 = 1;
const UPDATE_NODE: i32 = 2;
const ADD_LEARNER: i32 = 3;

/// What a WAL says about the member and its cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalIdentity {
    pub member_id: u64,
    pub cluster_id: u64,
    /// Member id -> peer URLs.
    pub members: BTreeMap<u64, Vec<String>>,
    /// The newest committed log index holding a client request (0: none).
    pub last_committed_request: u64,
}

/// Reads the records of one WAL file (etcd's framing: a little-endian
/// 64-bit length whose top byte carries the padding, then the record).
fn wal_records(bytes: &[u8], mut visit: impl FnMut(WalRecord) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let mut at = 0usize;
    while at + 8 <= bytes.len() {
        let frame = i64::from_le_bytes(bytes[at..at + 8].try_into()?);
        let len = (frame as u64 & 0x00ff_ffff_ffff_ffff) as usize;
        let pad = if frame < 0 { ((frame as u64 >> 56) & 0x7) as usize } else { 0 };
        if len == 0 {
            break; // preallocated space
        }
        let start = at + 8;
        let Some(data) = bytes.get(start..start + len) else {
            break; // a torn final record, as etcd tolerates
        };
        visit(WalRecord::decode(data).context("undecodable WAL record")?)?;
        at = start + len + pad;
    }
    Ok(())
}

/// The identity and membership recorded in a member's WAL directory.
pub fn read_wal(wal_dir: &Path) -> anyhow::Result<WalIdentity> {
    let mut files: Vec<_> = std::fs::read_dir(wal_dir)
        .with_context(|| format!("cannot read {}", wal_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{} holds no WAL files", wal_dir.display());
    }
    let mut metadata = None;
    let mut members = BTreeMap::new();
    let mut commit = 0u64;
    let mut request_indexes = Vec::new();
    for file in files {
        let bytes = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
        wal_records(&bytes, |r| {
            match r.r#type {
                METADATA_RECORD => metadata = Some(WalMetadata::decode(r.data.as_slice())?),
                STATE_RECORD => commit = commit.max(HardState::decode(r.data.as_slice())?.commit),
                ENTRY_RECORD => {
                    let entry = RaftEntry::decode(r.data.as_slice())?;
                    if entry.r#type == NORMAL_ENTRY && !entry.data.is_empty() {
                        request_indexes.push(entry.index);
                    }
                    if entry.r#type == CONF_CHANGE_ENTRY {
                        let cc = ConfChange::decode(entry.data.as_slice())?;
                        match cc.r#type {
                            ADD_NODE | ADD_LEARNER | UPDATE_NODE => {
                                let m: EtcdMember = serde_json::from_slice(&cc.context)
                                    .context("undecodable member in a configuration change")?;
                                members.insert(cc.node_id, m.peer_urls);
                            }
                            REMOVE_NODE => {
                                members.remove(&cc.node_id);
                            }
                            _ => {}
                        }
                    }
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
    if members.is_empty() {
        bail!("the WAL records no cluster members");
    }
    let last_committed_request = request_indexes.into_iter().filter(|i| *i <= commit).max().unwrap_or(0);
    Ok(WalIdentity { member_id: m.node_id, cluster_id: m.cluster_id, members, last_committed_request })
}

/// Converts an etcd data dir in place; `Ok(false)` when `data_dir` is
/// not one (a keel data dir, or a new one).
pub fn convert_if_etcd(data_dir: &Path) -> anyhow::Result<bool> {
    let member = data_dir.join("member");
    let etcd_db = member.join("snap").join("db");
    if member.join("db").exists() || !etcd_db.exists() {
        return Ok(false);
    }
    let refuse = |e: anyhow::Error| {
        e.context(format!(
            "{} looks like an etcd data dir but cannot be converted; it was left untouched",
            data_dir.display()
        ))
    };
    let identity = read_wal(&member.join("wal")).map_err(refuse)?;
    let db = std::fs::read(&etcd_db).with_context(|| format!("cannot read {}", etcd_db.display())).map_err(refuse)?;
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
    })
    .map_err(|e| refuse(e.into()))?;
    // The conversion starts from the database: committed requests it does
    // not reflect yet (etcd crashed instead of stopping) would be lost.
    if identity.last_committed_request > applied {
        return Err(refuse(anyhow::anyhow!(
            "its WAL holds committed requests up to index {} that its database (consistent index {applied}) does not reflect yet: start etcd on it and stop it cleanly, or restore a snapshot",
            identity.last_committed_request
        )));
    }

    let original = data_dir.join("member.etcd-original");
    if original.exists() {
        bail!(
            "{} exists: a previous conversion was interrupted; move it back to {} to retry",
            original.display(),
            member.display()
        );
    }
    std::fs::rename(&member, &original).with_context(|| format!("cannot move {} aside", member.display()))?;
    let ids: Vec<(u64, Vec<String>)> = identity.members.iter().map(|(id, urls)| (*id, urls.clone())).collect();
    let mut local = crate::storage::WriteBatch::new();
    local.put(
        crate::storage::Table::RaftState,
        crate::node::LOCAL_IDENTITY,
        crate::raft::codec::encode(&(identity.member_id, identity.cluster_id))?,
    );
    local.put(crate::storage::Table::RaftState, crate::node::BOOTSTRAP_MEMBERS, crate::raft::codec::encode(&ids)?);
    if let Err(e) = crate::backup::fill_member(data_dir, local, |put| {
        records.into_iter().try_for_each(|(table, k, v)| put(table, k, v))
    }) {
        // Put the original back so the directory is as it was.
        let _ = std::fs::remove_dir_all(&member);
        let _ = std::fs::rename(&original, &member);
        return Err(e.context("converting the etcd data dir failed; it was restored as it was"));
    }
    tracing::info!(
        data_dir = %data_dir.display(),
        member_id = %format!("{:x}", identity.member_id),
        cluster_id = %format!("{:x}", identity.cluster_id),
        members = identity.members.len(),
        original = %original.display(),
        "converted an etcd data dir to keel's"
    );
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(record: &WalRecord) -> Vec<u8> {
        let data = record.encode_to_vec();
        let pad = (8 - data.len() % 8) % 8;
        let mut len = data.len() as u64;
        if pad > 0 {
            len |= (0x80 | pad as u64) << 56;
        }
        let mut out = len.to_le_bytes().to_vec();
        out.extend_from_slice(&data);
        out.extend(std::iter::repeat_n(0u8, pad));
        out
    }

    #[test]
    fn identity_and_membership_come_from_the_wal() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let meta = WalMetadata { node_id: 0xaa, cluster_id: 0xcc };
        let add = |id: u64, url: &str| {
            let cc = ConfChange {
                id: 0,
                r#type: ADD_NODE,
                node_id: id,
                context: format!(r#"{{"id":{id},"peerURLs":["{url}"],"name":"n"}}"#).into_bytes(),
            };
            let entry = RaftEntry { term: 1, index: id, r#type: CONF_CHANGE_ENTRY, data: cc.encode_to_vec() };
            WalRecord { r#type: ENTRY_RECORD, crc: 0, data: entry.encode_to_vec() }
        };
        let mut wal = frame(&WalRecord { r#type: 4, crc: 0, data: Vec::new() });
        wal.extend(frame(&WalRecord { r#type: METADATA_RECORD, crc: 0, data: meta.encode_to_vec() }));
        wal.extend(frame(&add(0xaa, "http://a:2380")));
        wal.extend(frame(&add(0xbb, "http://b:2380")));
        wal.extend(vec![0u8; 64]);
        std::fs::write(dir.path().join("0000000000000000-0000000000000000.wal"), &wal)?;
        let id = read_wal(dir.path())?;
        assert_eq!(id.member_id, 0xaa);
        assert_eq!(id.cluster_id, 0xcc);
        assert_eq!(id.members.get(&0xbb), Some(&vec!["http://b:2380".to_string()]));
        Ok(())
    }

    #[test]
    fn committed_requests_missing_from_the_database_are_refused() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let wal_dir = dir.path().join("member/wal");
        std::fs::create_dir_all(&wal_dir)?;
        std::fs::create_dir_all(dir.path().join("member/snap"))?;
        let meta = WalMetadata { node_id: 1, cluster_id: 2 };
        let cc = ConfChange {
            id: 0,
            r#type: ADD_NODE,
            node_id: 1,
            context: br#"{"id":1,"peerURLs":["http://a:2380"]}"#.to_vec(),
        };
        let conf = RaftEntry { term: 1, index: 1, r#type: CONF_CHANGE_ENTRY, data: cc.encode_to_vec() };
        let put = RaftEntry { term: 2, index: 5, r#type: NORMAL_ENTRY, data: b"a request".to_vec() };
        let mut wal = frame(&WalRecord { r#type: METADATA_RECORD, crc: 0, data: meta.encode_to_vec() });
        for e in [conf, put] {
            wal.extend(frame(&WalRecord { r#type: ENTRY_RECORD, crc: 0, data: e.encode_to_vec() }));
        }
        let state = HardState { term: 2, vote: 1, commit: 5 };
        wal.extend(frame(&WalRecord { r#type: STATE_RECORD, crc: 0, data: state.encode_to_vec() }));
        std::fs::write(wal_dir.join("0000000000000000-0000000000000000.wal"), &wal)?;
        let mut db = Vec::new();
        let meta_bucket = (b"meta".to_vec(), vec![(b"consistent_index".to_vec(), 4u64.to_be_bytes().to_vec())]);
        crate::bbolt::write(&[meta_bucket], &mut db)?;
        std::fs::write(dir.path().join("member/snap/db"), &db)?;
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
        Ok(())
    }
}
