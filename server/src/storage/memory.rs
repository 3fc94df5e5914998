//! An in-memory [`Engine`] for unit tests: ordered maps behind one lock.
//! Durability calls are no-ops; everything else behaves as RocksDB does.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use super::{Engine, Result, SizeStats, StorageError, Table, TableVisitor, Visitor, WriteBatch, WriteOp};

type Tables = HashMap<Table, BTreeMap<Vec<u8>, Vec<u8>>>;
type Rows = Vec<(Vec<u8>, Vec<u8>)>;

#[derive(Default)]
pub struct MemoryEngine {
    tables: Mutex<Tables>,
}

impl MemoryEngine {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<MutexGuard<'_, Tables>> {
        self.tables.lock().map_err(|_| StorageError::Io("memory engine lock poisoned".into()))
    }
}

fn range_bounds<'a>(start: &'a [u8], end: Option<&'a [u8]>) -> (Bound<&'a [u8]>, Bound<&'a [u8]>) {
    (Bound::Included(start), end.map_or(Bound::Unbounded, Bound::Excluded))
}

impl Engine for MemoryEngine {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.lock()?.get(&table).and_then(|t| t.get(key).cloned()))
    }

    fn scan(&self, table: Table, start: &[u8], end: Option<&[u8]>, visit: &mut Visitor<'_>) -> Result<()> {
        if end.is_some_and(|e| e <= start) {
            return Ok(());
        }
        // Copy out first so the visitor may call back into the engine.
        let entries: Vec<(Vec<u8>, Vec<u8>)> = match self.lock()?.get(&table) {
            Some(t) => t.range::<[u8], _>(range_bounds(start, end)).map(|(k, v)| (k.clone(), v.clone())).collect(),
            None => Vec::new(),
        };
        for (k, v) in entries {
            if !visit(&k, &v)? {
                break;
            }
        }
        Ok(())
    }

    fn last_in_range(&self, table: Table, start: &[u8], end: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        if end <= start {
            return Ok(None);
        }
        Ok(self.lock()?.get(&table).and_then(|t| {
            t.range::<[u8], _>(range_bounds(start, Some(end))).next_back().map(|(k, v)| (k.clone(), v.clone()))
        }))
    }

    fn write(&self, batch: WriteBatch, _sync: bool) -> Result<()> {
        let mut tables = self.lock()?;
        for op in batch.into_ops() {
            match op {
                WriteOp::Put { table, key, value } => {
                    tables.entry(table).or_default().insert(key, value);
                }
                WriteOp::Delete { table, key } => {
                    tables.entry(table).or_default().remove(&key);
                }
                WriteOp::DeleteRange { table, start, end } => {
                    let t = tables.entry(table).or_default();
                    if start < end {
                        let doomed: Vec<Vec<u8>> =
                            t.range::<[u8], _>(range_bounds(&start, Some(&end))).map(|(k, _)| k.clone()).collect();
                        for k in doomed {
                            t.remove(&k);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn scan_consistent(&self, tables: &[Table], visit: &mut TableVisitor<'_>) -> Result<()> {
        let copy: Vec<(Table, Rows)> = {
            let all = self.lock()?;
            tables
                .iter()
                .map(|t| {
                    let rows =
                        all.get(t).map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default();
                    (*t, rows)
                })
                .collect()
        };
        for (table, rows) in copy {
            for (k, v) in rows {
                if !visit(table, &k, &v)? {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    fn size(&self, tables: &[Table]) -> Result<SizeStats> {
        let bytes: usize = self
            .lock()?
            .iter()
            .filter(|(t, _)| tables.contains(t))
            .flat_map(|(_, t)| t.iter().map(|(k, v)| k.len() + v.len()))
            .sum();
        Ok(SizeStats { total_bytes: bytes as u64, live_bytes: bytes as u64 })
    }

    fn defragment(&self) -> Result<()> {
        Ok(())
    }

    fn checkpoint(&self, _dir: &Path) -> Result<()> {
        Err(StorageError::Io("the memory engine cannot write checkpoints".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::tests::engine_conformance;

    #[test]
    fn memory_engine_passes_engine_conformance() -> Result<()> {
        engine_conformance(&MemoryEngine::new())
    }
}
