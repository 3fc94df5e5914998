//! Multi-version concurrency control with etcd's semantics: a store-wide
//! revision that grows by one per write transaction, per-key create/mod
//! revision and version, tombstones, historical reads and compaction.

pub mod key_index;
pub mod revision;
pub mod store;

#[cfg(test)]
mod model_tests;

pub use revision::Revision;
pub use store::{Committed, CompactionJob, MvccStore, RangeOptions, RangeResult, ReadTxn, ReadView, WriteTxn};
