//! etcdserverpb.Watch: not served yet; answers UNIMPLEMENTED.

use std::pin::Pin;

use futures::Stream;
use keel_proto::etcdserverpb::watch_server::Watch;
use keel_proto::etcdserverpb::{WatchRequest, WatchResponse};
use tonic::{Request, Response, Status, Streaming};

use super::errors::unimplemented;

pub struct WatchService;

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

    async fn watch(&self, _r: Request<Streaming<WatchRequest>>) -> Result<Response<Self::WatchStream>, Status> {
        Err(unimplemented("Watch.Watch"))
    }
}
