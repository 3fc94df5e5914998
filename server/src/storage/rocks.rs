//! The RocksDB engine: the only file in keel that names RocksDB.
//!
//! One RocksDB instance holds every table as a column family, so a write
//! batch spanning the Raft log and the state machine is atomic, and one
//! write-ahead log orders every write (recovery yields a prefix of history).

use std::path::Path;

use rocksdb::{
    BlockBasedOptions, BottommostLevelCompaction, Cache, ColumnFamilyDescriptor, CompactOptions,
    DBCompressionType, ErrorKind, Options, ReadOptions, WriteOptions, DB,
};

use super::{
    Engine, Result, SizeStats, StorageError, Table, TableVisitor, Visitor, WriteBatch, WriteOp,
};

/// Block cache shared by every column family. Kept small: the OS page cache
/// does the rest, and keel's memory target is half of etcd's.
const BLOCK_CACHE_BYTES: usize = 64 << 20;

pub struct RocksEngine {
    db: DB,
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
        let db = DB::open_cf_descriptors(&opts, path, descriptors).map_err(io_err)?;
        Ok(Self { db })
    }

    fn cf(&self, table: Table) -> Result<&rocksdb::ColumnFamily> {
        self.db.cf_handle(table.name()).ok_or_else(|| {
            StorageError::Corruption(format!("column family {} missing", table.name()))
        })
    }

    fn int_property(&self, table: Table, name: &str) -> Result<u64> {
        let cf = self.cf(table)?;
        Ok(self
            .db
            .property_int_value_cf(cf, name)
            .map_err(io_err)?
            .unwrap_or(0))
    }
}

impl Engine for RocksEngine {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.db.get_cf(self.cf(table)?, key).map_err(io_err)
    }

    fn multi_get(&self, table: Table, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>> {
        let cf = self.cf(table)?;
        self.db
            .batched_multi_get_cf(cf, keys.iter(), false)
            .into_iter()
            .map(|r| r.map(|v| v.map(|s| s.to_vec())).map_err(io_err))
            .collect()
    }

    fn scan(
        &self,
        table: Table,
        start: &[u8],
        end: Option<&[u8]>,
        visit: &mut Visitor<'_>,
    ) -> Result<()> {
        let mut ro = ReadOptions::default();
        if let Some(end) = end {
            ro.set_iterate_upper_bound(end.to_vec());
        }
        let mut it = self.db.raw_iterator_cf_opt(self.cf(table)?, ro);
        it.seek(start);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if !visit(k, v)? {
                return Ok(());
            }
            it.next();
        }
        it.status().map_err(io_err)
    }

    fn last_in_range(
        &self,
        table: Table,
        start: &[u8],
        end: &[u8],
    ) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(start.to_vec());
        ro.set_iterate_upper_bound(end.to_vec());
        let mut it = self.db.raw_iterator_cf_opt(self.cf(table)?, ro);
        it.seek_to_last();
        let found = match (it.key(), it.value()) {
            (Some(k), Some(v)) => Some((k.to_vec(), v.to_vec())),
            _ => None,
        };
        it.status().map_err(io_err)?;
        Ok(found)
    }

    fn write(&self, batch: WriteBatch, sync: bool) -> Result<()> {
        let mut wb = rocksdb::WriteBatch::default();
        for op in batch.into_ops() {
            match op {
                WriteOp::Put { table, key, value } => wb.put_cf(self.cf(table)?, key, value),
                WriteOp::Delete { table, key } => wb.delete_cf(self.cf(table)?, key),
                WriteOp::DeleteRange { table, start, end } => {
                    wb.delete_range_cf(self.cf(table)?, start, end)
                }
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(wb, &wo).map_err(io_err)
    }

    fn clear(&self, table: Table) -> Result<()> {
        let cf = self.cf(table)?;
        let mut it = self.db.raw_iterator_cf(cf);
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
            self.db.write(wb).map_err(io_err)?;
        }
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        self.db.flush_wal(true).map_err(io_err)
    }

    fn scan_consistent(&self, tables: &[Table], visit: &mut TableVisitor<'_>) -> Result<()> {
        let snapshot = self.db.snapshot();
        for &table in tables {
            let mut ro = ReadOptions::default();
            ro.set_snapshot(&snapshot);
            let mut it = self.db.raw_iterator_cf_opt(self.cf(table)?, ro);
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

    fn size(&self) -> Result<SizeStats> {
        let mut stats = SizeStats::default();
        for table in Table::ALL {
            let mem = self.int_property(table, "rocksdb.size-all-mem-tables")?;
            stats.total_bytes += self.int_property(table, "rocksdb.total-sst-files-size")? + mem;
            stats.live_bytes += self.int_property(table, "rocksdb.estimate-live-data-size")? + mem;
        }
        stats.live_bytes = stats.live_bytes.min(stats.total_bytes);
        Ok(stats)
    }

    fn defragment(&self) -> Result<()> {
        let mut co = CompactOptions::default();
        co.set_bottommost_level_compaction(BottommostLevelCompaction::Force);
        for table in Table::ALL {
            self.db
                .compact_range_cf_opt(self.cf(table)?, None::<&[u8]>, None::<&[u8]>, &co);
        }
        Ok(())
    }

    fn checkpoint(&self, dir: &Path) -> Result<()> {
        let cp = rocksdb::checkpoint::Checkpoint::new(&self.db).map_err(io_err)?;
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
