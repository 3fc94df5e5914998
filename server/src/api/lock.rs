//! v3lockpb.Lock: etcd's distributed lock, served with the same key layout
//! as clientv3/concurrency's Mutex (`recipes.rs`). A caller that goes
//! away while waiting gets its waiter key deleted.

use std::sync::Arc;

use keel_proto::v3lockpb::lock_server::Lock;
use keel_proto::v3lockpb::{LockRequest, LockResponse, UnlockRequest, UnlockResponse};
use tonic::{Request, Response, Status};

use crate::api::recipes::Recipes;
use crate::server::Server;

pub struct LockService {
    recipes: Arc<Recipes>,
}

impl LockService {
    pub fn new(server: Arc<Server>) -> Self {
        Self { recipes: Arc::new(Recipes::new(server)) }
    }
}

#[tonic::async_trait]
impl Lock for LockService {
    async fn lock(&self, req: Request<LockRequest>) -> Result<Response<LockResponse>, Status> {
        let recipes = self.recipes.for_request(&req).await?;
        let req = req.into_inner();
        let waiter = Arc::new(tokio::sync::Mutex::new(None));
        let task_waiter = waiter.clone();
        let task_recipes = recipes.clone();
        let task = tokio::spawn(async move { task_recipes.lock(&req.name, req.lease, &task_waiter).await });
        // If the client goes away while waiting, this future is dropped:
        // the guard aborts the wait and removes the waiter's key.
        let mut guard = AbortGuard { task: Some(task), waiter, recipes: recipes.clone() };
        let outcome = match guard.task.as_mut() {
            Some(t) => t.await.map_err(|e| Status::internal(e.to_string()))?,
            None => return Err(Status::internal("lock task missing")),
        };
        guard.task = None;
        let (mut header, key) = outcome?;
        self.recipes.kv_header(&mut header);
        Ok(Response::new(LockResponse { header: Some(header), key }))
    }

    async fn unlock(&self, req: Request<UnlockRequest>) -> Result<Response<UnlockResponse>, Status> {
        let recipes = self.recipes.for_request(&req).await?;
        let mut header = recipes.unlock(&req.into_inner().key).await?;
        self.recipes.kv_header(&mut header);
        Ok(Response::new(UnlockResponse { header: Some(header) }))
    }
}

struct AbortGuard {
    task: Option<
        tokio::task::JoinHandle<
            crate::api::recipes::RecipeResult<(keel_proto::etcdserverpb::ResponseHeader, bytes::Bytes)>,
        >,
    >,
    waiter: Arc<tokio::sync::Mutex<Option<bytes::Bytes>>>,
    recipes: Arc<Recipes>,
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let waiter = self.waiter.clone();
            let recipes = self.recipes.clone();
            tokio::spawn(async move {
                if let Some(key) = waiter.lock().await.take() {
                    let _ = recipes.unlock(&key).await;
                }
            });
        }
    }
}
