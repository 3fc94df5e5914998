//! etcdserverpb.Maintenance: status, alarms (through Raft), defragment,
//! hashes, backups, leader transfer and downgrades (`crate::downgrade`).

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
use crate::error::Error;
use crate::server::Server;
use crate::storage::Table;
use crate::version::minor;
use keel_proto::etcdserverpb::{downgrade_request::DowngradeAction, DowngradeInfo};
use keel_proto::keelpb::{internal_request, internal_response::Response as Applied, InternalRequest};

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
    async fn alarm(&self, req: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        let internal =
            InternalRequest { header: None, request: Some(internal_request::Request::Alarm(req.into_inner())) };
        match self.server.propose(internal).await?.response {
            Some(Applied::Alarm(mut resp)) => {
                self.server.fill_header(&mut resp.header);
                Ok(Response::new(resp))
            }
            other => Err(Error::Internal(format!("unexpected apply result {other:?}")).into()),
        }
    }

    async fn status(&self, req: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let s = &self.server;
        if minor(&s.settings.etcd_version) >= 5 {
            super::credentials::require_auth_info(s, &req).await?;
        }
        let downgrade_info = (minor(&s.settings.etcd_version) >= 5).then(|| {
            let target = s.members.downgrade_target();
            DowngradeInfo { enabled: target.is_some(), target_version: target.unwrap_or_default() }
        });
        s.refresh_db_size();
        let size = s.engine.size(&Table::STATE_MACHINE).map_err(Error::from)?;
        let metrics = s.raft.metrics().borrow().clone();
        let is_learner = s.members.is_learner(s.id, metrics.membership_config.membership());
        let raft_index =
            s.log_store.last_index().map_err(Error::from)?.unwrap_or(0).max(s.state_machine.applied_index());
        Ok(Response::new(StatusResponse {
            header: Some(s.header(s.mvcc.current_rev())),
            version: s.settings.etcd_version.clone(),
            db_size: size.total_bytes as i64,
            leader: metrics.current_leader.unwrap_or(0),
            raft_index,
            raft_term: metrics.current_term,
            raft_applied_index: s.state_machine.applied_index(),
            errors: s.alarms.status_errors(),
            db_size_in_use: size.live_bytes as i64,
            is_learner,
            storage_version: s.storage_version().unwrap_or_default(),
            db_size_quota: s.settings.quota_backend_bytes as i64,
            downgrade_info,
        }))
    }

    /// Rewrites the engine's files to return deleted space. RocksDB
    /// compacts in the background: reads and writes continue meanwhile.
    async fn defragment(&self, req: Request<DefragmentRequest>) -> Result<Response<DefragmentResponse>, Status> {
        super::credentials::require_admin(&self.server, &req).await?;
        let engine = self.server.engine.clone();
        let started = std::time::Instant::now();
        tokio::task::spawn_blocking(move || engine.defragment())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(Error::from)?;
        let size = self.server.refresh_db_size();
        tracing::info!(took = ?started.elapsed(), db_size = size, "defragmented");
        // etcd answers with an empty message (no header).
        Ok(Response::new(DefragmentResponse { header: None }))
    }

    /// A hash of this member's whole state machine.
    async fn hash(&self, req: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        super::credentials::require_admin(&self.server, &req).await?;
        let engine = self.server.engine.clone();
        let hash = tokio::task::spawn_blocking(move || {
            let mut h = crc32fast::Hasher::new();
            engine.scan_consistent(&Table::STATE_MACHINE, &mut |t, k, v| {
                h.update(&[t.tag()]);
                h.update(k);
                h.update(v);
                Ok(true)
            })?;
            Ok::<u32, crate::storage::StorageError>(h.finalize())
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(Error::from)?;
        Ok(Response::new(HashResponse { header: Some(self.server.header(self.server.mvcc.current_rev())), hash }))
    }

    /// etcd's HashKV: the same on every member at the same revision.
    async fn hash_kv(&self, req: Request<HashKvRequest>) -> Result<Response<HashKvResponse>, Status> {
        super::credentials::require_admin(&self.server, &req).await?;
        let rev = req.into_inner().revision;
        let mvcc = self.server.mvcc.clone();
        let (hash, compact_revision, current, hash_revision) = tokio::task::spawn_blocking(move || mvcc.hash_kv(rev))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(HashKvResponse {
            header: Some(self.server.header(current)),
            hash,
            compact_revision: compact_revision.max(0),
            hash_revision,
        }))
    }

    type SnapshotStream = SnapshotStream;

    /// Streams a point-in-time backup of this member (an etcd bbolt file
    /// with etcd's SHA-256 trailer), written to the scratch directory first
    /// so the total size is known, as etcd reports remaining_bytes.
    async fn snapshot(&self, req: Request<SnapshotRequest>) -> Result<Response<Self::SnapshotStream>, Status> {
        super::credentials::require_admin(&self.server, &req).await?;
        let engine = self.server.engine.clone();
        // Owned by the writer until it is done (a request dropped meanwhile
        // cannot remove the file under it), then by the streamer; removed
        // when the stream ends, however it ends.
        let backup = self.server.scratch.temp_file("backup");
        let version = self.server.storage_version().unwrap_or_default();
        let cluster_version = (minor(&self.server.settings.etcd_version) >= 5).then(|| self.server.cluster_version());
        let (backup, size) = tokio::task::spawn_blocking(move || {
            let format = crate::backup::EtcdFormat { cluster_version };
            let size = crate::backup::write_backup(engine.as_ref(), &format, backup.path());
            size.map(|size| (backup, size))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::internal(format!("snapshot: {e}")))?;
        let header = self.server.header(self.server.mvcc.current_rev());
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut sent = 0u64;
            let mut file = match tokio::fs::File::open(backup.path()).await {
                Ok(f) => f,
                Err(e) => {
                    let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                    return;
                }
            };
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match file.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => {
                        sent += n as u64;
                        let chunk = SnapshotResponse {
                            header: Some(header),
                            remaining_bytes: size - sent,
                            blob: bytes::Bytes::copy_from_slice(&buf[..n]),
                            version: version.clone(),
                        };
                        if tx.send(Ok(chunk)).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                        break;
                    }
                }
            }
            drop(backup);
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn move_leader(&self, req: Request<MoveLeaderRequest>) -> Result<Response<MoveLeaderResponse>, Status> {
        self.server.move_leader(req.into_inner().target_id).await?;
        Ok(Response::new(MoveLeaderResponse { header: Some(self.server.header(self.server.mvcc.current_rev())) }))
    }

    /// etcd 3.5 added Downgrade; a member reporting an older release
    /// answers as that release did.
    async fn downgrade(&self, req: Request<DowngradeRequest>) -> Result<Response<DowngradeResponse>, Status> {
        if minor(&self.server.settings.etcd_version) < 5 {
            return Err(unimplemented("Maintenance.Downgrade"));
        }
        super::credentials::require_admin(&self.server, &req).await?;
        let r = req.into_inner();
        let action = DowngradeAction::try_from(r.action).map_err(|_| Status::unimplemented("unknown method"))?;
        let version = self.server.downgrade(action, &r.version).await?;
        Ok(Response::new(DowngradeResponse {
            header: Some(self.server.header(self.server.mvcc.current_rev())),
            version,
        }))
    }
}
