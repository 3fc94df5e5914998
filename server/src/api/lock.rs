//! v3lockpb.Lock: not served yet; answers UNIMPLEMENTED.

use keel_proto::v3lockpb::lock_server::Lock;
use keel_proto::v3lockpb::{LockRequest, LockResponse, UnlockRequest, UnlockResponse};
use tonic::{Request, Response, Status};

use super::errors::unimplemented;

pub struct LockService;

#[tonic::async_trait]
impl Lock for LockService {
    async fn lock(&self, _r: Request<LockRequest>) -> Result<Response<LockResponse>, Status> {
        Err(unimplemented("Lock.Lock"))
    }

    async fn unlock(&self, _r: Request<UnlockRequest>) -> Result<Response<UnlockResponse>, Status> {
        Err(unimplemented("Lock.Unlock"))
    }
}
