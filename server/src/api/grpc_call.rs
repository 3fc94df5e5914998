//! The one middleware every gRPC call passes: metrics
//! (`grpc_metrics.rs`) and etcd's "request stats" warning for a slow
//! unary call, etcd's require-leader check (`require_leader.rs`) and
//! grpc-go's status for oversized requests (`errors.rs`). One layer rather than three: each axum middleware layer
//! costs a service clone and a boxed future per call.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;

use crate::api::grpc_metrics;
use crate::server::Server;

pub async fn grpc_call(State(server): State<Arc<Server>>, req: Request, next: Next) -> Response {
    let call = grpc_metrics::started(&req);
    let resp = match super::require_leader::refusal(&server, &req) {
        Some(refused) => refused,
        None => next.run(req).await,
    };
    if let Some(call) = &call {
        call.warn_if_slow(server.settings.warning_unary_request_duration);
    }
    grpc_metrics::finished(call, super::errors::with_grpc_go_status(resp))
}
