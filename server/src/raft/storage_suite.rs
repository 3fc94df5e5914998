//! openraft's storage conformance suite (`openraft::testing::Suite`) run
//! against keel's RocksDB-backed log store and state machine, once as a
//! follower's store (appends flushed inline) and once as a leader's
//! (appends flushed by the syncer thread).

use std::sync::Arc;

use openraft::testing::{StoreBuilder, Suite};

use super::log_store::LogStore;
use super::state_machine::{Reloadable, StateMachine};
use super::{RaftStorageError, TypeConfig};
use crate::apply::{Applier, CommitObserver, Compactor};
use crate::cluster::MemberRegistry;
use crate::mvcc::{CompactionJob, MvccStore};
use crate::storage::rocks::RocksEngine;
use crate::storage::{SharedEngine, StorageError};

struct Nothing;

impl CommitObserver for Nothing {
    fn committed(&self, _rev: i64, _events: &[keel_proto::mvccpb::Event]) {}
}

impl Compactor for Nothing {
    fn schedule(&self, _job: CompactionJob) {}
}

struct ReloadMvcc(Arc<MvccStore>);

impl Reloadable for ReloadMvcc {
    fn reload(&self) -> Result<(), StorageError> {
        self.0.reload().map_err(|e| StorageError::Io(e.to_string()))
    }
}

struct RocksBuilder {
    leading: bool,
}

fn storage_err(e: impl std::fmt::Display) -> RaftStorageError {
    openraft::StorageIOError::write(openraft::AnyError::error(e.to_string())).into()
}

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for RocksBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), RaftStorageError> {
        let dir = tempfile::tempdir().map_err(storage_err)?;
        let engine: SharedEngine = Arc::new(RocksEngine::open(&dir.path().join("db")).map_err(storage_err)?);
        let mvcc = Arc::new(MvccStore::open(engine.clone()).map_err(storage_err)?);
        let members = Arc::new(MemberRegistry::load(&engine).map_err(storage_err)?);
        let leases = Arc::new(crate::lease::Lessor::load(&engine, &mvcc).map_err(storage_err)?);
        let alarms = Arc::new(crate::alarm::AlarmStore::load(&engine).map_err(storage_err)?);
        let tokens = crate::auth::tokens::TokenProvider::from_flag("simple", std::time::Duration::from_secs(300))
            .map_err(storage_err)?;
        let auth = Arc::new(crate::auth::AuthStore::load(&engine, tokens).map_err(storage_err)?);
        let stores = crate::apply::Stores { mvcc: mvcc.clone(), members, leases, alarms, auth };
        let applier = Applier::new(engine.clone(), stores, Arc::new(Nothing), Arc::new(Nothing));
        let scratch = crate::scratch::ScratchDir::open_swept(&dir.path().join("tmp")).map_err(storage_err)?;
        let sm =
            StateMachine::open(engine.clone(), applier, dir.path().join("snap"), scratch, Arc::new(ReloadMvcc(mvcc)))
                .map_err(storage_err)?;
        let log = LogStore::open(engine, &dir.path().join("journal")).map_err(storage_err)?;
        log.set_leading(self.leading);
        Ok((dir, log, sm))
    }
}

#[test]
fn follower_store_passes_openraft_suite() -> Result<(), RaftStorageError> {
    Suite::test_all(RocksBuilder { leading: false })
}

#[test]
fn leader_store_passes_openraft_suite() -> Result<(), RaftStorageError> {
    Suite::test_all(RocksBuilder { leading: true })
}
