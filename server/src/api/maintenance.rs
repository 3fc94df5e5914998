//! etcdserverpb.Maintenance: member status now; alarms, hashes, snapshots,
//! defragmentation and leader transfer answer UNIMPLEMENTED until they land.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use keel_proto::etcdserverpb::maintenance_server::Maintenance;
use keel_proto::etcdserverpb::{
    AlarmRequest, AlarmResponse, DefragmentRequest, DefragmentResponse, DowngradeRequest, DowngradeResponse,
    HashKvRequest, HashKvResponse, HashRequest, HashResponse, MoveLeaderRequest, MoveLeaderResponse, SnapshotRequest,
    SnapshotResponse, StatusRequest, StatusResponse,
};
use tonic::{Request, Response, Status};

use super::errors::unimplemented;
use crate::config::ETCD_API_VERSION;
use crate::error::Error;
use crate::server::Server;

pub struct MaintenanceService {
    server: Arc<Server>,
}

impl MaintenanceService {
    pub fn new(server: Arc<Server>) -> Self {
        Self { server }
    }
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<SnapshotResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn alarm(&self, _req: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        Err(unimplemented("Maintenance.Alarm"))
    }

    async fn status(&self, _req: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let s = &self.server;
        let size = s.engine.size().map_err(Error::from)?;
        let metrics = s.raft.metrics().borrow().clone();
        let is_learner = s.members.is_learner(s.id, metrics.membership_config.membership());
        let raft_index =
            s.log_store.last_index().map_err(Error::from)?.unwrap_or(0).max(s.state_machine.applied_index());
        Ok(Response::new(StatusResponse {
            header: Some(s.header(s.mvcc.current_rev())),
            version: ETCD_API_VERSION.to_string(),
            db_size: size.total_bytes as i64,
            leader: metrics.current_leader.unwrap_or(0),
            raft_index,
            raft_term: metrics.current_term,
            raft_applied_index: s.state_machine.applied_index(),
            errors: Vec::new(),
            db_size_in_use: size.live_bytes as i64,
            is_learner,
            storage_version: String::new(),
            db_size_quota: s.config.quota_backend_bytes as i64,
        }))
    }

    async fn defragment(&self, _req: Request<DefragmentRequest>) -> Result<Response<DefragmentResponse>, Status> {
        Err(unimplemented("Maintenance.Defragment"))
    }

    async fn hash(&self, _req: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        Err(unimplemented("Maintenance.Hash"))
    }

    async fn hash_kv(&self, _req: Request<HashKvRequest>) -> Result<Response<HashKvResponse>, Status> {
        Err(unimplemented("Maintenance.HashKV"))
    }

    type SnapshotStream = SnapshotStream;

    async fn snapshot(&self, _req: Request<SnapshotRequest>) -> Result<Response<Self::SnapshotStream>, Status> {
        Err(unimplemented("Maintenance.Snapshot"))
    }

    async fn move_leader(&self, req: Request<MoveLeaderRequest>) -> Result<Response<MoveLeaderResponse>, Status> {
        self.server.move_leader(req.into_inner().target_id).await?;
        Ok(Response::new(MoveLeaderResponse { header: Some(self.server.header(self.server.mvcc.current_rev())) }))
    }

    async fn downgrade(&self, _req: Request<DowngradeRequest>) -> Result<Response<DowngradeResponse>, Status> {
        Err(unimplemented("Maintenance.Downgrade"))
    }
}
