//! etcd's `WithRequireLeader`: a request carrying the gRPC metadata
//! `hasleader: true` fails at once with "etcdserver: no leader" when this
//! member knows no leader, instead of waiting for an election.

use axum::extract::Request;
use axum::response::Response;

use crate::error::Error;
use crate::server::Server;

/// The refusal for `req` if it requires a leader and none is known.
pub fn refusal(server: &Server, req: &Request) -> Option<Response> {
    let wants_leader = req.headers().get("hasleader").is_some_and(|v| v.as_bytes() == b"true");
    (wants_leader && server.leader().is_none()).then(|| tonic::Status::from(Error::NoLeader).into_http())
}
