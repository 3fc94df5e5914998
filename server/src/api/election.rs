//! v3electionpb.Election: not served yet; answers UNIMPLEMENTED.

use std::pin::Pin;

use futures::Stream;
use keel_proto::v3electionpb::election_server::Election;
use keel_proto::v3electionpb::{
    CampaignRequest, CampaignResponse, LeaderRequest, LeaderResponse, ProclaimRequest, ProclaimResponse, ResignRequest,
    ResignResponse,
};
use tonic::{Request, Response, Status};

use super::errors::unimplemented;

pub struct ElectionService;

#[tonic::async_trait]
impl Election for ElectionService {
    async fn campaign(&self, _r: Request<CampaignRequest>) -> Result<Response<CampaignResponse>, Status> {
        Err(unimplemented("Election.Campaign"))
    }

    async fn proclaim(&self, _r: Request<ProclaimRequest>) -> Result<Response<ProclaimResponse>, Status> {
        Err(unimplemented("Election.Proclaim"))
    }

    async fn leader(&self, _r: Request<LeaderRequest>) -> Result<Response<LeaderResponse>, Status> {
        Err(unimplemented("Election.Leader"))
    }

    type ObserveStream = Pin<Box<dyn Stream<Item = Result<LeaderResponse, Status>> + Send>>;

    async fn observe(&self, _r: Request<LeaderRequest>) -> Result<Response<Self::ObserveStream>, Status> {
        Err(unimplemented("Election.Observe"))
    }

    async fn resign(&self, _r: Request<ResignRequest>) -> Result<Response<ResignResponse>, Status> {
        Err(unimplemented("Election.Resign"))
    }
}
