//! What an operator does with keel: backups under load restored into a
//! new three-member cluster, the space quota and its alarm, defragment,
//! auto compaction, hash agreement, /metrics, /health and the JSON
//! gateway.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions};
use keel_tests::{keel_bin, Cluster, ClusterOptions};

async fn all_keys(client: &mut Client, rev: i64) -> anyhow::Result<BTreeMap<String, (String, i64, i64, i64)>> {
    let mut opts = GetOptions::new().with_prefix();
    if rev > 0 {
        opts = opts.with_revision(rev);
    }
    let resp = client.get("", Some(opts.with_from_key())).await?;
    Ok(resp
        .kvs()
        .iter()
        .map(|kv| {
            let v = (kv.value_str().unwrap_or("").to_string(), kv.create_revision(), kv.mod_revision(), kv.version());
            (kv.key_str().unwrap_or("").to_string(), v)
        })
        .collect())
}

#[tokio::test(flavor = "multi_thread")]
async fn backup_under_load_restores_into_a_new_three_member_cluster() -> anyhow::Result<()> {
    let source = Cluster::start(1)?;
    let url = source.members[0].client_url.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let writer_stop = stop.clone();
    let writer_url = url.clone();
    let writer = tokio::spawn(async move {
        let mut c = Client::connect([writer_url.as_str()], None).await?;
        let mut i = 0u64;
        while !writer_stop.load(Ordering::Relaxed) {
            c.put(format!("load/{:05}", i % 2000), format!("v{i}"), None).await?;
            i += 1;
        }
        anyhow::Ok(i)
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let backup = tempfile::NamedTempFile::new()?;
    let path = backup.path().display().to_string();
    let saved = source.etcdctl(&["snapshot", "save", &path])?;
    assert!(saved.contains("Snapshot saved"), "{saved}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let writes = writer.await??;
    assert!(writes > 100);

    let status = Command::new(keel_bin()).args(["snapshot", "status", &path, "-w", "json"]).output()?;
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let status: serde_json::Value = serde_json::from_slice(&status.stdout)?;
    let rev = status["revision"].as_i64().unwrap_or(0);
    assert!(rev > 1);

    let restored = Cluster::start_with(ClusterOptions {
        restore_from: Some(backup.path().to_path_buf()),
        ..ClusterOptions::keel(3)
    })?;
    let mut src = Client::connect([url.as_str()], None).await?;
    let want = all_keys(&mut src, rev).await?;
    for i in 0..3 {
        let mut dst = Client::connect([restored.members[i].client_url.as_str()], None).await?;
        let resp = dst.get("load/", Some(GetOptions::new().with_prefix().with_limit(1))).await?;
        assert_eq!(resp.header().map(|h| h.revision()), Some(rev), "member {i} starts at the backup's revision");
        assert_eq!(all_keys(&mut dst, 0).await?, want, "member {i} has every key with its revisions");
    }
    // The restored cluster takes writes and continues the revision.
    let mut dst = Client::connect([restored.members[0].client_url.as_str()], None).await?;
    let put = dst.put("after-restore", "x", None).await?;
    assert_eq!(put.header().map(|h| h.revision()), Some(rev + 1));

    // A damaged backup is refused.
    let bytes = std::fs::read(backup.path())?;
    std::fs::write(backup.path(), &bytes[..bytes.len() / 2])?;
    let dir = tempfile::tempdir()?;
    let out = Command::new(keel_bin())
        .args(["snapshot", "restore", &path, "--data-dir"])
        .arg(dir.path().join("x"))
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("truncated"), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn quota_raises_nospace_and_compaction_defrag_disarm_recover() -> anyhow::Result<()> {
    let c = Cluster::start_with(ClusterOptions::keel(1).args(&["--quota-backend-bytes", "300000"]))?;
    let mut client = Client::connect([c.members[0].client_url.as_str()], None).await?;
    let value = "x".repeat(10_000);
    let mut last_ok = 0;
    let mut err = String::new();
    for i in 0..200 {
        match client.put(format!("big/{i}"), value.clone(), None).await {
            Ok(_) => last_ok = i,
            Err(e) => {
                err = e.to_string();
                break;
            }
        }
    }
    assert!(err.contains("etcdserver: mvcc: database space exceeded"), "after {last_ok} puts: {err}");
    let alarms = c.etcdctl(&["alarm", "list"])?;
    assert!(alarms.contains("alarm:NOSPACE"), "{alarms}");
    // Reads and deletes still work; writes do not.
    assert_eq!(client.get("big/0", None).await?.kvs().len(), 1);
    client.delete("big/", Some(etcd_client::DeleteOptions::new().with_prefix())).await?;
    assert!(client.put("more", "x", None).await.is_err());

    let rev = client.get("more", None).await?.header().map(|h| h.revision()).unwrap_or(0);
    client.compact(rev, None).await?;
    c.etcdctl(&["defrag"])?;
    c.etcdctl(&["alarm", "disarm"])?;
    assert_eq!(c.etcdctl(&["alarm", "list"])?, "");
    client.put("more", "x", None).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn periodic_auto_compaction_drops_old_history() -> anyhow::Result<()> {
    let c = Cluster::start_with(ClusterOptions::keel(1).args(&[
        "--auto-compaction-mode",
        "periodic",
        "--auto-compaction-retention",
        "2s",
    ]))?;
    let mut client = Client::connect([c.members[0].client_url.as_str()], None).await?;
    client.put("k", "1", None).await?;
    client.put("k", "2", None).await?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let old = client.get("k", Some(GetOptions::new().with_revision(2))).await;
        if old.is_err() {
            assert!(old.err().map(|e| e.to_string()).unwrap_or_default().contains("compacted"));
            break;
        }
        assert!(Instant::now() < deadline, "history was never compacted");
        client.put("tick", "x", None).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}

#[test]
fn hashkv_agrees_across_members_and_corrupt_check_passes() -> anyhow::Result<()> {
    let c = Cluster::start_with(ClusterOptions::keel(3).args(&["--experimental-corrupt-check-time", "1s"]))?;
    for i in 0..50 {
        c.etcdctl(&["put", &format!("k{i}"), "v"])?;
    }
    c.etcdctl(&["del", "k1"])?;
    c.etcdctl(&["compaction", "20"])?;
    c.etcdctl(&["put", "after", "x"])?;
    std::thread::sleep(Duration::from_millis(500));
    let out = c.etcdctl(&["endpoint", "hashkv", "-w", "json"])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let hashes: Vec<i64> =
        v.as_array().map(|a| a.iter().map(|e| e["HashKV"]["hash"].as_i64().unwrap_or(0)).collect()).unwrap_or_default();
    assert_eq!(hashes.len(), 3);
    assert!(hashes.iter().all(|h| *h == hashes[0] && *h != 0), "{out}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(c.etcdctl(&["alarm", "list"])?, "", "no CORRUPT alarm for agreeing members");
    Ok(())
}

/// --advertise-etcd-version changes every place the version shows, so a
/// Kubernetes API server can be told keel has etcd 3.5.13's RequestProgress.
#[test]
fn advertised_etcd_version_is_configurable() -> anyhow::Result<()> {
    let c = Cluster::start_with(ClusterOptions::keel(1).args(&["--advertise-etcd-version", "3.5.13"]))?;
    let base = c.members[0].client_url.clone();
    let status = c.etcdctl(&["endpoint", "status", "-w", "json"])?;
    assert!(status.contains(r#""version":"3.5.13""#), "{status}");
    assert_eq!(curl(&[&format!("{base}/version")])?, r#"{"etcdserver":"3.5.13","etcdcluster":"3.5.0"}"#);
    let metrics = curl(&[&format!("{base}/metrics")])?;
    assert!(metrics.contains(r#"etcd_server_version{server_version="3.5.13"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"etcd_cluster_version{cluster_version="3.5"} 1"#));

    // `--version` answers in etcd's shape, with the version reported.
    for (args, env, version) in [
        (&["--version"][..], None, "3.4.23"),
        (&["--advertise-etcd-version", "3.5.13", "--version"][..], None, "3.5.13"),
        (&["--version"][..], Some("3.6.17"), "3.6.17"),
    ] {
        let mut cmd = Command::new(keel_bin());
        cmd.args(args).env_remove("ETCD_ADVERTISE_ETCD_VERSION");
        if let Some(v) = env {
            cmd.env("ETCD_ADVERTISE_ETCD_VERSION", v);
        }
        let out = cmd.output()?;
        assert!(out.status.success(), "{args:?}: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.lines().next(), Some(format!("etcd Version: {version}").as_str()), "{text}");
        assert!(text.lines().any(|l| l.starts_with("keel Version: ")), "{text}");
    }

    let bad = Command::new(keel_bin()).args(["--advertise-etcd-version", "4.0"]).output()?;
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not an etcd 3.x version"));
    Ok(())
}

fn curl(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("curl").args(["-s", "-m", "5"]).args(args).output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn metrics_health_version_and_json_gateway() -> anyhow::Result<()> {
    let c = Cluster::start(1)?;
    let base = c.members[0].client_url.clone();
    c.etcdctl(&["put", "k", "v"])?;
    c.etcdctl(&["del", "k"])?;
    let metrics = curl(&[&format!("{base}/metrics")])?;
    for want in [
        "etcd_mvcc_put_total 1",
        "etcd_mvcc_delete_total 1",
        "etcd_server_has_leader 1",
        "etcd_server_is_leader 1",
        r#"etcd_server_version{server_version="3.4.23"} 1"#,
        r#"etcd_cluster_version{cluster_version="3.4"} 1"#,
        r#"grpc_server_handled_total{grpc_code="OK",grpc_method="Put",grpc_service="etcdserverpb.KV",grpc_type="unary"} 1"#,
        "etcd_disk_wal_fsync_duration_seconds_count",
        "etcd_disk_backend_commit_duration_seconds_count",
        "etcd_mvcc_db_total_size_in_bytes",
        "etcd_server_quota_backend_bytes 2147483648",
    ] {
        assert!(metrics.contains(want), "missing {want:?} in /metrics");
    }
    assert_eq!(curl(&[&format!("{base}/health")])?, r#"{"health":"true"}"#);
    assert_eq!(curl(&[&format!("{base}/version")])?, r#"{"etcdserver":"3.4.23","etcdcluster":"3.4.0"}"#);
    assert_eq!(curl(&[&format!("{base}/livez")])?, "ok\n");

    // grpc-gateway JSON: base64 bytes, int64 as strings, proto field names.
    let put = curl(&["-X", "POST", &format!("{base}/v3/kv/put"), "-d", r#"{"key":"Zm9v","value":"YmFy"}"#])?;
    assert!(put.contains(r#""revision":"4""#), "{put}");
    let range = curl(&["-X", "POST", &format!("{base}/v3beta/kv/range"), "-d", r#"{"key":"Zm9v"}"#])?;
    assert!(range.contains(r#""kvs":[{"key":"Zm9v","create_revision":"4","mod_revision":"4","version":"1","value":"YmFy"}],"count":"1""#), "{range}");
    let txn = curl(&[
        "-X",
        "POST",
        &format!("{base}/v3/kv/txn"),
        "-d",
        r#"{"compare":[{"key":"Zm9v","result":"EQUAL","target":"VALUE","value":"YmFy"}],"success":[{"request_put":{"key":"Zm9v","value":"YmF6"}}]}"#,
    ])?;
    assert!(txn.contains(r#""succeeded":true"#), "{txn}");
    let err = curl(&["-X", "POST", &format!("{base}/v3/kv/range"), "-d", r#"{"key":"Zm9v","revision":"99"}"#])?;
    assert!(err.contains(r#""code":11"#) && err.contains("required revision is a future revision"), "{err}");
    let grant = curl(&["-X", "POST", &format!("{base}/v3/lease/grant"), "-d", r#"{"TTL":"30"}"#])?;
    assert!(grant.contains(r#""TTL":"30""#), "{grant}");
    let watch = curl(&[
        "-N",
        "-m",
        "2",
        "-X",
        "POST",
        &format!("{base}/v3/watch"),
        "-d",
        r#"{"create_request":{"key":"Zm9v","start_revision":"4"}}"#,
    ])?;
    assert!(watch.contains(r#""result":{"header""#) && watch.contains(r#""value":"YmFy""#), "{watch}");
    Ok(())
}

/// `--grpc-keepalive-min-time` as grpc-go enforces it: two early pings are
/// tolerated, the third closes the connection; pings spaced by at least
/// the minimum time are always answered.
#[tokio::test]
async fn clients_pinging_faster_than_keepalive_min_time_are_cut_off() -> anyhow::Result<()> {
    async fn pings(url: &str, count: usize, gap: Duration) -> anyhow::Result<usize> {
        let tcp = tokio::net::TcpStream::connect(url.trim_start_matches("http://")).await?;
        let (_send, mut conn) = h2::client::handshake(tcp).await?;
        let mut pong = conn.ping_pong().ok_or_else(|| anyhow::anyhow!("no ping handle"))?;
        let driver = tokio::spawn(conn);
        let mut answered = 0;
        for _ in 0..count {
            match tokio::time::timeout(Duration::from_secs(5), pong.ping(h2::Ping::opaque())).await {
                Ok(Ok(_)) => answered += 1,
                _ => break,
            }
            tokio::time::sleep(gap).await;
        }
        driver.abort();
        Ok(answered)
    }

    let strict = Cluster::start(1)?; // etcd's default minimum: 5 s
    assert_eq!(pings(&strict.members[0].client_url, 6, Duration::ZERO).await?, 3);

    let lax = Cluster::start_with(ClusterOptions::keel(1).args(&["--grpc-keepalive-min-time", "50ms"]))?;
    assert_eq!(pings(&lax.members[0].client_url, 6, Duration::from_millis(100)).await?, 6);
    Ok(())
}

#[test]
fn bad_runtime_settings_in_the_environment_fail_fast() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("data");
    for (var, value, says) in [
        ("TOKIO_WORKER_THREADS", "0", "invalid TOKIO_WORKER_THREADS \"0\""),
        ("TOKIO_WORKER_THREADS", "many", "invalid TOKIO_WORKER_THREADS \"many\""),
        ("KEEL_BUSY_POLL_US", "soon", "invalid KEEL_BUSY_POLL_US \"soon\""),
    ] {
        let out = Command::new(keel_bin()).env(var, value).arg("--data-dir").arg(&data_dir).output()?;
        assert_eq!(out.status.code(), Some(2), "{var}={value}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{var}={value}: {stderr}");
        assert!(!data_dir.exists(), "{var}={value} created the data dir");
    }
    Ok(())
}
