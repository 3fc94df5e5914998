//! keel's peer gRPC service (`keelpb.RaftPeer`), the server side of the
//! peer transport (`raft::network` is the client side): hands openraft
//! messages to the local Raft and serves leader-bound requests from
//! followers (forwarded writes, read index, lease keepalives, membership
//! changes).

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;

use keel_proto::etcdserverpb::{
    HashKvRequest, HashKvResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseTimeToLiveRequest,
    LeaseTimeToLiveResponse,
};
use keel_proto::keelpb::raft_peer_server::RaftPeer;
use keel_proto::keelpb::{
    ApplyError, ClusterChangeRequest, ClusterChangeResponse, ClusterInfoRequest, ClusterInfoResponse, Empty,
    ForwardRequest, ForwardResponse, RaftPayload, ReadIndexRequest, ReadIndexResponse,
};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use tonic::{Request, Response, Status, Streaming};

use crate::error::Error;
use crate::raft::network::MEMBER_REMOVED;
use crate::raft::{codec, NodeId, TypeConfig};
use crate::server::Server;

pub struct PeerService {
    server: Arc<Server>,
}

impl PeerService {
    pub fn new(server: Arc<Server>) -> Self {
        Self { server }
    }
}

fn decode<T: serde::de::DeserializeOwned>(p: &RaftPayload) -> Result<T, Status> {
    codec::decode(&p.data).map_err(|e| Status::invalid_argument(format!("undecodable raft message: {e}")))
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Response<RaftPayload>, Status> {
    codec::encode(v)
        .map(|data| Response::new(RaftPayload { data: data.into() }))
        .map_err(|e| Status::internal(e.to_string()))
}

fn to_status(e: Error) -> Status {
    match e {
        Error::NotLeader => Status::failed_precondition("not leader"),
        Error::Timeout => Status::deadline_exceeded("request timed out"),
        Error::Stopped => Status::unavailable("server stopped"),
        other => Status::internal(other.to_string()),
    }
}

/// Refuses Raft traffic from a member this cluster removed, telling it so
/// (it then shuts down, as etcd's removed members do).
fn check_sender(server: &Server, sender: NodeId) -> Result<(), Status> {
    if server.members.is_removed(sender) {
        return Err(Status::failed_precondition(MEMBER_REMOVED));
    }
    Ok(())
}

/// Hands one append-entries message to the local Raft; returns its reply.
async fn append_one(server: &Server, payload: &RaftPayload) -> Result<RaftPayload, Status> {
    let rpc: AppendEntriesRequest<TypeConfig> = decode(payload)?;
    check_sender(server, rpc.vote.leader_id().voted_for().unwrap_or_default())?;
    Ok(encode(&server.raft.append_entries(rpc).await)?.into_inner())
}

/// The replies of an append-entries stream.
pub type AppendReplies = Pin<Box<dyn Stream<Item = Result<RaftPayload, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl RaftPeer for PeerService {
    async fn append_entries(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        Ok(Response::new(append_one(&self.server, req.get_ref()).await?))
    }

    type AppendEntriesStreamStream = AppendReplies;

    async fn append_entries_stream(
        &self,
        req: Request<Streaming<RaftPayload>>,
    ) -> Result<Response<AppendReplies>, Status> {
        // Each message is handled by whoever polls the reply stream (the
        // HTTP/2 stream's own task, no hand-off) and answered before the next
        // is read, so replies keep the requests' order: the sender pairs them
        // by position. An error ends the stream with its status.
        let replies =
            futures::stream::try_unfold((self.server.clone(), req.into_inner()), |(server, mut requests)| async move {
                let Some(payload) = requests.message().await? else {
                    return Ok(None);
                };
                let reply = append_one(&server, &payload).await?;
                Ok(Some((reply, (server, requests))))
            });
        Ok(Response::new(Box::pin(replies)))
    }

    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc: VoteRequest<NodeId> = decode(req.get_ref())?;
        check_sender(&self.server, rpc.vote.leader_id().voted_for().unwrap_or_default())?;
        encode(&self.server.raft.vote(rpc).await)
    }

    async fn install_snapshot(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc: InstallSnapshotRequest<TypeConfig> = decode(req.get_ref())?;
        check_sender(&self.server, rpc.vote.leader_id().voted_for().unwrap_or_default())?;
        encode(&self.server.raft.install_snapshot(rpc).await)
    }

    async fn cluster_change(
        &self,
        req: Request<ClusterChangeRequest>,
    ) -> Result<Response<ClusterChangeResponse>, Status> {
        match self.server.cluster_change_local(req.into_inner()).await {
            Ok((member, log_index)) => Ok(Response::new(ClusterChangeResponse { error: None, member, log_index })),
            Err(Error::NotLeader) => Err(Status::failed_precondition("not leader")),
            Err(e) => {
                let (kind, detail) = e.apply_code();
                Ok(Response::new(ClusterChangeResponse {
                    error: Some(ApplyError { kind, detail }),
                    member: None,
                    log_index: 0,
                }))
            }
        }
    }

    async fn cluster_info(&self, _req: Request<ClusterInfoRequest>) -> Result<Response<ClusterInfoResponse>, Status> {
        let membership = self.server.raft.metrics().borrow().membership_config.membership().clone();
        Ok(Response::new(ClusterInfoResponse {
            cluster_id: self.server.cluster_id,
            members: self.server.members.members(&membership),
        }))
    }

    async fn hash_kv(&self, req: Request<HashKvRequest>) -> Result<Response<HashKvResponse>, Status> {
        let rev = req.into_inner().revision;
        let mvcc = self.server.mvcc.clone();
        let (hash, compact_revision, current, hash_revision) = tokio::task::spawn_blocking(move || mvcc.hash_kv(rev))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(Status::from)?;
        Ok(Response::new(HashKvResponse {
            header: Some(self.server.header(current)),
            hash,
            compact_revision,
            hash_revision,
        }))
    }

    async fn campaign(&self, _req: Request<Empty>) -> Result<Response<Empty>, Status> {
        tracing::info!("starting an election to take over leadership");
        self.server.raft.trigger().elect().await.map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(Empty {}))
    }

    async fn forward(&self, req: Request<ForwardRequest>) -> Result<Response<ForwardResponse>, Status> {
        let inner = req.into_inner().request.ok_or_else(|| Status::invalid_argument("empty forwarded request"))?;
        let (response, log_index) = self.server.propose_local(inner).await.map_err(to_status)?;
        Ok(Response::new(ForwardResponse { response: Some(response), log_index }))
    }

    async fn read_index(&self, _req: Request<ReadIndexRequest>) -> Result<Response<ReadIndexResponse>, Status> {
        let read_index = self.server.read_index_local().await.map_err(to_status)?;
        Ok(Response::new(ReadIndexResponse { read_index }))
    }

    async fn lease_keep_alive(
        &self,
        req: Request<LeaseKeepAliveRequest>,
    ) -> Result<Response<LeaseKeepAliveResponse>, Status> {
        let id = req.into_inner().id;
        let ttl = self.server.lease_renew_local(id).await.map_err(to_status)?;
        Ok(Response::new(LeaseKeepAliveResponse { header: None, id, ttl }))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let req = req.into_inner();
        if !self.server.leases.is_primary() {
            return Err(to_status(Error::NotLeader));
        }
        let resp = match self.server.leases.time_to_live(req.id, req.keys) {
            Some(info) => LeaseTimeToLiveResponse {
                header: None,
                id: req.id,
                ttl: info.ttl,
                granted_ttl: info.granted_ttl,
                keys: info.keys,
            },
            None => LeaseTimeToLiveResponse { header: None, id: req.id, ttl: -1, granted_ttl: 0, keys: Vec::new() },
        };
        Ok(Response::new(resp))
    }
}
