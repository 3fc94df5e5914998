//! etcd's watch guarantees on real keel processes, checked by the watch
//! validator (`keel_tests::watch_check`) against the ground truth of the
//! writes: many watchers (keys, prefixes, ranges, from-key, filters,
//! prev_kv, past start revisions, resumed streams) under a random load of
//! puts, deletes and multi-op txns; bookmarks from RequestProgress; a
//! watcher that stops reading; compacted start revisions; watches served
//! by a follower across a leader change.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use keel_proto::etcdserverpb::{
    kv_client::KvClient, request_op, watch_client::WatchClient, watch_create_request::FilterType,
    watch_request::RequestUnion, DeleteRangeRequest, PutRequest, RequestOp, TxnRequest, WatchCreateRequest,
    WatchProgressRequest, WatchRequest, WatchResponse,
};
use keel_tests::watch_check::{check, GroundTruth, WatchSpec};
use keel_tests::Cluster;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use tonic::transport::Channel;

fn key(i: usize) -> Bytes {
    Bytes::from(format!("w/{:02}/{}", i % 20, i))
}

/// Applies `ops` random writes, recording the ground truth.
async fn write_load(
    kv: &mut KvClient<Channel>,
    truth: &mut GroundTruth,
    ops: usize,
    seed: u64,
    value_size: usize,
) -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    for _ in 0..ops {
        let value = Bytes::from(vec![b'a' + rng.gen_range(0..26u8); value_size.max(1)]);
        match rng.gen_range(0..10) {
            0..=4 => {
                let k = key(rng.gen_range(0..60));
                let resp = kv
                    .put(PutRequest { key: k.clone(), value: value.clone(), prev_kv: true, ..Default::default() })
                    .await?
                    .into_inner();
                truth.put(&k, &value, &resp);
            }
            5 | 6 => {
                let start = rng.gen_range(0..60);
                let (k, end) = if rng.gen_bool(0.5) {
                    (key(start), Bytes::new())
                } else {
                    (Bytes::from(format!("w/{:02}/", start % 20)), Bytes::from(format!("w/{:02}0", start % 20)))
                };
                let resp =
                    kv.delete_range(DeleteRangeRequest { key: k, range_end: end, prev_kv: true }).await?.into_inner();
                truth.delete(&resp);
            }
            _ => {
                // A txn writing several distinct keys at one revision.
                let mut used = std::collections::HashSet::new();
                let mut success = Vec::new();
                for _ in 0..rng.gen_range(1..5) {
                    let i = rng.gen_range(0..60);
                    if !used.insert(i) {
                        continue;
                    }
                    let request = if rng.gen_bool(0.7) {
                        request_op::Request::RequestPut(PutRequest {
                            key: key(i),
                            value: value.clone(),
                            prev_kv: true,
                            ..Default::default()
                        })
                    } else {
                        request_op::Request::RequestDeleteRange(DeleteRangeRequest {
                            key: key(i),
                            range_end: Bytes::new(),
                            prev_kv: true,
                        })
                    };
                    success.push(RequestOp { request: Some(request) });
                }
                let req = TxnRequest { compare: vec![], success, failure: vec![] };
                let resp = kv.txn(req.clone()).await?.into_inner();
                truth.txn(&req, &resp);
            }
        }
    }
    Ok(())
}

/// One gRPC watch stream and what each of its watchers received.
struct Recorder {
    requests: mpsc::UnboundedSender<WatchRequest>,
    task: tokio::task::JoinHandle<anyhow::Result<HashMap<i64, Vec<WatchResponse>>>>,
}

impl Recorder {
    /// Opens a stream; it records until it sees a progress notification
    /// at or past the revision sent on `done`. With `stall`, it does not
    /// read at all until `done` fires.
    async fn open(url: &str, mut done: tokio::sync::watch::Receiver<i64>, stall: bool) -> anyhow::Result<Recorder> {
        let mut client = WatchClient::connect(url.to_string()).await?.max_decoding_message_size(64 << 20);
        let (tx, rx) = mpsc::unbounded_channel();
        let mut responses = client.watch(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)).await?.into_inner();
        let progress_tx = tx.clone();
        let task = tokio::spawn(async move {
            let mut logs: HashMap<i64, Vec<WatchResponse>> = HashMap::new();
            let mut asked = false;
            if stall {
                let _ = done.wait_for(|r| *r > 0).await;
                asked = true;
                let _ = progress_tx
                    .send(WatchRequest { request_union: Some(RequestUnion::ProgressRequest(WatchProgressRequest {})) });
            }
            loop {
                tokio::select! {
                    r = responses.next() => {
                        let Some(r) = r else { anyhow::bail!("stream ended") };
                        let r = r?;
                        let target = *done.borrow();
                        let bookmark = r.events.is_empty() && !r.created && !r.canceled && r.watch_id == -1;
                        if r.watch_id == -1 {
                            for log in logs.values_mut() {
                                log.push(r.clone());
                            }
                        } else {
                            logs.entry(r.watch_id).or_default().push(r.clone());
                        }
                        if bookmark && target > 0 && r.header.as_ref().map_or(0, |h| h.revision) >= target {
                            return Ok(logs);
                        }
                    }
                    _ = done.changed(), if !asked => {
                        asked = true;
                        let _ = progress_tx.send(WatchRequest { request_union: Some(RequestUnion::ProgressRequest(WatchProgressRequest {})) });
                    }
                    _ = tokio::time::sleep(Duration::from_millis(300)), if asked => {
                        let _ = progress_tx.send(WatchRequest { request_union: Some(RequestUnion::ProgressRequest(WatchProgressRequest {})) });
                    }
                }
            }
        });
        Ok(Recorder { requests: tx, task })
    }

    fn watch(&self, id: i64, spec: &WatchSpec) {
        let mut filters = Vec::new();
        if spec.no_put {
            filters.push(FilterType::Noput as i32);
        }
        if spec.no_delete {
            filters.push(FilterType::Nodelete as i32);
        }
        let _ = self.requests.send(WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: spec.key.clone(),
                range_end: spec.range_end.clone(),
                start_revision: spec.start_rev,
                filters,
                prev_kv: spec.prev_kv,
                watch_id: id,
                ..Default::default()
            })),
        });
    }
}

fn specs(rng: &mut StdRng, n: usize, start_rev: impl Fn(&mut StdRng) -> i64) -> Vec<WatchSpec> {
    (0..n)
        .map(|i| {
            let (key, range_end) = match i % 4 {
                0 => (key(rng.gen_range(0..60)), Bytes::new()),
                1 => {
                    let p = rng.gen_range(0..20);
                    (Bytes::from(format!("w/{p:02}/")), Bytes::from(format!("w/{p:02}0")))
                }
                2 => (Bytes::from_static(b"w/"), Bytes::from_static(b"w0")),
                _ => (Bytes::from(format!("w/{:02}", rng.gen_range(0..20))), Bytes::from_static(b"\0")),
            };
            WatchSpec {
                key,
                range_end,
                start_rev: start_rev(rng),
                no_put: rng.gen_bool(0.1),
                no_delete: rng.gen_bool(0.1),
                prev_kv: rng.gen_bool(0.5),
            }
        })
        .collect()
}

fn verify(
    truth: &GroundTruth,
    specs: &[(i64, WatchSpec)],
    logs: &HashMap<i64, Vec<WatchResponse>>,
    upto: i64,
) -> anyhow::Result<usize> {
    let mut events = 0;
    for (id, spec) in specs {
        let log = logs.get(id).cloned().unwrap_or_default();
        assert!(
            log.first().is_some_and(|r| r.created && !r.canceled),
            "watcher {id}: first response must be 'created'"
        );
        events += check(truth, spec, &[log], upto).map_err(|e| anyhow::anyhow!("watcher {id} {spec:?}: {e}"))?;
    }
    Ok(events)
}

#[tokio::test(flavor = "multi_thread")]
async fn watchers_see_every_change_in_order_exactly_once() -> anyhow::Result<()> {
    let c = Cluster::start(1)?;
    let url = c.members[0].client_url.clone();
    let mut kv = KvClient::connect(url.clone()).await?;
    let mut truth = GroundTruth::default();
    let mut rng = StdRng::seed_from_u64(7);
    let (done_tx, done_rx) = tokio::sync::watch::channel(0i64);

    // Watchers from the start, on two streams.
    let early = specs(&mut rng, 40, |_| 0);
    let a = Recorder::open(&url, done_rx.clone(), false).await?;
    let b = Recorder::open(&url, done_rx.clone(), false).await?;
    let mut on_a = Vec::new();
    let mut on_b = Vec::new();
    for (i, s) in early.iter().enumerate() {
        let id = i as i64 + 1;
        if i % 2 == 0 {
            a.watch(id, s);
            on_a.push((id, s.clone()));
        } else {
            b.watch(id, s);
            on_b.push((id, s.clone()));
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    write_load(&mut kv, &mut truth, 600, 1, 16).await?;

    // Watchers that start in the past replay history, then continue live.
    let mid_rev = truth.last_rev();
    let late = specs(&mut rng, 20, |r| r.gen_range(2..=mid_rev));
    let cstream = Recorder::open(&url, done_rx.clone(), false).await?;
    let on_c: Vec<(i64, WatchSpec)> = late.into_iter().enumerate().map(|(i, s)| (i as i64 + 100, s)).collect();
    for (id, s) in &on_c {
        cstream.watch(*id, s);
    }
    write_load(&mut kv, &mut truth, 600, 2, 16).await?;

    let upto = truth.last_rev();
    done_tx.send(upto)?;
    let mut total = 0;
    for (rec, ws) in [(a, on_a), (b, on_b), (cstream, on_c)] {
        let logs = tokio::time::timeout(Duration::from_secs(30), rec.task).await???;
        total += verify(&truth, &ws, &logs, upto)?;
    }
    println!("checked {total} events across 60 watchers, {} revisions", upto - 1);
    assert!(total > 1000);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn resumed_watch_continues_exactly() -> anyhow::Result<()> {
    let c = Cluster::start(1)?;
    let url = c.members[0].client_url.clone();
    let mut kv = KvClient::connect(url.clone()).await?;
    let mut truth = GroundTruth::default();
    let spec = WatchSpec {
        key: Bytes::from_static(b"w/"),
        range_end: Bytes::from_static(b"w0"),
        start_rev: 0,
        no_put: false,
        no_delete: false,
        prev_kv: true,
    };

    let mut segments = Vec::new();
    // A new store's first write is revision 2.
    let mut next_start = 2;
    for round in 0..4 {
        let mut client = WatchClient::connect(url.clone()).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let mut s = spec.clone();
        s.start_rev = next_start;
        tx.send(WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: s.key.clone(),
                range_end: s.range_end.clone(),
                start_revision: s.start_rev,
                prev_kv: true,
                ..Default::default()
            })),
        })?;
        let mut responses = client.watch(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)).await?.into_inner();
        write_load(&mut kv, &mut truth, 150, 10 + round, 8).await?;
        // Read part of what is there, then drop the connection.
        let mut got = Vec::new();
        let mut seen_events = 0;
        while seen_events < 40 {
            let Some(r) = responses.next().await else { break };
            let r = r?;
            seen_events += r.events.len();
            got.push(r);
        }
        if let Some(last) = got.iter().rev().find_map(|r| r.events.last()) {
            next_start = last.kv.as_ref().map_or(0, |k| k.mod_revision) + 1;
        }
        segments.push(got);
    }
    let upto = next_start - 1;
    let total = check(&truth, &WatchSpec { start_rev: 2, ..spec }, &segments, upto).map_err(anyhow::Error::msg)?;
    assert!(total >= 120, "{total}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watcher_that_stops_reading_gets_everything_later() -> anyhow::Result<()> {
    let c = Cluster::start(1)?;
    let url = c.members[0].client_url.clone();
    let mut kv = KvClient::connect(url.clone()).await?;
    let mut truth = GroundTruth::default();
    let (done_tx, done_rx) = tokio::sync::watch::channel(0i64);
    let spec = WatchSpec {
        key: Bytes::from_static(b"w/"),
        range_end: Bytes::from_static(b"w0"),
        start_rev: 0,
        no_put: false,
        no_delete: false,
        prev_kv: false,
    };
    let stalled = Recorder::open(&url, done_rx.clone(), true).await?;
    stalled.watch(1, &spec);
    let live = Recorder::open(&url, done_rx.clone(), false).await?;
    live.watch(1, &spec);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ~40 MB of values while one client reads nothing: far beyond the
    // server's per-stream budget.
    write_load(&mut kv, &mut truth, 400, 3, 100_000).await?;
    let upto = truth.last_rev();
    done_tx.send(upto)?;
    for rec in [live, stalled] {
        let logs = tokio::time::timeout(Duration::from_secs(60), rec.task).await???;
        verify(&truth, &[(1, spec.clone())], &logs, upto)?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn compacted_start_revision_is_reported_and_canceled() -> anyhow::Result<()> {
    let c = Cluster::start(1)?;
    let url = c.members[0].client_url.clone();
    let mut kv = KvClient::connect(url.clone()).await?;
    for i in 0..10 {
        kv.put(PutRequest { key: key(i), value: Bytes::from_static(b"v"), ..Default::default() }).await?;
    }
    kv.compact(keel_proto::etcdserverpb::CompactionRequest { revision: 8, physical: true }).await?;
    let mut client = WatchClient::connect(url.clone()).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: key(1),
            start_revision: 3,
            ..Default::default()
        })),
    })?;
    let mut responses = client.watch(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)).await?.into_inner();
    let created = responses.next().await.ok_or_else(|| anyhow::anyhow!("no created"))??;
    assert!(created.created);
    let compacted = responses.next().await.ok_or_else(|| anyhow::anyhow!("no compacted"))??;
    assert!(compacted.canceled);
    assert_eq!(compacted.compact_revision, 8);
    assert_eq!(compacted.watch_id, created.watch_id);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn follower_watch_survives_leader_change() -> anyhow::Result<()> {
    let mut c = Cluster::start(3)?;
    let leader = c.leader(Duration::from_secs(10)).await?;
    let follower = (0..3).find(|&i| i != leader).unwrap_or(0);
    let other = (0..3).find(|&i| i != leader && i != follower).unwrap_or(0);
    let (done_tx, done_rx) = tokio::sync::watch::channel(0i64);
    let spec = WatchSpec {
        key: Bytes::from_static(b"w/"),
        range_end: Bytes::from_static(b"w0"),
        start_rev: 0,
        no_put: false,
        no_delete: false,
        prev_kv: true,
    };
    let rec = Recorder::open(&c.members[follower].client_url, done_rx, false).await?;
    rec.watch(1, &spec);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut truth = GroundTruth::default();
    let mut kv = KvClient::connect(c.members[other].client_url.clone()).await?;
    write_load(&mut kv, &mut truth, 200, 5, 8).await?;
    c.kill(leader)?;
    c.leader(Duration::from_secs(15)).await?;
    write_load(&mut kv, &mut truth, 200, 6, 8).await?;
    let upto = truth.last_rev();
    done_tx.send(upto)?;
    let logs = tokio::time::timeout(Duration::from_secs(30), rec.task).await???;
    verify(&truth, &[(1, spec)], &logs, upto)?;
    Ok(())
}

async fn open_watch(url: &str, create: WatchCreateRequest) -> anyhow::Result<tonic::Streaming<WatchResponse>> {
    let mut client = WatchClient::connect(url.to_string()).await?.max_decoding_message_size(64 << 20);
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(WatchRequest { request_union: Some(RequestUnion::CreateRequest(create)) })?;
    // Keep the request side open for the test's lifetime.
    std::mem::forget(tx);
    Ok(client.watch(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)).await?.into_inner())
}

#[tokio::test(flavor = "multi_thread")]
async fn large_revisions_are_fragmented_when_asked() -> anyhow::Result<()> {
    let c = Cluster::start(1)?;
    let url = c.members[0].client_url.clone();
    // With prev_kv, one revision's events carry twice what was written.
    let create = |fragment| WatchCreateRequest {
        key: Bytes::from_static(b"big/"),
        range_end: Bytes::from_static(b"big0"),
        fragment,
        prev_kv: true,
        ..Default::default()
    };
    let mut kv = KvClient::connect(url.clone()).await?;
    for i in 0..10 {
        let value = Bytes::from(vec![b'o'; 120_000]);
        kv.put(PutRequest { key: Bytes::from(format!("big/{i}")), value, ..Default::default() }).await?;
    }
    let mut fragmented = open_watch(&url, create(true)).await?;
    let mut whole = open_watch(&url, create(false)).await?;
    for s in [&mut fragmented, &mut whole] {
        assert!(s.next().await.ok_or_else(|| anyhow::anyhow!("closed"))??.created);
    }
    // One txn of 10 x 120 KB: its events with prev_kv are ~2.4 MB, over
    // --max-request-bytes (1.5 MiB).
    let success = (0..10)
        .map(|i| RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: Bytes::from(format!("big/{i}")),
                value: Bytes::from(vec![b'x'; 120_000]),
                ..Default::default()
            })),
        })
        .collect();
    kv.txn(TxnRequest { compare: vec![], success, failure: vec![] }).await?;

    let mut pieces = Vec::new();
    loop {
        let r = fragmented.next().await.ok_or_else(|| anyhow::anyhow!("closed"))??;
        let more = r.fragment;
        pieces.push(r);
        if !more {
            break;
        }
    }
    assert!(pieces.len() >= 2, "expected fragments, got {}", pieces.len());
    assert_eq!(pieces.iter().map(|p| p.events.len()).sum::<usize>(), 10);
    assert!(pieces[..pieces.len() - 1].iter().all(|p| p.fragment));
    let one = whole.next().await.ok_or_else(|| anyhow::anyhow!("closed"))??;
    assert_eq!(one.events.len(), 10, "without fragment the revision comes whole");
    assert!(!one.fragment);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn progress_notify_sends_periodic_bookmarks() -> anyhow::Result<()> {
    let opts = keel_tests::ClusterOptions::keel(1).args(&["--experimental-watch-progress-notify-interval", "200ms"]);
    let c = Cluster::start_with(opts)?;
    let url = c.members[0].client_url.clone();
    let mut kv = KvClient::connect(url.clone()).await?;
    kv.put(PutRequest { key: Bytes::from_static(b"p"), value: Bytes::from_static(b"1"), ..Default::default() }).await?;
    let mut s = open_watch(
        &url,
        WatchCreateRequest { key: Bytes::from_static(b"quiet"), progress_notify: true, ..Default::default() },
    )
    .await?;
    let created = s.next().await.ok_or_else(|| anyhow::anyhow!("closed"))??;
    let mut bookmarks = 0;
    while bookmarks < 2 {
        let r = tokio::time::timeout(Duration::from_secs(5), s.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("closed"))??;
        assert!(r.events.is_empty());
        assert_eq!(r.watch_id, created.watch_id);
        assert_eq!(r.header.map(|h| h.revision), Some(2));
        bookmarks += 1;
    }
    Ok(())
}

/// Watchers of one key on one stream with different options: a member
/// encodes a revision once per stream for the watchers that share it
/// (`watch/response.rs`), so each must still get its own watch id and the
/// events its options ask for.
#[tokio::test(flavor = "multi_thread")]
async fn watchers_sharing_a_stream_get_their_own_responses() -> anyhow::Result<()> {
    let c = Cluster::start(1)?;
    let url = c.members[0].client_url.clone();
    let mut client = WatchClient::connect(url.clone()).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    let options = [(false, false), (true, false), (true, true), (false, false)];
    for (prev_kv, fragment) in options {
        let create = WatchCreateRequest { key: Bytes::from_static(b"shared"), prev_kv, fragment, ..Default::default() };
        tx.send(WatchRequest { request_union: Some(RequestUnion::CreateRequest(create)) })?;
    }
    let mut stream = client.watch(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)).await?.into_inner();
    let mut ids = Vec::new();
    while ids.len() < options.len() {
        let r = stream.next().await.ok_or_else(|| anyhow::anyhow!("closed"))??;
        assert!(r.created);
        ids.push(r.watch_id);
    }
    let mut kv = KvClient::connect(url).await?;
    let first = kv
        .put(PutRequest { key: Bytes::from_static(b"shared"), value: Bytes::from_static(b"one"), ..Default::default() })
        .await?
        .into_inner();
    let second = kv
        .put(PutRequest { key: Bytes::from_static(b"shared"), value: Bytes::from_static(b"two"), ..Default::default() })
        .await?
        .into_inner();
    let revisions = [first.header.map(|h| h.revision), second.header.map(|h| h.revision)];
    let mut got: HashMap<i64, Vec<WatchResponse>> = HashMap::new();
    while got.values().map(Vec::len).sum::<usize>() < 2 * options.len() {
        let r = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("closed"))??;
        got.entry(r.watch_id).or_default().push(r);
    }
    for (id, (prev_kv, _)) in ids.iter().zip(options) {
        let responses = got.get(id).ok_or_else(|| anyhow::anyhow!("nothing for watch {id}"))?;
        assert_eq!(responses.len(), 2, "watch {id}");
        for (r, (rev, value)) in responses.iter().zip([(revisions[0], "one"), (revisions[1], "two")]) {
            assert_eq!(r.header.map(|h| h.revision), rev, "watch {id}");
            assert!(!r.fragment && !r.created && !r.canceled);
            let [event] = r.events.as_slice() else { anyhow::bail!("watch {id}: {:?}", r.events) };
            let kv = event.kv.as_ref().ok_or_else(|| anyhow::anyhow!("no kv"))?;
            assert_eq!(
                (kv.key.as_ref(), kv.value.as_ref(), kv.mod_revision),
                (&b"shared"[..], value.as_bytes(), rev.unwrap_or(0))
            );
            let prev = event.prev_kv.as_ref().map(|p| p.value.clone());
            let expected_prev = (prev_kv && value == "two").then(|| Bytes::from_static(b"one"));
            assert_eq!(prev, expected_prev, "watch {id} prev_kv={prev_kv} at {value}");
        }
    }
    Ok(())
}

/// keel serves etcdserverpb.Watch with its own service (`api/watch.rs`):
/// a method it does not have is UNIMPLEMENTED, as in tonic's generated
/// services, and the stream stays usable.
#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_watch_method_is_unimplemented() -> anyhow::Result<()> {
    let c = Cluster::start(1)?;
    let url = c.members[0].client_url.clone();
    let mut grpc = tonic::client::Grpc::new(Channel::from_shared(url.clone())?.connect().await?);
    grpc.ready().await?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/etcdserverpb.Watch/Other");
    let codec = tonic_prost::ProstCodec::<WatchRequest, WatchResponse>::default();
    let refused = grpc.unary(tonic::Request::new(WatchRequest::default()), path, codec).await;
    assert_eq!(refused.err().map(|s| s.code()), Some(tonic::Code::Unimplemented));
    let mut s = open_watch(&url, WatchCreateRequest { key: Bytes::from_static(b"k"), ..Default::default() }).await?;
    assert!(s.next().await.ok_or_else(|| anyhow::anyhow!("closed"))??.created);
    Ok(())
}
