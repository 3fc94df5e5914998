//! `/health`, `/livez` and `/readyz` as etcd serves them. `/health` is the
//! JSON check every etcd release has (with a `reason` from 3.5 on, so only
//! when keel reports 3.5 or later); `/livez` and `/readyz` are 3.6's named
//! checks, each also under its own path (`/readyz/linearizable_read`),
//! with `?exclude=name` and `?verbose`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use keel_proto::etcdserverpb::{AlarmType, RangeRequest};

use crate::server::Server;

/// How long a check's read may take (etcd: the request timeout).
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// The member reads its own store, as etcd's checks do with root
/// credentials: auth never refuses them. A linearizable read first waits
/// for the leader's read index.
async fn read_check(server: &Arc<Server>, serializable: bool) -> Result<(), String> {
    let read = async {
        if !serializable {
            server.linearizable_barrier().await.map_err(|e| crate::api::errors::code_and_message(&e).1)?;
        }
        let probe = RangeRequest { keys_only: true, limit: 1, ..Default::default() };
        let mvcc = server.mvcc.clone();
        let range = tokio::task::spawn_blocking(move || crate::apply::kv::range(&mvcc.read()?, &probe));
        match range.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(crate::api::errors::code_and_message(&e).1),
            Err(e) => Err(e.to_string()),
        }
    };
    tokio::time::timeout(CHECK_TIMEOUT, read).await.unwrap_or_else(|_| Err("context deadline exceeded".into()))
}

/// Why `/health` fails, or None: an alarm not excluded, no leader (unless
/// serializable), or a read that fails.
async fn health_problem(server: &Arc<Server>, params: &HashMap<String, String>) -> Option<String> {
    let excluded: Vec<&str> = params.get("exclude").map(|e| e.split(',').collect()).unwrap_or_default();
    for (_, alarm) in server.alarms.list(AlarmType::None as i32) {
        let name = AlarmType::try_from(alarm).map(|t| t.as_str_name()).unwrap_or("UNKNOWN");
        if !excluded.contains(&name) {
            let known = matches!(name, "NOSPACE" | "CORRUPT");
            return Some(format!("ALARM {}", if known { name } else { "UNKNOWN" }));
        }
    }
    let serializable = params.get("serializable").is_some_and(|v| v == "true");
    if !serializable && server.leader().is_none() {
        return Some("RAFT NO LEADER".into());
    }
    read_check(server, serializable).await.err().map(|e| format!("RANGE ERROR:{e}"))
}

/// etcd's /health: `{"health":"true"}`, or 503 with `"false"`.
pub async fn health(State(server): State<Arc<Server>>, Query(params): Query<HashMap<String, String>>) -> Response {
    let problem = health_problem(&server, &params).await;
    let with_reason = crate::version::minor(&server.settings.etcd_version) >= 5;
    let healthy = if problem.is_none() { "true" } else { "false" };
    let body = match (&problem, with_reason) {
        (_, false) => format!(r#"{{"health":"{healthy}"}}"#),
        (reason, true) => format!(r#"{{"health":"{healthy}","reason":"{}"}}"#, reason.as_deref().unwrap_or("")),
    };
    match problem {
        None => {
            crate::metrics::HEALTH_SUCCESS.inc();
            ([(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        Some(reason) => {
            crate::metrics::HEALTH_FAILURES.inc();
            tracing::warn!(reason = %reason, "serving /health false");
            // Go's http.Error: plain text, a newline after the body.
            (StatusCode::SERVICE_UNAVAILABLE, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body + "\n")
                .into_response()
        }
    }
}

/// The named checks of `/livez` or `/readyz`, in the order they run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Check {
    DataCorruption,
    LinearizableRead,
    NonLearner,
    SerializableRead,
}

impl Check {
    const LIVEZ: &'static [Check] = &[Check::SerializableRead];
    const READYZ: &'static [Check] =
        &[Check::DataCorruption, Check::LinearizableRead, Check::NonLearner, Check::SerializableRead];

    fn name(self) -> &'static str {
        match self {
            Check::DataCorruption => "data_corruption",
            Check::LinearizableRead => "linearizable_read",
            Check::NonLearner => "non_learner",
            Check::SerializableRead => "serializable_read",
        }
    }

    async fn run(self, server: &Arc<Server>) -> Result<(), String> {
        match self {
            Check::DataCorruption => {
                let corrupt = !server.alarms.list(AlarmType::Corrupt as i32).is_empty();
                if corrupt {
                    Err("alarm activated: CORRUPT".into())
                } else {
                    Ok(())
                }
            }
            Check::LinearizableRead => read_check(server, false).await,
            Check::NonLearner => {
                let metrics = server.raft.metrics();
                let is_learner = server.members.is_learner(server.id, metrics.borrow().membership_config.membership());
                if is_learner {
                    Err("not supported for learner".into())
                } else {
                    Ok(())
                }
            }
            Check::SerializableRead => read_check(server, true).await,
        }
    }
}

/// Runs `checks` and answers as etcd's check registry does: "ok" (each
/// check's line first with `?verbose`), or 503 listing every check.
async fn run_checks(server: &Arc<Server>, checks: &[Check], verbose: bool) -> Response {
    let mut report = String::new();
    let mut failed = false;
    for check in checks {
        match check.run(server).await {
            Ok(()) => report.push_str(&format!("[+]{} ok\n", check.name())),
            Err(e) => {
                failed = true;
                report.push_str(&format!("[-]{} failed: {e}\n", check.name()));
            }
        }
    }
    if failed {
        tracing::error!(reason = %report, "health check error");
        return (StatusCode::SERVICE_UNAVAILABLE, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], report + "\n")
            .into_response();
    }
    let body = if verbose { report + "ok\n" } else { "ok\n".to_string() };
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8"), (header::X_CONTENT_TYPE_OPTIONS, "nosniff")], body)
        .into_response()
}

/// The query's `exclude` values (repeatable) and whether it asks for
/// `verbose`.
fn parse_query(query: Option<&str>) -> (Vec<String>, bool) {
    let mut excluded = Vec::new();
    let mut verbose = false;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "exclude" => excluded.extend(value.split(',').filter(|v| !v.is_empty()).map(str::to_string)),
            "verbose" => verbose = true,
            _ => {}
        }
    }
    (excluded, verbose)
}

async fn root(server: Arc<Server>, checks: &[Check], query: Option<String>) -> Response {
    let (excluded, verbose) = parse_query(query.as_deref());
    let chosen: Vec<Check> = checks.iter().copied().filter(|c| !excluded.iter().any(|e| e == c.name())).collect();
    run_checks(&server, &chosen, verbose).await
}

async fn one(server: Arc<Server>, checks: &[Check], name: &str, query: Option<String>) -> Response {
    let (_, verbose) = parse_query(query.as_deref());
    match checks.iter().find(|c| c.name() == name) {
        Some(check) => run_checks(&server, &[*check], verbose).await,
        None => (StatusCode::NOT_FOUND, "404 page not found\n").into_response(),
    }
}

pub async fn livez(State(server): State<Arc<Server>>, RawQuery(query): RawQuery) -> Response {
    root(server, Check::LIVEZ, query).await
}

pub async fn readyz(State(server): State<Arc<Server>>, RawQuery(query): RawQuery) -> Response {
    root(server, Check::READYZ, query).await
}

pub async fn livez_check(
    State(server): State<Arc<Server>>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    one(server, Check::LIVEZ, &name, query).await
}

pub async fn readyz_check(
    State(server): State<Arc<Server>>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    one(server, Check::READYZ, &name, query).await
}

#[cfg(test)]
mod tests {
    use super::parse_query;

    #[test]
    fn queries_name_exclusions_and_verbosity() {
        assert_eq!(parse_query(None), (vec![], false));
        let (excluded, verbose) = parse_query(Some("exclude=serializable_read&verbose&exclude=a,b"));
        assert_eq!(excluded, ["serializable_read", "a", "b"]);
        assert!(verbose);
    }
}
