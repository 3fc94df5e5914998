//! HTTP on the client URLs (next to gRPC) and on `--listen-metrics-urls`:
//! `/health`, `/livez`, `/readyz`, `/version`, `/metrics`, and etcd's
//! grpc-gateway JSON API under `/v3/` (`gateway.rs`).

pub mod gateway;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use keel_proto::etcdserverpb::{AlarmType, RangeRequest};

use crate::api::kv::KvService;
use crate::server::Server;

/// Health and monitoring endpoints.
pub fn monitoring(server: Arc<Server>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/version", get(version))
        .route("/metrics", get(metrics))
        .with_state(server)
}

async fn version(State(server): State<Arc<Server>>) -> Response {
    let (etcd, cluster) = (&server.settings.etcd_version, server.settings.etcd_cluster_version());
    let body = format!(r#"{{"etcdserver":"{etcd}","etcdcluster":"{cluster}.0"}}"#);
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn metrics(State(server): State<Arc<Server>>) -> Response {
    server.export_leader_gauges();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], crate::metrics::render()).into_response()
}

/// Why the member is unhealthy, or None.
async fn check_health(server: &Arc<Server>, params: &HashMap<String, String>) -> Option<String> {
    let excluded: Vec<&str> = params.get("exclude").map(|e| e.split(',').collect()).unwrap_or_default();
    for (_, alarm) in server.alarms.list(AlarmType::None as i32) {
        let name = AlarmType::try_from(alarm).map(|t| t.as_str_name()).unwrap_or("UNKNOWN");
        if !excluded.contains(&name) {
            return Some(format!("ALARM {name}"));
        }
    }
    if server.leader().is_none() {
        return Some("RAFT NO LEADER".into());
    }
    let serializable = params.get("serializable").is_some_and(|v| v == "true");
    let kv = KvService::new(server.clone());
    let probe = RangeRequest { key: "health".into(), serializable, ..Default::default() };
    match tokio::time::timeout(Duration::from_secs(1), kv.range_inner(probe, None)).await {
        Ok(Ok(_)) => None,
        // With auth enabled the anonymous probe is refused, which still
        // proves the member answers (etcd's checkHealth does the same).
        Ok(Err(crate::error::Error::UserEmpty | crate::error::Error::PermissionDenied)) => None,
        Ok(Err(e)) => Some(format!("QGET ERROR: {e}")),
        Err(_) => Some("QGET ERROR: timeout".into()),
    }
}

/// etcd's /health: {"health":"true"} or 503 with {"health":"false"} (the
/// reason goes to the log); `?serializable=true` skips the quorum read,
/// `?exclude=NOSPACE` ignores that alarm.
async fn health(State(server): State<Arc<Server>>, Query(params): Query<HashMap<String, String>>) -> Response {
    match check_health(&server, &params).await {
        None => {
            crate::metrics::HEALTH_SUCCESS.inc();
            ([(header::CONTENT_TYPE, "application/json")], r#"{"health":"true"}"#).into_response()
        }
        Some(reason) => {
            crate::metrics::HEALTH_FAILURES.inc();
            tracing::warn!(reason = %reason, "serving /health false");
            (StatusCode::SERVICE_UNAVAILABLE, [(header::CONTENT_TYPE, "application/json")], r#"{"health":"false"}"#)
                .into_response()
        }
    }
}

/// The process is up and its store answers a local read. The probe reads
/// the store directly (the member checking itself, not a client), so it
/// still proves the read path when auth refuses anonymous requests.
async fn livez(State(server): State<Arc<Server>>) -> Response {
    let probe = RangeRequest { key: "health".into(), serializable: true, ..Default::default() };
    let mvcc = server.mvcc.clone();
    let read = tokio::task::spawn_blocking(move || crate::apply::kv::range(&mvcc.read()?, &probe));
    match tokio::time::timeout(Duration::from_secs(1), read).await {
        Ok(Ok(Ok(_))) => (StatusCode::OK, "ok").into_response(),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "not ok").into_response(),
    }
}

/// The member can serve: a leader is known, no corruption, reads work.
async fn readyz(State(server): State<Arc<Server>>) -> Response {
    let mut params = HashMap::new();
    params.insert("exclude".to_string(), "NOSPACE".to_string());
    match check_health(&server, &params).await {
        None => (StatusCode::OK, "ok").into_response(),
        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ok: {reason}")).into_response(),
    }
}
