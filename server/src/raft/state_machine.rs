//! openraft's state machine over keel's engine: applies committed entries
//! through [`Applier`], builds snapshots from a consistent engine view and
//! installs snapshots received from the leader.
//!
//! Snapshot files live in `<data-dir>/member/snap/`: `current.snap` is the
//! latest snapshot, built or received in the member's scratch directory
//! and renamed into place.
//! A file is `meta length u32 | bincode(SnapshotMeta) | keel snapshot
//! stream` (see `snapshot_file`).
//!
//! Installing replaces the state-machine tables and writes the applied log
//! id last, so a crash midway leaves "applied" behind the snapshot and the
//! install is redone at start-up.

use std::io::{BufReader, BufWriter, Read, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftLogId, Snapshot, StorageIOError};

use super::snapshot_file::{SnapshotReader, SnapshotWriter};
use super::{codec, CommandResult, Entry, LogId, RaftStorageError, SnapshotMeta, StoredMembership, TypeConfig};
use crate::apply::Applier;
use crate::scratch::ScratchDir;
use crate::storage::keys::{META_APPLIED, META_MEMBERSHIP};
use crate::storage::{SharedEngine, StorageError, Table, WriteBatch};

const CURRENT: &str = "current.snap";

/// Rebuilds in-memory state (index, leases, members) after the engine's
/// state-machine tables were replaced by a snapshot.
pub trait Reloadable: Send + Sync {
    fn reload(&self) -> Result<(), StorageError>;
}

pub struct StateMachineCore {
    engine: SharedEngine,
    applier: Applier,
    snap_dir: PathBuf,
    /// Where snapshots are built and received before they are renamed
    /// into `snap_dir`.
    scratch: ScratchDir,
    reload: Arc<dyn Reloadable>,
    /// Applied index, readable without the engine (status, read waits).
    applied_index: AtomicU64,
    applied_tx: tokio::sync::watch::Sender<u64>,
}

#[derive(Clone)]
pub struct StateMachine {
    core: Arc<StateMachineCore>,
}

fn sm_err(e: impl std::fmt::Display) -> RaftStorageError {
    StorageIOError::write_state_machine(openraft::AnyError::error(e.to_string())).into()
}

fn snap_err(e: impl std::fmt::Display) -> RaftStorageError {
    StorageIOError::write_snapshot(None, openraft::AnyError::error(e.to_string())).into()
}

fn read_meta_prefix<R: Read>(r: &mut R) -> std::io::Result<SnapshotMeta> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > 64 << 20 {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "snapshot meta too large"));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    codec::decode(&buf).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))
}

pub(crate) fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

impl StateMachine {
    /// Opens the state machine; redoes a snapshot install that a crash
    /// interrupted.
    pub fn open(
        engine: SharedEngine,
        applier: Applier,
        snap_dir: PathBuf,
        scratch: ScratchDir,
        reload: Arc<dyn Reloadable>,
    ) -> Result<Self, StorageError> {
        std::fs::create_dir_all(&snap_dir).map_err(|e| StorageError::Io(e.to_string()))?;
        remove_old_partial_snapshots(&snap_dir).map_err(|e| StorageError::Io(e.to_string()))?;
        let applied: Option<LogId> = read_applied(&engine)?;
        let (applied_tx, _) = tokio::sync::watch::channel(applied.map_or(0, |l| l.index));
        let core = Arc::new(StateMachineCore {
            engine,
            applier,
            snap_dir,
            scratch,
            reload,
            applied_index: AtomicU64::new(applied.map_or(0, |l| l.index)),
            applied_tx,
        });
        let sm = Self { core };
        let current = sm.core.snap_dir.join(CURRENT);
        if current.exists() {
            let meta =
                read_meta_prefix(&mut std::fs::File::open(&current).map_err(|e| StorageError::Io(e.to_string()))?)
                    .map_err(|e| StorageError::Corruption(format!("{}: {e}", current.display())))?;
            if meta.last_log_id > applied {
                tracing::warn!(snapshot = %meta, "finishing an interrupted snapshot install");
                sm.core.install_file(&current, &meta)?;
            }
        }
        Ok(sm)
    }

    pub fn applied_index(&self) -> u64 {
        self.core.applied_index.load(Ordering::Acquire)
    }

    /// Resolves whenever the applied index changes.
    pub fn subscribe_applied(&self) -> tokio::sync::watch::Receiver<u64> {
        self.core.applied_tx.subscribe()
    }
}

/// Before the scratch directory, snapshots were built and received in
/// `snap/` itself (`build-<pid>.body`, `build-<pid>.snap`, `recv-<n>.tmp`);
/// a crash could leave one there.
fn remove_old_partial_snapshots(snap_dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(snap_dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let partial = (name.starts_with("build-") && (name.ends_with(".body") || name.ends_with(".snap")))
            || (name.starts_with("recv-") && name.ends_with(".tmp"));
        if partial {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

fn read_applied(engine: &SharedEngine) -> Result<Option<LogId>, StorageError> {
    match engine.get(Table::Meta, META_APPLIED)? {
        Some(v) => Ok(Some(codec::decode(&v).map_err(|e| StorageError::Corruption(e.to_string()))?)),
        None => Ok(None),
    }
}

impl StateMachineCore {
    fn set_applied(&self, index: u64) {
        self.applied_index.store(index, Ordering::Release);
        self.applied_tx.send_replace(index);
    }

    /// Writes a snapshot of the current state into `snap_dir`; returns its
    /// meta and path.
    fn build(&self) -> Result<(SnapshotMeta, PathBuf), StorageError> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let io = |e: std::io::Error| StorageError::Io(e.to_string());
        let body = self.scratch.temp_file("snapshot-body");
        let body_path = body.path();
        let mut applied: Option<LogId> = None;
        let mut membership = StoredMembership::default();
        {
            let file = std::fs::File::create(body_path).map_err(io)?;
            let mut w = SnapshotWriter::new(BufWriter::new(file)).map_err(io)?;
            self.engine.scan_consistent(&Table::STATE_MACHINE, &mut |table, k, v| {
                if table == Table::Meta && k == META_APPLIED {
                    applied = Some(codec::decode(v).map_err(|e| StorageError::Corruption(e.to_string()))?);
                }
                if table == Table::Meta && k == META_MEMBERSHIP {
                    membership = codec::decode(v).map_err(|e| StorageError::Corruption(e.to_string()))?;
                }
                w.record(table, k, v).map_err(io)?;
                Ok(true)
            })?;
            // Only the finished snapshot needs to be durable: the body is
            // copied into it and removed.
            let (buf, _, _) = w.finish().map_err(io)?;
            buf.into_inner().map_err(|e| StorageError::Io(e.to_string()))?;
        }
        let snapshot_id = format!(
            "{}-{}-{}",
            applied.map_or(0, |l| l.leader_id.term),
            applied.map_or(0, |l| l.index),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let meta = SnapshotMeta { last_log_id: applied, last_membership: membership, snapshot_id };
        let built = self.scratch.temp_file("snapshot");
        {
            let meta_bytes = codec::encode(&meta).map_err(|e| StorageError::Io(e.to_string()))?;
            let mut out = BufWriter::new(std::fs::File::create(built.path()).map_err(io)?);
            out.write_all(&(meta_bytes.len() as u32).to_le_bytes()).map_err(io)?;
            out.write_all(&meta_bytes).map_err(io)?;
            std::io::copy(&mut std::fs::File::open(body_path).map_err(io)?, &mut out).map_err(io)?;
            out.into_inner().map_err(|e| StorageError::Io(e.to_string()))?.sync_all().map_err(io)?;
        }
        drop(body);
        let current = self.snap_dir.join(CURRENT);
        built.persist(&current).map_err(io)?;
        fsync_dir(&self.snap_dir).map_err(io)?;
        Ok((meta, current))
    }

    /// Replaces the state machine with the snapshot in `path` (already
    /// durable at that path).
    fn install_file(&self, path: &Path, meta: &SnapshotMeta) -> Result<(), StorageError> {
        let io = |e: std::io::Error| StorageError::Corruption(format!("snapshot {}: {e}", path.display()));
        // Verify everything before touching the state machine.
        {
            let mut f = BufReader::new(std::fs::File::open(path).map_err(io)?);
            read_meta_prefix(&mut f).map_err(io)?;
            super::snapshot_file::verify(f).map_err(io)?;
        }
        let mut f = BufReader::new(std::fs::File::open(path).map_err(io)?);
        read_meta_prefix(&mut f).map_err(io)?;
        let mut reader = SnapshotReader::new(f).map_err(io)?;

        for t in Table::STATE_MACHINE {
            self.engine.clear(t)?;
        }
        let mut batch = WriteBatch::new();
        let mut applied_value = None;
        while let Some((table, k, v)) = reader.next_record().map_err(io)? {
            if table == Table::Meta && k == META_APPLIED {
                applied_value = Some(v);
                continue;
            }
            batch.put(table, k, v);
            if batch.len() >= 10_000 {
                self.engine.write(std::mem::take(&mut batch), false)?;
            }
        }
        let applied_value = match applied_value {
            Some(v) => v,
            None => codec::encode(&meta.last_log_id).map_err(|e| StorageError::Io(e.to_string()))?,
        };
        batch.put(Table::Meta, META_APPLIED, applied_value);
        self.engine.write(batch, true)?;
        self.reload.reload()?;
        self.set_applied(meta.last_log_id.map_or(0, |l| l.index));
        tracing::info!(snapshot = %meta, "installed snapshot");
        Ok(())
    }
}

/// Builds snapshots off the apply path.
pub struct SnapshotBuilder {
    core: Arc<StateMachineCore>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, RaftStorageError> {
        let core = self.core.clone();
        let (meta, path) =
            tokio::task::spawn_blocking(move || core.build()).await.map_err(snap_err)?.map_err(snap_err)?;
        tracing::info!(snapshot = %meta, "built snapshot");
        let file = SnapshotFile::open(path).await.map_err(snap_err)?;
        Ok(Snapshot { meta, snapshot: Box::new(file) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), RaftStorageError> {
        let applied = read_applied(&self.core.engine).map_err(sm_err)?;
        let membership = match self.core.engine.get(Table::Meta, META_MEMBERSHIP).map_err(sm_err)? {
            Some(v) => codec::decode(&v).map_err(sm_err)?,
            None => StoredMembership::default(),
        };
        Ok((applied, membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, RaftStorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut results = Vec::new();
        let mut last = None;
        for entry in entries {
            let log_id = *entry.get_log_id();
            let result = match &entry.payload {
                EntryPayload::Blank => {
                    self.core.applier.apply_noop(&log_id).map_err(sm_err)?;
                    CommandResult::default()
                }
                EntryPayload::Normal(cmd) => CommandResult(self.core.applier.apply(&log_id, &cmd.0).map_err(sm_err)?),
                EntryPayload::Membership(m) => {
                    let stored = StoredMembership::new(Some(log_id), m.clone());
                    self.core.applier.apply_membership(&log_id, &stored).map_err(sm_err)?;
                    CommandResult::default()
                }
            };
            results.push(result);
            last = Some(log_id.index);
        }
        if let Some(index) = last {
            self.core.set_applied(index);
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder { core: self.core.clone() }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotFile>, RaftStorageError> {
        // Left in the scratch directory if the transfer is abandoned; the
        // next start sweeps it.
        let path = self.core.scratch.file("snapshot-received");
        Ok(Box::new(SnapshotFile::create(path).await.map_err(snap_err)?))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<SnapshotFile>,
    ) -> Result<(), RaftStorageError> {
        let SnapshotFile { file, path: received } = *snapshot;
        file.sync_all().await.map_err(snap_err)?;
        drop(file);
        let core = self.core.clone();
        let meta = meta.clone();
        tokio::task::spawn_blocking(move || -> Result<(), StorageError> {
            let io = |e: std::io::Error| StorageError::Io(e.to_string());
            let current = core.snap_dir.join(CURRENT);
            std::fs::rename(&received, &current).map_err(io)?;
            fsync_dir(&core.snap_dir).map_err(io)?;
            core.install_file(&current, &meta)
        })
        .await
        .map_err(sm_err)?
        .map_err(sm_err)
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, RaftStorageError> {
        let path = self.core.snap_dir.join(CURRENT);
        if !path.exists() {
            return Ok(None);
        }
        let meta = {
            let mut f = std::fs::File::open(&path).map_err(snap_err)?;
            read_meta_prefix(&mut f).map_err(snap_err)?
        };
        let file = SnapshotFile::open(path).await.map_err(snap_err)?;
        Ok(Some(Snapshot { meta, snapshot: Box::new(file) }))
    }
}

/// A snapshot file together with its path, so an installed snapshot can be
/// renamed into place. Reads, writes and seeks go to the file.
pub struct SnapshotFile {
    file: tokio::fs::File,
    path: PathBuf,
}

impl SnapshotFile {
    async fn open(path: PathBuf) -> std::io::Result<Self> {
        Ok(Self { file: tokio::fs::File::open(&path).await?, path })
    }

    async fn create(path: PathBuf) -> std::io::Result<Self> {
        let file = tokio::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).await?;
        Ok(Self { file, path })
    }
}

impl tokio::io::AsyncRead for SnapshotFile {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.file).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for SnapshotFile {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.file).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.file).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.file).poll_shutdown(cx)
    }
}

impl tokio::io::AsyncSeek for SnapshotFile {
    fn start_seek(mut self: Pin<&mut Self>, position: SeekFrom) -> std::io::Result<()> {
        Pin::new(&mut self.file).start_seek(position)
    }

    fn poll_complete(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<u64>> {
        Pin::new(&mut self.file).poll_complete(cx)
    }
}
