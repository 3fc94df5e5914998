//! Backups: Maintenance.Snapshot's stream, `keel snapshot status` and
//! `keel snapshot restore`.
//!
//! A backup is a point-in-time copy of the state machine in a
//! [`BackupFormat`] followed by the SHA-256 of everything before it (as
//! etcd appends to its snapshots), so a truncated or damaged file is
//! refused. Maintenance.Snapshot writes etcd's format (a bbolt database
//! laid out as etcd's backend: `etcd_format.rs`), so `etcdctl snapshot
//! status` and `snapshot restore` accept keel's backups; keel's own
//! format (the snapshot stream of `raft/snapshot_file.rs`) is still read,
//! and `keel snapshot restore` takes either.

use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use prost::Message;
use sha2::{Digest, Sha256};

use crate::mvcc::Revision;
use crate::raft::snapshot_file::{SnapshotReader, SnapshotWriter};
use crate::storage::keys::{
    prefix_end, META_ALARM_PREFIX, META_APPLIED, META_MEMBERSHIP, META_MEMBER_PREFIX, META_REMOVED_PREFIX,
};
use crate::storage::rocks::RocksEngine;
use crate::storage::{Engine, StorageError, Table, WriteBatch};

/// Length of the SHA-256 trailer.
const SHA_LEN: usize = 32;

/// Where a backup is written: a file (bbolt's meta pages, written last,
/// go back to its start).
pub trait BackupOutput: Write + Seek {}

impl<T: Write + Seek> BackupOutput for T {}

/// A way of writing the state machine to a backup.
pub trait BackupFormat: Send + Sync {
    fn name(&self) -> &'static str;
    /// Writes a consistent copy of the state machine tables.
    fn write(&self, engine: &dyn Engine, out: &mut dyn BackupOutput) -> io::Result<()>;
}

/// keel's framed, checksummed stream of every state-machine entry.
pub struct KeelFormat;

impl BackupFormat for KeelFormat {
    fn name(&self) -> &'static str {
        "keel"
    }

    fn write(&self, engine: &dyn Engine, out: &mut dyn BackupOutput) -> io::Result<()> {
        let mut w = SnapshotWriter::new(out as &mut dyn Write)?;
        engine
            .scan_consistent(&Table::STATE_MACHINE, &mut |table, k, v| {
                w.record(table, k, v).map_err(|e| StorageError::Io(e.to_string()))?;
                Ok(true)
            })
            .map_err(|e| io::Error::other(e.to_string()))?;
        w.finish()?;
        Ok(())
    }
}

/// etcd's format: a bbolt database with etcd's buckets.
pub struct EtcdFormat {
    /// The cluster version the backup records ("3.6"; None: 3.4).
    pub cluster_version: Option<String>,
}

impl BackupFormat for EtcdFormat {
    fn name(&self) -> &'static str {
        "etcd"
    }

    fn write(&self, engine: &dyn Engine, out: &mut dyn BackupOutput) -> io::Result<()> {
        let records =
            crate::etcd_format::MemberRecords { cluster_version: self.cluster_version.clone(), ..Default::default() };
        crate::etcd_format::write_db(engine, records, out).map(|_| ())
    }
}

/// Whether the backup at `path` is a bbolt (etcd) database.
fn is_bbolt(path: &Path) -> io::Result<bool> {
    let mut head = [0u8; 32];
    let mut file = std::fs::File::open(path)?;
    let n = file.read(&mut head)?;
    Ok(crate::bbolt::looks_like_bbolt(&head[..n]))
}

/// The body of a backup (without its checksum trailer) in memory.
fn body(path: &Path) -> io::Result<Vec<u8>> {
    let mut bytes = std::fs::read(path)?;
    bytes.truncate(bytes.len().saturating_sub(SHA_LEN));
    Ok(bytes)
}

/// Writes a backup of `engine` to a new file at `path`; returns its size.
/// The body is written first, then read back for etcd's SHA-256 trailer,
/// so no copy of the data is held in memory.
pub fn write_backup(engine: &dyn Engine, format: &dyn BackupFormat, path: &Path) -> io::Result<u64> {
    let file = std::fs::File::options().read(true).write(true).create(true).truncate(true).open(path)?;
    let mut out = BufWriter::new(file);
    format.write(engine, &mut out)?;
    let mut file = out.into_inner().map_err(|e| io::Error::other(e.to_string()))?;
    let written = file.seek(SeekFrom::End(0))?;
    // etcdctl accepts a snapshot only if its size is a multiple of 512
    // plus the 32-byte checksum (bbolt pages); pad the body with zeros.
    let pad = (512 - written % 512) % 512;
    file.write_all(&vec![0u8; pad as usize])?;
    file.seek(SeekFrom::Start(0))?;
    let mut sha = Sha256::new();
    let mut body = io::BufReader::new(&mut file).take(written + pad);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = body.read(&mut buf)?;
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
    }
    file.seek(SeekFrom::End(0))?;
    file.write_all(&sha.finalize())?;
    file.sync_all()?;
    Ok(file.metadata()?.len())
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Checks a backup's SHA-256 trailer and that its body parses (bbolt) or
/// passes its own checksums (keel's stream).
pub fn verify(path: &Path) -> io::Result<()> {
    let len = verify_trailer(path)?;
    if is_bbolt(path)? {
        return crate::bbolt::read(&body(path)?, &mut |_, _| Ok(()));
    }
    let body = std::fs::File::open(path)?.take(len - SHA_LEN as u64);
    crate::raft::snapshot_file::verify(BufReader::new(body)).map(|_| ())
}

/// Checks the SHA-256 trailer; returns the file's length.
fn verify_trailer(path: &Path) -> io::Result<u64> {
    let len = std::fs::metadata(path)?.len();
    if len < SHA_LEN as u64 {
        return Err(invalid("snapshot file is truncated"));
    }
    let mut file = BufReader::new(std::fs::File::open(path)?);
    let mut sha = Sha256::new();
    let mut remaining = len - SHA_LEN as u64;
    let mut buf = vec![0u8; 64 << 10];
    while remaining > 0 {
        let want = remaining.min(buf.len() as u64) as usize;
        let n = file.read(&mut buf[..want])?;
        if n == 0 {
            return Err(invalid("snapshot file is truncated"));
        }
        sha.update(&buf[..n]);
        remaining -= n as u64;
    }
    let mut trailer = [0u8; SHA_LEN];
    file.read_exact(&mut trailer)?;
    if sha.finalize().as_slice() != trailer {
        return Err(invalid("snapshot file has a bad checksum (truncated or corrupt)"));
    }
    Ok(len)
}

/// What `keel snapshot status` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub hash: u32,
    pub revision: i64,
    pub total_keys: u64,
    pub total_size: u64,
}

fn for_each_record(path: &Path, mut f: impl FnMut(Table, Vec<u8>, Vec<u8>) -> io::Result<()>) -> io::Result<()> {
    if is_bbolt(path)? {
        return crate::bbolt::read(&body(path)?, &mut |bucket, pair| {
            if let Some((k, v)) = pair {
                if let Some((table, k, v)) = crate::etcd_format::to_keel(bucket, k, v)? {
                    f(table, k, v)?;
                }
            }
            Ok(())
        });
    }
    let len = std::fs::metadata(path)?.len();
    let body = std::fs::File::open(path)?.take(len.saturating_sub(SHA_LEN as u64));
    let mut reader = SnapshotReader::new(BufReader::new(body))?;
    while let Some((table, k, v)) = reader.next_record()? {
        f(table, k, v)?;
    }
    Ok(())
}

pub fn status(path: &Path) -> io::Result<Status> {
    if is_bbolt(path)? {
        // The one pass below parses the whole database: only the trailer
        // needs checking first.
        verify_trailer(path)?;
        // etcdctl's figures: CRC-32C of every bucket name and pair, the
        // newest revision in `key`, and the number of pairs.
        let (mut hash, mut revision, mut total_keys) = (0u32, 0i64, 0u64);
        crate::bbolt::read(&body(path)?, &mut |bucket, pair| {
            match pair {
                None => hash = crc32c::crc32c_append(hash, bucket),
                Some((k, v)) => {
                    hash = crc32c::crc32c_append(crc32c::crc32c_append(hash, k), v);
                    total_keys += 1;
                    if bucket == b"key" && k.len() >= 8 {
                        revision = i64::from_be_bytes(k[..8].try_into().unwrap_or_default());
                    }
                }
            }
            Ok(())
        })?;
        return Ok(Status { hash, revision, total_keys, total_size: std::fs::metadata(path)?.len() });
    }
    verify(path)?;
    let mut hasher = crc32fast::Hasher::new();
    let mut revision = 1;
    let mut total_keys = 0u64;
    for_each_record(path, |table, k, v| {
        hasher.update(&k);
        hasher.update(&v);
        total_keys += 1;
        if table == Table::Kv {
            if let Some(r) = Revision::from_key(&k) {
                revision = revision.max(r.main);
            }
        }
        Ok(())
    })?;
    Ok(Status { hash: hasher.finalize(), revision, total_keys, total_size: std::fs::metadata(path)?.len() })
}

/// Builds a new member's data dir from a backup: every key with its
/// revision, leases and auth state; cluster membership, member records and
/// alarms are left behind (the restored cluster is a new one, bootstrapped
/// from the restore flags when the member first starts).
/// `local` is written to the new member's local state (its identity and
/// bootstrap membership).
pub fn restore(path: &Path, data_dir: &Path, local: WriteBatch) -> anyhow::Result<()> {
    verify(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    if data_dir.exists() {
        anyhow::bail!("data-dir {:?} exists", data_dir.display().to_string());
    }
    let skip_prefixes: Vec<(Vec<u8>, Vec<u8>)> = [META_MEMBER_PREFIX, META_REMOVED_PREFIX, META_ALARM_PREFIX]
        .iter()
        .map(|p| (p.to_vec(), prefix_end(p).unwrap_or_default()))
        .collect();
    fill_member(data_dir, local, |put| {
        for_each_record(path, |table, k, v| {
            if table == Table::Meta {
                if k == META_APPLIED || k == META_MEMBERSHIP {
                    return Ok(());
                }
                if skip_prefixes.iter().any(|(s, e)| k.as_slice() >= s.as_slice() && k.as_slice() < e.as_slice()) {
                    return Ok(());
                }
            }
            put(table, k, v)
        })
    })
}

/// Creates a member's engine under `data_dir` holding the state-machine
/// records `feed` gives its `put` (written in batches) and `local`
/// (identity, bootstrap membership).
pub fn fill_member(
    data_dir: &Path,
    local: WriteBatch,
    feed: impl FnOnce(&mut dyn FnMut(Table, Vec<u8>, Vec<u8>) -> io::Result<()>) -> io::Result<()>,
) -> anyhow::Result<()> {
    let db_dir: PathBuf = data_dir.join("member").join("db");
    std::fs::create_dir_all(&db_dir)?;
    let engine = RocksEngine::open(&db_dir)?;
    let mut batch = WriteBatch::new();
    feed(&mut |table, k, v| {
        batch.put(table, k, v);
        if batch.len() >= 10_000 {
            engine.write(std::mem::take(&mut batch), false).map_err(|e| io::Error::other(e.to_string()))?;
        }
        Ok(())
    })?;
    engine.write(batch, true)?;
    engine.write(local, true)?;
    engine.close()?;
    Ok(())
}

/// Decodes a lease record (used by tests of restored data).
pub fn decode_lease(v: &[u8]) -> Option<keel_proto::keelpb::LeaseRecord> {
    keel_proto::keelpb::LeaseRecord::decode(v).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::memory::MemoryEngine;

    #[test]
    fn backups_round_trip_and_damage_is_refused() -> anyhow::Result<()> {
        let engine = MemoryEngine::new();
        let mut b = WriteBatch::new();
        b.put(Table::Kv, Revision::new(5, 0).to_key().to_vec(), b"kv".to_vec());
        b.put(Table::Meta, META_APPLIED.to_vec(), b"applied".to_vec());
        engine.write(b, true)?;
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("backup.db");
        let size = write_backup(&engine, &KeelFormat, &file)?;
        let st = status(&file)?;
        assert_eq!((st.revision, st.total_keys, st.total_size), (5, 2, size));

        let bytes = std::fs::read(&file)?;
        std::fs::write(&file, &bytes[..bytes.len() - 1])?;
        assert!(verify(&file).is_err(), "truncated");
        let mut flipped = bytes.clone();
        flipped[20] ^= 1;
        std::fs::write(&file, &flipped)?;
        assert!(verify(&file).is_err(), "flipped");
        assert!(restore(&file, &dir.path().join("restored"), WriteBatch::new()).is_err());
        Ok(())
    }
}
