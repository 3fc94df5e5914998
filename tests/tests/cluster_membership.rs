//! Membership changes with etcdctl on a cluster under a steady write load:
//! add a learner, start it, promote it, add a voter, remove members
//! (including the leader). No acknowledged write is lost, the cluster stays
//! available, and a removed member stops. Also: a follower that falls
//! behind the purged log catches up by snapshot.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions};
use keel_tests::{Cluster, ClusterOptions};

fn member_id(out: &str) -> anyhow::Result<String> {
    // "Member 8e9e05c52164694d added to cluster ..."
    out.split_whitespace().nth(1).map(str::to_string).ok_or_else(|| anyhow::anyhow!("unexpected output {out}"))
}

async fn wait_serving(c: &Cluster, i: usize, key: &str, want: usize) -> anyhow::Result<()> {
    let mut client = Client::connect([c.members[i].client_url.as_str()], None).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let opts = GetOptions::new().with_prefix().with_serializable();
        if let Ok(resp) = client.get(key, Some(opts)).await {
            if resp.kvs().len() >= want {
                return Ok(());
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "member {i} did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn add_promote_remove_under_write_load() -> anyhow::Result<()> {
    let mut c = Cluster::start(3)?;
    let endpoints: Vec<String> = c.members.iter().map(|m| m.client_url.clone()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let writer_stop = stop.clone();
    let writer = tokio::spawn(async move {
        let mut client = Client::connect(endpoints, None).await.ok()?;
        let mut acked = Vec::new();
        let mut i = 0;
        while !writer_stop.load(Ordering::Relaxed) {
            let key = format!("load-{i:06}");
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(5), client.put(key.clone(), "v", None)).await {
                acked.push(key);
            }
            i += 1;
        }
        Some(acked)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A learner joins, catches up, is promoted.
    let learner = c.define_joining_member("learner", &[])?;
    let out =
        c.etcdctl(&["member", "add", "learner", "--learner", "--peer-urls", &c.members[learner].peer_url.clone()])?;
    let learner_id = member_id(&out)?;
    c.restart(learner)?;
    wait_serving(&c, learner, "load-", 100).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match c.etcdctl(&["member", "promote", &learner_id]) {
            Ok(out) => {
                assert!(out.contains("promoted"), "{out}");
                break;
            }
            Err(e) => {
                assert!(e.to_string().contains("in sync with leader"), "{e}");
                assert!(Instant::now() < deadline, "learner never became ready");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let list = c.etcdctl(&["member", "list"])?;
    assert!(list.contains(&format!("{learner_id}, started, learner")) && !list.contains(", true\n"), "{list}");

    // A voter joins directly.
    let voter = c.define_joining_member("voter", &[])?;
    let out = c.etcdctl(&["member", "add", "voter", "--peer-urls", &c.members[voter].peer_url.clone()])?;
    assert!(out.contains("added to cluster"), "{out}");
    c.restart(voter)?;
    wait_serving(&c, voter, "load-", 100).await?;

    // Remove the leader, then another member; each removed member exits.
    let leader = c.leader(Duration::from_secs(10)).await?;
    let status = c.status(leader).await?;
    let leader_id = format!("{:x}", status.header.map_or(0, |h| h.member_id));
    let survivors: Vec<usize> = (0..c.members.len()).filter(|&i| i != leader).collect();
    let out = c.etcdctl_at(&survivors, &["member", "remove", &leader_id], None)?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.is_running(leader) {
        assert!(Instant::now() < deadline, "removed leader kept running");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(c.log(leader).contains("the member has been permanently removed from the cluster"));

    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let acked = writer.await?.ok_or_else(|| anyhow::anyhow!("writer could not connect"))?;
    assert!(acked.len() > 200, "only {} writes acknowledged", acked.len());

    // Every acknowledged write is on every remaining member.
    let mut check = Client::connect([c.members[survivors[0]].client_url.as_str()], None).await?;
    let all = check.get("load-", Some(GetOptions::new().with_prefix().with_keys_only())).await?;
    let present: std::collections::HashSet<String> =
        all.kvs().iter().filter_map(|kv| kv.key_str().ok().map(String::from)).collect();
    for key in &acked {
        assert!(present.contains(key), "acknowledged {key} is missing");
    }
    for &i in &survivors {
        wait_serving(&c, i, "load-", acked.len()).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn lagging_follower_catches_up_by_snapshot() -> anyhow::Result<()> {
    let opts =
        ClusterOptions::keel(3).args(&["--snapshot-count", "1000", "--experimental-snapshot-catchup-entries", "100"]);
    let mut c = Cluster::start_with(opts)?;
    let leader = c.leader(Duration::from_secs(10)).await?;
    let follower = (0..3).find(|&i| i != leader).unwrap_or(0);
    c.stop(follower)?;
    let survivors: Vec<String> = (0..3).filter(|&i| i != follower).map(|i| c.members[i].client_url.clone()).collect();
    let mut client = Client::connect(survivors, None).await?;
    for i in 0..10_000 {
        client.put(format!("bulk-{i:05}"), "0123456789", None).await?;
    }
    c.restart(follower)?;
    wait_serving(&c, follower, "bulk-", 10_000).await?;
    assert!(c.log(follower).contains("installed snapshot"), "the follower caught up without a snapshot");
    Ok(())
}
