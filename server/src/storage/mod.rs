//! The storage engine seam. Everything above this module (MVCC, Raft log,
//! leases, auth) talks to an [`Engine`]; only `rocks.rs` names RocksDB, and
//! `memory.rs` keeps the trait honest and unit tests fast (TiKV's
//! engine_traits rule).
//!
//! The engine is a set of ordered byte maps ([`Table`]s) with atomic
//! multi-table write batches. Invariants every engine upholds:
//! - a [`WriteBatch`] is applied atomically: after a crash either all of it
//!   or none of it is visible;
//! - writes are visible to readers as soon as [`Engine::write`] returns, and
//!   durable once it returns with `sync = true` or once a later
//!   [`Engine::sync`] returns;
//! - recovery after a crash yields a prefix of the write history (never a
//!   later write without an earlier one).

pub mod keys;
pub mod memory;
pub mod rocks;

use std::path::Path;
use std::sync::Arc;

pub use keys::Table;

/// A storage failure. I/O errors and detected corruption are fatal for the
/// member: the caller stops rather than serve data it cannot trust.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage I/O error: {0}")]
    Io(String),
    #[error("storage corruption: {0}")]
    Corruption(String),
}

pub type Result<T> = std::result::Result<T, StorageError>;

/// One mutation inside a [`WriteBatch`].
#[derive(Debug, Clone)]
pub enum WriteOp {
    Put {
        table: Table,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        table: Table,
        key: Vec<u8>,
    },
    /// Deletes every key in `[start, end)`.
    DeleteRange {
        table: Table,
        start: Vec<u8>,
        end: Vec<u8>,
    },
}

/// An ordered list of mutations applied atomically by [`Engine::write`].
#[derive(Debug, Clone, Default)]
pub struct WriteBatch {
    ops: Vec<WriteOp>,
}

impl WriteBatch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn put(&mut self, table: Table, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push(WriteOp::Put { table, key: key.into(), value: value.into() });
    }

    pub fn delete(&mut self, table: Table, key: impl Into<Vec<u8>>) {
        self.ops.push(WriteOp::Delete { table, key: key.into() });
    }

    pub fn delete_range(&mut self, table: Table, start: impl Into<Vec<u8>>, end: impl Into<Vec<u8>>) {
        self.ops.push(WriteOp::DeleteRange { table, start: start.into(), end: end.into() });
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn ops(&self) -> &[WriteOp] {
        &self.ops
    }

    pub fn into_ops(self) -> Vec<WriteOp> {
        self.ops
    }
}

/// Size figures an operator sees in `endpoint status` and the quota check.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SizeStats {
    /// Bytes the engine occupies on disk.
    pub total_bytes: u64,
    /// Bytes of live data; the gap to `total_bytes` is what compaction and
    /// defragmentation can give back.
    pub live_bytes: u64,
}

/// Visitor for scans: return `Ok(false)` to stop early.
pub type Visitor<'a> = dyn FnMut(&[u8], &[u8]) -> Result<bool> + 'a;

/// Visitor for whole-store scans that also names the table.
pub type TableVisitor<'a> = dyn FnMut(Table, &[u8], &[u8]) -> Result<bool> + 'a;

/// An ordered, transactional key-value engine.
pub trait Engine: Send + Sync + 'static {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// Point lookups of many keys; the answer is in the order of `keys`.
    fn multi_get(&self, table: Table, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>> {
        keys.iter().map(|k| self.get(table, k)).collect()
    }

    /// Visits `start <= key < end` (no `end`: to the end of the table) in
    /// ascending key order.
    fn scan(&self, table: Table, start: &[u8], end: Option<&[u8]>, visit: &mut Visitor<'_>) -> Result<()>;

    /// The entry with the greatest key in `[start, end)`, if any.
    fn last_in_range(&self, table: Table, start: &[u8], end: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>)>>;

    /// Applies `batch` atomically. With `sync`, the batch (and everything
    /// written before it) is on stable storage when this returns.
    fn write(&self, batch: WriteBatch, sync: bool) -> Result<()>;

    /// Deletes every entry of `table`.
    fn clear(&self, table: Table) -> Result<()> {
        let mut first = None;
        self.scan(table, &[], None, &mut |k, _| {
            first = Some(k.to_vec());
            Ok(false)
        })?;
        let Some(first) = first else { return Ok(()) };
        let mut last = first.clone();
        // The greatest key: extend past every key by scanning from the first.
        self.scan(table, &first, None, &mut |k, _| {
            last = k.to_vec();
            Ok(true)
        })?;
        let mut b = WriteBatch::new();
        b.delete_range(table, first, last.clone());
        b.delete(table, last);
        self.write(b, false)
    }

    /// Makes every write that has returned so far durable.
    fn sync(&self) -> Result<()>;

    /// Visits every entry of `tables` as of one point in time, table by
    /// table; writes that happen during the scan are not seen.
    fn scan_consistent(&self, tables: &[Table], visit: &mut TableVisitor<'_>) -> Result<()>;

    /// Size of the given tables.
    fn size(&self, tables: &[Table]) -> Result<SizeStats>;

    /// Rewrites the engine's files so that deleted data stops occupying
    /// disk. Reads and writes continue while it runs.
    fn defragment(&self) -> Result<()>;

    /// Writes a consistent copy of the whole engine into `dir`, which must
    /// not exist yet.
    fn checkpoint(&self, dir: &Path) -> Result<()>;

    /// Makes everything durable and stops background work, so the process
    /// can exit while other threads still hold the engine. No writes may
    /// follow.
    fn close(&self) -> Result<()> {
        self.sync()
    }
}

pub type SharedEngine = Arc<dyn Engine>;

/// Behaviour every engine must show; run against each implementation.
#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn collect(engine: &dyn Engine, table: Table, start: &[u8], end: Option<&[u8]>) -> Result<Vec<Vec<u8>>> {
        let mut keys = Vec::new();
        engine.scan(table, start, end, &mut |k, _| {
            keys.push(k.to_vec());
            Ok(true)
        })?;
        Ok(keys)
    }

    pub(crate) fn engine_conformance(engine: &dyn Engine) -> Result<()> {
        let mut b = WriteBatch::new();
        for k in [b"a".as_slice(), b"b", b"c", b"d"] {
            b.put(Table::Kv, k.to_vec(), k.to_vec());
        }
        b.put(Table::Meta, b"a".to_vec(), b"meta".to_vec());
        engine.write(b, false)?;
        engine.sync()?;

        // Tables are separate keyspaces.
        assert_eq!(engine.get(Table::Meta, b"a")?, Some(b"meta".to_vec()));
        assert_eq!(engine.get(Table::Kv, b"a")?, Some(b"a".to_vec()));
        assert_eq!(engine.get(Table::Lease, b"a")?, None);

        assert_eq!(collect(engine, Table::Kv, b"b", None)?, vec![b"b".to_vec(), b"c".to_vec(), b"d".to_vec()]);
        assert_eq!(collect(engine, Table::Kv, b"b", Some(b"d"))?, vec![b"b".to_vec(), b"c".to_vec()]);
        assert!(collect(engine, Table::Kv, b"c", Some(b"b"))?.is_empty());

        let mut first = Vec::new();
        engine.scan(Table::Kv, b"", None, &mut |k, _| {
            first.push(k.to_vec());
            Ok(false)
        })?;
        assert_eq!(first, vec![b"a".to_vec()], "a visitor returning false stops the scan");

        assert_eq!(engine.last_in_range(Table::Kv, b"a", b"d")?.map(|(k, _)| k), Some(b"c".to_vec()));
        assert_eq!(engine.last_in_range(Table::Kv, b"x", b"z")?, None);

        let got = engine.multi_get(Table::Kv, &[b"d".to_vec(), b"zz".to_vec(), b"a".to_vec()])?;
        assert_eq!(got, vec![Some(b"d".to_vec()), None, Some(b"a".to_vec())]);

        let mut b = WriteBatch::new();
        b.delete_range(Table::Kv, b"b".to_vec(), b"d".to_vec());
        b.delete(Table::Kv, b"a".to_vec());
        b.put(Table::Kv, b"e".to_vec(), b"e".to_vec());
        engine.write(b, true)?;
        assert_eq!(collect(engine, Table::Kv, b"", None)?, vec![b"d".to_vec(), b"e".to_vec()]);

        let mut seen = Vec::new();
        engine.scan_consistent(&[Table::Kv, Table::Meta], &mut |t, k, _| {
            seen.push((t, k.to_vec()));
            Ok(true)
        })?;
        assert_eq!(seen, vec![(Table::Kv, b"d".to_vec()), (Table::Kv, b"e".to_vec()), (Table::Meta, b"a".to_vec())]);
        engine.defragment()?;
        assert_eq!(engine.get(Table::Kv, b"e")?, Some(b"e".to_vec()));
        Ok(())
    }
}
