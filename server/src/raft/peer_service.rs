//! The server side of the peer transport: hands openraft messages to the
//! local Raft and serves leader-bound requests from followers.

use std::sync::Arc;

use keel_proto::etcdserverpb::{
    LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};
use keel_proto::keelpb::raft_peer_server::RaftPeer;
use keel_proto::keelpb::{
    ForwardRequest, ForwardResponse, RaftPayload, ReadIndexRequest, ReadIndexResponse,
};
use tonic::{Request, Response, Status};

use super::codec;
use crate::error::Error;
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
    codec::decode(&p.data)
        .map_err(|e| Status::invalid_argument(format!("undecodable raft message: {e}")))
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

#[tonic::async_trait]
impl RaftPeer for PeerService {
    async fn append_entries(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let rpc = decode(req.get_ref())?;
        encode(&self.server.raft.append_entries(rpc).await)
    }

    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc = decode(req.get_ref())?;
        encode(&self.server.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let rpc = decode(req.get_ref())?;
        encode(&self.server.raft.install_snapshot(rpc).await)
    }

    async fn forward(
        &self,
        req: Request<ForwardRequest>,
    ) -> Result<Response<ForwardResponse>, Status> {
        let inner = req
            .into_inner()
            .request
            .ok_or_else(|| Status::invalid_argument("empty forwarded request"))?;
        let (response, log_index) = self.server.propose_local(inner).await.map_err(to_status)?;
        Ok(Response::new(ForwardResponse {
            response: Some(response),
            log_index,
        }))
    }

    async fn read_index(
        &self,
        _req: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexResponse>, Status> {
        let read_index = self.server.read_index_local().await.map_err(to_status)?;
        Ok(Response::new(ReadIndexResponse { read_index }))
    }

    async fn lease_keep_alive(
        &self,
        _req: Request<LeaseKeepAliveRequest>,
    ) -> Result<Response<LeaseKeepAliveResponse>, Status> {
        Err(Status::unimplemented(
            "RaftPeer.LeaseKeepAlive is not implemented by keel yet",
        ))
    }

    async fn lease_time_to_live(
        &self,
        _req: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        Err(Status::unimplemented(
            "RaftPeer.LeaseTimeToLive is not implemented by keel yet",
        ))
    }
}
