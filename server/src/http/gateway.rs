//! etcd's JSON gateway (grpc-gateway v1 with `OrigName`): `POST
//! /v3/<service>/<method>` (also under `/v3beta` and `/v3alpha`) with the
//! request as JSON; the response is the message as JSON, or for streaming
//! RPCs one `{"result": ...}` object per line. Field names are the .proto
//! names, 64-bit integers strings, bytes base64, defaults omitted.
//!
//! etcd's gateway talks to its gRPC server over one internal connection,
//! so `--max-concurrent-streams` caps how many gateway calls run at once;
//! a semaphore reproduces that.

use std::future::Future;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use futures::{Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::Semaphore;
use tonic::Status;

use keel_proto::etcdserverpb::{
    auth_server::Auth, cluster_server::Cluster, kv_server::Kv, lease_server::Lease, maintenance_server::Maintenance,
};
use keel_proto::v3electionpb::election_server::Election;
use keel_proto::v3lockpb::lock_server::Lock;

use crate::api;
use crate::server::Server;

struct Gateway {
    server: Arc<Server>,
    kv: api::kv::KvService,
    lease: api::lease::LeaseService,
    cluster: api::cluster::ClusterService,
    maintenance: api::maintenance::MaintenanceService,
    auth: api::auth::AuthService,
    lock: api::lock::LockService,
    election: api::election::ElectionService,
    streams: Arc<Semaphore>,
}

pub fn routes(server: Arc<Server>) -> Router {
    let permits = (server.settings.max_concurrent_streams as usize).min(Semaphore::MAX_PERMITS);
    let gw = Arc::new(Gateway {
        kv: api::kv::KvService::new(server.clone()),
        lease: api::lease::LeaseService::new(server.clone()),
        cluster: api::cluster::ClusterService::new(server.clone()),
        maintenance: api::maintenance::MaintenanceService::new(server.clone()),
        auth: api::auth::AuthService::new(server.clone()),
        lock: api::lock::LockService::new(server.clone()),
        election: api::election::ElectionService::new(server.clone()),
        server,
        streams: Arc::new(Semaphore::new(permits)),
    });
    Router::new().route("/{version}/{*rest}", post(dispatch)).with_state(gw)
}

/// grpc-gateway v1's HTTP status for a gRPC code.
fn http_status(code: tonic::Code) -> StatusCode {
    use tonic::Code::*;
    match code {
        Ok => StatusCode::OK,
        Cancelled => StatusCode::REQUEST_TIMEOUT,
        Unknown | Internal | DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        InvalidArgument | OutOfRange => StatusCode::BAD_REQUEST,
        DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        NotFound => StatusCode::NOT_FOUND,
        AlreadyExists | Aborted => StatusCode::CONFLICT,
        PermissionDenied => StatusCode::FORBIDDEN,
        Unauthenticated => StatusCode::UNAUTHORIZED,
        ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        FailedPrecondition => StatusCode::PRECONDITION_FAILED,
        Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

fn json(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn error(status: &Status) -> Response {
    let body =
        serde_json::json!({"error": status.message(), "message": status.message(), "code": status.code() as i32});
    json(http_status(status.code()), body.to_string())
}

pub(crate) fn decode<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, Status> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| Status::invalid_argument(e.to_string()))
}

/// Every JSON value in `body`, in order (a streaming call's requests).
pub(crate) fn decode_all<T: DeserializeOwned>(body: &[u8]) -> Result<Vec<T>, Status> {
    serde_json::Deserializer::from_slice(body)
        .into_iter::<T>()
        .collect::<Result<Vec<T>, _>>()
        .map_err(|e| Status::invalid_argument(e.to_string()))
}

/// A gRPC request carrying the HTTP caller's token, as grpc-gateway
/// forwards `Authorization`.
fn grpc_request<T>(msg: T, headers: &HeaderMap) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(token) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        if let Ok(v) = token.parse() {
            req.metadata_mut().insert("authorization", v);
        }
    }
    req
}

async fn unary<Req, Resp, F, Fut>(body: &[u8], headers: &HeaderMap, call: F) -> Response
where
    Req: DeserializeOwned + Default,
    Resp: Serialize,
    F: FnOnce(tonic::Request<Req>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
{
    let req = match decode::<Req>(body) {
        Ok(r) => r,
        Err(s) => return error(&s),
    };
    match call(grpc_request(req, headers)).await {
        Ok(resp) => match serde_json::to_string(resp.get_ref()) {
            Ok(s) => json(StatusCode::OK, s),
            Err(e) => error(&Status::internal(e.to_string())),
        },
        Err(s) => error(&s),
    }
}

/// One `{"result": ...}` line per message; an error ends the stream with
/// grpc-gateway's stream error object.
fn stream_body<M, S>(responses: S, permit: tokio::sync::OwnedSemaphorePermit) -> Response
where
    M: Serialize + Send + 'static,
    S: Stream<Item = Result<M, Status>> + Send + 'static,
{
    let lines = responses.map(move |item| {
        let _held = &permit;
        let line = match item {
            Ok(m) => serde_json::to_string(&serde_json::json!({ "result": m })),
            Err(s) => serde_json::to_string(&serde_json::json!({
                "error": {
                    "grpc_code": s.code() as i32,
                    "http_code": http_status(s.code()).as_u16(),
                    "message": s.message(),
                    "http_status": http_status(s.code()).canonical_reason().unwrap_or(""),
                }
            })),
        };
        line.map(|mut l| {
            l.push('\n');
            Bytes::from(l)
        })
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(lines))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

macro_rules! route_unary {
    ($path:expr, $body:expr, $headers:expr, { $($p:literal => $svc:ident . $method:ident),* $(,)? }) => {
        match $path {
            $($p => return unary($body, $headers, |r| async move { $svc.$method(r).await }).await,)*
            _ => {}
        }
    };
}

async fn dispatch(
    State(gw): State<Arc<Gateway>>,
    Path((version, rest)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !matches!(version.as_str(), "v3" | "v3beta" | "v3alpha") {
        return error(&Status::not_found("Not Found"));
    }
    let Ok(permit) = gw.streams.clone().acquire_owned().await else {
        return error(&Status::unavailable("gateway closed"));
    };
    let path = rest.trim_end_matches('/');
    let (kv, lease, cluster, maintenance, auth, lock, election) =
        (&gw.kv, &gw.lease, &gw.cluster, &gw.maintenance, &gw.auth, &gw.lock, &gw.election);
    route_unary!(path, &body, &headers, {
        "kv/range" => kv.range,
        "kv/put" => kv.put,
        "kv/deleterange" => kv.delete_range,
        "kv/txn" => kv.txn,
        "kv/compaction" => kv.compact,
        "lease/grant" => lease.lease_grant,
        "lease/revoke" => lease.lease_revoke,
        "kv/lease/revoke" => lease.lease_revoke,
        "lease/timetolive" => lease.lease_time_to_live,
        "kv/lease/timetolive" => lease.lease_time_to_live,
        "lease/leases" => lease.lease_leases,
        "kv/lease/leases" => lease.lease_leases,
        "cluster/member/add" => cluster.member_add,
        "cluster/member/remove" => cluster.member_remove,
        "cluster/member/update" => cluster.member_update,
        "cluster/member/list" => cluster.member_list,
        "cluster/member/promote" => cluster.member_promote,
        "maintenance/alarm" => maintenance.alarm,
        "maintenance/status" => maintenance.status,
        "maintenance/defragment" => maintenance.defragment,
        // etcd 3.4 maps both Hash and HashKV here; HashKV is the one served.
        "maintenance/hash" => maintenance.hash_kv,
        // etcd 3.5+ gives HashKV a path of its own.
        "maintenance/hashkv" => maintenance.hash_kv,
        "maintenance/transfer-leadership" => maintenance.move_leader,
        "auth/enable" => auth.auth_enable,
        "auth/disable" => auth.auth_disable,
        "auth/status" => auth.auth_status,
        "auth/authenticate" => auth.authenticate,
        "auth/user/add" => auth.user_add,
        "auth/user/get" => auth.user_get,
        "auth/user/list" => auth.user_list,
        "auth/user/delete" => auth.user_delete,
        "auth/user/changepw" => auth.user_change_password,
        "auth/user/grant" => auth.user_grant_role,
        "auth/user/revoke" => auth.user_revoke_role,
        "auth/role/add" => auth.role_add,
        "auth/role/get" => auth.role_get,
        "auth/role/list" => auth.role_list,
        "auth/role/delete" => auth.role_delete,
        "auth/role/grant" => auth.role_grant_permission,
        "auth/role/revoke" => auth.role_revoke_permission,
        "lock/lock" => lock.lock,
        "lock/unlock" => lock.unlock,
        "election/campaign" => election.campaign,
        "election/proclaim" => election.proclaim,
        "election/leader" => election.leader,
        "election/resign" => election.resign,
    });
    match path {
        "watch" => match decode_all::<keel_proto::etcdserverpb::WatchRequest>(&body) {
            Ok(reqs) => {
                // A watch outlives the request body (etcd keeps the stream
                // open after the client's CloseSend).
                let requests = futures::stream::iter(reqs.into_iter().map(Ok)).chain(futures::stream::pending());
                let require_leader = headers.get("hasleader").is_some_and(|v| v.as_bytes() == b"true");
                let options = crate::api::watch_session::StreamOptions {
                    require_leader,
                    credentials: crate::api::watch_session::Credentials {
                        metadata: grpc_request((), &headers).metadata().clone(),
                        common_name: None,
                    },
                };
                let responses = crate::api::watch_session::start(
                    gw.server.clone(),
                    gw.server.hub.clone(),
                    Box::pin(requests),
                    options,
                );
                stream_body(responses.map(|r| r.map(crate::watch::response::WatchOut::into_response)), permit)
            }
            Err(s) => error(&s),
        },
        "lease/keepalive" => match decode_all::<keel_proto::etcdserverpb::LeaseKeepAliveRequest>(&body) {
            // The end of the request body ends the keepalive stream, as
            // the gateway's CloseSend does in etcd.
            Ok(reqs) => {
                stream_body(gw.lease.keep_alive_stream(futures::stream::iter(reqs.into_iter().map(Ok))), permit)
            }
            Err(s) => error(&s),
        },
        "election/observe" => match decode::<keel_proto::v3electionpb::LeaderRequest>(&body) {
            Ok(req) => match gw.election.observe(grpc_request(req, &headers)).await {
                Ok(resp) => stream_body(resp.into_inner(), permit),
                Err(s) => error(&s),
            },
            Err(s) => error(&s),
        },
        "maintenance/snapshot" => match gw.maintenance.snapshot(grpc_request(Default::default(), &headers)).await {
            Ok(resp) => stream_body(resp.into_inner(), permit),
            Err(s) => error(&s),
        },
        _ => error(&Status::not_found("Not Found")),
    }
}
