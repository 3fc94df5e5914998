//! The RocksDB engine: the only file in keel that names RocksDB.
//!
//! One RocksDB instance holds every table as a column family, so a write
//! batch spanning the Raft log and the state machine is atomic, and one
//! write-ahead log orders every write (recovery yields a prefix of history).

use std::path::Path;
use std::sync::{RwLock, RwLockReadGuard};

use rocksdb::{
    BlockBasedOptions, BottommostLevelCompaction, Cache, ColumnFamilyDescriptor, CompactOptions, DBCompressionType,
    DBRecoveryMode, ErrorKind, Options, ReadOptions, WriteOptions, DB,
};

use super::{Engine, Result, SizeStats, StorageError, Table, TableVisitor, Visitor, WriteBatch, WriteOp};

/// Block cache shared by every column family. Kept small: the OS page cache
/// does the rest, and keel's memory target is half of etcd's.
const BLOCK_CACHE_BYTES: usize = 64 << 20;

pub struct RocksEngine {
    /// `None` once closed: the database is dropped (closed cleanly) even
    /// while other threads still hold the engine; they then get errors.
    db: RwLock<Option<DB>>,
}

/// A read guard on the open database.
struct Open<'a>(RwLockReadGuard<'a, Option<DB>>);

impl std::ops::Deref for Open<'_> {
    type Target = DB;
    fn deref(&self) -> &DB {
        // Checked when the guard was made.
        self.0.as_ref().unwrap_or_else(|| unreachable!("Open is only built for an open database"))
    }
}

fn io_err(e: rocksdb::Error) -> StorageError {
    if e.kind() == ErrorKind::Corruption {
        StorageError::Corruption(e.into_string())
    } else {
        StorageError::Io(e.into_string())
    }
}

impl RocksEngine {
    /// Opens (creating if needed) the engine in directory `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_paranoid_checks(true);
        // A torn record at the end of the write-ahead log is a write that
        // was never acknowledged (a crash mid-write) and is dropped; damage
        // anywhere else means acknowledged writes are gone, so the member
        // must refuse to start rather than come back with a shorter Raft
        // log than it promised its peers (RocksDB's default, point-in-time
        // recovery, would silently stop at the damage).
        opts.set_wal_recovery_mode(DBRecoveryMode::TolerateCorruptedTailRecords);
        opts.set_max_background_jobs(2);
        opts.set_bytes_per_sync(1 << 20);
        opts.set_max_total_wal_size(256 << 20);
        opts.set_keep_log_file_num(4);
        opts.set_max_log_file_size(16 << 20);

        let cache = Cache::new_lru_cache(BLOCK_CACHE_BYTES);
        let descriptors = Table::ALL.iter().map(|t| {
            let mut table_opts = BlockBasedOptions::default();
            table_opts.set_block_cache(&cache);
            table_opts.set_cache_index_and_filter_blocks(true);
            table_opts.set_pin_l0_filter_and_index_blocks_in_cache(true);
            if matches!(t, Table::Kv | Table::Lease | Table::Auth | Table::Meta) {
                table_opts.set_bloom_filter(10.0, false);
            }
            let mut cf_opts = Options::default();
            cf_opts.set_block_based_table_factory(&table_opts);
            cf_opts.set_compression_type(DBCompressionType::Lz4);
            cf_opts.set_write_buffer_size(32 << 20);
            ColumnFamilyDescriptor::new(t.name(), cf_opts)
        });
        // Closing leaves the memtables to the synced WAL (replayed at the
        // next open) rather than flushing them: a stop is quick and writes
        // no new files, which tools that remove a data dir right after
        // SIGTERM (etcd's test framework does) rely on. (The bindings have
        // no setter for this option.)
        let opts = opts.get_options_from_string("avoid_flush_during_shutdown=true").map_err(io_err)?;
        let db = DB::open_cf_descriptors(&opts, path, descriptors).map_err(io_err)?;
        Ok(Self { db: RwLock::new(Some(db)) })
    }

    fn open_db(&self) -> Result<Open<'_>> {
        let guard = self.db.read().map_err(|_| StorageError::Io("engine lock poisoned".into()))?;
        if guard.is_none() {
            return Err(StorageError::Io("storage engine is closed".into()));
        }
        Ok(Open(guard))
    }
}

fn cf(db: &DB, table: Table) -> Result<&rocksdb::ColumnFamily> {
    db.cf_handle(table.name())
        .ok_or_else(|| StorageError::Corruption(format!("column family {} missing", table.name())))
}

fn int_property(db: &DB, table: Table, name: &str) -> Result<u64> {
    Ok(db.property_int_value_cf(cf(db, table)?, name).map_err(io_err)?.unwrap_or(0))
}

impl Engine for RocksEngine {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let db = self.open_db()?;
        db.get_cf(cf(&db, table)?, key).map_err(io_err)
    }

    fn multi_get(&self, table: Table, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>> {
        let db = self.open_db()?;
        let cf = cf(&db, table)?;
        db.batched_multi_get_cf(cf, keys.iter(), false)
            .into_iter()
            .map(|r| r.map(|v| v.map(|s| s.to_vec())).map_err(io_err))
            .collect()
    }

    fn scan(&self, table: Table, start: &[u8], end: Option<&[u8]>, visit: &mut Visitor<'_>) -> Result<()> {
        let db = self.open_db()?;
        let mut ro = ReadOptions::default();
        if let Some(end) = end {
            ro.set_iterate_upper_bound(end.to_vec());
        }
        let mut it = db.raw_iterator_cf_opt(cf(&db, table)?, ro);
        it.seek(start);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if !visit(k, v)? {
                return Ok(());
            }
            it.next();
        }
        it.status().map_err(io_err)
    }

    fn last_in_range(&self, table: Table, start: &[u8], end: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        let db = self.open_db()?;
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(start.to_vec());
        ro.set_iterate_upper_bound(end.to_vec());
        let mut it = db.raw_iterator_cf_opt(cf(&db, table)?, ro);
        it.seek_to_last();
        let found = match (it.key(), it.value()) {
            (Some(k), Some(v)) => Some((k.to_vec(), v.to_vec())),
            _ => None,
        };
        it.status().map_err(io_err)?;
        Ok(found)
    }

    fn write(&self, batch: WriteBatch, sync: bool) -> Result<()> {
        let db = self.open_db()?;
        let mut wb = rocksdb::WriteBatch::default();
        for op in batch.into_ops() {
            match op {
                WriteOp::Put { table, key, value } => wb.put_cf(cf(&db, table)?, key, value),
                WriteOp::Delete { table, key } => wb.delete_cf(cf(&db, table)?, key),
                WriteOp::DeleteRange { table, start, end } => wb.delete_range_cf(cf(&db, table)?, start, end),
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        db.write_opt(wb, &wo).map_err(io_err)
    }

    fn clear(&self, table: Table) -> Result<()> {
        let db = self.open_db()?;
        let cf = cf(&db, table)?;
        let mut it = db.raw_iterator_cf(cf);
        it.seek_to_first();
        let first = it.key().map(|k| k.to_vec());
        it.seek_to_last();
        let last = it.key().map(|k| k.to_vec());
        it.status().map_err(io_err)?;
        drop(it);
        if let (Some(first), Some(last)) = (first, last) {
            let mut wb = rocksdb::WriteBatch::default();
            wb.delete_range_cf(cf, &first, &last);
            wb.delete_cf(cf, &last);
            db.write(wb).map_err(io_err)?;
        }
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        let db = self.open_db()?;
        db.flush_wal(true).map_err(io_err)
    }

    fn scan_consistent(&self, tables: &[Table], visit: &mut TableVisitor<'_>) -> Result<()> {
        let db = self.open_db()?;
        let snapshot = db.snapshot();
        for &table in tables {
            let mut ro = ReadOptions::default();
            ro.set_snapshot(&snapshot);
            let mut it = db.raw_iterator_cf_opt(cf(&db, table)?, ro);
            it.seek_to_first();
            while let (Some(k), Some(v)) = (it.key(), it.value()) {
                if !visit(table, k, v)? {
                    return Ok(());
                }
                it.next();
            }
            it.status().map_err(io_err)?;
        }
        Ok(())
    }

    fn size(&self, tables: &[Table]) -> Result<SizeStats> {
        let db = self.open_db()?;
        let mut stats = SizeStats::default();
        for &table in tables {
            let mem = int_property(&db, table, "rocksdb.size-all-mem-tables")?;
            stats.total_bytes += int_property(&db, table, "rocksdb.total-sst-files-size")? + mem;
            stats.live_bytes += int_property(&db, table, "rocksdb.estimate-live-data-size")? + mem;
        }
        stats.live_bytes = stats.live_bytes.min(stats.total_bytes);
        Ok(stats)
    }

    fn defragment(&self) -> Result<()> {
        let db = self.open_db()?;
        let mut co = CompactOptions::default();
        co.set_bottommost_level_compaction(BottommostLevelCompaction::Force);
        for table in Table::ALL {
            db.compact_range_cf_opt(cf(&db, table)?, None::<&[u8]>, None::<&[u8]>, &co);
        }
        Ok(())
    }

    fn close(&self) -> Result<()> {
        let mut guard = self.db.write().map_err(|_| StorageError::Io("engine lock poisoned".into()))?;
        if let Some(db) = guard.take() {
            db.flush_wal(true).map_err(io_err)?;
            // Dropping closes the database and joins RocksDB's background
            // threads, which must not outlive the C++ runtime at exit.
            drop(db);
        }
        Ok(())
    }

    fn checkpoint(&self, dir: &Path) -> Result<()> {
        let db = self.open_db()?;
        let cp = rocksdb::checkpoint::Checkpoint::new(&*db).map_err(io_err)?;
        cp.create_checkpoint(dir).map_err(io_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::tests::engine_conformance;

    #[test]
    fn rocks_engine_passes_engine_conformance() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| StorageError::Io(e.to_string()))?;
        let engine = RocksEngine::open(dir.path())?;
        engine_conformance(&engine)
    }

    #[test]
    fn rocks_engine_keeps_data_across_reopen() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| StorageError::Io(e.to_string()))?;
        {
            let engine = RocksEngine::open(dir.path())?;
            let mut b = WriteBatch::new();
            b.put(Table::Kv, b"k".to_vec(), b"v".to_vec());
            engine.write(b, true)?;
        }
        let engine = RocksEngine::open(dir.path())?;
        assert_eq!(engine.get(Table::Kv, b"k")?, Some(b"v".to_vec()));
        Ok(())
    }
}
