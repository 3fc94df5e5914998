//! keel as etcd 3.5, 3.6 and 3.7: what each release added to the API
//! (Downgrade, Status' new fields, RangeStream, progress requests that
//! 3.6 drops, /livez and /readyz) and the flags 3.6 renamed, driven
//! through gRPC and HTTP against real keel processes.

use std::process::Command;
use std::time::{Duration, Instant};

use keel_proto::etcdserverpb::downgrade_request::DowngradeAction;
use keel_proto::etcdserverpb::kv_client::KvClient;
use keel_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use keel_proto::etcdserverpb::range_request::SortOrder;
use keel_proto::etcdserverpb::{DowngradeRequest, PutRequest, RangeRequest, StatusRequest};
use keel_tests::{keel_bin, Cluster, ClusterOptions};
use tonic::Code;

fn curl(args: &[&str]) -> anyhow::Result<(u16, String)> {
    let out = Command::new("curl").args(["-s", "-m", "5", "-w", "\n%{http_code}"]).args(args).output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or((&text, "0"));
    Ok((code.parse().unwrap_or(0), body.to_string()))
}

async fn downgrade(
    m: &mut MaintenanceClient<tonic::transport::Channel>,
    action: DowngradeAction,
    version: &str,
) -> Result<String, tonic::Status> {
    let req = DowngradeRequest { action: action as i32, version: version.into() };
    m.downgrade(req).await.map(|r| r.into_inner().version)
}

#[tokio::test(flavor = "multi_thread")]
async fn downgrade_follows_etcds_rules_and_shows_in_status() -> anyhow::Result<()> {
    let c = Cluster::start_with(ClusterOptions::keel(1).args(&["--advertise-etcd-version", "3.7.4"]))?;
    let mut m = MaintenanceClient::connect(c.members[0].client_url.clone()).await?;
    let status = m.status(StatusRequest {}).await?.into_inner();
    assert_eq!(status.version, "3.7.4");
    assert_eq!(status.storage_version, "3.7.0");
    assert_eq!(status.db_size_quota, 2 << 30);
    assert!(status.downgrade_info.is_some_and(|d| !d.enabled));

    assert_eq!(downgrade(&mut m, DowngradeAction::Validate, "3.6").await?, "3.7");
    let wrong = downgrade(&mut m, DowngradeAction::Validate, "3.5").await.unwrap_err();
    assert_eq!(
        (wrong.code(), wrong.message()),
        (Code::InvalidArgument, "etcdserver: invalid downgrade target version")
    );
    let bad = downgrade(&mut m, DowngradeAction::Validate, "three").await.unwrap_err();
    assert_eq!(bad.message(), "etcdserver: wrong downgrade target version format");

    assert_eq!(downgrade(&mut m, DowngradeAction::Enable, "3.6.2").await?, "3.7");
    let info = m.status(StatusRequest {}).await?.into_inner().downgrade_info.unwrap_or_default();
    assert!(info.enabled);
    assert_eq!(info.target_version, "3.6.0");
    let busy = downgrade(&mut m, DowngradeAction::Validate, "3.6").await.unwrap_err();
    assert_eq!(
        (busy.code(), busy.message()),
        (Code::FailedPrecondition, "etcdserver: cluster has a downgrade job in progress")
    );
    assert_eq!(downgrade(&mut m, DowngradeAction::Cancel, "").await?, "3.7");
    assert!(m.status(StatusRequest {}).await?.into_inner().downgrade_info.is_some_and(|d| !d.enabled));
    // Cancelling with nothing in flight still succeeds, as in etcd.
    assert_eq!(downgrade(&mut m, DowngradeAction::Cancel, "").await?, "3.7");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_member_restarts_as_the_previous_release_only_during_a_downgrade() -> anyhow::Result<()> {
    let mut c = Cluster::start_with(ClusterOptions::keel(1).args(&[
        "--advertise-etcd-version",
        "3.7.4",
        "--downgrade-check-time",
        "100ms",
    ]))?;
    let base = c.members[0].client_url.clone();
    assert_eq!(
        curl(&[&format!("{base}/version")])?.1,
        r#"{"etcdserver":"3.7.4","etcdcluster":"3.7.0","storage":"3.7.0"}"#
    );
    c.stop(0)?;
    let refused = c.restart_with(0, &["--advertise-etcd-version", "3.6.17"]).unwrap_err();
    assert!(format!("{refused:#}").contains("server version is lower than determined cluster version"), "{refused:#}");

    c.restart_with(0, &["--advertise-etcd-version", "3.7.4"])?;
    let mut m = MaintenanceClient::connect(base.clone()).await?;
    downgrade(&mut m, DowngradeAction::Enable, "3.6").await?;
    c.stop(0)?;
    c.restart_with(0, &["--advertise-etcd-version", "3.6.17"])?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !c.log(0).contains("the cluster has been downgraded") {
        anyhow::ensure!(Instant::now() < deadline, "downgrade never finished:\n{}", c.log(0));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut m = MaintenanceClient::connect(base.clone()).await?;
    let status = m.status(StatusRequest {}).await?.into_inner();
    assert!(status.downgrade_info.is_some_and(|d| !d.enabled));
    assert_eq!(status.storage_version, "3.6.0");
    assert_eq!(
        curl(&[&format!("{base}/version")])?.1,
        r#"{"etcdserver":"3.6.17","etcdcluster":"3.6.0","storage":"3.6.0"}"#
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn range_stream_sends_growing_chunks_with_the_header_last() -> anyhow::Result<()> {
    let c = Cluster::start_with(ClusterOptions::keel(1).args(&["--advertise-etcd-version", "3.7.4"]))?;
    let mut kv = KvClient::connect(c.members[0].client_url.clone()).await?;
    for i in 0..500 {
        kv.put(PutRequest { key: format!("k{i:04}").into(), value: vec![b'v'; 100].into(), ..Default::default() })
            .await?;
    }
    let all = RangeRequest { key: "k".into(), range_end: "l".into(), ..Default::default() };
    let mut stream = kv.range_stream(all.clone()).await?.into_inner();
    let mut chunks = Vec::new();
    while let Some(chunk) = stream.message().await? {
        chunks.push(chunk.range_response.unwrap_or_default());
    }
    assert!(chunks.len() > 2, "{} chunks", chunks.len());
    assert_eq!(chunks[0].kvs.len(), 10, "the first chunk reads 10 keys");
    assert!(chunks[1].kvs.len() > 10, "chunks grow while small");
    let (last, rest) = chunks.split_last().expect("chunks");
    assert!(rest.iter().all(|c| c.header.is_none() && c.count == 0 && !c.more));
    assert_eq!(last.count, 500);
    assert!(!last.more);
    let header = last.header.unwrap_or_default();
    assert_eq!(header.revision, 501);
    assert_ne!(header.member_id, 0);
    let keys: Vec<_> = chunks.iter().flat_map(|c| c.kvs.iter().map(|kv| kv.key.clone())).collect();
    let whole = kv.range(all.clone()).await?.into_inner();
    assert_eq!(keys, whole.kvs.iter().map(|kv| kv.key.clone()).collect::<Vec<_>>());

    // A limit: `more` and the count of the whole range, in the last chunk.
    let mut limited = kv.range_stream(RangeRequest { limit: 25, ..all.clone() }).await?.into_inner();
    let mut got = 0;
    let mut last = Default::default();
    while let Some(chunk) = limited.message().await? {
        last = chunk.range_response.unwrap_or_default();
        got += last.kvs.len();
    }
    assert_eq!((got, last.more, last.count), (25, true, 500));

    let refused = kv.range_stream(RangeRequest { sort_order: SortOrder::Descend as i32, ..all.clone() }).await;
    let refused = match refused {
        Err(s) => s,
        Ok(r) => r.into_inner().message().await.expect_err("refused"),
    };
    assert_eq!(
        (refused.code(), refused.message()),
        (Code::Unimplemented, "RangeStream does not support custom sort orders")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn releases_before_3_7_and_3_5_lack_range_stream_and_downgrade() -> anyhow::Result<()> {
    let c = Cluster::start_with(ClusterOptions::keel(1).args(&["--advertise-etcd-version", "3.4.23"]))?;
    let mut kv = KvClient::connect(c.members[0].client_url.clone()).await?;
    let req = RangeRequest { key: "k".into(), ..Default::default() };
    let refused = match kv.range_stream(req).await {
        Err(s) => s,
        Ok(r) => r.into_inner().message().await.expect_err("refused"),
    };
    assert_eq!(refused.code(), Code::Unimplemented);
    let mut m = MaintenanceClient::connect(c.members[0].client_url.clone()).await?;
    assert_eq!(downgrade(&mut m, DowngradeAction::Validate, "3.3").await.unwrap_err().code(), Code::Unimplemented);
    let status = m.status(StatusRequest {}).await?.into_inner();
    assert_eq!((status.storage_version.as_str(), status.downgrade_info), ("", None));
    Ok(())
}

#[test]
fn health_livez_and_readyz_answer_as_3_6() -> anyhow::Result<()> {
    let c = Cluster::start_with(ClusterOptions::keel(1).args(&["--advertise-etcd-version", "3.6.17"]))?;
    let base = c.members[0].client_url.clone();
    assert_eq!(curl(&[&format!("{base}/health")])?, (200, r#"{"health":"true","reason":""}"#.into()));
    assert_eq!(curl(&[&format!("{base}/health?serializable=true")])?.0, 200);
    assert_eq!(curl(&[&format!("{base}/livez")])?, (200, "ok\n".into()));
    assert_eq!(curl(&[&format!("{base}/readyz")])?, (200, "ok\n".into()));
    let verbose = curl(&[&format!("{base}/readyz?verbose&exclude=non_learner")])?;
    assert_eq!(verbose, (200, "[+]data_corruption ok\n[+]linearizable_read ok\n[+]serializable_read ok\nok\n".into()));
    assert_eq!(curl(&[&format!("{base}/readyz/linearizable_read")])?, (200, "ok\n".into()));
    assert_eq!(curl(&[&format!("{base}/livez/nonsense")])?.0, 404);
    Ok(())
}

#[test]
fn renamed_flags_take_both_names_until_3_7() -> anyhow::Result<()> {
    let c = Cluster::start_with(ClusterOptions::keel(1).args(&[
        "--advertise-etcd-version",
        "3.6.17",
        "--experimental-compaction-batch-limit=50",
        "--snapshot-catchup-entries=100",
        "--feature-gates=InitialCorruptCheck=true",
    ]))?;
    assert!(c.log(0).contains("--experimental-compaction-batch-limit is deprecated in v3.6"), "{}", c.log(0));
    drop(c);
    let out = Command::new(keel_bin())
        .args(["--advertise-etcd-version", "3.7.4", "--experimental-compaction-batch-limit=50"])
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("flag provided but not defined: -experimental-compaction-batch-limit"), "{stderr}");
    let out = Command::new(keel_bin()).args(["--feature-gates=NoSuchGate=true"]).output()?;
    assert!(String::from_utf8_lossy(&out.stderr).contains("unrecognized feature gate: NoSuchGate"));
    Ok(())
}
