//! Per-key registers: linearizable reads, blind writes, and
//! compare-and-set (a txn comparing the value). Keys rotate every few
//! seconds so each key's history stays small enough to check exhaustively.

use anyhow::Result;
use keel_client::{Compare, Op as TxnOp, Txn};
use rand::Rng;
use serde_json::{json, Value};

use super::{spawn_workers, Ctx, Worker};
use crate::wire::{padded, unpadded};

/// Keys in use at once.
const ACTIVE_KEYS: u64 = 3;
/// Seconds a key generation lasts.
const GENERATION_SECS: u64 = 8;

pub async fn run(ctx: Ctx) -> Result<()> {
    let started = std::time::Instant::now();
    spawn_workers(&ctx, ctx.concurrency, move |w| worker(w, started)).await
}

fn value_of(kv: Option<keel_client::KeyValue>) -> Value {
    kv.and_then(|kv| std::str::from_utf8(unpadded(&kv.value)).ok().and_then(|s| s.parse::<i64>().ok()))
        .map_or(Value::Null, Value::from)
}

async fn worker(mut w: Worker, started: std::time::Instant) {
    while w.running() {
        w.pace().await;
        let generation = started.elapsed().as_secs() / GENERATION_SECS;
        let key = format!("reg/{generation}/{}", w.rng.gen_range(0..ACTIVE_KEYS));
        match w.rng.gen_range(0..3) {
            0 => {
                let p = w.invoke("read", json!({"key": key}));
                let r = w.client.get(key.clone()).await;
                w.finish(p, r, |kv| json!({"value": value_of(kv)}));
            }
            1 => {
                let v: i64 = w.rng.gen_range(0..5);
                let p = w.invoke("write", json!({"key": key, "value": v}));
                let r = w.client.put(key.clone(), padded(&v.to_string(), w.value_size)).await;
                w.finish(p, r, |resp| json!({"rev": resp.header.map_or(0, |h| h.revision)}));
            }
            _ => {
                let (from, to): (i64, i64) = (w.rng.gen_range(0..5), w.rng.gen_range(0..5));
                let p = w.invoke("cas", json!({"key": key, "from": from, "to": to}));
                let txn = Txn::new()
                    .when([Compare::value(key.clone(), "=", padded(&from.to_string(), w.value_size))])
                    .and_then([TxnOp::put(key.clone(), padded(&to.to_string(), w.value_size))]);
                let r = w.client.txn(txn).await;
                w.finish(p, r, |resp| json!({"succeeded": resp.succeeded}));
            }
        }
    }
}
