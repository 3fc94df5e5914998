//! Leases, locks and elections on real keel processes: etcdctl's lease
//! commands, the etcd-client crate's keepalive, expiry deleting keys (with
//! watch events), leases surviving a leader kill while kept alive, and the
//! server-side Lock and Election services.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, GetOptions, LeaseGrantOptions, LockOptions, PutOptions, WatchOptions};
use keel_tests::Cluster;

#[test]
fn etcdctl_lease_commands() -> anyhow::Result<()> {
    let c = Cluster::start(1)?;
    let out = c.etcdctl(&["lease", "grant", "60"])?;
    // "lease 694d7a3e7d2ab104 granted with TTL(60s)"
    assert!(out.contains("granted with TTL(60s)"), "{out}");
    let id = out.split_whitespace().nth(1).unwrap_or("").to_string();
    c.etcdctl(&["put", "k1", "v", "--lease", &id])?;
    c.etcdctl(&["put", "k2", "v", "--lease", &id])?;
    let ttl = c.etcdctl(&["lease", "timetolive", &id, "--keys"])?;
    assert!(ttl.contains("granted with TTL(60s)") && ttl.contains("attached keys([k1 k2])"), "{ttl}");
    assert!(c.etcdctl(&["lease", "list"])?.contains(&id));
    let once = c.etcdctl(&["lease", "keep-alive", "--once", &id])?;
    assert!(once.contains("keepalived with TTL(60)"), "{once}");
    // A put without --lease detaches the key.
    c.etcdctl(&["put", "k2", "v2"])?;
    assert!(c.etcdctl(&["lease", "timetolive", &id, "--keys"])?.contains("attached keys([k1])"));
    assert_eq!(c.etcdctl(&["lease", "revoke", &id])?, format!("lease {id} revoked\n"));
    assert_eq!(c.etcdctl(&["get", "k1"])?, "");
    assert_eq!(c.etcdctl(&["get", "k2", "--print-value-only"])?, "v2\n");
    let gone = c.etcdctl(&["lease", "timetolive", &id])?;
    assert!(gone.contains("already expired"), "{gone}");
    let err = c.etcdctl_at(&[0], &["lease", "revoke", &id], None)?;
    assert!(String::from_utf8_lossy(&err.stderr).contains("etcdserver: requested lease not found"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn expiry_deletes_keys_in_one_revision_with_watch_events() -> anyhow::Result<()> {
    let c = Cluster::start(1)?;
    let mut client = Client::connect([c.members[0].client_url.as_str()], None).await?;
    let lease = client.lease_grant(2, None).await?;
    assert_eq!(lease.ttl(), 2);
    for k in ["e/a", "e/b", "e/c"] {
        client.put(k, "v", Some(PutOptions::new().with_lease(lease.id()))).await?;
    }
    let mut stream = client.watch("e/", Some(WatchOptions::new().with_prefix())).await?;
    let start = Instant::now();
    let resp = loop {
        let r = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await??
            .ok_or_else(|| anyhow::anyhow!("watch closed"))?;
        if !r.events().is_empty() {
            break r;
        }
    };
    let events = resp.events();
    assert_eq!(events.len(), 3, "all keys deleted by one revision");
    assert!(events.iter().all(|e| e.event_type() == EventType::Delete));
    let revs: Vec<i64> = events.iter().filter_map(|e| e.kv().map(|kv| kv.mod_revision())).collect();
    assert!(revs.windows(2).all(|w| w[0] == w[1]));
    assert!(start.elapsed() < Duration::from_secs(6), "expired after {:?}", start.elapsed());
    assert!(client.get("e/", Some(GetOptions::new().with_prefix())).await?.kvs().is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kept_alive_lease_survives_leader_kill_and_expires_after_keepalives_stop() -> anyhow::Result<()> {
    let mut c = Cluster::start(3)?;
    let mut client = Client::connect([c.endpoints().split(',').next().unwrap_or_default()], None).await?;
    let eps: Vec<String> = c.members.iter().map(|m| m.client_url.clone()).collect();
    let lease = client.lease_grant(5, Some(LeaseGrantOptions::new())).await?;
    client.put("held", "v", Some(PutOptions::new().with_lease(lease.id()))).await?;

    // Keep the lease alive from a client connected to all members.
    let id = lease.id();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ka_stop = stop.clone();
    let keeper = tokio::spawn(async move {
        while !ka_stop.load(Ordering::Relaxed) {
            if let Ok(mut cl) = Client::connect(eps.clone(), None).await {
                if let Ok((mut k, mut s)) = cl.lease_keep_alive(id).await {
                    while !ka_stop.load(Ordering::Relaxed) {
                        if k.keep_alive().await.is_err() || s.message().await.is_err() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(1000)).await;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });

    for _ in 0..2 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let leader = c.leader(Duration::from_secs(10)).await?;
        c.kill(leader)?;
        tokio::time::sleep(Duration::from_secs(8)).await;
        c.restart(leader)?;
    }
    let survivor = c.leader(Duration::from_secs(10)).await?;
    let mut check = Client::connect([c.members[survivor].client_url.as_str()], None).await?;
    assert_eq!(check.get("held", None).await?.kvs().len(), 1, "the key outlived leader kills while kept alive");

    stop.store(true, Ordering::Relaxed);
    keeper.await?;
    let stopped = Instant::now();
    loop {
        if check.get("held", None).await?.kvs().is_empty() {
            break;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(5 + 1 + 3),
            "key still there {:?} after keepalives stopped",
            stopped.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn lock_service_excludes_and_election_service_elects() -> anyhow::Result<()> {
    let c = Cluster::start(3)?;
    let eps: Vec<String> = c.members.iter().map(|m| m.client_url.clone()).collect();
    let holders = Arc::new(AtomicUsize::new(0));
    let max_seen = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..4 {
        let eps = vec![eps[i % 3].clone()];
        let holders = holders.clone();
        let max_seen = max_seen.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = Client::connect(eps, None).await?;
            for _ in 0..3 {
                let lease = client.lease_grant(10, None).await?;
                let lock = client.lock("mutex", Some(LockOptions::new().with_lease(lease.id()))).await?;
                let now = holders.fetch_add(1, Ordering::SeqCst) + 1;
                max_seen.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                holders.fetch_sub(1, Ordering::SeqCst);
                client.unlock(lock.key()).await?;
                client.lease_revoke(lease.id()).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    assert_eq!(max_seen.load(Ordering::SeqCst), 1, "two holders of the lock at once");

    let mut a = Client::connect([eps[0].as_str()], None).await?;
    let mut b = Client::connect([eps[1].as_str()], None).await?;
    let la = a.lease_grant(10, None).await?;
    let lb = b.lease_grant(10, None).await?;
    let won = a.campaign("elect", "alice", la.id()).await?;
    let leader_key = won.leader().cloned().ok_or_else(|| anyhow::anyhow!("no leader key"))?;
    let leader = b.leader("elect").await?;
    assert_eq!(leader.kv().map(|kv| kv.value()), Some(b"alice".as_slice()));
    let mut observer = b.observe("elect").await?;
    let first = observer.message().await?.ok_or_else(|| anyhow::anyhow!("observe closed"))?;
    assert_eq!(first.kv().map(|kv| kv.value()), Some(b"alice".as_slice()));
    // Bob waits while Alice leads; Alice proclaims, then resigns.
    let bob = tokio::spawn(async move { b.campaign("elect", "bob", lb.id()).await });
    a.proclaim("alice-2", Some(etcd_client::ProclaimOptions::new().with_leader(leader_key.clone()))).await?;
    let second = observer.message().await?.ok_or_else(|| anyhow::anyhow!("observe closed"))?;
    assert_eq!(second.kv().map(|kv| kv.value()), Some(b"alice-2".as_slice()));
    assert!(!bob.is_finished());
    a.resign(Some(etcd_client::ResignOptions::new().with_leader(leader_key))).await?;
    let bob_won = tokio::time::timeout(Duration::from_secs(10), bob).await???;
    assert!(bob_won.leader().is_some());
    let third = observer.message().await?.ok_or_else(|| anyhow::anyhow!("observe closed"))?;
    assert_eq!(third.kv().map(|kv| kv.value()), Some(b"bob".as_slice()));
    let err = a.leader("nobody").await.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("election: no leader"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn checkpointed_ttl_is_not_reset_by_a_leader_change() -> anyhow::Result<()> {
    let opts = keel_tests::ClusterOptions::keel(3).args(&["--experimental-lease-checkpoint-interval", "1s"]);
    let mut c = Cluster::start_with(opts)?;
    let eps: Vec<String> = c.members.iter().map(|m| m.client_url.clone()).collect();
    let mut client = Client::connect(eps.clone(), None).await?;
    let lease = client.lease_grant(60, None).await?;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let leader = c.leader(Duration::from_secs(10)).await?;
    c.kill(leader)?;
    let new_leader = c.leader(Duration::from_secs(15)).await?;
    let mut check = Client::connect([c.members[new_leader].client_url.as_str()], None).await?;
    let ttl = check.lease_time_to_live(lease.id(), None).await?.ttl();
    // Without checkpoints the new leader would grant the full 60 s again
    // (plus an election timeout).
    assert!(ttl > 0 && ttl <= 57, "remaining TTL after leader change: {ttl}");
    Ok(())
}
