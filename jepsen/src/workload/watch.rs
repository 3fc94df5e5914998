//! Watch guarantees. Writers put and delete keys under `watch/` (with
//! prev_kv, so their acknowledgements carry what the events must say);
//! watchers hold raw watch streams with assorted options, ask for progress,
//! and now and then drop the connection and resume from the last revision
//! they saw plus one, on another member. After the run every member
//! replays the whole history (the ground truth) and the checker compares
//! every watcher with it.

use std::time::{Duration, Instant};

use anyhow::Result;
use keel_client::etcdserverpb::watch_client::WatchClient;
use keel_client::etcdserverpb::watch_create_request::FilterType;
use keel_client::etcdserverpb::watch_request::RequestUnion;
use keel_client::etcdserverpb::{
    DeleteRangeRequest, PutRequest, WatchCreateRequest, WatchProgressRequest, WatchRequest, WatchResponse,
};
use keel_client::Client;
use rand::Rng;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tonic::Streaming;

use super::{CatchUp, Ctx, Worker};
use crate::history::Recorder;
use crate::wire::{kv_json, response_json};

const PREFIX: &str = "watch/";
const PREFIX_END: &str = "watch0";
const KEYS: usize = 8;
const WATCHERS: usize = 4;

/// One watch stream, as the wire delivers it.
pub struct RawWatch {
    requests: mpsc::UnboundedSender<WatchRequest>,
    responses: Streaming<WatchResponse>,
}

impl RawWatch {
    pub async fn open(client: &Client, member: usize, create: WatchCreateRequest) -> Result<RawWatch, tonic::Status> {
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(WatchRequest { request_union: Some(RequestUnion::CreateRequest(create)) });
        let mut wc = WatchClient::new(client.channel(member));
        let fut = wc.watch(tokio_stream::wrappers::UnboundedReceiverStream::new(rx));
        let responses = tokio::time::timeout(Duration::from_secs(5), fut)
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("watch open timed out"))??
            .into_inner();
        Ok(RawWatch { requests: tx, responses })
    }

    pub fn request_progress(&self) {
        let _ = self
            .requests
            .send(WatchRequest { request_union: Some(RequestUnion::ProgressRequest(WatchProgressRequest {})) });
    }

    /// The next response; `Ok(None)` when the stream ended or `wait` passed
    /// without one is `Err(())`.
    pub async fn next(&mut self, wait: Duration) -> Result<Option<WatchResponse>, ()> {
        match tokio::time::timeout(wait, self.responses.message()).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Ok(None),
            Err(_) => Err(()),
        }
    }
}

/// True for a progress notification (no events, not created/canceled).
pub fn is_progress(r: &WatchResponse) -> bool {
    r.events.is_empty() && !r.created && !r.canceled && !r.fragment
}

fn header_rev(r: &WatchResponse) -> i64 {
    r.header.as_ref().map_or(0, |h| h.revision)
}

pub async fn current_revision(client: &Client) -> Result<i64, keel_client::Error> {
    let r = client.range(keel_client::etcdserverpb::RangeRequest { key: "\0".into(), ..Default::default() }).await?;
    Ok(r.header.map_or(0, |h| h.revision))
}

pub async fn run(ctx: Ctx) -> Result<()> {
    let first = current_revision(&ctx.client).await? + 1;
    let writers = (ctx.concurrency / 2).max(1);
    let mut tasks = Vec::new();
    for i in 0..writers {
        tasks.push(tokio::spawn(writer(ctx.worker(i))));
    }
    let mut watchers = Vec::new();
    for i in 0..WATCHERS {
        let w = ctx.worker(writers + i);
        watchers.push(tokio::spawn(watcher(w, ctx.clone(), first, i)));
    }
    for t in tasks {
        t.await?;
    }
    ctx.wait_healed().await;
    for w in watchers {
        w.await?;
    }
    collect_truth(&ctx.client, &ctx.rec, ctx.members, first, PREFIX, PREFIX_END).await;
    Ok(())
}

async fn writer(mut w: Worker) {
    while w.running() {
        w.pace().await;
        let key = format!("{PREFIX}k{}", w.rng.gen_range(0..KEYS));
        if w.rng.gen_bool(0.75) {
            let value = format!("{}-{}", w.id, w.rng.gen::<u32>());
            let p = w.invoke("put", json!({"key": key, "value": value}));
            let req = PutRequest { key: key.into(), value: value.into(), prev_kv: true, ..Default::default() };
            let r = w.client.put_req(req).await;
            w.finish(p, r, |resp| {
                json!({"rev": resp.header.map_or(0, |h| h.revision), "prev": resp.prev_kv.as_ref().map(kv_json)})
            });
        } else {
            let p = w.invoke("delete", json!({"key": key}));
            let req = DeleteRangeRequest { key: key.into(), prev_kv: true, ..Default::default() };
            let r = w.client.delete_req(req).await;
            w.finish(p, r, |resp| {
                json!({"rev": resp.header.map_or(0, |h| h.revision), "deleted": resp.prev_kvs.iter().map(kv_json).collect::<Vec<_>>()})
            });
        }
    }
}

/// One logical watcher: a spec, resumed across connections until it has
/// caught up with the final revision.
async fn watcher(mut w: Worker, ctx: Ctx, first: i64, n: usize) {
    // Assorted options: the whole prefix, one key, filters, prev_kv.
    let (key, range_end) = if n.is_multiple_of(2) {
        (PREFIX.to_string(), PREFIX_END.to_string())
    } else {
        (format!("{PREFIX}k{}", n % KEYS), String::new())
    };
    let prev_kv = n % 4 < 2;
    let no_delete = n == 3;
    let spec = json!({
        "id": n, "key": key, "range_end": range_end, "start_rev": first,
        "prev_kv": prev_kv, "no_put": false, "no_delete": no_delete, "member": w.member,
    });
    let p = w.invoke("watch", spec);
    let mut segments: Vec<Vec<Value>> = Vec::new();
    let mut next = first;
    // The newest revision this watcher is known to have everything up to.
    let mut attested = first - 1;
    let mut catch_up = CatchUp::default();
    let mut reconnects = 0usize;
    'connections: loop {
        if catch_up.reached(attested) || catch_up.gave_up() {
            break;
        }
        catch_up.poll(&ctx).await;
        if !w.running() && catch_up.target().is_none() {
            // Waiting for the heal: do not hammer a broken cluster.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let create = WatchCreateRequest {
            key: key.clone().into(),
            range_end: range_end.clone().into(),
            start_revision: next,
            prev_kv,
            filters: if no_delete { vec![FilterType::Nodelete as i32] } else { vec![] },
            ..Default::default()
        };
        let mut stream = match RawWatch::open(&w.all, w.member, create).await {
            Ok(s) => s,
            Err(_) => {
                w.after(crate::history::Outcome::Fail, true);
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            }
        };
        reconnects += 1;
        let mut segment = Vec::new();
        let mut last_progress_ask = Instant::now();
        loop {
            if last_progress_ask.elapsed() > Duration::from_millis(700) {
                stream.request_progress();
                last_progress_ask = Instant::now();
            }
            match stream.next(Duration::from_millis(500)).await {
                Ok(Some(r)) => {
                    if let Some(last) = r.events.last().and_then(|e| e.kv.as_ref()) {
                        next = last.mod_revision + 1;
                        if !r.fragment {
                            attested = attested.max(last.mod_revision);
                        }
                    }
                    if is_progress(&r) {
                        attested = attested.max(header_rev(&r));
                    }
                    let canceled = r.canceled;
                    segment.push(response_json(&r));
                    if canceled {
                        segments.push(segment);
                        break 'connections;
                    }
                    // Resume somewhere else now and then, between whole
                    // revisions.
                    if !r.fragment && !r.events.is_empty() && w.rng.gen_bool(0.03) {
                        w.member = w.rng.gen_range(0..ctx.members);
                        break;
                    }
                }
                Ok(None) => {
                    w.after(crate::history::Outcome::Fail, true);
                    break;
                }
                Err(()) => {}
            }
            catch_up.poll(&ctx).await;
            if catch_up.reached(attested) || catch_up.gave_up() {
                break;
            }
        }
        segments.push(segment);
    }
    let caught_up = catch_up.reached(attested);
    p.ok(json!({"segments": segments, "upto": attested, "caught_up": caught_up, "connections": reconnects}));
}

/// Replays `[first, now]` of a key range from every member as the ground
/// truth (`f = "truth"` ops).
pub async fn collect_truth(client: &Client, rec: &Recorder, members: usize, first: i64, key: &str, end: &str) {
    let Ok(last) = current_revision(client).await else {
        return;
    };
    for m in 0..members {
        let p = rec.invoke(1_000_000 + m, "truth", json!({"member": m, "key": key, "range_end": end}));
        let create = WatchCreateRequest {
            key: key.to_string().into(),
            range_end: end.to_string().into(),
            start_revision: first,
            prev_kv: true,
            ..Default::default()
        };
        let mut stream = match RawWatch::open(client, m, create).await {
            Ok(s) => s,
            Err(e) => {
                p.fail(e.message());
                continue;
            }
        };
        let mut events = Vec::new();
        let mut reached = first - 1;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut asked = Instant::now() - Duration::from_secs(1);
        let mut canceled = false;
        while reached < last && Instant::now() < deadline {
            if asked.elapsed() > Duration::from_millis(500) {
                stream.request_progress();
                asked = Instant::now();
            }
            match stream.next(Duration::from_millis(500)).await {
                Ok(Some(r)) => {
                    if r.canceled {
                        canceled = true;
                        break;
                    }
                    // Only events count here, not progress responses: the
                    // truth must not trust the bookmarks it is used to
                    // judge (etcd 3.4.23 sends them early). Every revision
                    // of the run is a write under the prefix, so the last
                    // one arrives as an event.
                    for e in &r.events {
                        if let Some(kv) = &e.kv {
                            reached = reached.max(kv.mod_revision);
                        }
                        events.push(crate::wire::event_json(e));
                    }
                }
                Ok(None) => break,
                Err(()) => {}
            }
        }
        if reached >= last && !canceled {
            p.ok(json!({"events": events, "from": first, "to": last, "contiguous": true}));
        } else {
            p.fail(format!("truth incomplete: reached {reached} of {last} (canceled: {canceled})"));
        }
    }
}
