//! Restart and crash durability: every acknowledged write survives a clean
//! stop and a kill -9, with its exact revision, and the revision counter
//! continues where it was.

use etcd_client::{Client, GetOptions};
use keel_tests::Cluster;

async fn write_keys(c: &Cluster, n: usize) -> anyhow::Result<Vec<(String, i64)>> {
    let mut client = Client::connect([c.members[0].client_url.as_str()], None).await?;
    let mut acked = Vec::new();
    for i in 0..n {
        let key = format!("key-{i:05}");
        let resp = client.put(key.clone(), format!("value-{i}"), None).await?;
        acked.push((key, resp.header().map(|h| h.revision()).unwrap_or(0)));
    }
    Ok(acked)
}

async fn check_keys(c: &Cluster, acked: &[(String, i64)]) -> anyhow::Result<i64> {
    let mut client = Client::connect([c.members[0].client_url.as_str()], None).await?;
    let resp = client.get("key-", Some(GetOptions::new().with_prefix())).await?;
    assert_eq!(resp.kvs().len(), acked.len(), "every acknowledged key is present");
    for (kv, (key, rev)) in resp.kvs().iter().zip(acked) {
        assert_eq!(kv.key_str()?, key);
        assert_eq!(kv.mod_revision(), *rev, "{key} keeps its revision");
    }
    Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_writes_survive_kill_9_and_clean_stop() -> anyhow::Result<()> {
    let mut c = Cluster::start(1)?;
    let mut acked = write_keys(&c, 300).await?;
    assert_eq!(acked.last().map(|a| a.1), Some(301));

    c.kill(0)?;
    c.restart(0)?;
    let rev = check_keys(&c, &acked).await?;
    assert_eq!(rev, 301);

    // The revision continues after the crash.
    let mut client = Client::connect([c.members[0].client_url.as_str()], None).await?;
    let r = client.put("key-after", "x", None).await?;
    assert_eq!(r.header().map(|h| h.revision()), Some(302));
    acked.push(("key-after".into(), 302));

    // A clean stop ends every task of the member, even with a Watch
    // stream open and a client connected that never says a word; a file
    // left in the scratch directory is gone after the restart.
    let _watch = client.watch("key-", Some(etcd_client::WatchOptions::new().with_prefix())).await?;
    let client_addr = c.members[0].client_url.trim_start_matches("http://").to_string();
    let _silent = std::net::TcpStream::connect(&client_addr)?;
    let scratch = c.members[0].data_dir.join("member").join("tmp");
    std::fs::write(scratch.join("backup-7.tmp"), b"left by a crash")?;
    let status = c.stop(0)?;
    assert!(status.success(), "SIGTERM stops cleanly: {status}");
    let log = c.log(0);
    assert!(log.contains("stopped keel member"), "no clean stop in the log:\n{log}");
    assert!(!log.contains("tasks still running"), "a task outlived the stop:\n{log}");
    c.restart(0)?;
    assert_eq!(std::fs::read_dir(&scratch)?.count(), 0, "the scratch directory was not swept");
    check_keys(&c, &acked).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_during_continuous_writes_loses_no_acknowledged_write() -> anyhow::Result<()> {
    let mut c = Cluster::start(1)?;
    let url = c.members[0].client_url.clone();
    let writer = tokio::spawn(async move {
        let mut acked = Vec::new();
        let Ok(mut client) = Client::connect([url.as_str()], None).await else {
            return acked;
        };
        for i in 0.. {
            let key = format!("key-{i:05}");
            match client.put(key.clone(), "v", None).await {
                Ok(resp) => acked.push((key, resp.header().map(|h| h.revision()).unwrap_or(0))),
                Err(_) => break,
            }
        }
        acked
    });
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    c.kill(0)?;
    let acked = writer.await?;
    assert!(!acked.is_empty());
    c.restart(0)?;
    let mut client = Client::connect([c.members[0].client_url.as_str()], None).await?;
    for (key, rev) in &acked {
        let resp = client.get(key.as_str(), None).await?;
        assert_eq!(resp.kvs().first().map(|kv| kv.mod_revision()), Some(*rev), "{key} was acknowledged");
    }
    Ok(())
}

/// The newest file in `dir` with extension `ext`.
fn newest(dir: &std::path::Path, ext: &str) -> anyhow::Result<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    files.sort();
    files.pop().ok_or_else(|| anyhow::anyhow!("no .{ext} file in {}", dir.display()))
}

/// Cuts the last 4 KiB of RocksDB's newest write-ahead log: what a disk
/// that dropped synced data leaves.
fn cut_rocksdb_log(c: &Cluster) -> anyhow::Result<()> {
    let wal = newest(&c.members[0].data_dir.join("member").join("db"), "log")?;
    let len = std::fs::metadata(&wal)?.len();
    assert!(len > 8192, "the log holds the writes ({len} bytes)");
    std::fs::OpenOptions::new().write(true).open(&wal)?.set_len(len - 4096)?;
    Ok(())
}

/// Regression (found by the Jepsen harness): a member whose write-ahead log
/// lost acknowledged records (a truncated file, a disk that dropped synced
/// data) came back at an earlier state, resumed leadership with a shorter
/// log and served stale reads. It must refuse to start instead.
#[tokio::test(flavor = "multi_thread")]
async fn member_refuses_to_start_on_a_log_that_lost_acknowledged_writes() -> anyhow::Result<()> {
    let mut c = Cluster::start(1)?;
    let acked = write_keys(&c, 200).await?;
    c.kill(0)?;
    // RocksDB's log alone losing its tail loses nothing: the Raft log
    // journal has every acknowledged entry and is replayed.
    cut_rocksdb_log(&c)?;
    c.restart(0)?;
    let rev = check_keys(&c, &acked).await?;
    assert!(rev >= 200, "revision {rev}");

    // Both losing their tails: acknowledged entries are gone for good.
    write_keys(&c, 200).await?;
    c.kill(0)?;
    cut_rocksdb_log(&c)?;
    let journal = newest(&c.members[0].data_dir.join("member").join("journal"), "journal")?;
    let mut bytes = std::fs::read(&journal)?;
    // Segments are allocated in full: the records end where the zeros start.
    let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
    assert!(end > 8192, "the journal holds the writes ({end} bytes)");
    // Whole sectors, as a disk loses them: the record cut in two reads as
    // torn (ends the journal), not as damage (which refuses for another
    // reason).
    let from = (end - 4096) / 512 * 512;
    bytes[from..end].fill(0);
    std::fs::write(&journal, &bytes)?;
    assert!(c.restart(0).is_err(), "the member must not start");
    let log = c.log(0);
    assert!(log.contains("lost acknowledged data"), "says why: {}", log.lines().last().unwrap_or(""));
    Ok(())
}
