//! keel: an etcd-compatible, Raft-replicated MVCC key-value store.
//!
//! Module map (lowest layer first):
//! - `storage`: the [`storage::Engine`] trait; RocksDB (`rocks.rs`, the only
//!   file naming RocksDB) and an in-memory engine for tests; every table
//!   and key layout in `keys.rs`.
//! - `mvcc`: revisions, the in-memory key index and the multi-version
//!   store with etcd's semantics.
//! - `apply`: etcd's request semantics (range/put/delete/txn) and the
//!   application of committed Raft entries.
//! - `auth`: users, roles, key-range permissions and tokens; auth changes
//!   are applied through Raft, permission checks run at apply (writes)
//!   and in the API layer (reads, watches, admin RPCs).
//! - `raft`: openraft's type config, log store (entries in RocksDB, made
//!   durable by the preallocated journal), state machine, snapshot files
//!   and the gRPC peer transport.
//! - `cluster`: member/cluster ids, URL rules, published member attributes.
//! - `watch`: the hub that takes each applied revision to the synced
//!   watchers, one session per gRPC stream (catch-up from history for the
//!   rest), and responses encoded once per stream (`watch/response.rs`).
//! - `lease`: leases, their expiry on the leader, keepalives and
//!   checkpoints.
//! - `server`: the member core: propose (with forwarding) and
//!   linearizable read barriers.
//! - `api`: the etcd gRPC services, one file each; `api/errors.rs` maps
//!   errors to etcd's codes and messages; `api/grpc_call.rs` is the
//!   middleware every call passes first (metrics, require-leader).
//! - `transport`: listeners, TLS, peer dialing.
//! - `backup`, `bbolt`, `etcd_format`, `etcd_wal`, `etcd_data_dir`: backups
//!   in etcd's bbolt format (and keel's own), and etcd's data dirs both
//!   ways (a keel member takes one over; `keel convert-to-etcd` hands one
//!   back).
//! - `config`, `logging`, `node`: flags, logs, and wiring a member;
//!   `busy_poll`: the runtime's workers poll briefly before they sleep.
//!
//! The path of a write: `api::kv` validates -> `server::Server::propose`
//! (forwards to the leader if needed) -> `raft::batcher` (concurrent writes
//! share one entry) -> openraft (patched: `vendor/openraft`) replicates
//! while the leader's log flushes (`raft::log_store`, `raft::journal`),
//! and commits
//! -> `raft::state_machine` -> `apply::Applier` -> `apply::kv` over an
//! `mvcc::WriteTxn` -> one engine batch with the applied index -> the
//! response travels back through Raft's client_write.
//!
//! The path of a read: `api::kv` -> `Server::linearizable_barrier` (read
//! index from the leader, wait for local apply; skipped when serializable)
//! -> `apply::kv::range` over an `mvcc::ReadTxn`.
//!
//! The path of a watch event: `apply::Applier` -> `watch::hub` (queued
//! once per stream) -> `watch::session`'s sender -> `api::watch`'s codec.

pub mod alarm;
pub mod api;
pub mod apply;
pub mod auth;
pub mod backup;
pub mod bbolt;
pub mod busy_poll;
pub mod cli;
pub mod cluster;
pub mod concurrency;
pub mod config;
pub mod error;
pub mod etcd_data_dir;
pub mod etcd_format;
pub mod etcd_wal;
pub mod http;
pub mod lease;
pub mod logging;
pub mod maintenance_duties;
pub mod membership;
pub mod metrics;
pub mod mvcc;
pub mod node;
pub mod raft;
pub mod server;
pub mod storage;
pub mod transport;
pub mod watch;

#[cfg(test)]
mod fuzz_targets;

/// Runs a member until SIGINT or SIGTERM, then stops it cleanly.
pub async fn run(config: config::Config) -> anyhow::Result<()> {
    let node = node::start(config).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("received interrupt signal, shutting down"),
        _ = term.recv() => tracing::info!("received terminated signal, shutting down"),
        _ = node.removed() => tracing::warn!("the member has been permanently removed from the cluster; shutting down"),
    }
    node.shutdown().await?;
    tracing::info!("stopped keel member");
    Ok(())
}
