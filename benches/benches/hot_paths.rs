//! Micro-benchmarks of keel's hot paths: MVCC put and range, key index
//! lookup, watch event fan-out, request decode/encode, and the Raft log's
//! append to RocksDB. `cargo bench -p keel-bench`.

use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use keel_proto::etcdserverpb::{PutRequest, RangeResponse, ResponseHeader, WatchResponse};
use keel_proto::mvccpb::{event::EventType, Event, KeyValue};
use keel_server::apply::CommitObserver;
use keel_server::mvcc::store::{MvccStore, RangeOptions, ReadView};
use keel_server::storage::memory::MemoryEngine;
use keel_server::storage::rocks::RocksEngine;
use keel_server::storage::{SharedEngine, Table, WriteBatch};
use keel_server::watch::hub::{WatchHub, WatchSpec};
use keel_server::watch::response::{SharedResponse, WatchOut};
use prost::Message;

fn key(i: u64) -> Vec<u8> {
    format!("/registry/pods/default/pod-{i:08}").into_bytes()
}

fn filled_store(n: u64) -> Arc<MvccStore> {
    let engine: SharedEngine = Arc::new(MemoryEngine::new());
    let store = Arc::new(MvccStore::open(engine).unwrap_or_else(|e| panic!("open: {e}")));
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let mut w = store.write().unwrap_or_else(|e| panic!("write: {e}"));
        for i in chunk {
            w.put(&key(*i), Bytes::from_static(&[b'v'; 256]), 0);
        }
        w.commit().unwrap_or_else(|e| panic!("commit: {e}"));
    }
    store
}

fn mvcc(c: &mut Criterion) {
    let mut g = c.benchmark_group("mvcc");
    let store = filled_store(100_000);
    let mut i = 0u64;
    g.throughput(Throughput::Elements(1));
    g.bench_function("put (one key per txn, 100k keys)", |b| {
        b.iter(|| {
            i = (i + 7919) % 100_000;
            let mut w = store.write().unwrap_or_else(|e| panic!("write: {e}"));
            w.put(&key(i), Bytes::from_static(&[b'w'; 256]), 0);
            w.commit().unwrap_or_else(|e| panic!("commit: {e}"))
        })
    });
    g.bench_function("range one key (100k keys)", |b| {
        b.iter(|| {
            i = (i + 7919) % 100_000;
            let r = store.read().unwrap_or_else(|e| panic!("read: {e}"));
            r.range(&key(i), None, RangeOptions::default()).unwrap_or_else(|e| panic!("range: {e}"))
        })
    });
    g.throughput(Throughput::Elements(500));
    g.bench_function("range 500 keys with limit (100k keys)", |b| {
        b.iter(|| {
            let r = store.read().unwrap_or_else(|e| panic!("read: {e}"));
            r.range(
                b"/registry/pods/default/",
                Some(b"/registry/pods/default0"),
                RangeOptions { limit: 500, ..Default::default() },
            )
            .unwrap_or_else(|e| panic!("range: {e}"))
        })
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("key index count-only over 100k keys", |b| {
        b.iter(|| {
            let r = store.read().unwrap_or_else(|e| panic!("read: {e}"));
            r.range(b"/registry/", Some(b"/registry0"), RangeOptions { count_only: true, ..Default::default() })
                .unwrap_or_else(|e| panic!("range: {e}"))
        })
    });
    g.finish();
}

fn watch_fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("watch");
    for watchers in [100usize, 10_000] {
        let hub = WatchHub::new(1);
        let mut queues = Vec::new();
        for s in 0..(watchers / 100).max(1) {
            let q = hub.open_stream();
            for _ in 0..100.min(watchers) {
                let spec = WatchSpec::new(
                    Bytes::from_static(b"/registry/pods/"),
                    Some(Bytes::from_static(b"/registry/pods0")),
                );
                hub.create(q.id, 0, spec, 0).unwrap_or_else(|e| panic!("create {s}: {e:?}"));
            }
            queues.push(q);
        }
        let mut rev = 1;
        g.throughput(Throughput::Elements(watchers as u64));
        g.bench_function(format!("one event to {watchers} watchers"), |b| {
            b.iter_batched(
                || {
                    rev += 1;
                    (
                        rev,
                        vec![Event {
                            r#type: EventType::Put as i32,
                            kv: Some(KeyValue {
                                key: Bytes::from(key(rev as u64)),
                                value: Bytes::from_static(&[b'v'; 256]),
                                create_revision: rev,
                                mod_revision: rev,
                                version: 1,
                                lease: 0,
                            }),
                            prev_kv: None,
                        }],
                    )
                },
                |(at, events)| {
                    hub.committed(at, &events);
                    // Drain as a session would, releasing the stream's
                    // byte budget (else watchers fall back to catch-up).
                    for q in queues.iter_mut() {
                        let mut got = 0;
                        while q.rx.try_recv().is_ok() {
                            got += 1;
                        }
                        assert!(got > 0, "every stream gets the event");
                        q.queued.store(0, std::sync::atomic::Ordering::Release);
                    }
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    let put = PutRequest { key: Bytes::from(key(42)), value: Bytes::from_static(&[b'v'; 256]), ..Default::default() };
    let bytes = put.encode_to_vec();
    g.bench_function("PutRequest encode", |b| b.iter(|| put.encode_to_vec()));
    g.bench_function("PutRequest decode", |b| b.iter(|| PutRequest::decode(bytes.as_slice())));
    let resp = RangeResponse {
        kvs: (0..500)
            .map(|i| KeyValue {
                key: Bytes::from(key(i)),
                value: Bytes::from_static(&[b'v'; 256]),
                create_revision: 2,
                mod_revision: 3,
                version: 1,
                lease: 0,
            })
            .collect(),
        count: 500,
        ..Default::default()
    };
    g.throughput(Throughput::Elements(500));
    g.bench_function("RangeResponse of 500 kvs encode", |b| b.iter(|| resp.encode_to_vec()));
    // One revision's event to the 1,000 watchers of a stream, as the
    // stream's sender turns it into bytes for gRPC.
    let header = ResponseHeader { cluster_id: 1 << 60, member_id: 1 << 61, revision: 1 << 20, raft_term: 3 };
    let events = vec![Event {
        r#type: EventType::Put as i32,
        kv: Some(KeyValue {
            key: Bytes::from(key(7)),
            value: Bytes::from_static(&[b'v'; 256]),
            create_revision: 2,
            mod_revision: 1 << 20,
            version: 9,
            lease: 0,
        }),
        prev_kv: None,
    }];
    let mut out = Vec::with_capacity(1 << 20);
    g.throughput(Throughput::Elements(1000));
    g.bench_function("watch event to 1000 watchers, a WatchResponse each", |b| {
        b.iter(|| {
            out.clear();
            for watch_id in 0..1000 {
                let r = WatchResponse { header: Some(header), watch_id, events: events.clone(), ..Default::default() };
                r.encode(&mut out).expect("Vec grows");
            }
        })
    });
    g.bench_function("watch event to 1000 watchers, encoded once (SharedResponse)", |b| {
        b.iter(|| {
            out.clear();
            let shared = Arc::new(SharedResponse::new(header, events.clone()));
            for watch_id in 0..1000 {
                WatchOut::Shared { response: shared.clone(), watch_id }.encode(&mut out).expect("Vec grows");
            }
        })
    });
    g.finish();
}

fn raft_log(c: &mut Criterion) {
    let mut g = c.benchmark_group("raft log");
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let engine = RocksEngine::open(&dir.path().join("db")).unwrap_or_else(|e| panic!("open: {e}"));
    let entry = vec![7u8; 300];
    let mut index = 0u64;
    g.bench_function("append one 300-byte entry (no fsync)", |b| {
        b.iter(|| {
            index += 1;
            let mut batch = WriteBatch::new();
            batch.put(Table::RaftLog, keel_server::storage::keys::log_key(index), entry.clone());
            keel_server::storage::Engine::write(&engine, batch, false).unwrap_or_else(|e| panic!("write: {e}"))
        })
    });
    g.sample_size(20);
    g.bench_function("append one 300-byte entry and fsync", |b| {
        b.iter(|| {
            index += 1;
            let mut batch = WriteBatch::new();
            batch.put(Table::RaftLog, keel_server::storage::keys::log_key(index), entry.clone());
            keel_server::storage::Engine::write(&engine, batch, true).unwrap_or_else(|e| panic!("write: {e}"))
        })
    });
    g.finish();
}

criterion_group!(benches, mvcc, watch_fanout, codec, raft_log);
criterion_main!(benches);
