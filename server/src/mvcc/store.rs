//! The multi-version store: etcd's revision semantics on top of an
//! [`Engine`]. Values live in the engine's `kv` table keyed by revision; the
//! [`TreeIndex`] maps user keys to revisions and is rebuilt from the table
//! when the store opens.
//!
//! Concurrency: one writer (the Raft apply loop) and many readers. A
//! [`WriteTxn`] holds the index write lock from its first change until its
//! batch is in the engine, so readers see either none or all of a
//! transaction, and never an index entry whose value is not stored yet.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::Bytes;
use keel_proto::mvccpb::{event::EventType, Event, KeyValue};
use prost::Message;

use super::key_index::{KeyAt, TreeIndex};
use super::revision::Revision;
use crate::error::{Error, Result};
use crate::storage::keys::{decode_i64, META_COMPACT_FINISHED, META_COMPACT_SCHEDULED};
use crate::storage::{SharedEngine, Table, WriteBatch};

/// How many revisions a background compaction deletes per engine write.
const COMPACTION_BATCH: usize = 10_000;

/// Options of a range read at the MVCC level (etcd's mvcc.RangeOptions).
#[derive(Debug, Clone, Copy, Default)]
pub struct RangeOptions {
    /// Return at most this many key-values (0: all). `count` is unaffected.
    pub limit: usize,
    /// Revision to read at; <= 0 reads the latest.
    pub rev: i64,
    /// Only count, fetch no values.
    pub count_only: bool,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct RangeResult {
    pub kvs: Vec<KeyValue>,
    /// Keys in the range at the read revision, regardless of limit.
    pub count: i64,
    /// The store revision the read was served at (the header revision).
    pub rev: i64,
}

/// Reads at one revision: implemented by read and write transactions.
pub trait ReadView {
    /// Revision this view reads at.
    fn rev(&self) -> i64;
    /// Oldest revision still readable (the compaction revision).
    fn first_rev(&self) -> i64;
    /// Keys in `[key, end)` (no end: the single key; empty end: every key
    /// from `key`) at `opts.rev`.
    fn range(&self, key: &[u8], end: Option<&[u8]>, opts: RangeOptions) -> Result<RangeResult>;
}

struct Inner {
    index: TreeIndex,
    /// Revision of the last committed write transaction; 1 in a new store.
    current_rev: i64,
    /// Reads below this revision fail with `Compacted`; -1 before the
    /// first compaction.
    compact_rev: i64,
}

/// Tracks background physical compactions so `physical` compaction
/// requests can wait for theirs.
#[derive(Default)]
struct CompactionProgress {
    finished: Mutex<i64>,
    done: Condvar,
}

pub struct MvccStore {
    engine: SharedEngine,
    inner: RwLock<Inner>,
    progress: Arc<CompactionProgress>,
}

/// What a committed write transaction changed.
#[derive(Debug, Default, Clone)]
pub struct Committed {
    /// Store revision after the transaction.
    pub rev: i64,
    /// Every revision the transaction created, in order, with one event
    /// per change (empty for a read-only txn).
    pub revisions: Vec<(i64, Vec<Event>)>,
    /// (key, old lease, new lease) for every change of a key's lease.
    pub lease_changes: Vec<(Bytes, i64, i64)>,
}

fn is_tombstone(kv: &KeyValue) -> bool {
    kv.version == 0
}

fn decode_kv(bytes: &[u8]) -> Result<KeyValue> {
    KeyValue::decode(bytes).map_err(|e| Error::Storage(format!("undecodable key-value record: {e}")))
}

impl MvccStore {
    /// Opens the store, rebuilding the index from the engine and finishing
    /// any compaction a crash interrupted.
    pub fn open(engine: SharedEngine) -> Result<Self> {
        let (inner, finished, pending) = load(&engine)?;
        let store = Self {
            engine,
            inner: RwLock::new(inner),
            progress: Arc::new(CompactionProgress { finished: Mutex::new(finished), done: Condvar::new() }),
        };
        store.finish_interrupted(pending)?;
        Ok(store)
    }

    /// Rebuilds the in-memory state from the engine (after a snapshot
    /// replaced the stored data).
    pub fn reload(&self) -> Result<()> {
        let (inner, finished, pending) = load(&self.engine)?;
        *self.write_inner()? = inner;
        if let Ok(mut f) = self.progress.finished.lock() {
            *f = finished;
        }
        self.finish_interrupted(pending)
    }

    fn finish_interrupted(&self, pending: Option<PendingCompaction>) -> Result<()> {
        if let Some((at, orphans)) = pending {
            let mut removed = self.write_inner()?.index.compact(at);
            removed.extend(orphans.into_iter().filter(|r| r.main <= at));
            delete_revisions(&self.engine, &removed, at)?;
            self.mark_compaction_finished(at);
        }
        Ok(())
    }

    fn read_inner(&self) -> Result<RwLockReadGuard<'_, Inner>> {
        self.inner.read().map_err(|_| Error::Internal("mvcc index lock poisoned".into()))
    }

    fn write_inner(&self) -> Result<RwLockWriteGuard<'_, Inner>> {
        self.inner.write().map_err(|_| Error::Internal("mvcc index lock poisoned".into()))
    }

    pub fn engine(&self) -> &SharedEngine {
        &self.engine
    }

    /// Latest committed revision.
    pub fn current_rev(&self) -> i64 {
        self.read_inner().map(|i| i.current_rev).unwrap_or(0)
    }

    /// Revision of the last compaction (-1: never compacted).
    pub fn compact_rev(&self) -> i64 {
        self.read_inner().map(|i| i.compact_rev).unwrap_or(-1)
    }

    /// Number of keys the index tracks (live or with history).
    pub fn indexed_keys(&self) -> usize {
        self.read_inner().map(|i| i.index.len()).unwrap_or(0)
    }

    /// A read view at the latest revision.
    pub fn read(&self) -> Result<ReadTxn<'_>> {
        let inner = self.read_inner()?;
        Ok(ReadTxn { store: self, rev: inner.current_rev, compact_rev: inner.compact_rev })
    }

    /// Starts the single write transaction. Writers must not overlap; the
    /// apply loop is the only writer.
    pub fn write(&self) -> Result<WriteTxn<'_>> {
        let inner = self.write_inner()?;
        let begin_rev = inner.current_rev;
        Ok(WriteTxn {
            store: self,
            inner,
            begin_rev,
            changes: Vec::new(),
            sealed: Vec::new(),
            pending: HashMap::new(),
            batch: WriteBatch::new(),
            lease_changes: Vec::new(),
        })
    }

    /// Values of the given revisions, from `pending` first, then storage.
    fn fetch(
        &self,
        revs: &[(Box<[u8]>, KeyAt)],
        pending: Option<&HashMap<Revision, KeyValue>>,
    ) -> Result<Vec<KeyValue>> {
        let mut out: Vec<Option<KeyValue>> = vec![None; revs.len()];
        let mut missing_idx = Vec::new();
        let mut missing_keys = Vec::new();
        for (i, (_, at)) in revs.iter().enumerate() {
            match pending.and_then(|p| p.get(&at.modified)) {
                Some(kv) => out[i] = Some(kv.clone()),
                None => {
                    missing_idx.push(i);
                    missing_keys.push(at.modified.to_key().to_vec());
                }
            }
        }
        if !missing_keys.is_empty() {
            let values = self.engine.multi_get(Table::Kv, &missing_keys)?;
            for (i, v) in missing_idx.into_iter().zip(values) {
                match v {
                    Some(bytes) => out[i] = Some(decode_kv(&bytes)?),
                    // A concurrent compaction removed it: the read revision
                    // is no longer available.
                    None => return Err(Error::Compacted),
                }
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    fn range_at(
        &self,
        inner: &Inner,
        cur_rev: i64,
        key: &[u8],
        end: Option<&[u8]>,
        opts: RangeOptions,
        pending: Option<&HashMap<Revision, KeyValue>>,
    ) -> Result<RangeResult> {
        if opts.rev > cur_rev {
            return Err(Error::FutureRevision);
        }
        let rev = if opts.rev <= 0 { cur_rev } else { opts.rev };
        if rev < inner.compact_rev {
            return Err(Error::Compacted);
        }
        let mut count = 0i64;
        let mut selected = Vec::new();
        inner.index.visit_at(key, end, rev, |k, at| {
            count += 1;
            if !opts.count_only && (opts.limit == 0 || selected.len() < opts.limit) {
                selected.push((Box::<[u8]>::from(k), at));
            }
            true
        });
        let kvs = if opts.count_only { Vec::new() } else { self.fetch(&selected, pending)? };
        Ok(RangeResult { kvs, count, rev: cur_rev })
    }

    /// Waits until the background deletion of a compaction at `rev` (or a
    /// later one) is done.
    pub fn wait_compaction(&self, rev: i64) {
        let mut finished = match self.progress.finished.lock() {
            Ok(f) => f,
            Err(_) => return,
        };
        while *finished < rev {
            finished = match self.progress.done.wait(finished) {
                Ok(f) => f,
                Err(_) => return,
            };
        }
    }

    fn mark_compaction_finished(&self, rev: i64) {
        if let Ok(mut f) = self.progress.finished.lock() {
            *f = (*f).max(rev);
        }
        self.progress.done.notify_all();
    }

    /// Applies a compaction at `rev`: reads below it fail from now on, the
    /// index forgets the history, and the returned job deletes the stored
    /// history in the background. Fails like etcd for compacted or future
    /// revisions.
    pub fn compact(&self, rev: i64, batch: &mut WriteBatch) -> Result<CompactionJob> {
        let mut inner = self.write_inner()?;
        if rev <= inner.compact_rev {
            return Err(Error::Compacted);
        }
        if rev > inner.current_rev {
            return Err(Error::FutureRevision);
        }
        inner.compact_rev = rev;
        let removed = inner.index.compact(rev);
        batch.put(Table::Meta, META_COMPACT_SCHEDULED, rev.to_be_bytes().to_vec());
        Ok(CompactionJob { rev, removed })
    }

    /// Runs a compaction job's deletions (call off the apply path).
    pub fn finish_compaction(&self, job: CompactionJob) -> Result<()> {
        delete_revisions(&self.engine, &job.removed, job.rev)?;
        self.mark_compaction_finished(job.rev);
        Ok(())
    }

    /// The revisions a compaction at `rev` keeps (for HashKV).
    pub fn keep_set(&self, rev: i64) -> Result<std::collections::HashSet<Revision>> {
        Ok(self.read_inner()?.index.keep(rev))
    }

    /// The value of `key` as of revision `rev`, if it existed then and the
    /// revision is not compacted (used for watch prev_kv).
    pub fn get_at(&self, key: &[u8], rev: i64) -> Result<Option<KeyValue>> {
        let found = {
            let inner = self.read_inner()?;
            if rev < inner.compact_rev || rev <= 0 {
                return Ok(None);
            }
            inner.index.get(key, rev)
        };
        let Some(at) = found else { return Ok(None) };
        match self.engine.get(Table::Kv, &at.modified.to_key())? {
            Some(bytes) => Ok(Some(decode_kv(&bytes)?)),
            None => Ok(None),
        }
    }

    /// Every change with main revision in `[from, to]`, in revision order,
    /// as watch events (a tombstone becomes a DELETE carrying the key and
    /// its revision). Fails with `Compacted` when `from` is compacted.
    pub fn history(&self, from: i64, to: i64) -> Result<Vec<Event>> {
        if from < self.compact_rev() {
            return Err(Error::Compacted);
        }
        let mut events = Vec::new();
        if to < from {
            return Ok(events);
        }
        let end = Revision::start_key(to + 1);
        self.engine.scan(Table::Kv, &Revision::start_key(from), Some(&end), &mut |k, v| {
            let rev = Revision::from_key(k)
                .ok_or_else(|| crate::storage::StorageError::Corruption("bad revision key in kv table".into()))?;
            let mut kv = KeyValue::decode(v)
                .map_err(|e| crate::storage::StorageError::Corruption(format!("bad kv record at {rev}: {e}")))?;
            let ty = if is_tombstone(&kv) {
                kv.mod_revision = rev.main;
                EventType::Delete
            } else {
                EventType::Put
            };
            events.push(Event { r#type: ty as i32, kv: Some(kv), prev_kv: None });
            Ok(true)
        })?;
        Ok(events)
    }

    /// etcd's HashKV: a hash of the stored history up to `rev` (0: now),
    /// counting what a compaction keeps below the compaction revision, so
    /// every member at the same revision gets the same hash whatever its
    /// background compaction has physically removed so far. Returns
    /// (hash, compaction revision, current revision, hashed revision).
    pub fn hash_kv(&self, rev: i64) -> Result<(u32, i64, i64, i64)> {
        let (current, compact) = {
            let inner = self.read_inner()?;
            (inner.current_rev, inner.compact_rev)
        };
        let rev = if rev <= 0 { current } else { rev };
        if rev > current {
            return Err(Error::FutureRevision);
        }
        if rev < compact {
            return Err(Error::Compacted);
        }
        let keep = if compact > 0 { self.keep_set(compact)? } else { Default::default() };
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(Table::Kv.name().as_bytes());
        let end = Revision::start_key(rev + 1);
        self.engine.scan(Table::Kv, &[], Some(&end), &mut |k, v| {
            if let Some(r) = Revision::from_key(k) {
                if r.main <= compact && !keep.contains(&r) {
                    return Ok(true);
                }
            }
            hasher.update(k);
            hasher.update(v);
            Ok(true)
        })?;
        Ok((hasher.finalize(), compact, current, rev))
    }

    /// Live keys in range with their lease, for lease bookkeeping and
    /// range permission checks.
    pub fn live_keys_with_lease(&self, start: &[u8], end: Option<&[u8]>) -> Result<Vec<(Bytes, i64)>> {
        let inner = self.read_inner()?;
        let mut out = Vec::new();
        inner.index.visit_live(start, end, |k, ki| out.push((Bytes::copy_from_slice(k), ki.lease())));
        Ok(out)
    }
}

/// A compaction to redo at start-up: its revision and the tombstones whose
/// generations were already deleted.
type PendingCompaction = (i64, Vec<Revision>);

/// Reads the index and compaction state from the engine. Returns the
/// state, the finished compaction revision, and a compaction to redo
/// (revision and orphaned tombstones) when a crash interrupted one.
fn load(engine: &SharedEngine) -> Result<(Inner, i64, Option<PendingCompaction>)> {
    let scheduled = engine.get(Table::Meta, META_COMPACT_SCHEDULED)?.and_then(|v| decode_i64(&v));
    let finished = engine.get(Table::Meta, META_COMPACT_FINISHED)?.and_then(|v| decode_i64(&v));
    let mut index = TreeIndex::default();
    let mut current_rev = 1;
    let mut orphans = Vec::new();
    engine.scan(Table::Kv, &[], None, &mut |k, v| {
        let rev = Revision::from_key(k)
            .ok_or_else(|| crate::storage::StorageError::Corruption("bad revision key in kv table".into()))?;
        let kv = KeyValue::decode(v)
            .map_err(|e| crate::storage::StorageError::Corruption(format!("bad kv record at {rev}: {e}")))?;
        if is_tombstone(&kv) {
            if !index.tombstone(&kv.key, rev) {
                // Its generation was physically compacted before a crash.
                orphans.push(rev);
            }
        } else {
            index.restore(&kv.key, Revision::new(kv.create_revision, 0), rev, kv.version);
            if let Some(ki) = index.key_mut(&kv.key) {
                ki.set_lease(kv.lease);
            }
        }
        current_rev = current_rev.max(rev.main);
        Ok(true)
    })?;
    let compact_rev = scheduled.unwrap_or(-1);
    current_rev = current_rev.max(compact_rev);
    let mut live = 0i64;
    index.visit_live(b"\0", Some(&[]), |_, _| live += 1);
    crate::metrics::KEYS_TOTAL.set(live);
    let pending = match scheduled {
        Some(at) if finished != Some(at) => Some((at, orphans)),
        _ => None,
    };
    Ok((Inner { index, current_rev, compact_rev }, finished.unwrap_or(-1), pending))
}

/// Deletes `removed` revisions in batches, then records `rev` as finished.
fn delete_revisions(engine: &SharedEngine, removed: &[Revision], rev: i64) -> Result<()> {
    for chunk in removed.chunks(COMPACTION_BATCH) {
        let mut batch = WriteBatch::new();
        for r in chunk {
            batch.delete(Table::Kv, r.to_key().to_vec());
        }
        engine.write(batch, false)?;
    }
    let mut batch = WriteBatch::new();
    batch.put(Table::Meta, META_COMPACT_FINISHED, rev.to_be_bytes().to_vec());
    engine.write(batch, false)?;
    Ok(())
}

/// Stored history a compaction no longer references, to delete.
#[derive(Debug)]
pub struct CompactionJob {
    pub rev: i64,
    removed: Vec<Revision>,
}

/// A consistent read view at the revision current when it was created.
pub struct ReadTxn<'a> {
    store: &'a MvccStore,
    rev: i64,
    compact_rev: i64,
}

impl ReadView for ReadTxn<'_> {
    fn rev(&self) -> i64 {
        self.rev
    }

    fn first_rev(&self) -> i64 {
        self.compact_rev
    }

    fn range(&self, key: &[u8], end: Option<&[u8]>, opts: RangeOptions) -> Result<RangeResult> {
        let inner = self.store.read_inner()?;
        self.store.range_at(&inner, self.rev, key, end, opts, None)
    }
}

/// The write transaction of one applied entry. Changes get revision
/// `(begin + 1, n)`; reads inside the transaction see earlier changes.
/// An entry carrying several requests calls [`WriteTxn::seal_request`]
/// after each: the next request's changes get the next revision, and all
/// of them reach the engine in one batch at [`WriteTxn::commit`].
pub struct WriteTxn<'a> {
    store: &'a MvccStore,
    inner: RwLockWriteGuard<'a, Inner>,
    /// Revision before the current request (advanced by `seal_request`).
    begin_rev: i64,
    /// Changes of the current request.
    changes: Vec<KeyValue>,
    /// Changes of earlier requests of this transaction, by revision.
    sealed: Vec<(i64, Vec<KeyValue>)>,
    pending: HashMap<Revision, KeyValue>,
    batch: WriteBatch,
    lease_changes: Vec<(Bytes, i64, i64)>,
}

impl WriteTxn<'_> {
    /// Whether anything was written so far.
    pub fn has_changes(&self) -> bool {
        !self.changes.is_empty()
    }

    /// Revision the next change gets.
    fn next_rev(&self) -> Revision {
        Revision::new(self.begin_rev + 1, self.changes.len() as i64)
    }

    /// Header revision of a write op: the new revision once anything changed.
    pub fn write_rev(&self) -> i64 {
        if self.has_changes() {
            self.begin_rev + 1
        } else {
            self.begin_rev
        }
    }

    /// Extra engine writes to commit atomically with the changes.
    pub fn batch_mut(&mut self) -> &mut WriteBatch {
        &mut self.batch
    }

    pub fn put(&mut self, key: &[u8], value: Bytes, lease: i64) {
        crate::metrics::PUT_TOTAL.inc();
        let rev = self.next_rev();
        let (created, version, old_lease) = match self.inner.index.key(key) {
            Some(ki) if ki.is_live() => {
                let at = ki.get(self.begin_rev + 1).map(|a| (a.created.main, a.version));
                let (c, v) = at.unwrap_or((rev.main, 0));
                (c, v + 1, ki.lease())
            }
            _ => {
                crate::metrics::KEYS_TOTAL.inc();
                (rev.main, 1, 0)
            }
        };
        let kv = KeyValue {
            key: Bytes::copy_from_slice(key),
            create_revision: created,
            mod_revision: rev.main,
            version,
            value,
            lease,
        };
        self.inner.index.put(key, rev);
        if let Some(ki) = self.inner.index.key_mut(key) {
            ki.set_lease(lease);
        }
        if old_lease != lease {
            self.lease_changes.push((kv.key.clone(), old_lease, lease));
        }
        self.batch.put(Table::Kv, rev.to_key().to_vec(), kv.encode_to_vec());
        self.pending.insert(rev, kv.clone());
        self.changes.push(kv);
    }

    /// Deletes the live keys in range; returns how many.
    pub fn delete_range(&mut self, key: &[u8], end: Option<&[u8]>) -> i64 {
        crate::metrics::DELETE_TOTAL.inc();
        let at = self.begin_rev + 1;
        let mut doomed = Vec::new();
        self.inner.index.visit_at(key, end, at, |k, _| {
            doomed.push(Bytes::copy_from_slice(k));
            true
        });
        for k in &doomed {
            let rev = self.next_rev();
            let old_lease = self.inner.index.key(k).map(|ki| ki.lease()).unwrap_or(0);
            if !self.inner.index.tombstone(k, rev) {
                continue;
            }
            crate::metrics::KEYS_TOTAL.dec();
            if old_lease != 0 {
                self.lease_changes.push((k.clone(), old_lease, 0));
            }
            let tomb = KeyValue { key: k.clone(), ..Default::default() };
            self.batch.put(Table::Kv, rev.to_key().to_vec(), tomb.encode_to_vec());
            self.changes.push(KeyValue { mod_revision: rev.main, ..tomb });
        }
        doomed.len() as i64
    }

    /// Lease attachment changes so far, handed over (an entry carrying
    /// several requests applies them after each, so a later lease revoke
    /// in the same entry sees the keys attached before it).
    pub fn take_lease_changes(&mut self) -> Vec<(Bytes, i64, i64)> {
        std::mem::take(&mut self.lease_changes)
    }

    /// Ends the current request: its changes (if any) keep revision
    /// `begin + 1` and the next request starts after it. Returns the
    /// revision the request's response reports.
    pub fn seal_request(&mut self) -> i64 {
        if self.has_changes() {
            self.begin_rev += 1;
            let changes = std::mem::take(&mut self.changes);
            self.sealed.push((self.begin_rev, changes));
        }
        self.begin_rev
    }

    /// Writes everything to the engine and publishes the new revision
    /// (only then can readers see revisions whose records they must
    /// fetch). On error the in-memory index may be ahead of storage: the
    /// caller must stop the member (it rebuilds from storage on restart).
    pub fn commit(mut self) -> Result<Committed> {
        self.seal_request();
        let batch = std::mem::take(&mut self.batch);
        if !batch.is_empty() {
            let started = std::time::Instant::now();
            self.store.engine.write(batch, false)?;
            crate::metrics::BACKEND_COMMIT.observe(started.elapsed().as_secs_f64());
        }
        self.inner.current_rev = self.begin_rev;
        let rev = self.inner.current_rev;
        let revisions = std::mem::take(&mut self.sealed)
            .into_iter()
            .map(|(rev, changes)| {
                let events = changes
                    .into_iter()
                    .map(|kv| {
                        let ty = if is_tombstone(&kv) { EventType::Delete } else { EventType::Put };
                        Event { r#type: ty as i32, kv: Some(kv), prev_kv: None }
                    })
                    .collect();
                (rev, events)
            })
            .collect();
        Ok(Committed { rev, revisions, lease_changes: std::mem::take(&mut self.lease_changes) })
    }
}

impl ReadView for WriteTxn<'_> {
    fn rev(&self) -> i64 {
        self.begin_rev
    }

    fn first_rev(&self) -> i64 {
        self.inner.compact_rev
    }

    fn range(&self, key: &[u8], end: Option<&[u8]>, opts: RangeOptions) -> Result<RangeResult> {
        self.store.range_at(&self.inner, self.write_rev(), key, end, opts, Some(&self.pending))
    }
}
