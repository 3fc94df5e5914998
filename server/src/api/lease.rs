//! etcdserverpb.Lease: not served yet; every RPC answers UNIMPLEMENTED.

use std::pin::Pin;

use futures::Stream;
use keel_proto::etcdserverpb::lease_server::Lease;
use keel_proto::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseLeasesRequest,
    LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};
use tonic::{Request, Response, Status, Streaming};

use super::errors::unimplemented;

pub struct LeaseService;

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(&self, _r: Request<LeaseGrantRequest>) -> Result<Response<LeaseGrantResponse>, Status> {
        Err(unimplemented("Lease.LeaseGrant"))
    }

    async fn lease_revoke(&self, _r: Request<LeaseRevokeRequest>) -> Result<Response<LeaseRevokeResponse>, Status> {
        Err(unimplemented("Lease.LeaseRevoke"))
    }

    type LeaseKeepAliveStream = Pin<Box<dyn Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send>>;

    async fn lease_keep_alive(
        &self,
        _r: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        Err(unimplemented("Lease.LeaseKeepAlive"))
    }

    async fn lease_time_to_live(
        &self,
        _r: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        Err(unimplemented("Lease.LeaseTimeToLive"))
    }

    async fn lease_leases(&self, _r: Request<LeaseLeasesRequest>) -> Result<Response<LeaseLeasesResponse>, Status> {
        Err(unimplemented("Lease.LeaseLeases"))
    }
}
