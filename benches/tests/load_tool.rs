//! The load tool against a real single-member keel: every benchmark
//! completes the operations it was asked for, without errors, and the
//! watch benchmark sees every event on every watcher.

use keel_bench::load::LoadConfig;
use keel_bench::workloads::{self, Keys, Target, WatchLoad};
use keel_tests::Cluster;

fn cfg(name: &str, clients: usize, total: u64) -> LoadConfig {
    LoadConfig { name: name.into(), clients, total: Some(total), duration: None, rate: None, progress: false }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_benchmark_completes_against_keel() -> anyhow::Result<()> {
    let c = Cluster::start(1)?;
    let target = Target { endpoints: vec![c.members[0].client_url.clone()], conns: 2, target_leader: true };
    let keys = Keys { key_size: 8, val_size: 64, key_space: 100, sequential: false, incompressible: false };

    let r = workloads::put(&target, &keys, &cfg("put", 4, 200)).await?;
    assert_eq!((r.ops, r.errors), (200, 0), "{r:?}");
    assert!(r.p50_ms > 0.0 && r.p50_ms <= r.p99_ms && r.p99_ms <= r.max_ms, "{r:?}");

    let r = workloads::range(&target, "foo", true, &cfg("range", 4, 200)).await?;
    assert_eq!((r.ops, r.errors), (200, 0), "{r:?}");
    let r = workloads::txn_put(&target, &keys, 3, &cfg("txn-put", 2, 50)).await?;
    assert_eq!((r.ops, r.errors), (50, 0), "{r:?}");
    let r = workloads::txn_mixed(&target, &keys, 1.0, false, &cfg("txn-mixed", 2, 100)).await?;
    assert_eq!((r.ops, r.errors), (100, 0), "{r:?}");
    let r = workloads::lease_keepalive(&target, &cfg("keepalive", 2, 100)).await?;
    assert_eq!((r.ops, r.errors), (100, 0), "{r:?}");
    let r = workloads::lease_grant_revoke(&target, &cfg("lease-grant", 2, 50)).await?;
    assert_eq!((r.ops, r.errors), (50, 0), "{r:?}");
    let r = workloads::kube(&target, 20, 5, 100, &cfg("kube", 2, 100)).await?;
    assert_eq!((r.ops, r.errors), (100, 0), "{r:?}");
    // Runs until the member was compacted and defragmented.
    let r = workloads::put_during_defrag(&target, &keys, &cfg("put-during-defrag", 2, 2000)).await?;
    assert_eq!((r.ops, r.errors), (2000, 0), "{r:?}");

    // 30 watchers x 20 puts = 600 deliveries.
    let load = WatchLoad { streams: 3, watchers: 30, writers: 2, puts: 20, put_rate: None };
    let r = workloads::watch(&target, &load, "watch", false).await?;
    assert_eq!((r.ops, r.errors), (600, 0), "{r:?}");
    Ok(())
}

#[test]
fn incompressible_values_are_fresh_random_bytes_of_the_size_asked() {
    let keys = Keys { key_size: 8, val_size: 4096, key_space: 100, sequential: false, incompressible: true };
    let shared = keys.value();
    let (a, b) = (keys.value_for(&shared), keys.value_for(&shared));
    assert_eq!((a.len(), b.len()), (4096, 4096));
    assert_ne!(a, b);
    assert!(a.iter().filter(|&&x| x == b'v').count() < 100, "values are not random");
    let plain = Keys { incompressible: false, ..keys };
    assert_eq!(plain.value_for(&shared), shared);
}
