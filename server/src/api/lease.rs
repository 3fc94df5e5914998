//! etcdserverpb.Lease: grants and revocations go through Raft; renewals
//! and remaining TTLs are the leader's business (followers forward them);
//! the lease list is served from local state.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use keel_proto::etcdserverpb::lease_server::Lease;
use keel_proto::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseLeasesRequest,
    LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus, LeaseTimeToLiveRequest,
    LeaseTimeToLiveResponse,
};
use keel_proto::keelpb::{internal_request, internal_response::Response as Applied, InternalRequest};
use tonic::{Request, Response, Status, Streaming};

use super::credentials;
use crate::auth::AuthInfo;
use crate::error::Error;
use crate::lease::MAX_LEASE_TTL;
use crate::server::Server;

pub struct LeaseService {
    server: Arc<Server>,
}

impl LeaseService {
    pub fn new(server: Arc<Server>) -> Self {
        Self { server }
    }
}

impl LeaseService {
    /// Serves a keepalive stream: one response per request, TTL 0 for an
    /// unknown lease; a failure ends the stream.
    pub fn keep_alive_stream<S>(
        &self,
        mut requests: S,
    ) -> tokio_stream::wrappers::ReceiverStream<Result<LeaseKeepAliveResponse, Status>>
    where
        S: Stream<Item = Result<LeaseKeepAliveRequest, Status>> + Send + Unpin + 'static,
    {
        let server = self.server.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            while let Some(req) = requests.next().await {
                let req = match req {
                    Ok(req) => req,
                    // As etcd, a request that cannot be read ends the
                    // stream with its status (unless the client is not
                    // reading).
                    Err(status) => {
                        let _ = tx.try_send(Err(super::errors::as_grpc_go(status)));
                        return;
                    }
                };
                let reply = match server.lease_renew(req.id).await {
                    Ok(ttl) => Ok(LeaseKeepAliveResponse {
                        header: Some(server.header(server.mvcc.current_rev())),
                        id: req.id,
                        ttl,
                    }),
                    Err(e) => Err(Status::from(e)),
                };
                let failed = reply.is_err();
                if tx.send(reply).await.is_err() || failed {
                    return;
                }
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

fn internal(who: Option<&AuthInfo>, r: internal_request::Request) -> InternalRequest {
    InternalRequest { header: who.and_then(AuthInfo::header), request: Some(r) }
}

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(&self, req: Request<LeaseGrantRequest>) -> Result<Response<LeaseGrantResponse>, Status> {
        let who = credentials::auth_info(&self.server, &req).await?;
        let mut r = req.into_inner();
        if r.ttl > MAX_LEASE_TTL {
            return Err(Error::LeaseTtlTooLarge.into());
        }
        // The proposer fixes id and TTL so every member applies the same.
        if r.id == 0 {
            r.id = self.server.lease_ids.next();
        }
        r.ttl = r.ttl.max(self.server.min_lease_ttl());
        match self.server.propose(internal(who.as_ref(), internal_request::Request::LeaseGrant(r))).await?.response {
            Some(Applied::LeaseGrant(mut resp)) => {
                self.server.fill_header(&mut resp.header);
                Ok(Response::new(resp))
            }
            other => Err(Error::Internal(format!("unexpected apply result {other:?}")).into()),
        }
    }

    async fn lease_revoke(&self, req: Request<LeaseRevokeRequest>) -> Result<Response<LeaseRevokeResponse>, Status> {
        let who = credentials::auth_info(&self.server, &req).await?;
        let revoke = internal(who.as_ref(), internal_request::Request::LeaseRevoke(req.into_inner()));
        match self.server.propose(revoke).await?.response {
            Some(Applied::LeaseRevoke(mut resp)) => {
                self.server.fill_header(&mut resp.header);
                Ok(Response::new(resp))
            }
            other => Err(Error::Internal(format!("unexpected apply result {other:?}")).into()),
        }
    }

    type LeaseKeepAliveStream = Pin<Box<dyn Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send>>;

    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        Ok(Response::new(Box::pin(self.keep_alive_stream(req.into_inner()))))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let who = credentials::auth_info(&self.server, &req).await?;
        let r = req.into_inner();
        if self.server.auth.is_enabled() {
            // etcd 3.5's checkLeaseTimeToLive: the answer can list the
            // lease's keys, so the caller must be able to read each.
            let who = who.unwrap_or_default();
            for key in self.server.leases.keys_to_revoke(r.id).unwrap_or_default() {
                self.server.auth.check_read(&who, &key, &[])?;
            }
        }
        let header = Some(self.server.header(self.server.mvcc.current_rev()));
        let resp = match self.server.lease_time_to_live(r.id, r.keys).await? {
            Some(info) => LeaseTimeToLiveResponse {
                header,
                id: r.id,
                ttl: info.ttl,
                granted_ttl: info.granted_ttl,
                keys: info.keys,
            },
            // etcd answers an unknown lease with TTL -1, not an error.
            None => LeaseTimeToLiveResponse { header, id: r.id, ttl: -1, granted_ttl: 0, keys: Vec::new() },
        };
        Ok(Response::new(resp))
    }

    async fn lease_leases(&self, _req: Request<LeaseLeasesRequest>) -> Result<Response<LeaseLeasesResponse>, Status> {
        let leases = self.server.leases.leases().into_iter().map(|id| LeaseStatus { id }).collect();
        Ok(Response::new(LeaseLeasesResponse {
            header: Some(self.server.header(self.server.mvcc.current_rev())),
            leases,
        }))
    }
}
