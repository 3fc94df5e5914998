//! Elle list-append transactions. Each transaction reads the keys it
//! touches, then commits a txn guarded by every key's mod_revision, so it
//! applies only if nothing it read changed: a serializable read-modify-write
//! built from etcd primitives, as an etcd client would write it. The read
//! values and the appended elements form the Elle history.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use anyhow::Result;
use keel_client::etcdserverpb::response_op::Response;
use keel_client::{Compare, Op as TxnOp, Txn};
use rand::seq::SliceRandom;
use rand::Rng;
use serde_json::{json, Value};

use super::{decode_list, encode_list, spawn_workers, Ctx, Worker};

/// Keys in use at once; a key retires after this many transactions
/// started, so reads stay short.
const ACTIVE_KEYS: i64 = 6;
const TXNS_PER_KEY_WINDOW: i64 = 120;

pub async fn run(ctx: Ctx) -> Result<()> {
    let counter = Arc::new(AtomicI64::new(0));
    spawn_workers(&ctx, ctx.concurrency, move |w| worker(w, counter.clone())).await
}

enum Micro {
    Read(String),
    Append(String, i64),
}

async fn worker(mut w: Worker, counter: Arc<AtomicI64>) {
    while w.running() {
        w.pace().await;
        let n = counter.fetch_add(1, Ordering::Relaxed);
        let base = n / TXNS_PER_KEY_WINDOW;
        let mut keys: Vec<i64> = (base..base + ACTIVE_KEYS).collect();
        keys.shuffle(&mut w.rng);
        let len = w.rng.gen_range(1..=4);
        let micro: Vec<Micro> = (0..len)
            .map(|i| {
                let key = format!("append/{}", keys[i % keys.len()]);
                if w.rng.gen_bool(0.5) {
                    Micro::Read(key)
                } else {
                    // Unique per key: the global transaction number and
                    // the position within it.
                    Micro::Append(key, n * 4 + i as i64)
                }
            })
            .collect();
        let value: Vec<Value> = micro
            .iter()
            .map(|m| match m {
                Micro::Read(k) => json!(["r", k, null]),
                Micro::Append(k, v) => json!(["append", k, v]),
            })
            .collect();
        let p = w.invoke("txn", Value::Array(value));
        match transact(&w, &micro).await {
            Ok(Some(result)) => {
                p.ok(Value::Array(result));
            }
            Ok(None) => {
                p.fail("conflict: a key changed since it was read");
            }
            Err(e) => w.failed(p, &e),
        }
    }
}

/// Reads every key the transaction touches, then commits guarded by their
/// mod_revisions. `None` if the guard failed.
async fn transact(w: &Worker, micro: &[Micro]) -> Result<Option<Vec<Value>>, keel_client::Error> {
    let mut keys: Vec<&str> = micro
        .iter()
        .map(|m| match m {
            Micro::Read(k) | Micro::Append(k, _) => k.as_str(),
        })
        .collect();
    keys.sort_unstable();
    keys.dedup();
    // One read-only txn reads all keys at one revision.
    let read = Txn::new().and_then(keys.iter().map(|k| TxnOp::get(k.to_string())));
    let resp = w.client.txn(read).await?;
    let mut state: Vec<(String, i64, Vec<i64>)> = Vec::new();
    for (k, r) in keys.iter().zip(resp.responses) {
        let kv = match r.response {
            Some(Response::ResponseRange(rr)) => rr.kvs.into_iter().next(),
            _ => None,
        };
        let (rev, list) = kv.map_or((0, Vec::new()), |kv| (kv.mod_revision, decode_list(&kv.value)));
        state.push((k.to_string(), rev, list));
    }
    let mut result = Vec::new();
    for m in micro {
        match m {
            Micro::Read(k) => {
                let list = state.iter().find(|s| &s.0 == k).map(|s| s.2.clone()).unwrap_or_default();
                result.push(json!(["r", k, list]));
            }
            Micro::Append(k, v) => {
                if let Some(s) = state.iter_mut().find(|s| &s.0 == k) {
                    s.2.push(*v);
                }
                result.push(json!(["append", k, v]));
            }
        }
    }
    let written: Vec<&(String, i64, Vec<i64>)> =
        state.iter().filter(|s| micro.iter().any(|m| matches!(m, Micro::Append(k, _) if k == &s.0))).collect();
    if written.is_empty() {
        // Read-only: the single-revision read is the transaction.
        return Ok(Some(result));
    }
    let guard = state.iter().map(|(k, rev, _)| Compare::mod_revision(k.clone(), "=", *rev));
    let puts = written.iter().map(|(k, _, list)| TxnOp::put(k.clone(), encode_list(list)));
    let resp = w.client.txn(Txn::new().when(guard).and_then(puts)).await?;
    Ok(resp.succeeded.then_some(result))
}
