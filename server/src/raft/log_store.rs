//! The Raft log and vote, stored in the engine's `raft_log` and
//! `raft_state` tables.
//!
//! Durability: on the leader, `append` writes entries without waiting for
//! the disk and hands the flush callback to one syncer thread, which fsyncs
//! the engine's write-ahead log once for every callback that queued up
//! meanwhile (group commit) and completes them in order; the leader's Raft
//! (keel's openraft patch) replicates while that runs. A follower's Raft
//! waits for every flush before answering, so there `append` writes with
//! fsync on the calling task and completes the callback itself: two thread
//! hand-offs (to the syncer and back, ~60 us each on a busy 2-core machine)
//! fewer on every write's critical path. That holds one runtime worker for
//! the fsync, while Raft's task, the only one that could use the answer,
//! waits for it anyway. Votes are written synchronously.
//!
//! Integrity: each entry is stored as crc32 + bincode; a checksum mismatch
//! (a torn or flipped write) is reported as corruption and stops the
//! member instead of serving a damaged log.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{OptionalSend, StorageIOError, Vote};

use super::ack_mark::{AckMark, Acknowledged};
use super::{codec, Entry, LogId, NodeId, RaftStorageError, TypeConfig};
use crate::storage::keys::{log_key, RAFT_COMMITTED, RAFT_LAST_PURGED, RAFT_VOTE};
use crate::storage::{SharedEngine, StorageError, Table, WriteBatch};

/// Encodes a log entry as stored: crc32 (little-endian) of the bincode
/// body, then the body.
pub fn encode_entry(entry: &Entry) -> Result<Vec<u8>, bincode::Error> {
    let body = codec::encode(entry)?;
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

pub fn decode_entry(index: u64, bytes: &[u8]) -> Result<Entry, StorageError> {
    if bytes.len() < 4 {
        return Err(StorageError::Corruption(format!("raft log entry {index} is truncated")));
    }
    let (crc, body) = bytes.split_at(4);
    let want = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if crc32fast::hash(body) != want {
        return Err(StorageError::Corruption(format!("raft log entry {index} fails its checksum")));
    }
    codec::decode(body).map_err(|e| StorageError::Corruption(format!("raft log entry {index}: {e}")))
}

type FlushRequest = LogFlushed<TypeConfig>;

/// The truncation count's guard. A poisoned lock still holds a valid
/// count (it is only ever incremented), so it is used as is.
fn lock_epoch(truncations: &Mutex<u64>) -> std::sync::MutexGuard<'_, u64> {
    truncations.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One thread that makes appended entries durable in batches.
struct Syncer {
    tx: mpsc::Sender<FlushRequest>,
    /// Callbacks sent and not yet completed.
    queued: Arc<AtomicUsize>,
}

impl Syncer {
    fn start(
        engine: SharedEngine,
        appended: Arc<AtomicU64>,
        truncations: Arc<Mutex<u64>>,
        mark: Option<Arc<AckMark>>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<FlushRequest>();
        let queued = Arc::new(AtomicUsize::new(0));
        let completed = queued.clone();
        // Weak: the engine closes with its last user, not later in this
        // thread (which may still run while the process exits).
        let engine = Arc::downgrade(&engine);
        std::thread::Builder::new().name("raft-log-sync".into()).spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut waiting = vec![first];
                waiting.extend(rx.try_iter());
                // Everything appended before this load is in the
                // write-ahead log, so durable once the sync returns.
                let epoch = *lock_epoch(&truncations);
                let covered = appended.load(Ordering::Acquire);
                let started = std::time::Instant::now();
                let res = match engine.upgrade() {
                    Some(engine) => engine.sync(),
                    None => Err(StorageError::Io("the storage engine was closed".into())),
                };
                crate::metrics::WAL_FSYNC.observe(started.elapsed().as_secs_f64());
                if let (Ok(()), Some(mark)) = (&res, &mark) {
                    // A truncation since `covered` was read may have
                    // replaced entries up to it with new ones this sync does
                    // not cover: record nothing then (the next sync will).
                    // The epoch's lock keeps a truncation from lowering the
                    // mark between this check and the write.
                    let current = lock_epoch(&truncations);
                    if *current == epoch {
                        if let Err(e) = mark.durable_up_to(covered.min(appended.load(Ordering::Acquire))) {
                            tracing::warn!(error = %e, "cannot update the acknowledgement mark");
                        }
                    }
                }
                let n = waiting.len();
                for cb in waiting {
                    let r = res.as_ref().map(|_| ()).map_err(|e| std::io::Error::other(e.to_string()));
                    cb.log_io_completed(r);
                }
                completed.fetch_sub(n, Ordering::AcqRel);
            }
        })?;
        Ok(Self { tx, queued })
    }

    fn submit(&self, callback: FlushRequest) -> Result<(), RaftStorageError> {
        self.queued.fetch_add(1, Ordering::AcqRel);
        self.tx.send(callback).map_err(|_| write_err("raft log syncer stopped"))
    }

    /// Whether every callback handed over has been completed.
    fn idle(&self) -> bool {
        self.queued.load(Ordering::Acquire) == 0
    }
}

#[derive(Clone)]
pub struct LogStore {
    engine: SharedEngine,
    syncer: Arc<Syncer>,
    /// Index of the last entry handed to the engine.
    appended: Arc<AtomicU64>,
    /// How many truncations there have been (see the syncer).
    truncations: Arc<Mutex<u64>>,
    mark: Option<Arc<AckMark>>,
    /// Whether this member leads (see the module doc); kept by
    /// [`LogStore::set_leading`] from Raft's metrics, so it may lag a role
    /// change by a moment, which costs speed, never durability.
    leading: Arc<AtomicBool>,
}

fn read_err(e: impl std::fmt::Display) -> RaftStorageError {
    StorageIOError::read_logs(openraft::AnyError::error(e.to_string())).into()
}

fn write_err(e: impl std::fmt::Display) -> RaftStorageError {
    StorageIOError::write_logs(openraft::AnyError::error(e.to_string())).into()
}

fn vote_err(e: impl std::fmt::Display) -> RaftStorageError {
    StorageIOError::write_vote(openraft::AnyError::error(e.to_string())).into()
}

impl LogStore {
    /// Opens the log without an acknowledgement mark (tests, tools).
    pub fn open(engine: SharedEngine) -> std::io::Result<Self> {
        let appended = Arc::new(AtomicU64::new(0));
        let truncations = Arc::new(Mutex::new(0));
        let syncer = Arc::new(Syncer::start(engine.clone(), appended.clone(), truncations.clone(), None)?);
        Ok(Self { engine, syncer, appended, truncations, mark: None, leading: Arc::new(AtomicBool::new(false)) })
    }

    /// Opens the log of a member, checking that the engine recovered
    /// everything the mark at `mark_path` says was acknowledged (see
    /// `ack_mark`); an error means the member must not start.
    pub fn open_checked(engine: SharedEngine, mark_path: &std::path::Path) -> anyhow::Result<Self> {
        let (mark, acknowledged) = AckMark::open(mark_path)?;
        let mut store = Self::open(engine)?;
        let recovered = store.recovered()?;
        if let Some(ack) = acknowledged {
            super::ack_mark::check(recovered, ack, mark.path()).map_err(anyhow::Error::msg)?;
        }
        // Start from what is on disk (also for data dirs from before the
        // mark existed).
        mark.durable_up_to(recovered.last_index)?;
        mark.voted(recovered.vote_term)?;
        store.appended.store(recovered.last_index, Ordering::Release);
        let mark = Arc::new(mark);
        store.syncer = Arc::new(Syncer::start(
            store.engine.clone(),
            store.appended.clone(),
            store.truncations.clone(),
            Some(mark.clone()),
        )?);
        store.mark = Some(mark);
        Ok(store)
    }

    fn recovered(&self) -> anyhow::Result<Acknowledged> {
        let last = self.engine.last_in_range(Table::RaftLog, &log_key(0), &log_key(u64::MAX))?;
        let last_index = match last.and_then(|(k, _)| crate::storage::keys::decode_u64(&k)) {
            Some(i) => i,
            None => self.last_purged().map_err(|e| anyhow::anyhow!("{e}"))?.map_or(0, |l| l.index),
        };
        let vote: Option<Vote<NodeId>> = self.get_meta(RAFT_VOTE).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Acknowledged { last_index, vote_term: vote.map_or(0, |v| v.leader_id().term) })
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, RaftStorageError> {
        match self.engine.get(Table::RaftState, key).map_err(read_err)? {
            Some(bytes) => Ok(Some(codec::decode(&bytes).map_err(read_err)?)),
            None => Ok(None),
        }
    }

    fn last_purged(&self) -> Result<Option<LogId>, RaftStorageError> {
        self.get_meta(RAFT_LAST_PURGED)
    }

    /// Records whether this member is the Raft leader.
    pub fn set_leading(&self, leading: bool) {
        self.leading.store(leading, Ordering::Release);
    }

    /// Index of the last entry in the log, if any (for status reporting).
    pub fn last_index(&self) -> Result<Option<u64>, StorageError> {
        let last = self.engine.last_in_range(Table::RaftLog, &log_key(0), &log_key(u64::MAX))?;
        Ok(last.and_then(|(k, _)| crate::storage::keys::decode_u64(&k)))
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, RaftStorageError> {
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => e.checked_add(1),
            Bound::Excluded(&e) => Some(e),
            Bound::Unbounded => None,
        };
        let end_key = end.map(log_key);
        let mut entries = Vec::new();
        self.engine
            .scan(Table::RaftLog, &log_key(start), end_key.as_ref().map(|k| k.as_slice()), &mut |k, v| {
                let index = crate::storage::keys::decode_u64(k)
                    .ok_or_else(|| StorageError::Corruption("bad raft log key".into()))?;
                entries.push(decode_entry(index, v)?);
                Ok(true)
            })
            .map_err(read_err)?;
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, RaftStorageError> {
        let last_purged = self.last_purged()?;
        let last = self.engine.last_in_range(Table::RaftLog, &log_key(0), &log_key(u64::MAX)).map_err(read_err)?;
        let last_log_id = match last {
            Some((k, v)) => {
                let index = crate::storage::keys::decode_u64(&k).ok_or_else(|| read_err("bad raft log key"))?;
                Some(decode_entry(index, &v).map_err(read_err)?.log_id)
            }
            None => last_purged,
        };
        Ok(LogState { last_purged_log_id: last_purged, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), RaftStorageError> {
        let mut b = WriteBatch::new();
        b.put(Table::RaftState, RAFT_VOTE, codec::encode(vote).map_err(vote_err)?);
        self.engine.write(b, true).map_err(vote_err)?;
        if let Some(mark) = &self.mark {
            mark.voted(vote.leader_id().term).map_err(vote_err)?;
        }
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, RaftStorageError> {
        self.get_meta(RAFT_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), RaftStorageError> {
        let mut b = WriteBatch::new();
        b.put(Table::RaftState, RAFT_COMMITTED, codec::encode(&committed).map_err(write_err)?);
        self.engine.write(b, false).map_err(write_err)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, RaftStorageError> {
        Ok(self.get_meta::<Option<LogId>>(RAFT_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), RaftStorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut b = WriteBatch::new();
        let mut last = None;
        for entry in entries {
            b.put(Table::RaftLog, log_key(entry.log_id.index), encode_entry(&entry).map_err(write_err)?);
            last = Some(entry.log_id.index);
        }
        // Inline only once the syncer has completed everything before:
        // callbacks must complete in append order.
        let inline = !self.leading.load(Ordering::Acquire) && self.syncer.idle();
        let started = std::time::Instant::now();
        self.engine.write(b, inline).map_err(write_err)?;
        if let Some(last) = last {
            self.appended.store(last, Ordering::Release);
        }
        if !inline {
            return self.syncer.submit(callback);
        }
        crate::metrics::WAL_FSYNC.observe(started.elapsed().as_secs_f64());
        if let (Some(mark), Some(last)) = (&self.mark, last) {
            if let Err(e) = mark.durable_up_to(last) {
                tracing::warn!(error = %e, "cannot update the acknowledgement mark");
            }
        }
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), RaftStorageError> {
        // Lower the mark (and what the syncer may record) first, so it
        // never claims entries the log no longer has.
        {
            let mut epoch = lock_epoch(&self.truncations);
            self.appended.store(log_id.index.saturating_sub(1), Ordering::Release);
            *epoch += 1;
            if let Some(mark) = &self.mark {
                mark.truncating_from(log_id.index).map_err(write_err)?;
            }
        }
        let mut b = WriteBatch::new();
        b.delete_range(Table::RaftLog, log_key(log_id.index), log_key(u64::MAX));
        self.engine.write(b, true).map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), RaftStorageError> {
        let mut b = WriteBatch::new();
        b.put(Table::RaftState, RAFT_LAST_PURGED, codec::encode(&log_id).map_err(write_err)?);
        b.delete_range(Table::RaftLog, log_key(0), log_key(log_id.index + 1));
        self.engine.write(b, false).map_err(write_err)
    }
}
