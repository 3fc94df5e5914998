//! How long a member added to a loaded cluster takes to serve every key:
//! a 3-member cluster takes puts of large incompressible values for a
//! while, a fourth member is added with `member add` and started with
//! `--initial-cluster-state existing`, and the clock runs from its start
//! until a serializable count on it matches the keys written. The same
//! steps run against keel and against etcd (`keel-bench catch-up`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use keel_jepsen::cluster::{ClusterSpec, Db, Network};
use keel_proto::etcdserverpb::kv_client::KvClient;
use keel_proto::etcdserverpb::RangeRequest;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use crate::load::LoadConfig;
use crate::workloads::{self, Keys, Target};

/// One run's settings.
#[derive(Debug, Clone)]
pub struct CatchUpConfig {
    pub binary: PathBuf,
    pub run_dir: PathBuf,
    /// How long the load runs before the member is added.
    pub load: Duration,
    pub clients: usize,
    pub val_size: usize,
    pub key_space: u64,
    /// Flags for every member, on top of the cluster's own.
    pub extra_args: Vec<String>,
    /// How long the new member has to serve every key.
    pub deadline: Duration,
    pub progress: bool,
}

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct CatchUpReport {
    pub binary: String,
    pub puts: u64,
    pub put_errors: u64,
    pub keys: i64,
    /// Data dir of each original member when the new one starts, MiB.
    pub data_dir_mib: Vec<f64>,
    /// Seconds from the new member's start until it served every key;
    /// `None` if it did not within the deadline.
    pub serving_after_secs: Option<f64>,
    /// Keys the new member served when the run ended.
    pub keys_served: i64,
    /// Data dir of the new member at the end, MiB.
    pub new_member_data_dir_mib: f64,
}

/// A client of the member at `url`, connecting on first use (and again
/// after a failure), so it can be made before the member listens.
fn member_client(url: &str) -> Result<KvClient<Channel>> {
    Ok(KvClient::new(Endpoint::from_shared(url.to_string())?.connect_timeout(Duration::from_secs(1)).connect_lazy()))
}

/// The number of keys the member behind `kv` serves; `serializable`: what
/// the member itself holds, read without a quorum.
async fn count_keys(kv: &mut KvClient<Channel>, serializable: bool) -> Result<i64> {
    let req = RangeRequest {
        key: vec![0u8].into(),
        range_end: vec![0u8].into(),
        count_only: true,
        serializable,
        ..Default::default()
    };
    let resp = tokio::time::timeout(Duration::from_secs(5), kv.range(req)).await.context("count timed out")??;
    Ok(resp.into_inner().count)
}

/// Bytes under `p`, recursively.
pub fn dir_size(p: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(p) else { return 0 };
    entries
        .filter_map(|e| e.ok())
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Runs the scenario once against `cfg.binary`.
pub async fn catch_up(cfg: &CatchUpConfig) -> Result<CatchUpReport> {
    if cfg.run_dir.exists() {
        std::fs::remove_dir_all(&cfg.run_dir)?;
    }
    let mut extra_args: Vec<String> =
        ["--snapshot-count", "1000", "--quota-backend-bytes", "8589934592"].iter().map(|s| s.to_string()).collect();
    extra_args.extend(cfg.extra_args.iter().cloned());
    let spec = ClusterSpec {
        binary: cfg.binary.clone(),
        members: 3,
        run_dir: cfg.run_dir.clone(),
        extra_args,
        network: Network::Loopback,
    };
    let mut db = Db::start(spec).await.with_context(|| format!("cannot start {}", cfg.binary.display()))?;
    let result = measure(&mut db, cfg).await;
    db.stop_all();
    let _ = std::fs::remove_dir_all(&cfg.run_dir);
    result
}

async fn measure(db: &mut Db, cfg: &CatchUpConfig) -> Result<CatchUpReport> {
    let target = Target { endpoints: db.client_urls(), conns: cfg.clients.min(16), target_leader: false };
    let keys =
        Keys { key_size: 8, val_size: cfg.val_size, key_space: cfg.key_space, sequential: false, incompressible: true };
    let load = LoadConfig {
        name: "put".into(),
        clients: cfg.clients,
        total: None,
        duration: Some(cfg.load),
        rate: None,
        progress: cfg.progress,
    };
    let report = workloads::put(&target, &keys, &load).await?;
    let expected = count_keys(&mut member_client(&db.nodes[0].client_url)?, false).await?;
    let data_dir_mib = db.nodes.iter().map(|n| mib(dir_size(&n.data_dir))).collect();

    let client = db.client(Duration::from_secs(10)).await?;
    let new = db.define_member()?;
    let started = Instant::now();
    db.join(new, &client, false).await?;
    let mut joined = member_client(&db.nodes[new].client_url)?;
    let mut served = 0;
    let mut serving_after = None;
    let mut last_note = Instant::now();
    while started.elapsed() < cfg.deadline {
        if cfg.progress && last_note.elapsed() >= Duration::from_secs(1) {
            eprintln!("{:5.1} s: the new member serves {served} of {expected} keys", started.elapsed().as_secs_f64());
            last_note = Instant::now();
        }
        if !db.is_running(new) {
            bail!("the new member exited; its log is {}", db.nodes[new].log.display());
        }
        if let Ok(n) = count_keys(&mut joined, true).await {
            served = n;
            if n >= expected {
                serving_after = Some(started.elapsed().as_secs_f64());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(CatchUpReport {
        binary: cfg.binary.display().to_string(),
        puts: report.ops,
        put_errors: report.errors,
        keys: expected,
        data_dir_mib,
        serving_after_secs: serving_after,
        keys_served: served,
        new_member_data_dir_mib: mib(dir_size(&db.nodes[new].data_dir)),
    })
}

impl CatchUpReport {
    pub fn render(&self) -> String {
        let dirs: Vec<String> = self.data_dir_mib.iter().map(|d| format!("{d:.0}")).collect();
        let serving = match self.serving_after_secs {
            Some(s) => format!("{s:.1} s"),
            None => format!("not within the deadline ({} of {} keys)", self.keys_served, self.keys),
        };
        format!(
            "{}: {} puts ({} errors), {} keys, data dirs {} MiB; new member served every key after {}, its data dir {:.0} MiB",
            self.binary,
            self.puts,
            self.put_errors,
            self.keys,
            dirs.join("/"),
            serving,
            self.new_member_data_dir_mib
        )
    }
}
