//! go-grpc-prometheus's server metrics for the gRPC services:
//! `grpc_server_started_total`, `grpc_server_handled_total` (with the
//! final status code, "Canceled" when the client goes away first) and
//! `grpc_server_handling_seconds`.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use bytes::Bytes;
use http_body::Frame;

use crate::metrics::{GRPC_HANDLED, GRPC_HANDLING, GRPC_STARTED};

fn grpc_type(service: &str, method: &str) -> &'static str {
    match (service, method) {
        ("etcdserverpb.Watch", "Watch") | ("etcdserverpb.Lease", "LeaseKeepAlive") => "bidi_stream",
        ("etcdserverpb.Maintenance", "Snapshot") | ("v3electionpb.Election", "Observe") => "server_stream",
        _ => "unary",
    }
}

fn code_name(code: &str) -> &'static str {
    match code.trim() {
        "0" => "OK",
        "1" => "Canceled",
        "2" => "Unknown",
        "3" => "InvalidArgument",
        "4" => "DeadlineExceeded",
        "5" => "NotFound",
        "6" => "AlreadyExists",
        "7" => "PermissionDenied",
        "8" => "ResourceExhausted",
        "9" => "FailedPrecondition",
        "10" => "Aborted",
        "11" => "OutOfRange",
        "12" => "Unimplemented",
        "13" => "Internal",
        "14" => "Unavailable",
        "15" => "DataLoss",
        "16" => "Unauthenticated",
        _ => "Unknown",
    }
}

struct Labels {
    ty: &'static str,
    service: String,
    method: String,
    start: Instant,
}

impl Labels {
    fn handled(&self, code: &'static str) {
        GRPC_HANDLED.with_label_values(&[self.ty, &self.service, &self.method, code]).inc();
        GRPC_HANDLING
            .with_label_values(&[self.ty, &self.service, &self.method])
            .observe(self.start.elapsed().as_secs_f64());
    }
}

/// Counts a gRPC call when its response body finishes (or is dropped).
struct CountingBody {
    inner: Body,
    labels: Option<Labels>,
    header_code: Option<&'static str>,
}

impl http_body::Body for CountingBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) =
                    frame.trailers_ref().and_then(|t| t.get("grpc-status")).and_then(|v| v.to_str().ok())
                {
                    let code = code_name(code);
                    if let Some(l) = self.labels.take() {
                        l.handled(code);
                    }
                }
            }
            Poll::Ready(None) => {
                let code = self.header_code.unwrap_or("OK");
                if let Some(l) = self.labels.take() {
                    l.handled(code);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(l) = self.labels.take() {
                    l.handled("Unknown");
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for CountingBody {
    fn drop(&mut self) {
        // The client went away before the call finished.
        if let Some(l) = self.labels.take() {
            l.handled(self.header_code.unwrap_or("Canceled"));
        }
    }
}

/// A gRPC call being recorded: counted as started by [`started`], as
/// handled when [`finished`]'s response body ends.
pub struct Call(Labels);

/// Counts `req` as a started call if it is a gRPC call.
pub fn started(req: &Request) -> Option<Call> {
    let is_grpc = req.headers().get("content-type").is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let (service, method) = req.uri().path().strip_prefix('/').and_then(|p| p.split_once('/')).filter(|_| is_grpc)?;
    let ty = grpc_type(service, method);
    GRPC_STARTED.with_label_values(&[ty, service, method]).inc();
    Some(Call(Labels { ty, service: service.to_string(), method: method.to_string(), start: Instant::now() }))
}

impl Call {
    /// etcd's "request stats" warning when a unary call took longer than
    /// `--warning-unary-request-duration` (its handler has answered).
    pub fn warn_if_slow(&self, limit: std::time::Duration) {
        let spent = self.0.start.elapsed();
        if self.0.ty == "unary" && spent > limit {
            tracing::warn!(
                "time spent" = ?spent,
                "response type" = format!("/etcdserverpb.{}/{}", self.0.service.trim_start_matches("etcdserverpb."), self.0.method),
                "request stats"
            );
        }
    }
}

/// Records `call` as handled once `resp`'s body finishes.
pub fn finished(call: Option<Call>, resp: Response) -> Response {
    let Some(Call(labels)) = call else {
        return resp;
    };
    let header_code = resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()).map(code_name);
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, Body::new(CountingBody { inner: body, labels: Some(labels), header_code }))
}
