//! The Raft log and vote, stored in the engine's `raft_log` and
//! `raft_state` tables, with appends made durable by the journal.
//!
//! Durability: `append` writes the entries to the engine without waiting
//! for the disk and to the journal (`journal`: preallocated segments, one
//! device wait per fsync instead of the engine's two); the journal's fsync
//! is what completes the flush callback. On the leader the callback goes
//! to one syncer thread, which fsyncs once for every callback that queued
//! up meanwhile (group commit) and completes them in order; the leader's
//! Raft (keel's openraft patch) replicates while that runs. A follower's
//! Raft waits for every flush before answering, so there `append` fsyncs
//! on the calling task and completes the callback itself: two thread
//! hand-offs (to the syncer and back) fewer on every write's critical
//! path. That holds one runtime worker for
//! the fsync, while Raft's task, the only one that could use the answer,
//! waits for it anyway. Votes are written to the engine synchronously.
//!
//! On open, the journal is replayed onto the `raft_log` table, so the log
//! holds every entry whose append completed, whatever the engine lost.
//!
//! Integrity: each entry is stored as crc32 + bincode; a checksum mismatch
//! (a torn or flipped write) is reported as corruption and stops the
//! member instead of serving a damaged log.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{OptionalSend, StorageIOError, Vote};

use super::ack_mark::{AckMark, Acknowledged};
use super::journal::{self, Journal, Record};
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
        journal: Arc<Journal>,
        appended: Arc<AtomicU64>,
        truncations: Arc<Mutex<u64>>,
        mark: Option<Arc<AckMark>>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<FlushRequest>();
        let queued = Arc::new(AtomicUsize::new(0));
        let completed = queued.clone();
        std::thread::Builder::new().name("raft-log-sync".into()).spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut waiting = vec![first];
                waiting.extend(rx.try_iter());
                // Everything appended before this load is in the
                // journal, so durable once the sync returns.
                let epoch = *lock_epoch(&truncations);
                let covered = appended.load(Ordering::Acquire);
                let started = std::time::Instant::now();
                let res = journal.sync();
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
                    let r = res.as_ref().map(|_| ()).map_err(|e| std::io::Error::new(e.kind(), e.to_string()));
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
    journal: Arc<Journal>,
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
    /// Opens the log without an acknowledgement mark (tests, tools), with
    /// its journal in `journal_dir`.
    pub fn open(engine: SharedEngine, journal_dir: &Path) -> anyhow::Result<Self> {
        let journal = replay_journal(&engine, journal_dir)?;
        retire_replayed_journal(&engine, &journal)?;
        Ok(Self::assemble(engine, journal, None, 0)?)
    }

    /// Opens the log of a member, checking that the engine and the journal
    /// recovered everything the mark at `mark_path` says was acknowledged
    /// (see `ack_mark`); an error means the member must not start.
    pub fn open_checked(engine: SharedEngine, journal_dir: &Path, mark_path: &Path) -> anyhow::Result<Self> {
        let (mark, acknowledged) = AckMark::open(mark_path)?;
        let journal = replay_journal(&engine, journal_dir)?;
        let recovered = recovered(&engine)?;
        if let Some(ack) = acknowledged {
            // Before the journal is retired: a member that refuses to start
            // keeps the evidence.
            super::ack_mark::check(recovered, ack, mark.path()).map_err(anyhow::Error::msg)?;
        }
        retire_replayed_journal(&engine, &journal)?;
        // Start from what is on disk (also for data dirs from before the
        // mark existed).
        mark.durable_up_to(recovered.last_index)?;
        mark.voted(recovered.vote_term)?;
        Ok(Self::assemble(engine, journal, Some(Arc::new(mark)), recovered.last_index)?)
    }

    /// The store over a replayed journal, its syncer started.
    fn assemble(
        engine: SharedEngine,
        journal: Arc<Journal>,
        mark: Option<Arc<AckMark>>,
        last_index: u64,
    ) -> std::io::Result<Self> {
        let appended = Arc::new(AtomicU64::new(last_index));
        let truncations = Arc::new(Mutex::new(0));
        let syncer = Arc::new(Syncer::start(journal.clone(), appended.clone(), truncations.clone(), mark.clone())?);
        Ok(Self { engine, journal, syncer, appended, truncations, mark, leading: Arc::new(AtomicBool::new(false)) })
    }

    fn write_journal(&self, body: &[u8]) -> Result<(), RaftStorageError> {
        let engine = &self.engine;
        let sync_engine = || engine.sync().map_err(|e| std::io::Error::other(e.to_string()));
        self.journal.write(body, &sync_engine).map_err(write_err)
    }

    /// Records whether this member is the Raft leader.
    pub fn set_leading(&self, leading: bool) {
        self.leading.store(leading, Ordering::Release);
    }

    /// Index of the last entry in the log, if any (for status reporting).
    pub fn last_index(&self) -> Result<Option<u64>, StorageError> {
        last_index(&self.engine)
    }
}

fn get_meta<T: serde::de::DeserializeOwned>(engine: &SharedEngine, key: &[u8]) -> Result<Option<T>, RaftStorageError> {
    match engine.get(Table::RaftState, key).map_err(read_err)? {
        Some(bytes) => Ok(Some(codec::decode(&bytes).map_err(read_err)?)),
        None => Ok(None),
    }
}

fn last_index(engine: &SharedEngine) -> Result<Option<u64>, StorageError> {
    let last = engine.last_in_range(Table::RaftLog, &log_key(0), &log_key(u64::MAX))?;
    Ok(last.and_then(|(k, _)| crate::storage::keys::decode_u64(&k)))
}

fn last_purged(engine: &SharedEngine) -> Result<Option<LogId>, RaftStorageError> {
    get_meta(engine, RAFT_LAST_PURGED)
}

/// Index of the last purged entry (0 if none).
fn purged_index(engine: &SharedEngine) -> anyhow::Result<u64> {
    Ok(last_purged(engine).map_err(|e| anyhow::anyhow!("{e}"))?.map_or(0, |l| l.index))
}

/// What the engine holds after replay: the last log index and vote term.
fn recovered(engine: &SharedEngine) -> anyhow::Result<Acknowledged> {
    let last_index = match last_index(engine)? {
        Some(i) => i,
        None => purged_index(engine)?,
    };
    let vote: Option<Vote<NodeId>> = get_meta(engine, RAFT_VOTE).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Acknowledged { last_index, vote_term: vote.map_or(0, |v| v.leader_id().term) })
}

/// Opens the journal in `journal_dir` and replays its records onto the
/// engine's `raft_log` table (unsynced).
fn replay_journal(engine: &SharedEngine, journal_dir: &Path) -> anyhow::Result<Arc<Journal>> {
    // Opened first, so what it writes goes to a segment newer than every
    // replayed one, and those can be retired as a whole.
    let journal = Arc::new(Journal::open(journal_dir)?);
    // Entries up to the purge point are in a snapshot; replay must not
    // bring them back.
    let purged = purged_index(engine)?;
    let records = journal::replay::<anyhow::Error>(journal_dir, &mut |record| {
        let mut b = WriteBatch::new();
        match record {
            Record::Append(entries) => {
                for (index, bytes) in entries.into_iter().filter(|(index, _)| *index > purged) {
                    b.put(Table::RaftLog, log_key(index), bytes);
                }
            }
            Record::Truncate(from) => {
                b.delete_range(Table::RaftLog, log_key(from.max(purged + 1)), log_key(u64::MAX));
            }
        }
        Ok(engine.write(b, false)?)
    })?;
    if records > 0 {
        tracing::info!(records, "replayed the raft log journal");
    }
    Ok(journal)
}

/// Makes the replayed records durable in the engine, then deletes the
/// journal segments they came from.
fn retire_replayed_journal(engine: &SharedEngine, journal: &Journal) -> anyhow::Result<()> {
    engine.sync()?;
    journal.retire_older()?;
    Ok(())
}

/// Most stored bytes of entries one append-entries message carries to a
/// lagging or new member: small enough that a message crosses the network
/// and a follower's disk in a fraction of a second (its timeout grows
/// with its size, see `raft::network`), large enough that the round trip
/// per message is not what limits catch-up. A single larger entry is
/// still sent, alone.
pub const APPEND_BYTES_BUDGET: usize = 4 << 20;

impl LogStore {
    /// The entries in `[start, end)` (`end` `None`: to the last), in
    /// order, stopping after the first entry that brings the stored bytes
    /// read to `budget` or more (so at least one entry when any is there).
    fn read_entries(&self, start: u64, end: Option<u64>, budget: usize) -> Result<Vec<Entry>, RaftStorageError> {
        let end_key = end.map(log_key);
        let mut entries = Vec::new();
        let mut bytes = 0usize;
        self.engine
            .scan(Table::RaftLog, &log_key(start), end_key.as_ref().map(|k| k.as_slice()), &mut |k, v| {
                let index = crate::storage::keys::decode_u64(k)
                    .ok_or_else(|| StorageError::Corruption("bad raft log key".into()))?;
                entries.push(decode_entry(index, v)?);
                bytes = bytes.saturating_add(v.len());
                Ok(bytes < budget)
            })
            .map_err(read_err)?;
        Ok(entries)
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
        self.read_entries(start, end, usize::MAX)
    }

    /// What replication sends in one append-entries message: the entries
    /// from `start` up to [`APPEND_BYTES_BUDGET`] stored bytes. Without the
    /// budget a member far behind was sent hundreds of megabytes in one
    /// message, which no per-message timeout let through.
    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> Result<Vec<Entry>, RaftStorageError> {
        self.read_entries(start, Some(end), APPEND_BYTES_BUDGET)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, RaftStorageError> {
        let last_purged = last_purged(&self.engine)?;
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
        get_meta(&self.engine, RAFT_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), RaftStorageError> {
        let mut b = WriteBatch::new();
        b.put(Table::RaftState, RAFT_COMMITTED, codec::encode(&committed).map_err(write_err)?);
        self.engine.write(b, false).map_err(write_err)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, RaftStorageError> {
        Ok(get_meta::<Option<LogId>>(&self.engine, RAFT_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), RaftStorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut stored = Vec::new();
        for entry in entries {
            stored.push((entry.log_id.index, encode_entry(&entry).map_err(write_err)?));
        }
        let Some(&(last, _)) = stored.last() else {
            callback.log_io_completed(Ok(()));
            return Ok(());
        };
        let body = journal::append_body(stored.iter().map(|(index, bytes)| (*index, bytes.as_slice())));
        let mut b = WriteBatch::new();
        for (index, bytes) in stored {
            b.put(Table::RaftLog, log_key(index), bytes);
        }
        // Inline only once the syncer has completed everything before:
        // callbacks must complete in append order.
        let inline = !self.leading.load(Ordering::Acquire) && self.syncer.idle();
        let started = std::time::Instant::now();
        // The engine first: a full journal segment is retired only after
        // the engine has synced everything it holds.
        self.engine.write(b, false).map_err(write_err)?;
        self.write_journal(&body)?;
        self.appended.store(last, Ordering::Release);
        if !inline {
            return self.syncer.submit(callback);
        }
        self.journal.sync().map_err(write_err)?;
        crate::metrics::WAL_FSYNC.observe(started.elapsed().as_secs_f64());
        if let Some(mark) = &self.mark {
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
        // Durable in the journal before the engine can make it durable:
        // replay must never bring back the entries removed here.
        self.write_journal(&journal::truncate_body(log_id.index))?;
        self.journal.sync().map_err(write_err)?;
        let mut b = WriteBatch::new();
        b.delete_range(Table::RaftLog, log_key(log_id.index), log_key(u64::MAX));
        self.engine.write(b, false).map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), RaftStorageError> {
        let mut b = WriteBatch::new();
        b.put(Table::RaftState, RAFT_LAST_PURGED, codec::encode(&log_id).map_err(write_err)?);
        b.delete_range(Table::RaftLog, log_key(0), log_key(log_id.index + 1));
        // Synced: replay skips entries up to the purge point the engine
        // recovers, and after a snapshot install that point can be past the
        // last entry the log had; if it were lost while the appends after
        // it survived in the journal, the log would have a gap.
        self.engine.write(b, true).map_err(write_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::memory::MemoryEngine;

    fn blank(term: u64, index: u64) -> Entry {
        Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(term, 1), index),
            payload: openraft::EntryPayload::Blank,
        }
    }

    fn append_record(journal: &Journal, entries: &[Entry]) -> anyhow::Result<()> {
        let stored: Vec<(u64, Vec<u8>)> =
            entries.iter().map(|e| Ok((e.log_id.index, encode_entry(e)?))).collect::<Result<_, bincode::Error>>()?;
        journal.write(&journal::append_body(stored.iter().map(|(i, b)| (*i, b.as_slice()))), &|| Ok(()))?;
        Ok(())
    }

    async fn log_ids(store: &mut LogStore) -> anyhow::Result<Vec<(u64, u64)>> {
        let entries = store.try_get_log_entries(0..).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(entries.iter().map(|e| (e.log_id.leader_id.term, e.log_id.index)).collect())
    }

    /// What an engine that lost every unsynced write gets back: the journal
    /// alone rebuilds the log, truncations included, and the log from the
    /// purge point on only.
    #[tokio::test]
    async fn replaying_the_journal_rebuilds_the_log_an_engine_lost() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        {
            let journal = Journal::open(dir.path())?;
            append_record(&journal, &[blank(1, 1), blank(1, 2), blank(1, 3)])?;
            append_record(&journal, &[blank(1, 4)])?;
            journal.write(&journal::truncate_body(3), &|| Ok(()))?;
            append_record(&journal, &[blank(2, 3)])?;
            journal.sync()?;
        }
        let mut store = LogStore::open(Arc::new(MemoryEngine::new()), dir.path())?;
        assert_eq!(log_ids(&mut store).await?, vec![(1, 1), (1, 2), (2, 3)], "entry 4 stays truncated");
        // Replayed, made durable in the engine, and retired.
        assert!(journal::replay::<std::io::Error>(dir.path(), &mut |_| Ok(()))? == 0);

        let dir = tempfile::tempdir()?;
        {
            let journal = Journal::open(dir.path())?;
            append_record(&journal, &[blank(1, 1), blank(1, 2), blank(1, 3)])?;
            journal.sync()?;
        }
        let engine: SharedEngine = Arc::new(MemoryEngine::new());
        let mut b = WriteBatch::new();
        b.put(Table::RaftState, RAFT_LAST_PURGED, codec::encode(&blank(1, 2).log_id)?);
        engine.write(b, true)?;
        let mut store = LogStore::open(engine, dir.path())?;
        assert_eq!(log_ids(&mut store).await?, vec![(1, 3)], "purged entries stay purged");
        Ok(())
    }
}
