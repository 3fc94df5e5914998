//! HTTP on the client URLs (next to gRPC) and on `--listen-metrics-urls`:
//! `/health`, `/livez`, `/readyz`, `/version`, `/metrics`, `/debug/vars`, and etcd's
//! grpc-gateway JSON API under `/v3/` (`gateway.rs`).

pub mod gateway;
mod health;

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::server::Server;

/// Health and monitoring endpoints.
pub fn monitoring(server: Arc<Server>) -> Router {
    Router::new()
        .route("/health", get(health::health))
        .route("/livez", get(health::livez))
        .route("/livez/{check}", get(health::livez_check))
        .route("/readyz", get(health::readyz))
        .route("/readyz/{check}", get(health::readyz_check))
        .route("/version", get(version))
        .route("/metrics", get(metrics))
        .route("/debug/vars", get(debug_vars))
        .with_state(server)
}

async fn version(State(server): State<Arc<Server>>) -> Response {
    let (etcd, cluster) = (&server.settings.etcd_version, server.cluster_version());
    // etcd 3.6 added the storage (data format) version.
    let body = match server.storage_version() {
        Some(storage) => format!(r#"{{"etcdserver":"{etcd}","etcdcluster":"{cluster}.0","storage":"{storage}"}}"#),
        None => format!(r#"{{"etcdserver":"{etcd}","etcdcluster":"{cluster}.0"}}"#),
    };
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Go's expvar page, which etcd serves: the command line and memory
/// figures (keel's from the kernel: it has no Go heap).
async fn debug_vars() -> Response {
    let cmdline: Vec<String> = std::env::args().collect();
    let page = 4096u64;
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let mut fields = statm.split_whitespace().map(|f| f.parse::<u64>().unwrap_or(0) * page);
    let (size, resident) = (fields.next().unwrap_or(0), fields.next().unwrap_or(0));
    let body = serde_json::json!({
        "cmdline": cmdline,
        "memstats": { "Sys": size, "Alloc": resident, "HeapAlloc": resident },
    });
    ([(header::CONTENT_TYPE, "application/json; charset=utf-8")], body.to_string()).into_response()
}

async fn metrics(State(server): State<Arc<Server>>) -> Response {
    server.export_leader_gauges();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], crate::metrics::render()).into_response()
}
