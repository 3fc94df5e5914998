//! Multi-member clusters of the real binary: leader loss, minority loss,
//! restarts, and linearizable reads that are never stale.

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions};
use keel_tests::Cluster;
use tokio::sync::Mutex;

async fn client_for(c: &Cluster, members: &[usize]) -> anyhow::Result<Client> {
    let eps: Vec<String> = members.iter().map(|&i| c.members[i].client_url.clone()).collect();
    Ok(Client::connect(eps, None).await?)
}

/// Writes until one succeeds; returns how long that took.
async fn first_write(client: &mut Client, key: &str, timeout: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        let attempt = tokio::time::timeout(Duration::from_millis(1500), client.put(key, "v", None)).await;
        if let Ok(Ok(_)) = attempt {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            anyhow::bail!("no write accepted within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn three_members_survive_leader_kill_and_restart() -> anyhow::Result<()> {
    let mut c = Cluster::start(3)?;
    let mut all = client_for(&c, &[0, 1, 2]).await?;
    for i in 0..100 {
        all.put(format!("before-{i:03}"), "x", None).await?;
    }
    let mut failover = Vec::new();
    for round in 0..3 {
        let leader = c.leader(Duration::from_secs(10)).await?;
        c.kill(leader)?;
        let survivors: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
        let mut client = client_for(&c, &survivors).await?;
        let took = first_write(&mut client, &format!("after-kill-{round}"), Duration::from_secs(20)).await?;
        failover.push(took);
        let new_leader = c.leader(Duration::from_secs(10)).await?;
        assert_ne!(new_leader, leader);
        c.restart(leader)?;
    }
    failover.sort();
    println!("leader kill -> first accepted write: {failover:?} (median {:?})", failover[1]);

    // Every member has every acknowledged write, read locally.
    for i in 0..3 {
        let mut client = client_for(&c, &[i]).await?;
        let opts = GetOptions::new().with_prefix().with_serializable();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let before = client.get("before-", Some(opts.clone())).await?.kvs().len();
            let after = client.get("after-kill-", Some(opts.clone())).await?.kvs().len();
            if before == 100 && after == 3 {
                break;
            }
            assert!(Instant::now() < deadline, "member {i} has {before}/100 and {after}/3 keys");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn five_members_tolerate_two_failures() -> anyhow::Result<()> {
    let mut c = Cluster::start(5)?;
    let leader = c.leader(Duration::from_secs(10)).await?;
    let follower = (0..5).find(|&i| i != leader).unwrap_or(0);
    c.kill(leader)?;
    c.kill(follower)?;
    let survivors: Vec<usize> = (0..5).filter(|&i| i != leader && i != follower).collect();
    let mut client = client_for(&c, &survivors).await?;
    first_write(&mut client, "with-two-down", Duration::from_secs(20)).await?;
    // Losing a third member loses quorum: writes must not succeed.
    c.kill(survivors[0])?;
    let mut minority = client_for(&c, &survivors[1..]).await?;
    let write = tokio::time::timeout(Duration::from_secs(3), minority.put("no-quorum", "x", None)).await;
    assert!(!matches!(write, Ok(Ok(_))), "a minority accepted a write");

    // With the leader gone, a request that requires a leader (etcd's
    // WithRequireLeader metadata) fails fast instead of waiting.
    let mut kv =
        keel_proto::etcdserverpb::kv_client::KvClient::connect(c.members[survivors[1]].client_url.clone()).await?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut req =
            tonic::Request::new(keel_proto::etcdserverpb::RangeRequest { key: "k".into(), ..Default::default() });
        req.metadata_mut().insert("hasleader", tonic::metadata::MetadataValue::from_static("true"));
        let started = Instant::now();
        match kv.range(req).await {
            Err(status) if status.message() == "etcdserver: no leader" => {
                assert_eq!(status.code(), tonic::Code::Unavailable);
                assert!(started.elapsed() < Duration::from_secs(1));
                break;
            }
            other => {
                if Instant::now() >= deadline {
                    for &i in &survivors[1..] {
                        eprintln!(
                            "member {i}: {:?}",
                            c.status(i).await.map(|s| (s.leader, s.raft_term, s.header.map(|h| h.member_id)))
                        );
                        eprintln!("{}", c.log(i).lines().rev().take(8).collect::<Vec<_>>().join("\n"));
                    }
                    panic!("expected 'no leader', got {other:?}");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.restart(survivors[0])?;
    first_write(&mut minority, "quorum-back", Duration::from_secs(20)).await?;
    Ok(())
}

/// A linearizable read issued after a write was acknowledged returns that
/// write or a later one, on every member, while the leader changes.
#[tokio::test(flavor = "multi_thread")]
async fn linearizable_reads_are_never_stale() -> anyhow::Result<()> {
    let mut c = Cluster::start(3)?;
    let acked = Arc::new(Mutex::new(0i64));
    let writer_acked = acked.clone();
    let mut writer = client_for(&c, &[0, 1, 2]).await?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer_stop = stop.clone();
    let w = tokio::spawn(async move {
        let mut n = 0i64;
        while !writer_stop.load(std::sync::atomic::Ordering::Relaxed) {
            n += 1;
            if let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_secs(2), writer.put("counter", n.to_string(), None)).await
            {
                *writer_acked.lock().await = n;
            }
        }
    });
    let mut readers = Vec::new();
    for i in 0..3 {
        let mut client = client_for(&c, &[i]).await?;
        let acked = acked.clone();
        let stop = stop.clone();
        readers.push(tokio::spawn(async move {
            let mut checked = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let floor = *acked.lock().await;
                if let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(2), client.get("counter", None)).await {
                    let seen: i64 = resp.kvs().first().and_then(|kv| kv.value_str().ok()?.parse().ok()).unwrap_or(0);
                    assert!(seen >= floor, "member {i} read {seen} after {floor} was acknowledged");
                    checked += 1;
                }
            }
            checked
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Change leaders while reading: kill the leader, bring it back.
    let leader = c.leader(Duration::from_secs(10)).await?;
    c.kill(leader)?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.restart(leader)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    w.await?;
    let mut total = 0;
    for r in readers {
        total += r.await?;
    }
    assert!(total > 100, "only {total} reads checked");
    Ok(())
}

/// Regression (found by the Jepsen harness): a leader that lost its quorum
/// answered a linearizable read by spinning in a loop that never yielded,
/// which froze the member for good. Now the read fails within the request
/// timeout and the member keeps answering.
#[tokio::test(flavor = "multi_thread")]
async fn leader_without_quorum_fails_reads_and_stays_responsive() -> anyhow::Result<()> {
    let mut c = Cluster::start(3)?;
    let leader = c.leader(Duration::from_secs(20)).await?;
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    for &f in &followers {
        c.pause(f)?;
    }
    let mut client = client_for(&c, &[leader]).await?;
    // Let check-quorum notice.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for _ in 0..3 {
        let read = tokio::time::timeout(Duration::from_secs(20), client.get("k", None)).await;
        assert!(matches!(read, Ok(Err(_))), "a read without a quorum fails instead of hanging: {read:?}");
    }
    let status = tokio::time::timeout(Duration::from_secs(5), c.status(leader)).await;
    assert!(matches!(status, Ok(Ok(_))), "the member still answers: {status:?}");
    for &f in &followers {
        c.resume(f)?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match client.put("k", "v", None).await {
            Ok(_) => break,
            Err(e) if Instant::now() > deadline => anyhow::bail!("no write after healing: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    Ok(())
}

/// Regression (found by the Jepsen harness): a leader killed and restarted
/// at once took up its old term again (its stored vote is a committed vote
/// for itself) and served linearizable reads from a commit index it had
/// not yet caught up on. A restarted member must win a new term first.
#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_leader_does_not_resume_its_term() -> anyhow::Result<()> {
    let mut c = Cluster::start(3)?;
    let leader = c.leader(Duration::from_secs(10)).await?;
    let mut client = client_for(&c, &[leader]).await?;
    first_write(&mut client, "before", Duration::from_secs(10)).await?;
    let term = c.status(leader).await?.header.map_or(0, |h| h.raft_term);
    assert!(term > 0);
    c.kill(leader)?;
    c.restart(leader)?;
    let mut client = client_for(&c, &[leader]).await?;
    let resp = loop {
        match tokio::time::timeout(Duration::from_secs(2), client.put("after", "v", None)).await {
            Ok(Ok(resp)) => break resp,
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let written_in = resp.header().map_or(0, |h| h.raft_term());
    assert!(
        written_in > term,
        "the first write after the restart went in term {written_in}, the old leader's was {term}"
    );
    Ok(())
}
