//! Leases: workers grant short leases, attach keys, then keep them alive,
//! revoke them, or let them expire; readers list the keys. After the run,
//! once every lease has had time to expire, a final read must find no key.

use std::time::Duration;

use anyhow::Result;
use keel_client::etcdserverpb::{PutRequest, RangeRequest};
use rand::Rng;
use serde_json::json;

use super::{Ctx, Worker};

const PREFIX: &str = "lease/";
const PREFIX_END: &str = "lease0";
/// TTLs in seconds; etcd's minimum is larger than the election timeout.
const TTLS: [i64; 3] = [2, 3, 5];

pub async fn run(ctx: Ctx) -> Result<()> {
    let readers = 2.min(ctx.concurrency);
    let mut tasks = Vec::new();
    for i in 0..ctx.concurrency.max(2) {
        let w = ctx.worker(i);
        tasks.push(if i < readers { tokio::spawn(reader(w)) } else { tokio::spawn(holder(w)) });
    }
    for t in tasks {
        t.await?;
    }
    ctx.wait_healed().await;
    // A new leader gives every lease a full TTL again; wait for that too.
    let longest = TTLS.iter().max().copied().unwrap_or(5) as u64;
    tokio::time::sleep(Duration::from_secs(2 * longest + 5)).await;
    let p = ctx.rec.invoke(2_000_000, "final-read", json!({}));
    match read(&ctx.client).await {
        Ok(v) => {
            p.ok(v);
        }
        Err(e) => {
            p.error(&e);
        }
    }
    Ok(())
}

async fn read(client: &keel_client::Client) -> Result<serde_json::Value, keel_client::Error> {
    let r =
        client.range(RangeRequest { key: PREFIX.into(), range_end: PREFIX_END.into(), ..Default::default() }).await?;
    let keys: Vec<_> = r
        .kvs
        .iter()
        .map(|kv| json!({"key": String::from_utf8_lossy(&kv.key), "lease": kv.lease, "mod": kv.mod_revision}))
        .collect();
    Ok(json!({"keys": keys, "rev": r.header.map_or(0, |h| h.revision)}))
}

async fn reader(mut w: Worker) {
    while w.running() {
        w.pace().await;
        let p = w.invoke("read", json!({}));
        let r = read(&w.client).await;
        w.finish(p, r, |v| v);
    }
}

async fn holder(mut w: Worker) {
    let mut n = 0u64;
    while w.running() {
        w.pace().await;
        let ttl = TTLS[w.rng.gen_range(0..TTLS.len())];
        let p = w.invoke("grant", json!({"ttl": ttl}));
        let id = match w.client.lease_grant(ttl).await {
            Ok(r) => {
                p.ok(json!({"id": r.id, "ttl": r.ttl}));
                r.id
            }
            Err(e) => {
                w.failed(p, &e);
                continue;
            }
        };
        n += 1;
        let key = format!("{PREFIX}{id:x}/{n}");
        let p = w.invoke("put", json!({"key": key, "lease": id}));
        let req = PutRequest { key: key.clone().into(), value: "v".into(), lease: id, ..Default::default() };
        let r = w.client.put_req(req).await;
        w.finish(p, r, |resp| json!({"rev": resp.header.map_or(0, |h| h.revision)}));
        match w.rng.gen_range(0..3) {
            0 => {
                // Keep alive for a while, then revoke.
                for _ in 0..w.rng.gen_range(1..4) {
                    tokio::time::sleep(Duration::from_millis((ttl as u64 * 1000) / 3)).await;
                    keepalive(&mut w, id).await;
                }
                revoke(&mut w, id).await;
            }
            1 => {
                // Let it expire, then ask about it.
                tokio::time::sleep(Duration::from_millis(ttl as u64 * 1000 + w.rng.gen_range(500..3000))).await;
                keepalive(&mut w, id).await;
            }
            _ => revoke(&mut w, id).await,
        }
    }
}

async fn keepalive(w: &mut Worker, id: i64) {
    let p = w.invoke("keepalive", json!({"lease": id}));
    let r = w.client.lease_keep_alive_once(id).await;
    w.finish(p, r, |ttl| json!({"ttl": ttl}));
}

async fn revoke(w: &mut Worker, id: i64) {
    let p = w.invoke("revoke", json!({"lease": id}));
    let r = w.client.lease_revoke(id).await;
    match r {
        // Revoking a lease that already expired is etcd's NotFound: the
        // lease is gone either way.
        Err(keel_client::Error::Rejected { code: tonic::Code::NotFound, .. }) => {
            p.ok(json!({"expired": true}));
        }
        r => w.finish(p, r, |_| json!({})),
    }
}
