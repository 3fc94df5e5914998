//! etcdserverpb.Watch: each bidirectional stream is a watch session
//! (`watch/session.rs`) on this member's watch hub, so any member,
//! follower or leader, serves watches from its own applied state.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use keel_proto::etcdserverpb::watch_server::Watch;
use keel_proto::etcdserverpb::{WatchRequest, WatchResponse};
use tonic::{Request, Response, Status, Streaming};

use crate::server::Server;
use crate::watch::{session, WatchHub};

pub struct WatchService {
    server: Arc<Server>,
    hub: Arc<WatchHub>,
}

impl WatchService {
    pub fn new(server: Arc<Server>, hub: Arc<WatchHub>) -> Self {
        Self { server, hub }
    }
}

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

    async fn watch(&self, req: Request<Streaming<WatchRequest>>) -> Result<Response<Self::WatchStream>, Status> {
        let require_leader = req.metadata().get("hasleader").is_some_and(|v| v.as_bytes() == b"true");
        let options = session::StreamOptions {
            require_leader,
            credentials: session::Credentials {
                metadata: req.metadata().clone(),
                common_name: req.extensions().get::<super::credentials::ClientCommonName>().cloned(),
            },
        };
        let responses = session::start(self.server.clone(), self.hub.clone(), req.into_inner(), options);
        Ok(Response::new(Box::pin(responses)))
    }
}
