//! What the Kubernetes API server asks of its store (its etcd3 storage
//! layer): creates guarded by `mod_revision == 0`, updates and deletes
//! guarded by the mod_revision the object was read at, paged lists at one
//! revision (`limit` plus `revision` for the later pages) and counts,
//! informers that list then watch (with prev_kv, asking for progress) from
//! the list's revision and relist when the watch is compacted away, event
//! objects with short leases, and the periodic compaction through
//! `compact_rev_key`.

use std::time::{Duration, Instant};

use anyhow::Result;
use keel_client::etcdserverpb::{response_op::Response, RangeRequest, WatchCreateRequest};
use keel_client::{Client, Compare, Op as TxnOp, Txn};
use rand::Rng;
use serde_json::{json, Value};

use super::watch::{current_revision, is_progress, RawWatch};
use super::{CatchUp, Ctx, Worker};
use crate::wire::{padded, unpadded};

const PREFIX: &str = "/registry/pods/default/";
const PREFIX_END: &str = "/registry/pods/default0";
const OBJECTS: usize = 16;
const PAGE: i64 = 5;
const INFORMERS: usize = 2;
const COMPACT_KEY: &str = "compact_rev_key";

pub async fn run(ctx: Ctx) -> Result<()> {
    let mut tasks = Vec::new();
    for i in 0..ctx.concurrency {
        tasks.push(tokio::spawn(worker(ctx.worker(i))));
    }
    let compactor = tokio::spawn(compactor(ctx.worker(ctx.concurrency)));
    let informers: Vec<_> =
        (0..INFORMERS).map(|i| tokio::spawn(informer(ctx.worker(ctx.concurrency + 1 + i), ctx.clone()))).collect();
    for t in tasks {
        t.await?;
    }
    compactor.await?;
    ctx.wait_healed().await;
    let p = ctx.rec.invoke(3_000_000, "final-list", json!({}));
    match list_whole(&ctx.client, 0).await {
        Ok((rev, items)) => {
            p.ok(json!({"rev": rev, "items": items}));
        }
        Err(e) => {
            p.error(&e);
        }
    }
    for i in informers {
        i.await?;
    }
    Ok(())
}

fn object(i: usize) -> String {
    format!("{PREFIX}pod-{i}")
}

fn item(kv: &keel_client::KeyValue) -> Value {
    json!({"key": String::from_utf8_lossy(&kv.key), "mod": kv.mod_revision, "value": String::from_utf8_lossy(unpadded(&kv.value))})
}

async fn list_whole(client: &Client, revision: i64) -> Result<(i64, Vec<Value>), keel_client::Error> {
    let r = client
        .range(RangeRequest { key: PREFIX.into(), range_end: PREFIX_END.into(), revision, ..Default::default() })
        .await?;
    Ok((r.header.map_or(0, |h| h.revision), r.kvs.iter().map(item).collect()))
}

/// A paged list as the API server does it: the first page fixes the
/// revision, later pages ask for it explicitly.
async fn list_paged(client: &Client) -> Result<(i64, Vec<Value>, usize), keel_client::Error> {
    let mut items = Vec::new();
    let mut key = PREFIX.as_bytes().to_vec();
    let mut rev = 0;
    let mut pages = 0;
    loop {
        let r = client
            .range(RangeRequest {
                key: key.clone().into(),
                range_end: PREFIX_END.into(),
                limit: PAGE,
                revision: rev,
                ..Default::default()
            })
            .await?;
        pages += 1;
        if rev == 0 {
            rev = r.header.as_ref().map_or(0, |h| h.revision);
        }
        items.extend(r.kvs.iter().map(item));
        match (r.more, r.kvs.last()) {
            (true, Some(last)) => {
                key = last.key.to_vec();
                key.push(0);
            }
            _ => return Ok((rev, items, pages)),
        }
    }
}

async fn read_object(w: &Worker, key: &str) -> Result<i64, keel_client::Error> {
    Ok(w.client.get(key.to_string()).await?.map_or(0, |kv| kv.mod_revision))
}

async fn worker(mut w: Worker) {
    let mut generation = 0u64;
    while w.running() {
        w.pace().await;
        let key = object(w.rng.gen_range(0..OBJECTS));
        let roll = w.rng.gen_range(0..100);
        if roll >= 95 {
            // An event object with a short lease, as the API server writes
            // them (they expire on their own).
            event(&mut w, generation).await;
            generation += 1;
            continue;
        }
        if roll < 25 {
            let p = w.invoke("list", json!({}));
            let r = async {
                let (rev, paged, pages) = list_paged(&w.client).await?;
                // The same revision, unpaged, from another member.
                let other = w.all.pinned((w.member + 1) % w.all.endpoints().len());
                let whole = list_whole(&other, rev).await.ok().map(|(_, items)| items);
                // And counted, as the API server does for its object-count
                // metrics.
                let count = other
                    .range(RangeRequest {
                        key: PREFIX.into(),
                        range_end: PREFIX_END.into(),
                        revision: rev,
                        count_only: true,
                        ..Default::default()
                    })
                    .await
                    .ok()
                    .map(|r| r.count);
                Ok::<_, keel_client::Error>(
                    json!({"rev": rev, "paged": paged, "whole": whole, "count": count, "pages": pages}),
                )
            }
            .await;
            w.finish(p, r, |v| v);
            continue;
        }
        // Conditional writes read the object first, as the API server's
        // GuaranteedUpdate does.
        let expect = match read_object(&w, &key).await {
            Ok(rev) => rev,
            Err(_) => {
                w.after(crate::history::Outcome::Fail, true);
                continue;
            }
        };
        generation += 1;
        let value = format!("{{\"by\":{},\"gen\":{generation}}}", w.id);
        let (f, then) = if roll < 85 {
            (if expect == 0 { "create" } else { "update" }, TxnOp::put(key.clone(), padded(&value, w.value_size)))
        } else {
            ("delete", TxnOp::delete(key.clone()))
        };
        let p = w.invoke(f, json!({"key": key, "expect": expect, "value": value}));
        let txn = Txn::new()
            .when([Compare::mod_revision(key.clone(), "=", expect)])
            .and_then([then])
            .or_else([TxnOp::get(key.clone())]);
        let r = w.client.txn(txn).await;
        w.finish(p, r, |resp| {
            let current = resp.responses.first().and_then(|r| match &r.response {
                Some(Response::ResponseRange(rr)) => rr.kvs.first().map(|kv| kv.mod_revision),
                _ => None,
            });
            json!({"succeeded": resp.succeeded, "rev": resp.header.map_or(0, |h| h.revision), "current": current})
        });
    }
}

async fn event(w: &mut Worker, n: u64) {
    let key = format!("/registry/events/default/ev-{}-{n}", w.id);
    let p = w.invoke("event", json!({"key": key}));
    let r = async {
        let lease = w.client.lease_grant(2).await?.id;
        let put = keel_client::etcdserverpb::PutRequest {
            key: key.clone().into(),
            value: "{}".into(),
            lease,
            ..Default::default()
        };
        w.client.put_req(put).await?;
        Ok::<_, keel_client::Error>(json!({"lease": lease}))
    }
    .await;
    w.finish(p, r, |v| v);
}

/// Compacts every few seconds to the revision recorded the previous time,
/// coordinating through `compact_rev_key` as every API server does.
async fn compactor(mut w: Worker) {
    let mut previous = 0i64;
    let mut version = 0i64;
    while w.running() {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let Ok(rev) = current_revision(&w.client).await else { continue };
        let txn = Txn::new()
            .when([Compare::version(COMPACT_KEY, "=", version)])
            .and_then([TxnOp::put(COMPACT_KEY, rev.to_string())])
            .or_else([TxnOp::get(COMPACT_KEY)]);
        match w.client.txn(txn).await {
            Ok(r) if r.succeeded => {
                version += 1;
                if previous > 0 {
                    let p = w.invoke("compact", json!({"rev": previous}));
                    let r = w.client.compact(previous, false).await;
                    w.finish(p, r, |_| json!({}));
                }
                previous = rev;
            }
            Ok(r) => {
                // Another compactor won; learn its version.
                if let Some(Response::ResponseRange(rr)) = r.responses.first().and_then(|x| x.response.clone()) {
                    version = rr.kvs.first().map_or(0, |kv| kv.version);
                }
            }
            Err(_) => {}
        }
    }
}

/// Lists, then watches from the list's revision; relists when the watch
/// is compacted away. Records every list and event so the checker can
/// replay the informer's cache.
async fn informer(mut w: Worker, ctx: Ctx) {
    let p = w.invoke("informer", json!({"member": w.member}));
    let mut segments: Vec<Value> = Vec::new();
    let mut catch_up = CatchUp::default();
    let mut attested = 0i64;
    'relist: while !catch_up.gave_up() {
        let Ok((rev, items)) = list_whole(&w.client, 0).await else {
            w.after(crate::history::Outcome::Fail, true);
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        };
        let mut events: Vec<Value> = Vec::new();
        let mut next = rev + 1;
        attested = rev;
        let mut relist = false;
        while !catch_up.gave_up() && !relist {
            let create = WatchCreateRequest {
                key: PREFIX.into(),
                range_end: PREFIX_END.into(),
                start_revision: next,
                prev_kv: true,
                ..Default::default()
            };
            let Ok(mut stream) = RawWatch::open(&w.all, w.member, create).await else {
                w.after(crate::history::Outcome::Fail, true);
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            };
            let mut asked = Instant::now();
            loop {
                catch_up.poll(&ctx).await;
                if catch_up.reached(attested) {
                    segments.push(json!({"list": {"rev": rev, "items": items}, "events": events}));
                    break 'relist;
                }
                if catch_up.gave_up() {
                    break;
                }
                if asked.elapsed() > Duration::from_secs(1) {
                    stream.request_progress();
                    asked = Instant::now();
                }
                match stream.next(Duration::from_millis(500)).await {
                    Ok(Some(r)) if r.canceled => {
                        // Compacted: relist, as a reflector does.
                        relist = true;
                        break;
                    }
                    Ok(Some(r)) => {
                        if is_progress(&r) {
                            attested = attested.max(r.header.as_ref().map_or(0, |h| h.revision));
                        }
                        for e in &r.events {
                            if let Some(kv) = &e.kv {
                                next = kv.mod_revision + 1;
                                attested = attested.max(kv.mod_revision);
                            }
                            events.push(crate::wire::event_json(e));
                        }
                    }
                    Ok(None) => {
                        w.after(crate::history::Outcome::Fail, true);
                        break;
                    }
                    Err(()) => {}
                }
            }
        }
        segments.push(json!({"list": {"rev": rev, "items": items}, "events": events}));
    }
    p.ok(json!({"segments": segments, "attested": attested, "target": catch_up.target()}));
}
