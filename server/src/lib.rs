//! keel: an etcd-compatible, Raft-replicated MVCC key-value store.
//!
//! ## Module map, by layer (lowest first)
//!
//! A module imports only from its own layer or a lower one, and the
//! imports between modules form no cycle. `tests/layers.rs` reads this
//! list and fails when a module is missing from it or an import goes
//! against it.
//!
//! - **Foundation**
//!   - `storage`: the [`storage::Engine`] trait; RocksDB (`rocks.rs`, the
//!     only file naming RocksDB) and an in-memory engine for tests; every
//!     table and fixed key in `keys.rs`.
//!   - `error`: the error every layer returns (`api::errors` maps it to
//!     etcd's codes and messages).
//!   - `metrics`: the Prometheus registry and etcd's metric names.
//!   - `transport`: listeners, TLS, peer dialing.
//!   - `raft_types`: member ids, log ids, memberships, the log entry
//!     payload and the codec of persisted Raft state.
//!   - `bbolt`: etcd's bbolt database files.
//!   - `version`, `go_duration`, `busy_poll`: version numbers, Go's
//!     duration syntax, and the runtime's workers polling briefly before
//!     they sleep.
//!   - `scratch`: the one directory for files in progress (backups being
//!     streamed, snapshots being built or received), swept at start-up.
//!   - `tasks`: every task of a member, stopped and awaited at shutdown.
//! - **State** (what applying an entry changes)
//!   - `mvcc`: revisions, the in-memory key index and the multi-version
//!     store with etcd's semantics.
//!   - `lease`: leases and the keys attached to them (the leader's timed
//!     side is `duties::lease`).
//!   - `auth`: users, roles, key-range permissions and tokens.
//!   - `alarm`, `cluster`: alarms; member and cluster ids, URL rules,
//!     published member attributes.
//!   - `etcd_format`, `etcd_wal`: etcd's backend layout and its WAL and
//!     snapshot files, both ways.
//! - **Apply**
//!   - `apply`: etcd's request semantics (range/put/delete/txn) and the
//!     application of committed Raft entries.
//! - **Replication**
//!   - `raft`: openraft's type config, log store (entries in RocksDB, made
//!     durable by the preallocated journal), state machine, snapshot files
//!     and the client side of the peer transport.
//!   - `watch`: the hub that takes each applied revision to the synced
//!     watchers, catch-up from history for the rest, responses encoded
//!     once per stream.
//! - **Member core**
//!   - `server`: the member's state and the two things every request needs
//!     from Raft: propose (forwarded to the leader when needed) and
//!     linearizable read barriers; `RaftSeam`/`MembershipSeam`, the narrow
//!     view of Raft the duties get.
//!   - `backup`: backups in etcd's bbolt format and keel's own.
//! - **Duties** (work a member starts itself, most of it as leader)
//!   - `duties`: lease expiry, checkpoints and keepalives; scheduled
//!     compaction; the corruption check; learner promotion; the end of a
//!     downgrade. Each reaches Raft only through the seams and is
//!     unit-tested against a fake.
//!   - `membership`: etcd's Cluster-service changes through Raft,
//!     MoveLeader, and CheckQuorum.
//!   - `downgrade`: etcd's cluster downgrade (Maintenance.Downgrade) and
//!     the cluster version.
//! - **Services**
//!   - `api`: the etcd gRPC services, one file each, and keel's peer
//!     service (`peer.rs`); `errors.rs` maps errors to etcd's codes and
//!     messages; `grpc_call.rs` is the middleware every call passes first;
//!     `watch_session.rs` runs one Watch stream; `recipes.rs` the lock and
//!     election recipes.
//!   - `http`: /health, /livez, /readyz, /version, /metrics and the JSON
//!     gateway.
//!   - `etcd_data_dir`: a keel member takes over an etcd data dir, and
//!     `keel convert-to-etcd` hands one back.
//! - **Configuration**
//!   - `config`: etcd's flags and `ETCD_*` variables, validated into a
//!     `Config`, which holds the `server::Settings` the layers below read.
//! - **Wiring**
//!   - `node`: wires a member together and starts its listeners and duties.
//!   - `cli`: offline subcommands (snapshot status/restore,
//!     convert-to-etcd).
//!   - `logging`: logs with etcd's knobs.
//!   - `fuzz_targets`: hostile-input property tests (test builds only).
//!
//! The path of a write: `api::kv` validates -> `server::Server::propose`
//! (forwards to the leader if needed; the leader's side is `api::peer`)
//! -> `raft::batcher` (concurrent writes share one entry) -> openraft
//! (patched: `vendor/openraft`) replicates while the leader's log flushes
//! (`raft::log_store`, `raft::journal`), and commits ->
//! `raft::state_machine` -> `apply::Applier` -> `apply::kv` over an
//! `mvcc::WriteTxn` -> one engine batch with the applied index -> the
//! response travels back through Raft's client_write.
//!
//! The path of a read: `api::kv` -> `Server::linearizable_barrier` (read
//! index from the leader, wait for local apply; skipped when serializable)
//! -> `apply::kv::range` over an `mvcc::ReadTxn`.
//!
//! The path of a watch event: `apply::Applier` -> `watch::hub` (queued
//! once per stream) -> `api::watch_session`'s sender -> `api::watch`'s
//! codec.

pub mod alarm;
pub mod api;
pub mod apply;
pub mod auth;
pub mod backup;
pub mod bbolt;
pub mod busy_poll;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod downgrade;
pub mod duties;
pub mod error;
pub mod etcd_data_dir;
pub mod etcd_format;
pub mod etcd_wal;
pub mod go_duration;
pub mod http;
pub mod lease;
pub mod logging;
pub mod membership;
pub mod metrics;
pub mod mvcc;
pub mod node;
pub mod raft;
pub mod raft_types;
pub mod scratch;
pub mod server;
pub mod storage;
pub mod tasks;
pub mod transport;
pub mod version;
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
