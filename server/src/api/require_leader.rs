//! etcd's `WithRequireLeader`: a request carrying the gRPC metadata
//! `hasleader: true` fails at once with "etcdserver: no leader" when this
//! member knows no leader, instead of waiting for an election.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;

use crate::error::Error;
use crate::server::Server;

pub async fn require_leader(State(server): State<Arc<Server>>, req: Request, next: Next) -> Response {
    let wants_leader = req.headers().get("hasleader").is_some_and(|v| v.as_bytes() == b"true");
    if wants_leader && server.leader().is_none() {
        return tonic::Status::from(Error::NoLeader).into_http();
    }
    next.run(req).await
}
