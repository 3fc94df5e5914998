//! Members catch up when the log holds more than one append-entries
//! message can carry: a member added to a cluster whose log holds about
//! 100 MiB of incompressible values, and a follower cut off (paused) while
//! they were committed. No snapshot is taken (a high `--snapshot-count`),
//! so everything has to cross as log entries; one more test purges the
//! log so that the new member needs the snapshot. Values of 64 KiB are batched
//! into entries of about 1 MiB; values of 1 MiB make one entry each.
//! Before the fix, the leader sent such a log in messages of up to 63 MiB
//! with a 100 ms timeout and resent them forever.

use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions};
use keel_tests::{Cluster, ClusterOptions};
use rand::RngCore;

/// Bytes of values written before the member has to catch up.
const LOG_BYTES: usize = 96 << 20;
/// No snapshot during a test: the log alone carries the data.
const NO_SNAPSHOT: &[&str] = &["--snapshot-count", "1000000"];
/// How long catching up may take; it takes a few seconds.
const CATCH_UP: Duration = Duration::from_secs(90);

/// Puts `LOG_BYTES` of random `value_size` values under `prefix` from 8
/// concurrent clients; returns how many keys were written.
async fn write_incompressible(endpoints: &[String], prefix: &str, value_size: usize) -> anyhow::Result<usize> {
    let count = LOG_BYTES / value_size;
    let writers = 8;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let mut client = Client::connect(endpoints, None).await?;
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            let mut value = vec![0u8; value_size];
            for i in (w..count).step_by(writers) {
                rand::thread_rng().fill_bytes(&mut value);
                client.put(format!("{prefix}{i:06}"), value.clone(), None).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(count)
}

/// The hash of member `i`'s keyspace at `revision` (etcd's HashKV).
async fn hash_at(c: &Cluster, i: usize, revision: i64) -> anyhow::Result<u32> {
    let mut client = Client::connect([c.members[i].client_url.as_str()], None).await?;
    Ok(client.hash_kv(revision).await?.hash())
}

/// Waits until member `i` serves `want` keys under `prefix` on its own
/// (serializable reads), then checks that its keyspace hashes as the
/// leader's does.
async fn assert_caught_up(c: &mut Cluster, i: usize, prefix: &str, want: usize) -> anyhow::Result<()> {
    let mut client = Client::connect([c.members[i].client_url.as_str()], None).await?;
    let started = Instant::now();
    let mut served = 0;
    while served < want {
        anyhow::ensure!(
            started.elapsed() < CATCH_UP,
            "member {i} serves {served} of {want} keys after {CATCH_UP:?}; log:\n{}",
            c.log(i)
        );
        let opts = GetOptions::new().with_prefix().with_serializable().with_count_only();
        if let Ok(resp) = client.get(prefix, Some(opts)).await {
            served = resp.count() as usize;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let leader = c.leader(Duration::from_secs(10)).await?;
    let revision = c.status(leader).await?.header.map_or(0, |h| h.revision);
    // The member may still be applying the last revisions.
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.status(i).await?.header.map_or(0, |h| h.revision) < revision {
        anyhow::ensure!(Instant::now() < deadline, "member {i} never reached revision {revision}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        hash_at(c, i, revision).await?,
        hash_at(c, leader, revision).await?,
        "member {i} differs from the leader"
    );
    Ok(())
}

async fn added_member_catches_up(value_size: usize) -> anyhow::Result<()> {
    let mut c = Cluster::start_with(ClusterOptions::keel(3).args(NO_SNAPSHOT))?;
    let endpoints: Vec<String> = c.members.iter().map(|m| m.client_url.clone()).collect();
    let written = write_incompressible(&endpoints, "big/", value_size).await?;

    let joiner = c.define_joining_member("joiner", NO_SNAPSHOT)?;
    let peer_url = c.members[joiner].peer_url.clone();
    let out = c.etcdctl(&["member", "add", "joiner", "--peer-urls", &peer_url])?;
    assert!(out.contains("added to cluster"), "{out}");
    c.restart(joiner)?;
    assert_caught_up(&mut c, joiner, "big/", written).await
}

/// With the log purged behind frequent snapshots, the new member gets the
/// leader's snapshot (about 100 MiB of values), then the log after it.
#[tokio::test(flavor = "multi_thread")]
async fn added_member_catches_up_by_snapshot_with_64k_values() -> anyhow::Result<()> {
    let purging = ["--snapshot-count", "20", "--experimental-snapshot-catchup-entries", "5"];
    let mut c = Cluster::start_with(ClusterOptions::keel(3).args(&purging))?;
    let endpoints: Vec<String> = c.members.iter().map(|m| m.client_url.clone()).collect();
    let written = write_incompressible(&endpoints, "big/", 64 << 10).await?;

    let joiner = c.define_joining_member("joiner", &purging)?;
    let peer_url = c.members[joiner].peer_url.clone();
    c.etcdctl(&["member", "add", "joiner", "--peer-urls", &peer_url])?;
    c.restart(joiner)?;
    assert_caught_up(&mut c, joiner, "big/", written).await?;
    assert!(c.log(joiner).contains("installed snapshot"), "the new member caught up without a snapshot");
    Ok(())
}

async fn cut_off_follower_catches_up(value_size: usize) -> anyhow::Result<()> {
    let mut c = Cluster::start_with(ClusterOptions::keel(3).args(NO_SNAPSHOT))?;
    let leader = c.leader(Duration::from_secs(10)).await?;
    let follower = (0..3).find(|&i| i != leader).unwrap_or(0);
    let survivors: Vec<String> = (0..3).filter(|&i| i != follower).map(|i| c.members[i].client_url.clone()).collect();

    c.pause(follower)?;
    let written = write_incompressible(&survivors, "big/", value_size).await;
    c.resume(follower)?;
    let written = written?;
    assert_caught_up(&mut c, follower, "big/", written).await
}

#[tokio::test(flavor = "multi_thread")]
async fn added_member_catches_up_with_64k_values() -> anyhow::Result<()> {
    added_member_catches_up(64 << 10).await
}

#[tokio::test(flavor = "multi_thread")]
async fn added_member_catches_up_with_1m_values() -> anyhow::Result<()> {
    added_member_catches_up(1 << 20).await
}

#[tokio::test(flavor = "multi_thread")]
async fn cut_off_follower_catches_up_with_64k_values() -> anyhow::Result<()> {
    cut_off_follower_catches_up(64 << 10).await
}

#[tokio::test(flavor = "multi_thread")]
async fn cut_off_follower_catches_up_with_1m_values() -> anyhow::Result<()> {
    cut_off_follower_catches_up(1 << 20).await
}
