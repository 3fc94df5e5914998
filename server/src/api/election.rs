//! v3electionpb.Election: leader election with clientv3/concurrency's
//! Election layout (`recipes.rs`).

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use keel_proto::v3electionpb::election_server::Election;
use keel_proto::v3electionpb::{
    CampaignRequest, CampaignResponse, LeaderKey, LeaderRequest, LeaderResponse, ProclaimRequest, ProclaimResponse,
    ResignRequest, ResignResponse,
};
use tonic::{Request, Response, Status};

use crate::api::recipes::{RecipeError, Recipes};
use crate::server::Server;

pub struct ElectionService {
    recipes: Arc<Recipes>,
}

impl ElectionService {
    pub fn new(server: Arc<Server>) -> Self {
        Self { recipes: Arc::new(Recipes::new(server)) }
    }
}

type CampaignOutcome = crate::api::recipes::RecipeResult<(keel_proto::etcdserverpb::ResponseHeader, bytes::Bytes, i64)>;

struct ResignOnDrop {
    task: Option<tokio::task::JoinHandle<CampaignOutcome>>,
    candidate: Arc<tokio::sync::Mutex<Option<(bytes::Bytes, i64)>>>,
    recipes: Arc<Recipes>,
}

impl Drop for ResignOnDrop {
    fn drop(&mut self) {
        // The client went away mid-campaign: withdraw the candidacy.
        if let Some(task) = self.task.take() {
            task.abort();
            let candidate = self.candidate.clone();
            let recipes = self.recipes.clone();
            tokio::spawn(async move {
                if let Some((key, rev)) = candidate.lock().await.take() {
                    let _ = recipes.resign(&key, rev).await;
                }
            });
        }
    }
}

#[tonic::async_trait]
impl Election for ElectionService {
    async fn campaign(&self, req: Request<CampaignRequest>) -> Result<Response<CampaignResponse>, Status> {
        let recipes = self.recipes.for_request(&req).await?;
        let req = req.into_inner();
        let candidate = Arc::new(tokio::sync::Mutex::new(None));
        let task_candidate = candidate.clone();
        let (name, lease, value) = (req.name.clone(), req.lease, req.value.clone());
        let task_recipes = recipes.clone();
        let task = tokio::spawn(async move { task_recipes.campaign(&name, lease, value, &task_candidate).await });
        let mut guard = ResignOnDrop { task: Some(task), candidate, recipes: recipes.clone() };
        let outcome = match guard.task.as_mut() {
            Some(t) => t.await.map_err(|e| Status::internal(e.to_string()))?,
            None => return Err(Status::internal("campaign task missing")),
        };
        guard.task = None;
        let (mut header, key, rev) = outcome?;
        self.recipes.kv_header(&mut header);
        Ok(Response::new(CampaignResponse {
            header: Some(header),
            leader: Some(LeaderKey { name: req.name, key, rev, lease: req.lease }),
        }))
    }

    async fn proclaim(&self, req: Request<ProclaimRequest>) -> Result<Response<ProclaimResponse>, Status> {
        let recipes = self.recipes.for_request(&req).await?;
        let req = req.into_inner();
        let leader = req.leader.ok_or(RecipeError::MissingLeaderKey)?;
        let mut header = recipes.proclaim(&leader.key, leader.rev, leader.lease, req.value).await?;
        self.recipes.kv_header(&mut header);
        Ok(Response::new(ProclaimResponse { header: Some(header) }))
    }

    async fn leader(&self, req: Request<LeaderRequest>) -> Result<Response<LeaderResponse>, Status> {
        let recipes = self.recipes.for_request(&req).await?;
        let (mut header, kv) = recipes.leader(&req.into_inner().name).await?;
        self.recipes.kv_header(&mut header);
        Ok(Response::new(LeaderResponse { header: Some(header), kv: Some(kv) }))
    }

    type ObserveStream = Pin<Box<dyn Stream<Item = Result<LeaderResponse, Status>> + Send>>;

    async fn observe(&self, req: Request<LeaderRequest>) -> Result<Response<Self::ObserveStream>, Status> {
        let recipes = self.recipes.for_request(&req).await?;
        let name = req.into_inner().name;
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let (out_tx, out_rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let observe = recipes.observe(&name, tx);
            tokio::pin!(observe);
            loop {
                tokio::select! {
                    done = &mut observe => {
                        if let Err(e) = done {
                            let _ = out_tx.send(Err(Status::from(e))).await;
                        }
                        return;
                    }
                    item = rx.recv() => {
                        let Some(item) = item else { return };
                        let reply = item.map(|(mut header, kv)| {
                            recipes.kv_header(&mut header);
                            LeaderResponse { header: Some(header), kv: Some(kv) }
                        }).map_err(Status::from);
                        if out_tx.send(reply).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(out_rx))))
    }

    async fn resign(&self, req: Request<ResignRequest>) -> Result<Response<ResignResponse>, Status> {
        let recipes = self.recipes.for_request(&req).await?;
        let leader = req.into_inner().leader.ok_or(RecipeError::MissingLeaderKey)?;
        let mut header = recipes.resign(&leader.key, leader.rev).await?;
        self.recipes.kv_header(&mut header);
        Ok(Response::new(ResignResponse { header: Some(header) }))
    }
}
