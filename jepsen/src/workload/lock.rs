//! The Lock service with fencing. A worker takes the lock (with a lease it
//! keeps alive), learns its fencing token (its lock key's create revision),
//! and writes to a shared resource only through a txn that checks its lock
//! key still exists with that revision. Now and then a worker stalls while
//! holding the lock (no keepalives, longer than the TTL), as a GC pause
//! would, and then tries to write: the lease-based lock is lost by then,
//! and only the fence keeps the write out.

use std::time::Duration;

use anyhow::Result;
use keel_client::{Compare, Op as TxnOp, Txn};
use rand::Rng;
use serde_json::json;

use super::{spawn_workers, Ctx, Worker};

const LOCK_NAME: &str = "lock/mutex";
const RESOURCE: &str = "lock/resource";
const TTL: i64 = 2;

pub async fn run(ctx: Ctx) -> Result<()> {
    spawn_workers(&ctx, ctx.concurrency, worker).await
}

async fn worker(mut w: Worker) {
    let mut writes = 0u64;
    while w.running() {
        w.pace().await;
        let lease = match w.client.lease_grant(TTL).await {
            Ok(r) => r.id,
            Err(_) => {
                w.after(crate::history::Outcome::Fail, true);
                continue;
            }
        };
        let keep = w.client.keep_alive(lease, Duration::from_millis(500));
        let p = w.invoke("acquire", json!({"lease": lease}));
        let key = match w.client.lock(LOCK_NAME, lease).await {
            Ok(r) => r.key,
            Err(e) => {
                w.failed(p, &e);
                drop(keep);
                let _ = w.client.lease_revoke(lease).await;
                continue;
            }
        };
        // The fencing token: the lock key's create revision. Without it
        // (the read failed, or the key is already gone) there is nothing
        // to fence with: give up this acquisition.
        let key_text = String::from_utf8_lossy(&key).into_owned();
        let token = match w.client.get(key.clone()).await {
            Ok(Some(kv)) => kv.create_revision,
            other => {
                p.info(format!("acquired {key_text} but could not read its revision: {other:?}"));
                w.after(crate::history::Outcome::Info, false);
                drop(keep);
                let _ = w.client.lease_revoke(lease).await;
                continue;
            }
        };
        p.ok(json!({"key": key_text, "token": token}));
        let stall = w.rng.gen_bool(0.1);
        if stall {
            drop(keep);
            tokio::time::sleep(Duration::from_millis(TTL as u64 * 1000 + 2500)).await;
        }
        for _ in 0..w.rng.gen_range(1..3) {
            writes += 1;
            let value = format!("{token}:{}:{writes}", w.id);
            let p =
                w.invoke("fenced-write", json!({"key": key_text, "token": token, "value": value, "stalled": stall}));
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), "=", token)])
                .and_then([TxnOp::put(RESOURCE, value.clone())]);
            let r = w.client.txn(txn).await;
            w.finish(p, r, |resp| json!({"succeeded": resp.succeeded, "rev": resp.header.map_or(0, |h| h.revision)}));
            tokio::time::sleep(Duration::from_millis(w.rng.gen_range(10..200))).await;
        }
        let p = w.invoke("release", json!({"key": key_text, "token": token, "stalled": stall}));
        let r = w.client.unlock(key.clone()).await;
        w.finish(p, r, |_| json!({}));
        let _ = w.client.lease_revoke(lease).await;
    }
}
