//! The benchmarks, as etcd's tools/benchmark defines them (put, range,
//! txn-put, txn-mixed, watch, watch-latency, lease-keepalive) plus the
//! Kubernetes API server's traffic (kube). Each speaks etcd's gRPC API
//! directly over `--conns` shared HTTP/2 connections.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use keel_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use keel_proto::etcdserverpb::kv_client::KvClient;
use keel_proto::etcdserverpb::lease_client::LeaseClient;
use keel_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use keel_proto::etcdserverpb::request_op::Request;
use keel_proto::etcdserverpb::watch_request::RequestUnion;
use keel_proto::etcdserverpb::{
    CompactionRequest, Compare, DefragmentRequest, LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest,
    PutRequest, RangeRequest, RequestOp, TxnRequest, WatchCreateRequest, WatchRequest,
};
use rand::Rng;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

use crate::load::{self, new_histogram, LoadConfig, Report};

/// Where and how to send requests.
#[derive(Debug, Clone)]
pub struct Target {
    pub endpoints: Vec<String>,
    pub conns: usize,
    pub target_leader: bool,
}

/// Key and value shape.
#[derive(Debug, Clone)]
pub struct Keys {
    pub key_size: usize,
    pub val_size: usize,
    pub key_space: u64,
    pub sequential: bool,
    /// Random bytes in every value, so that neither side's storage can
    /// compress them (`--incompressible-values`).
    pub incompressible: bool,
}

impl Keys {
    /// The key for operation `n`: the `n`th of the key space with
    /// `--sequential-keys`, else a random one.
    pub fn key(&self, n: u64) -> Bytes {
        self.format(self.index(n))
    }

    pub fn index(&self, n: u64) -> u64 {
        let space = self.key_space.max(1);
        if self.sequential {
            n % space
        } else {
            rand::thread_rng().gen_range(0..space)
        }
    }

    pub fn format(&self, i: u64) -> Bytes {
        let mut k = format!("{:0width$}", i % self.key_space.max(1), width = self.key_size).into_bytes();
        k.truncate(self.key_size.max(1));
        Bytes::from(k)
    }

    /// The value every operation writes; with `incompressible`, use
    /// [`Keys::value_for`].
    pub fn value(&self) -> Bytes {
        Bytes::from(vec![b'v'; self.val_size])
    }

    /// The value of one operation: `shared` (from [`Keys::value`]), or
    /// fresh random bytes when values are incompressible.
    pub fn value_for(&self, shared: &Bytes) -> Bytes {
        if !self.incompressible {
            return shared.clone();
        }
        let mut v = vec![0u8; self.val_size];
        rand::thread_rng().fill(&mut v[..]);
        Bytes::from(v)
    }
}

pub struct Conns {
    pub channels: Vec<Channel>,
}

impl Conns {
    pub async fn open(t: &Target) -> Result<Conns> {
        let mut endpoints = t.endpoints.clone();
        if t.target_leader {
            let client = keel_client::Client::connect(&t.endpoints).await?;
            if let Some(leader) = client.discover_leader().await {
                endpoints = vec![t.endpoints[leader].clone()];
            }
        }
        let mut channels = Vec::new();
        for i in 0..t.conns.max(1) {
            let url = endpoints[i % endpoints.len()].clone();
            let ch = Endpoint::from_shared(url.clone())?
                .connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true)
                .connect()
                .await
                .with_context(|| format!("cannot connect to {url}"))?;
            channels.push(ch);
        }
        Ok(Conns { channels })
    }

    pub fn kv(&self, client: usize) -> KvClient<Channel> {
        KvClient::new(self.channels[client % self.channels.len()].clone())
    }

    pub fn channel(&self, i: usize) -> Channel {
        self.channels[i % self.channels.len()].clone()
    }
}

fn err(e: tonic::Status) -> String {
    format!("{:?}: {}", e.code(), e.message())
}

pub async fn put(t: &Target, keys: &Keys, cfg: &LoadConfig) -> Result<Report> {
    let conns = Arc::new(Conns::open(t).await?);
    let keys = Arc::new(keys.clone());
    let value = keys.value();
    Ok(load::run(cfg, move |c, n| {
        let mut kv = conns.kv(c);
        let req = PutRequest { key: keys.key(n), value: keys.value_for(&value), ..Default::default() };
        async move { kv.put(req).await.map(|_| ()).map_err(err) }
    })
    .await)
}

pub async fn range(t: &Target, key: &str, serializable: bool, cfg: &LoadConfig) -> Result<Report> {
    let conns = Arc::new(Conns::open(t).await?);
    let key = Bytes::from(key.to_string());
    Ok(load::run(cfg, move |c, _| {
        let mut kv = conns.kv(c);
        let req = RangeRequest { key: key.clone(), serializable, ..Default::default() };
        async move { kv.range(req).await.map(|_| ()).map_err(err) }
    })
    .await)
}

fn put_op(key: Bytes, value: Bytes) -> RequestOp {
    RequestOp { request: Some(Request::RequestPut(PutRequest { key, value, ..Default::default() })) }
}

pub async fn txn_put(t: &Target, keys: &Keys, ops_per_txn: usize, cfg: &LoadConfig) -> Result<Report> {
    let conns = Arc::new(Conns::open(t).await?);
    let keys = Arc::new(keys.clone());
    let value = keys.value();
    Ok(load::run(cfg, move |c, n| {
        let mut kv = conns.kv(c);
        // Distinct keys (etcd rejects a txn that writes one key twice).
        let base = keys.index(n * ops_per_txn as u64);
        let success = (0..ops_per_txn as u64).map(|i| put_op(keys.format(base + i), value.clone())).collect();
        let req = TxnRequest { success, ..Default::default() };
        async move { kv.txn(req).await.map(|_| ()).map_err(err) }
    })
    .await)
}

/// Reads and writes mixed `read_ratio`:1, reads linearizable unless
/// `serializable`.
pub async fn txn_mixed(
    t: &Target,
    keys: &Keys,
    read_ratio: f64,
    serializable: bool,
    cfg: &LoadConfig,
) -> Result<Report> {
    let conns = Arc::new(Conns::open(t).await?);
    let keys = Arc::new(keys.clone());
    let value = keys.value();
    let p_read = read_ratio / (read_ratio + 1.0);
    Ok(load::run(cfg, move |c, n| {
        let mut kv = conns.kv(c);
        let read = rand::thread_rng().gen_bool(p_read.clamp(0.0, 1.0));
        let key = keys.key(n);
        let value = value.clone();
        async move {
            if read {
                let op = RequestOp {
                    request: Some(Request::RequestRange(RangeRequest { key, serializable, ..Default::default() })),
                };
                kv.txn(TxnRequest { success: vec![op], ..Default::default() }).await.map(|_| ()).map_err(err)
            } else {
                kv.txn(TxnRequest { success: vec![put_op(key, value)], ..Default::default() })
                    .await
                    .map(|_| ())
                    .map_err(err)
            }
        }
    })
    .await)
}

fn nanos_since(start: Instant) -> u64 {
    start.elapsed().as_nanos() as u64
}

/// The shape of a watch benchmark.
#[derive(Debug, Clone)]
pub struct WatchLoad {
    /// Watch streams the watchers are spread over.
    pub streams: usize,
    /// Watchers, all of one key.
    pub watchers: usize,
    /// Clients writing the key.
    pub writers: usize,
    pub puts: u64,
    /// Puts per second; None for as fast as possible.
    pub put_rate: Option<f64>,
}

/// Watch fan-out: `watchers` watchers of one key over `streams` streams;
/// `puts` writes (by `writers` clients, at `put_rate` per second if set)
/// each carry their send time; reports event delivery throughput and the
/// put-to-delivery latency of every event.
pub async fn watch(t: &Target, load: &WatchLoad, name: &str, progress: bool) -> Result<Report> {
    let WatchLoad { streams, watchers, writers, puts, put_rate } = load.clone();
    let conns = Arc::new(Conns::open(t).await?);
    let key = Bytes::from_static(b"bench-watch-key");
    let start = Instant::now();
    let expected = puts * watchers as u64;
    let delivered = Arc::new(AtomicU64::new(0));
    let hist = Arc::new(Mutex::new(new_histogram()));
    let (ready_tx, mut ready_rx) = mpsc::channel::<()>(streams.max(1));
    let mut stream_tasks = Vec::new();
    let per_stream = watchers.div_ceil(streams.max(1));
    let mut remaining = watchers;
    for s in 0..streams.max(1) {
        let n = per_stream.min(remaining);
        remaining -= n;
        if n == 0 {
            break;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        for _ in 0..n {
            let _ = tx.send(WatchRequest {
                request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                    key: key.clone(),
                    ..Default::default()
                })),
            });
        }
        let mut stream = crate::watch_decode::open(conns.channel(s), rx).await?;
        let (delivered, hist, ready) = (delivered.clone(), hist.clone(), ready_tx.clone());
        stream_tasks.push(tokio::spawn(async move {
            let _keep = tx;
            let mut created = 0;
            let mut local = new_histogram();
            let mut count = 0u64;
            while let Ok(Some(r)) = stream.message().await {
                if r.created {
                    created += 1;
                    if created == n {
                        let _ = ready.send(()).await;
                    }
                    continue;
                }
                let now = nanos_since(start);
                for &sent in &r.sent_times {
                    let _ = local.record((now.saturating_sub(sent) / 1000).max(1));
                    count += 1;
                }
                let total = delivered.fetch_add(count, Ordering::Relaxed) + count;
                count = 0;
                if total >= expected {
                    break;
                }
            }
            if let Ok(mut h) = hist.lock() {
                let _ = h.add(&local);
            }
        }));
    }
    drop(ready_tx);
    let live_streams = stream_tasks.len();
    for _ in 0..live_streams {
        ready_rx.recv().await;
    }
    let cfg = LoadConfig {
        name: format!("{name} (puts)"),
        clients: writers.max(1),
        total: Some(puts),
        duration: None,
        rate: put_rate,
        progress,
    };
    let began = Instant::now();
    let writer_conns = conns.clone();
    load::run(&cfg, move |c, _| {
        let mut kv = writer_conns.kv(c);
        let req = PutRequest {
            key: Bytes::from_static(b"bench-watch-key"),
            value: Bytes::from(nanos_since(start).to_string()),
            ..Default::default()
        };
        async move { kv.put(req).await.map(|_| ()).map_err(err) }
    })
    .await;
    // Wait for delivery to finish (or stall).
    let mut last = 0;
    let mut last_change = Instant::now();
    while delivered.load(Ordering::Relaxed) < expected {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let d = delivered.load(Ordering::Relaxed);
        if d != last {
            last = d;
            last_change = Instant::now();
        } else if last_change.elapsed() > Duration::from_secs(10) {
            break;
        }
    }
    let elapsed = began.elapsed();
    for t in stream_tasks {
        t.abort();
    }
    let h = hist.lock().map(|h| h.clone()).unwrap_or_else(|_| new_histogram());
    let got = delivered.load(Ordering::Relaxed);
    let mut r = Report::from_histogram(name, &h, expected.saturating_sub(got), elapsed);
    r.ops = got;
    r.throughput = got as f64 / elapsed.as_secs_f64().max(1e-9);
    Ok(r)
}

pub async fn lease_keepalive(t: &Target, cfg: &LoadConfig) -> Result<Report> {
    let conns = Conns::open(t).await?;
    // One lease and one keepalive stream per client.
    let mut streams = Vec::new();
    for c in 0..cfg.clients.max(1) {
        let mut lc = LeaseClient::new(conns.channel(c));
        let id = lc.lease_grant(LeaseGrantRequest { ttl: 60, id: 0 }).await?.into_inner().id;
        let (tx, rx) = mpsc::unbounded_channel();
        // Queue the first request before opening the stream: grpc-go (etcd)
        // sends the response headers only with the first response.
        let _ = tx.send(LeaseKeepAliveRequest { id });
        let mut resp =
            lc.lease_keep_alive(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)).await?.into_inner();
        resp.message().await?;
        streams.push(Arc::new(tokio::sync::Mutex::new((id, tx, resp))));
    }
    let streams = Arc::new(streams);
    Ok(load::run(cfg, move |c, _| {
        let s = streams[c % streams.len()].clone();
        async move {
            let mut g = s.lock().await;
            let (id, tx, resp) = &mut *g;
            tx.send(LeaseKeepAliveRequest { id: *id }).map_err(|e| e.to_string())?;
            match resp.message().await {
                Ok(Some(_)) => Ok(()),
                Ok(None) => Err("keepalive stream ended".into()),
                Err(e) => Err(err(e)),
            }
        }
    })
    .await)
}

/// The API server's storage traffic on `objects` objects: guarded updates
/// (read the object's mod_revision, then a txn comparing it), creates, and
/// paged lists of `page` items at one revision, in a 6:1:3 mix.
/// Lease churn: each operation grants a lease and revokes it (two Raft
/// writes), as short-lived sessions and Kubernetes events do.
pub async fn lease_grant_revoke(t: &Target, cfg: &LoadConfig) -> Result<Report> {
    let conns = Arc::new(Conns::open(t).await?);
    Ok(load::run(cfg, move |c, _| {
        let mut lc = LeaseClient::new(conns.channel(c));
        async move {
            let id = lc.lease_grant(LeaseGrantRequest { ttl: 60, id: 0 }).await.map_err(err)?.into_inner().id;
            lc.lease_revoke(LeaseRevokeRequest { id }).await.map(|_| ()).map_err(err)
        }
    })
    .await)
}

/// Puts at a steady rate while every member is defragmented in turn
/// (after a compaction, so there is space to give back): the report's
/// p99 and max show how long defragmentation stalls writes.
pub async fn put_during_defrag(t: &Target, keys: &Keys, cfg: &LoadConfig) -> Result<Report> {
    let conns = Conns::open(t).await?;
    let mut kv = KvClient::new(conns.channel(0));
    let rev = kv.range(RangeRequest { key: "bench-defrag".into(), ..Default::default() }).await?.into_inner();
    let rev = rev.header.map_or(0, |h| h.revision);
    kv.compact(CompactionRequest { revision: rev, physical: true }).await?;
    let endpoints = t.endpoints.clone();
    let defrag = async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut took = Vec::new();
        for ep in endpoints {
            let one = Target { endpoints: vec![ep], conns: 1, target_leader: false };
            let mut m = MaintenanceClient::new(Conns::open(&one).await?.channel(0));
            let started = Instant::now();
            m.defragment(DefragmentRequest {}).await?;
            took.push(started.elapsed().as_secs_f64());
        }
        anyhow::Ok(took)
    };
    let (report, took) = tokio::join!(put(t, keys, cfg), defrag);
    let took = took.context("defragment")?;
    if took.is_empty() {
        anyhow::bail!("no member was defragmented");
    }
    report
}

pub async fn kube(t: &Target, objects: u64, page: i64, val_size: usize, cfg: &LoadConfig) -> Result<Report> {
    let conns = Arc::new(Conns::open(t).await?);
    let prefix = "/registry/pods/bench/";
    let value = Bytes::from(vec![b'o'; val_size]);
    // Create the objects first.
    let mut kv = conns.kv(0);
    for i in 0..objects {
        kv.put(PutRequest {
            key: Bytes::from(format!("{prefix}pod-{i:06}")),
            value: value.clone(),
            ..Default::default()
        })
        .await?;
    }
    Ok(load::run(cfg, move |c, n| {
        let mut kv = conns.kv(c);
        let value = value.clone();
        let roll = n % 10;
        let key = Bytes::from(format!("{prefix}pod-{:06}", rand::thread_rng().gen_range(0..objects.max(1))));
        async move {
            if roll < 6 {
                let cur =
                    kv.range(RangeRequest { key: key.clone(), ..Default::default() }).await.map_err(err)?.into_inner();
                let rev = cur.kvs.first().map_or(0, |k| k.mod_revision);
                let cmp = Compare {
                    result: CompareResult::Equal as i32,
                    target: CompareTarget::Mod as i32,
                    key: key.clone(),
                    target_union: Some(TargetUnion::ModRevision(rev)),
                    range_end: Bytes::new(),
                };
                let get = RequestOp {
                    request: Some(Request::RequestRange(RangeRequest { key: key.clone(), ..Default::default() })),
                };
                kv.txn(TxnRequest { compare: vec![cmp], success: vec![put_op(key, value)], failure: vec![get] })
                    .await
                    .map(|_| ())
                    .map_err(err)
            } else if roll < 7 {
                let key = Bytes::from(format!("{prefix}new-{n}"));
                let cmp = Compare {
                    result: CompareResult::Equal as i32,
                    target: CompareTarget::Mod as i32,
                    key: key.clone(),
                    target_union: Some(TargetUnion::ModRevision(0)),
                    range_end: Bytes::new(),
                };
                kv.txn(TxnRequest { compare: vec![cmp], success: vec![put_op(key, value)], failure: vec![] })
                    .await
                    .map(|_| ())
                    .map_err(err)
            } else {
                let end = Bytes::from(format!("{}0", &prefix[..prefix.len() - 1]));
                let mut start = Bytes::from(prefix.to_string());
                let mut rev = 0;
                loop {
                    let r = kv
                        .range(RangeRequest {
                            key: start.clone(),
                            range_end: end.clone(),
                            limit: page,
                            revision: rev,
                            ..Default::default()
                        })
                        .await
                        .map_err(err)?
                        .into_inner();
                    if rev == 0 {
                        rev = r.header.map_or(0, |h| h.revision);
                    }
                    match (r.more, r.kvs.last()) {
                        (true, Some(last)) => {
                            let mut k = last.key.to_vec();
                            k.push(0);
                            start = Bytes::from(k);
                        }
                        _ => return Ok(()),
                    }
                }
            }
        }
    })
    .await)
}
