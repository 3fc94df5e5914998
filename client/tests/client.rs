//! keel-client against real keel processes: CRUD, txn builder, error
//! classification, lease keepalive, and a watch that survives the member
//! it is connected to being killed.

use std::time::Duration;

use keel_client::{Client, Compare, Op, Txn, WatchEvent, WatchOptions};
use keel_tests::Cluster;

#[tokio::test(flavor = "multi_thread")]
async fn kv_txn_errors_and_leases() -> anyhow::Result<()> {
    let c = Cluster::start(1)?;
    let client = Client::connect([c.members[0].client_url.as_str()]).await?;
    client.put("k", "v1").await?;
    assert_eq!(client.get("k").await?.map(|kv| kv.value), Some("v1".into()));
    let cas = Txn::new().when([Compare::value("k", "=", "v1")]).and_then([Op::put("k", "v2")]).or_else([Op::get("k")]);
    assert!(client.txn(cas.clone()).await?.succeeded);
    assert!(!client.txn(cas).await?.succeeded, "second CAS sees v2");

    let err = client
        .range(keel_client::etcdserverpb::RangeRequest { key: "k".into(), revision: 999, ..Default::default() })
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("future revision accepted"))?;
    assert!(err.is_definite(), "a rejected request did not happen: {err}");

    let lease = client.lease_grant(3).await?;
    client
        .put_req(keel_client::etcdserverpb::PutRequest {
            key: "l".into(),
            value: "x".into(),
            lease: lease.id,
            ..Default::default()
        })
        .await?;
    let keep = client.keep_alive(lease.id, Duration::from_millis(500));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(client.get("l").await?.is_some(), "kept alive past its TTL");
    drop(keep);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(client.get("l").await?.is_none(), "expired once keepalives stopped");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_resumes_on_another_member_without_gap_or_duplicate() -> anyhow::Result<()> {
    let mut c = Cluster::start(3)?;
    let eps: Vec<String> = c.members.iter().map(|m| m.client_url.clone()).collect();
    let client = Client::connect(&eps).await?;
    let writer = Client::connect(&eps).await?;
    let mut w = client.watch("w/", WatchOptions::prefix(b"w/")).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..50 {
        writer.put(format!("w/{i}"), "x").await?;
    }
    // The watcher is on endpoint 0: kill it mid-stream.
    c.kill(0)?;
    for i in 50..100 {
        loop {
            if writer.put(format!("w/{i}"), "x").await.is_ok() {
                break;
            }
        }
    }
    let mut seen = Vec::new();
    let mut resumed = false;
    while seen.len() < 100 {
        match tokio::time::timeout(Duration::from_secs(20), w.next()).await? {
            Some(WatchEvent::Events { events, .. }) => seen.extend(
                events.into_iter().filter_map(|e| e.kv.map(|kv| String::from_utf8_lossy(&kv.key).into_owned())),
            ),
            Some(WatchEvent::Resumed { .. }) => resumed = true,
            Some(_) => {}
            None => anyhow::bail!("watch ended"),
        }
    }
    assert!(resumed);
    let want: Vec<String> = (0..100).map(|i| format!("w/{i}")).collect();
    assert_eq!(seen, want, "every write exactly once, in order");
    Ok(())
}
