//! etcd's backend layout over bbolt (`bbolt.rs`), both ways: keel's state
//! machine written as the database etcd's `snapshot save` produces, and
//! an etcd database read back as keel's tables.
//!
//! | etcd bucket | key                                  | value                    | keel |
//! |-------------|--------------------------------------|--------------------------|------|
//! | key         | main (8, BE) `_` sub (8, BE) [`t`]   | mvccpb.KeyValue          | kv (16-byte revision; tombstone: version 0) |
//! | meta        | consistent_index, term, scheduledCompactRev, finishedCompactRev, storageVersion (3.6+) | u64 BE, revision bytes, "3.6.0" | meta |
//! | lease       | lease id (8, BE)                     | leasepb.Lease            | lease |
//! | auth        | authEnabled, authRevision            | [1]/[0], u64 BE          | meta |
//! | authUsers   | user name                            | authpb.User              | auth `u/` |
//! | authRoles   | role name                            | authpb.Role              | auth `r/` |
//! | members, members_removed | member records (JSON), removed ids |  | empty in backups (a restore starts a new cluster); filled by `keel convert-to-etcd` |
//! | cluster, alarm | cluster version, alarms |                           | not carried |

use std::io;

use prost::Message;

use crate::mvcc::Revision;
use crate::storage::keys::{
    AUTH_ROLE_PREFIX, AUTH_USER_PREFIX, META_APPLIED, META_AUTH_ENABLED, META_AUTH_REVISION, META_COMPACT_FINISHED,
    META_COMPACT_SCHEDULED,
};
use crate::storage::{Engine, StorageError, Table};

/// etcd's leasepb.Lease.
#[derive(Clone, PartialEq, prost::Message)]
struct EtcdLease {
    #[prost(int64, tag = "1")]
    id: i64,
    #[prost(int64, tag = "2")]
    ttl: i64,
    #[prost(int64, tag = "3")]
    remaining_ttl: i64,
}

const CLUSTER_VERSION: &[u8] = b"3.4.0";

/// etcd's revToBytes: main, '_', sub.
fn etcd_revision(rev: Revision, tombstone: bool) -> Vec<u8> {
    let mut k = Vec::with_capacity(18);
    k.extend_from_slice(&rev.main.to_be_bytes());
    k.push(b'_');
    k.extend_from_slice(&rev.sub.to_be_bytes());
    if tombstone {
        k.push(b't');
    }
    k
}

fn parse_etcd_revision(k: &[u8]) -> Option<Revision> {
    if !(k.len() == 17 || (k.len() == 18 && k[17] == b't')) || k[8] != b'_' {
        return None;
    }
    let main = i64::from_be_bytes(k[..8].try_into().ok()?);
    let sub = i64::from_be_bytes(k[9..17].try_into().ok()?);
    Some(Revision { main, sub })
}

fn storage(e: StorageError) -> io::Error {
    io::Error::other(e.to_string())
}

/// etcd's member records (the `members` and `members_removed` buckets):
/// empty in a backup (a restore starts a new cluster), filled when a data
/// dir is handed to etcd in place. Any order: `write_db` sorts them.
#[derive(Debug, Default)]
pub struct MemberRecords {
    pub members: Vec<(Vec<u8>, Vec<u8>)>,
    pub removed: Vec<(Vec<u8>, Vec<u8>)>,
    /// The cluster version to record ("3.6"; None: 3.4). From 3.6 on,
    /// etcd also reads the storage version from the `meta` bucket.
    pub cluster_version: Option<String>,
}

/// Writes keel's state machine to `out` as etcd's backend database (a
/// bbolt file), in one consistent scan. The `key` bucket, which holds
/// nearly all the data, streams straight into pages; the other buckets
/// are small and are sorted in memory. Returns the output and the
/// database's size.
pub fn write_db<W: std::io::Write + std::io::Seek>(
    engine: &dyn Engine,
    member_records: MemberRecords,
    out: W,
) -> io::Result<(W, u64)> {
    let mut w = crate::bbolt::FileWriter::new(out)?;
    w.begin_bucket(b"key")?;
    let mut lease = Vec::new();
    let mut users = Vec::new();
    let mut roles = Vec::new();
    let mut meta = Vec::new();
    let mut auth = Vec::new();
    let mut failure: Option<io::Error> = None;
    engine
        .scan_consistent(&Table::STATE_MACHINE, &mut |table, k, v| {
            match table {
                Table::Kv => match (Revision::from_key(k), keel_proto::mvccpb::KeyValue::decode(v)) {
                    (Some(rev), Ok(kv)) => {
                        if let Err(e) = w.put(&etcd_revision(rev, kv.version == 0), v) {
                            failure = Some(e);
                        }
                    }
                    _ => failure = Some(invalid(format!("undecodable kv record at {k:?}"))),
                },
                Table::Lease => match keel_proto::keelpb::LeaseRecord::decode(v) {
                    Ok(r) => lease.push((
                        r.id.to_be_bytes().to_vec(),
                        EtcdLease { id: r.id, ttl: r.ttl, remaining_ttl: r.remaining_ttl }.encode_to_vec(),
                    )),
                    Err(e) => failure = Some(invalid(format!("undecodable lease record: {e}"))),
                },
                Table::Auth => {
                    if let Some(name) = k.strip_prefix(AUTH_USER_PREFIX) {
                        users.push((name.to_vec(), v.to_vec()));
                    } else if let Some(name) = k.strip_prefix(AUTH_ROLE_PREFIX) {
                        roles.push((name.to_vec(), v.to_vec()));
                    }
                }
                Table::Meta => {
                    if k == META_APPLIED {
                        if let Ok(applied) = crate::raft_types::codec::decode::<crate::raft_types::LogId>(v) {
                            meta.push((b"consistent_index".to_vec(), applied.index.to_be_bytes().to_vec()));
                            // etcd 3.5+ keeps the applied entry's term too,
                            // and 3.6 reads a file without a storage
                            // version as 3.5's only when it is there.
                            meta.push((b"term".to_vec(), applied.leader_id.term.to_be_bytes().to_vec()));
                        }
                    } else if k == META_COMPACT_SCHEDULED || k == META_COMPACT_FINISHED {
                        if let Some(main) = crate::storage::keys::decode_i64(v) {
                            let name: &[u8] = if k == META_COMPACT_SCHEDULED {
                                b"scheduledCompactRev"
                            } else {
                                b"finishedCompactRev"
                            };
                            meta.push((name.to_vec(), etcd_revision(Revision { main, sub: 0 }, false)));
                        }
                    } else if k == META_AUTH_ENABLED {
                        auth.push((b"authEnabled".to_vec(), v.to_vec()));
                    } else if k == META_AUTH_REVISION {
                        auth.push((b"authRevision".to_vec(), v.to_vec()));
                    }
                }
                Table::RaftLog | Table::RaftState => {}
            }
            Ok(failure.is_none())
        })
        .map_err(storage)?;
    if let Some(f) = failure {
        return Err(f);
    }
    w.end_bucket()?;
    let cluster_version = match &member_records.cluster_version {
        Some(v) => format!("{v}.0").into_bytes(),
        None => CLUSTER_VERSION.to_vec(),
    };
    if crate::version::minor(&String::from_utf8_lossy(&cluster_version)) >= 6 {
        meta.push((b"storageVersion".to_vec(), cluster_version.clone()));
    }
    if !auth.iter().any(|(k, _)| k == b"authRevision") {
        auth.push((b"authRevision".to_vec(), 1u64.to_be_bytes().to_vec()));
    }
    let small = [
        (&b"alarm"[..], Vec::new()),
        (b"auth", auth),
        (b"authRoles", roles),
        (b"authUsers", users),
        (b"cluster", vec![(b"clusterVersion".to_vec(), cluster_version)]),
        (b"lease", lease),
        (b"members", member_records.members),
        (b"members_removed", member_records.removed),
        (b"meta", meta),
    ];
    for (name, mut pairs) in small {
        pairs.sort();
        w.begin_bucket(name)?;
        for (k, v) in &pairs {
            w.put(k, v)?;
        }
        w.end_bucket()?;
    }
    w.finish()
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// A record of one of keel's tables.
pub type Record = (Table, Vec<u8>, Vec<u8>);

/// One etcd record as a keel state-machine record, if it is one keel
/// keeps (membership, alarms and the consistent index are not).
pub fn to_keel(bucket: &[u8], k: &[u8], v: &[u8]) -> io::Result<Option<Record>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("etcd {what} record: {k:?}"));
    Ok(match bucket {
        b"key" => {
            let rev = parse_etcd_revision(k).ok_or_else(|| bad("key"))?;
            keel_proto::mvccpb::KeyValue::decode(v).map_err(|_| bad("key"))?;
            Some((Table::Kv, rev.to_key().to_vec(), v.to_vec()))
        }
        b"lease" => {
            let l = EtcdLease::decode(v).map_err(|_| bad("lease"))?;
            let record = keel_proto::keelpb::LeaseRecord { id: l.id, ttl: l.ttl, remaining_ttl: l.remaining_ttl };
            Some((Table::Lease, l.id.to_be_bytes().to_vec(), record.encode_to_vec()))
        }
        b"authUsers" => Some((Table::Auth, [AUTH_USER_PREFIX, k].concat(), v.to_vec())),
        b"authRoles" => Some((Table::Auth, [AUTH_ROLE_PREFIX, k].concat(), v.to_vec())),
        b"auth" if k == b"authEnabled" => Some((Table::Meta, META_AUTH_ENABLED.to_vec(), v.to_vec())),
        b"auth" if k == b"authRevision" => Some((Table::Meta, META_AUTH_REVISION.to_vec(), v.to_vec())),
        b"meta" if k == b"scheduledCompactRev" || k == b"finishedCompactRev" => {
            let rev = parse_etcd_revision(v).ok_or_else(|| bad("meta"))?;
            let key = if k == b"scheduledCompactRev" { META_COMPACT_SCHEDULED } else { META_COMPACT_FINISHED };
            Some((Table::Meta, key.to_vec(), rev.main.to_be_bytes().to_vec()))
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::storage::memory::MemoryEngine;
    use crate::storage::{SharedEngine, WriteBatch};

    #[test]
    fn keel_tables_survive_the_etcd_layout() -> anyhow::Result<()> {
        let engine: SharedEngine = Arc::new(MemoryEngine::new());
        let mut b = WriteBatch::new();
        let live = keel_proto::mvccpb::KeyValue {
            key: "a".into(),
            value: "1".into(),
            create_revision: 2,
            mod_revision: 3,
            version: 2,
            lease: 7,
        };
        b.put(Table::Kv, Revision { main: 3, sub: 0 }.to_key(), live.encode_to_vec());
        let tomb = keel_proto::mvccpb::KeyValue { key: "b".into(), ..Default::default() };
        b.put(Table::Kv, Revision { main: 4, sub: 1 }.to_key(), tomb.encode_to_vec());
        let lease = keel_proto::keelpb::LeaseRecord { id: 7, ttl: 60, remaining_ttl: 30 };
        b.put(Table::Lease, 7i64.to_be_bytes(), lease.encode_to_vec());
        b.put(Table::Auth, b"u/alice".to_vec(), b"user".to_vec());
        b.put(Table::Auth, b"r/reader".to_vec(), b"role".to_vec());
        b.put(Table::Meta, META_AUTH_ENABLED, vec![1]);
        b.put(Table::Meta, META_AUTH_REVISION, 5u64.to_be_bytes().to_vec());
        b.put(Table::Meta, META_COMPACT_FINISHED, 2i64.to_be_bytes().to_vec());
        engine.write(b, false)?;

        let (file, _) = write_db(engine.as_ref(), MemberRecords::default(), std::io::Cursor::new(Vec::new()))?;
        let file = file.into_inner();
        let mut back = Vec::new();
        let mut tombstone_keys = 0;
        crate::bbolt::read(&file, &mut |bucket, pair| {
            if let Some((k, v)) = pair {
                if bucket == b"key" && k.ends_with(b"t") {
                    tombstone_keys += 1;
                }
                if let Some(r) = to_keel(bucket, k, v)? {
                    back.push(r);
                }
            }
            Ok(())
        })?;
        assert_eq!(tombstone_keys, 1, "a tombstone's etcd key ends in 't'");
        let mut expected = Vec::new();
        engine.scan_consistent(&Table::STATE_MACHINE, &mut |t, k, v| {
            expected.push((t, k.to_vec(), v.to_vec()));
            Ok(true)
        })?;
        back.sort();
        expected.sort();
        assert_eq!(back, expected);
        Ok(())
    }
}
