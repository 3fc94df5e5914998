//! etcdserverpb.Watch: each bidirectional stream is a watch session
//! (`watch_session.rs`) on this member's watch hub, so any member,
//! follower or leader, serves watches from its own applied state.
//!
//! The service is written out here instead of taking the generated
//! `WatchServer`: its responses go through [`WatchCodec`], which writes a
//! revision encoded once for many watchers (`watch/response.rs`), where
//! the generated server would need a `WatchResponse` per watcher.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use keel_proto::etcdserverpb::WatchRequest;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::{Grpc, NamedService, StreamingService};
use tonic::{Request, Response, Status, Streaming};

use super::watch_session as session;
use crate::server::Server;
use crate::watch::response::{WatchCodec, WatchOut};
use crate::watch::WatchHub;

const WATCH_METHOD: &str = "/etcdserverpb.Watch/Watch";

/// The Watch gRPC service, ready for tonic's router.
#[derive(Clone)]
pub struct WatchServer {
    inner: Arc<WatchService>,
    max_decoding_message_size: usize,
}

impl WatchServer {
    pub fn new(server: Arc<Server>, hub: Arc<WatchHub>, max_decoding_message_size: usize) -> Self {
        Self { inner: Arc::new(WatchService { server, hub }), max_decoding_message_size }
    }
}

impl NamedService for WatchServer {
    const NAME: &'static str = "etcdserverpb.Watch";
}

impl<B> tower::Service<http::Request<B>> for WatchServer
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != WATCH_METHOD {
            return Box::pin(async { Ok(Status::unimplemented("").into_http()) });
        }
        let inner = self.inner.clone();
        let max = self.max_decoding_message_size;
        Box::pin(async move {
            let mut grpc = Grpc::new(WatchCodec).apply_max_message_size_config(Some(max), None);
            Ok(grpc.streaming(WatchMethod(inner), req).await)
        })
    }
}

struct WatchService {
    server: Arc<Server>,
    hub: Arc<WatchHub>,
}

struct WatchMethod(Arc<WatchService>);

impl StreamingService<WatchRequest> for WatchMethod {
    type Response = WatchOut;
    type ResponseStream = session::ResponseStream;
    type Future = BoxFuture<'static, Result<Response<session::ResponseStream>, Status>>;

    fn call(&mut self, req: Request<Streaming<WatchRequest>>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move {
            let require_leader = req.metadata().get("hasleader").is_some_and(|v| v.as_bytes() == b"true");
            let options = session::StreamOptions {
                require_leader,
                credentials: session::Credentials {
                    metadata: req.metadata().clone(),
                    common_name: req.extensions().get::<super::credentials::ClientCommonName>().cloned(),
                },
            };
            Ok(Response::new(session::start(service.server.clone(), service.hub.clone(), req.into_inner(), options)))
        })
    }
}
