//! keel against etcd on the same machine in the same run: two 3-member
//! clusters on loopback with equivalent settings, the same suite against
//! each, alternating which goes first, then memory and scale figures, and
//! a Markdown report.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use keel_jepsen::cluster::{ClusterSpec, Db, Network};
use keel_proto::etcdserverpb::kv_client::KvClient;
use keel_proto::etcdserverpb::watch_client::WatchClient;
use keel_proto::etcdserverpb::watch_request::RequestUnion;
use keel_proto::etcdserverpb::{PutRequest, RangeRequest, WatchCreateRequest, WatchRequest};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::catch_up::dir_size;
use crate::load::{LoadConfig, Report};
use crate::workloads::{self, Keys, Target, WatchLoad};

#[derive(Debug, Clone)]
pub struct CompareConfig {
    pub keel: PathBuf,
    pub etcd: PathBuf,
    pub run_dir: PathBuf,
    pub out: PathBuf,
    pub quick: bool,
    pub progress: bool,
    /// Run only the workloads whose name contains this, print their rows
    /// and write no report (for measuring one change).
    pub only: Option<String>,
}

/// Flags both systems get: fsync on every commit is the default of both;
/// the rest is pinned so neither runs on a different default.
const COMMON_FLAGS: &[&str] = &[
    "--snapshot-count",
    "100000",
    "--heartbeat-interval",
    "100",
    "--election-timeout",
    "1000",
    "--quota-backend-bytes",
    "8589934592",
];

struct System {
    name: &'static str,
    db: Db,
}

impl System {
    async fn start(name: &'static str, binary: &Path, run_dir: &Path) -> Result<System> {
        let dir = run_dir.join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        let spec = ClusterSpec {
            binary: binary.to_path_buf(),
            members: 3,
            run_dir: dir,
            extra_args: COMMON_FLAGS.iter().map(|s| s.to_string()).collect(),
            network: Network::Loopback,
        };
        let db = Db::start(spec).await.with_context(|| format!("cannot start the {name} cluster"))?;
        Ok(System { name, db })
    }

    fn target(&self, leader_only: bool) -> Target {
        Target { endpoints: self.db.client_urls(), conns: 16, target_leader: leader_only }
    }

    /// Member `i` alone, over `conns` connections.
    fn member_target(&self, i: usize, conns: usize) -> Target {
        Target { endpoints: vec![self.db.nodes[i].client_url.clone()], conns, target_leader: false }
    }

    fn rss_kib(&self, i: usize, field: &str) -> u64 {
        let Some(pid) = self.db.pid(i) else { return 0 };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    fn peak_rss_mib(&self) -> Vec<f64> {
        (0..self.db.len()).map(|i| self.rss_kib(i, "VmHWM:") as f64 / 1024.0).collect()
    }

    fn rss_mib(&self) -> Vec<f64> {
        (0..self.db.len()).map(|i| self.rss_kib(i, "VmRSS:") as f64 / 1024.0).collect()
    }

    fn disk_mib(&self) -> Vec<f64> {
        self.db.nodes.iter().map(|n| dir_size(&n.data_dir) as f64 / (1024.0 * 1024.0)).collect()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Pair {
    pub workload: String,
    pub keel: Report,
    pub etcd: Report,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Scale {
    pub keys: u64,
    pub load_seconds: [f64; 2],
    pub rss_mib: [f64; 2],
    pub disk_mib: [f64; 2],
    pub restart_seconds: [f64; 2],
    /// Idle watchers held on one member (in streams of 1000).
    pub watchers: usize,
    /// That member's RSS growth while holding them.
    pub watchers_rss_mib: [f64; 2],
    pub peak_rss_mib: [Vec<f64>; 2],
}

/// One benchmark of the suite.
#[derive(Clone)]
enum Bench {
    Put { clients: usize, total: u64 },
    Range { clients: usize, total: u64, serializable: bool },
    TxnMixed { clients: usize, total: u64 },
    Watch { watchers: usize, puts: u64 },
    WatchSteady { watchers: usize, rate: f64, puts: u64 },
    WatchLatency { puts: u64 },
    Keepalive { clients: usize, total: u64 },
    LeaseGrant { clients: usize, total: u64 },
    Kube { clients: usize, total: u64 },
    SteadyPut { rate: f64, seconds: u64, defrag: bool },
}

impl Bench {
    fn name(&self) -> String {
        match self {
            Bench::Put { clients, .. } => format!("put, {clients} clients"),
            Bench::Range { clients, serializable, .. } => {
                format!("range {}, {clients} clients", if *serializable { "serializable" } else { "linearizable" })
            }
            Bench::TxnMixed { clients, .. } => format!("txn-mixed 1:1, {clients} clients"),
            Bench::Watch { watchers, .. } => format!("watch fan-out, {watchers} watchers"),
            Bench::WatchSteady { watchers, rate, .. } => {
                format!("watch, {watchers} watchers on one member, {rate:.0} puts/s")
            }
            Bench::WatchLatency { .. } => "watch latency, 100 watchers".to_string(),
            Bench::Keepalive { clients, .. } => format!("lease-keepalive, {clients} clients"),
            Bench::LeaseGrant { clients, .. } => format!("lease grant+revoke, {clients} clients"),
            Bench::Kube { clients, .. } => format!("kube, {clients} clients"),
            Bench::SteadyPut { rate, defrag: false, .. } => format!("put {rate:.0}/s, 16 clients"),
            Bench::SteadyPut { rate, defrag: true, .. } => {
                format!("put {rate:.0}/s, 16 clients, defragmenting every member")
            }
        }
    }

    async fn run(&self, s: &System, progress: bool) -> Result<Report> {
        let keys = Keys { key_size: 8, val_size: 256, key_space: 10_000, sequential: false, incompressible: false };
        let cfg = |clients: usize, total: u64| LoadConfig {
            name: format!("{} {}", s.name, self.name()),
            clients,
            total: Some(total),
            duration: None,
            rate: None,
            progress,
        };
        let mut r = match self {
            Bench::Put { clients, total } => workloads::put(&s.target(true), &keys, &cfg(*clients, *total)).await?,
            Bench::Range { clients, total, serializable } => {
                let t = s.target(false);
                let mut kv = KvClient::new(workloads::Conns::open(&t).await?.channel(0));
                kv.put(PutRequest { key: "bench-range".into(), value: keys.value(), ..Default::default() }).await?;
                workloads::range(&t, "bench-range", *serializable, &cfg(*clients, *total)).await?
            }
            Bench::TxnMixed { clients, total } => {
                workloads::txn_mixed(&s.target(false), &keys, 1.0, false, &cfg(*clients, *total)).await?
            }
            Bench::WatchSteady { watchers, rate, puts } => {
                let load =
                    WatchLoad { streams: 100, watchers: *watchers, writers: 1, puts: *puts, put_rate: Some(*rate) };
                workloads::watch(&s.member_target(0, 16), &load, &self.name(), progress).await?
            }
            Bench::Watch { watchers, puts } => {
                let load = WatchLoad { streams: 100, watchers: *watchers, writers: 4, puts: *puts, put_rate: None };
                workloads::watch(&s.target(false), &load, &self.name(), progress).await?
            }
            Bench::WatchLatency { puts } => {
                let load = WatchLoad { streams: 10, watchers: 100, writers: 1, puts: *puts, put_rate: Some(200.0) };
                workloads::watch(&s.target(false), &load, &self.name(), progress).await?
            }
            Bench::Keepalive { clients, total } => {
                workloads::lease_keepalive(&s.target(false), &cfg(*clients, *total)).await?
            }
            Bench::LeaseGrant { clients, total } => {
                workloads::lease_grant_revoke(&s.target(false), &cfg(*clients, *total)).await?
            }
            Bench::Kube { clients, total } => {
                workloads::kube(&s.target(false), 500, 100, 1024, &cfg(*clients, *total)).await?
            }
            Bench::SteadyPut { rate, seconds, defrag } => {
                let steady = LoadConfig {
                    total: None,
                    duration: Some(Duration::from_secs(*seconds)),
                    rate: Some(*rate),
                    ..cfg(16, 0)
                };
                if *defrag {
                    workloads::put_during_defrag(&s.target(false), &keys, &steady).await?
                } else {
                    workloads::put(&s.target(false), &keys, &steady).await?
                }
            }
        };
        r.name = self.name();
        Ok(r)
    }
}

fn suite(quick: bool) -> Vec<Bench> {
    let k = |full: u64, q: u64| if quick { q } else { full };
    vec![
        Bench::Put { clients: 1, total: k(3_000, 1_000) },
        Bench::Put { clients: 16, total: k(20_000, 5_000) },
        Bench::Put { clients: 256, total: k(100_000, 20_000) },
        Bench::Range { clients: 1, total: k(10_000, 2_000), serializable: false },
        Bench::Range { clients: 256, total: k(200_000, 30_000), serializable: false },
        Bench::Range { clients: 256, total: k(200_000, 30_000), serializable: true },
        Bench::TxnMixed { clients: 64, total: k(60_000, 10_000) },
        Bench::Watch { watchers: 1_000, puts: k(2_000, 50) },
        Bench::Watch { watchers: 10_000, puts: k(1_000, 20) },
        Bench::Watch { watchers: 100_000, puts: k(20, 2) },
        Bench::WatchSteady { watchers: 1_000, rate: 200.0, puts: k(2_000, 200) },
        Bench::WatchSteady { watchers: 10_000, rate: 50.0, puts: k(500, 50) },
        Bench::WatchSteady { watchers: 100_000, rate: 5.0, puts: k(50, 5) },
        Bench::WatchLatency { puts: k(2_000, 400) },
        Bench::Keepalive { clients: 64, total: k(100_000, 20_000) },
        Bench::LeaseGrant { clients: 64, total: k(30_000, 5_000) },
        Bench::Kube { clients: 32, total: k(30_000, 5_000) },
        Bench::SteadyPut { rate: 1000.0, seconds: k(15, 8), defrag: false },
        Bench::SteadyPut { rate: 1000.0, seconds: k(15, 8), defrag: true },
    ]
}

pub async fn compare(cfg: CompareConfig) -> Result<()> {
    let started = Instant::now();
    std::fs::create_dir_all(&cfg.run_dir)?;
    let keel = System::start("keel", &cfg.keel, &cfg.run_dir).await?;
    let etcd = System::start("etcd", &cfg.etcd, &cfg.run_dir).await?;
    // Idle watchers first, on members that have not served any yet.
    let watchers = if cfg.quick { 10_000 } else { 100_000 };
    let watcher_rss = match cfg.only {
        Some(_) => [0.0; 2],
        None => [idle_watchers_rss(&keel, watchers).await?, idle_watchers_rss(&etcd, watchers).await?],
    };
    let mut pairs = Vec::new();
    println!("{}", Report::table_header());
    let selected =
        suite(cfg.quick).into_iter().filter(|b| cfg.only.as_ref().is_none_or(|o| b.name().contains(o.as_str())));
    for (i, bench) in selected.enumerate() {
        // Alternate which system goes first.
        let (k, e) = if i % 2 == 0 {
            let k = bench.run(&keel, cfg.progress).await?;
            (k, bench.run(&etcd, cfg.progress).await?)
        } else {
            let e = bench.run(&etcd, cfg.progress).await?;
            (bench.run(&keel, cfg.progress).await?, e)
        };
        for (sys, r) in [("keel", &k), ("etcd", &e)] {
            let mut row = r.clone();
            row.name = format!("{sys}: {}", r.name);
            println!("{}", row.table_row());
        }
        pairs.push(Pair { workload: bench.name(), keel: k, etcd: e });
    }
    if cfg.only.is_some() {
        for p in &pairs {
            println!("{}: keel/etcd {:.2}x", p.workload, p.keel.throughput / p.etcd.throughput.max(f64::MIN_POSITIVE));
        }
        return Ok(());
    }
    let mut systems = [keel, etcd];
    let scale =
        Scale { watchers, watchers_rss_mib: watcher_rss, ..scale(&mut systems, cfg.quick, cfg.progress).await? };
    let mut report = render(&cfg, &pairs, &scale, started.elapsed());
    // The hand-written analysis at the end of the report survives
    // regeneration.
    if let Ok(old) = std::fs::read_to_string(&cfg.out) {
        if let Some(at) = old.find("\n## Analysis") {
            report.push_str(&old[at..]);
        }
    }
    std::fs::write(&cfg.out, report)?;
    let rows: Vec<(String, f64)> = pairs
        .iter()
        .filter(|p| p.etcd.throughput > 0.0)
        .map(|p| (p.workload.clone(), p.keel.throughput / p.etcd.throughput))
        .collect();
    std::fs::write(cfg.out.with_file_name(CHART_FILE), crate::chart::throughput_ratios(&rows))?;
    let json = serde_json::json!({"pairs": pairs, "scale": scale});
    std::fs::write(cfg.run_dir.join("compare.json"), serde_json::to_string_pretty(&json)?)?;
    println!("wrote {} in {:.0} s", cfg.out.display(), started.elapsed().as_secs_f64());
    Ok(())
}

/// RSS growth of member 0 while it holds `watchers` idle watchers, 1000
/// per stream (on a member that has not served watchers before, so freed
/// memory is not reused), in MiB.
async fn idle_watchers_rss(s: &System, watchers: usize) -> Result<f64> {
    let before = s.rss_kib(0, "VmRSS:");
    let ch = workloads::Conns::open(&s.member_target(0, 1)).await?.channel(0);
    let mut held = Vec::new();
    let per_stream = 1000;
    for st in 0..watchers.div_ceil(per_stream) {
        let (tx, rx) = mpsc::unbounded_channel();
        for w in 0..per_stream {
            let _ = tx.send(WatchRequest {
                request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                    key: Bytes::from(format!("idle-watch-{st}-{w}")),
                    ..Default::default()
                })),
            });
        }
        let mut stream = WatchClient::new(ch.clone())
            .watch(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
            .await?
            .into_inner();
        let mut created = 0;
        while created < per_stream {
            match stream.message().await? {
                Some(r) if r.created => created += 1,
                Some(_) => {}
                None => break,
            }
        }
        held.push((tx, stream));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = s.rss_kib(0, "VmRSS:");
    drop(held);
    Ok(after.saturating_sub(before) as f64 / 1024.0)
}

/// Memory and scale: many keys (RSS, disk, load time), then the time a
/// restarted member takes to serve reads.
async fn scale(systems: &mut [System; 2], quick: bool, progress: bool) -> Result<Scale> {
    let mut out = Scale { keys: if quick { 100_000 } else { 1_000_000 }, ..Default::default() };
    for (i, s) in systems.iter_mut().enumerate() {
        // Many keys of 256 bytes.
        let keys = Keys { key_size: 16, val_size: 256, key_space: out.keys, sequential: true, incompressible: false };
        let cfg = LoadConfig {
            name: format!("{} load {} keys", s.name, out.keys),
            clients: 256,
            total: Some(out.keys),
            duration: None,
            rate: None,
            progress,
        };
        let r = workloads::put(&s.target(true), &keys, &cfg).await?;
        out.load_seconds[i] = r.seconds;
        tokio::time::sleep(Duration::from_secs(2)).await;
        out.rss_mib[i] = s.rss_mib().into_iter().fold(0.0, f64::max);
        out.disk_mib[i] = s.disk_mib().into_iter().fold(0.0, f64::max);
        out.peak_rss_mib[i] = s.peak_rss_mib();

        // Restart a member holding the keys; time until it serves a read.
        let victim = 2;
        s.db.kill(victim)?;
        let t0 = Instant::now();
        s.db.start_member(victim).await?;
        // start_member returned on the readiness marker, so one connection
        // serves every attempt.
        let mut kv = KvClient::new(workloads::Conns::open(&s.member_target(victim, 1)).await?.channel(0));
        while kv.range(RangeRequest { key: "0".into(), serializable: true, ..Default::default() }).await.is_err()
            && t0.elapsed() < Duration::from_secs(300)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        out.restart_seconds[i] = t0.elapsed().as_secs_f64();
    }
    Ok(out)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpu
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("")
        .trim()
        .to_string();
    let cores = cpu.lines().filter(|l| l.starts_with("processor")).count();
    let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let total =
        mem.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} cores ({model}), {:.0} GiB RAM, Linux {}", total as f64 / 1048576.0, kernel.trim())
}

/// The throughput chart, written next to the report.
const CHART_FILE: &str = "benchmarks-ratios.svg";

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}x", a / b)
    } else {
        "-".to_string()
    }
}

fn render(cfg: &CompareConfig, pairs: &[Pair], scale: &Scale, took: Duration) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Benchmarks: keel against etcd\n");
    let _ = writeln!(
        s,
        "Generated by `make bench-compare{}` ({}), which ran in {:.0} s. Both systems ran as 3-member clusters \
         on loopback on the same machine at the same time, with the same flags ({}; both fsync every commit), \
         and the same load (`keel-bench`, speaking etcd's gRPC API, 16 HTTP/2 connections spread over the members; \
         writes go to the leader). Each benchmark ran against both clusters back to back, alternating which went first.\n",
        if cfg.quick { " QUICK=1" } else { "" },
        if cfg.quick { "quick mode: smaller totals" } else { "full mode" },
        took.as_secs_f64(),
        COMMON_FLAGS.join(" ")
    );
    let _ = writeln!(s, "- machine: {}", machine());
    let _ = writeln!(s, "- keel: `{}`; etcd: `{}` (Debian etcd-server 3.4)", cfg.keel.display(), cfg.etcd.display());
    let _ = writeln!(s, "- values are 256 bytes unless said; ratios are keel/etcd (throughput: higher is better for keel; latency: lower is better for keel)\n");
    let _ = writeln!(s, "## Throughput and latency\n");
    let _ = writeln!(s, "| workload | keel ops/s | etcd ops/s | throughput ratio | keel p50 ms | etcd p50 ms | keel p99 ms | etcd p99 ms | p99 ratio | errors keel/etcd |");
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for p in pairs {
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.0} | **{}** | {:.2} | {:.2} | {:.2} | {:.2} | {} | {}/{} |",
            p.workload,
            p.keel.throughput,
            p.etcd.throughput,
            ratio(p.keel.throughput, p.etcd.throughput),
            p.keel.p50_ms,
            p.etcd.p50_ms,
            p.keel.p99_ms,
            p.etcd.p99_ms,
            ratio(p.keel.p99_ms, p.etcd.p99_ms),
            p.keel.errors,
            p.etcd.errors
        );
    }
    let _ = writeln!(s, "\n![keel's throughput as a multiple of etcd's, per workload]({CHART_FILE})");
    let _ =
        writeln!(s, "\nWatch rows count delivered events (watchers x puts) per second and put-to-delivery latency; fan-out rows write as fast as the cluster takes, steady rows at a fixed put rate with every watcher on member 0.\n");
    let _ = writeln!(s, "## Memory, disk and restart\n");
    let _ = writeln!(s, "| figure | keel | etcd | ratio |");
    let _ = writeln!(s, "|---|---:|---:|---:|");
    let row = |s: &mut String, name: &str, v: [f64; 2], unit: &str| {
        let _ = writeln!(s, "| {name} | {:.1} {unit} | {:.1} {unit} | **{}** |", v[0], v[1], ratio(v[0], v[1]));
    };
    row(
        &mut s,
        &format!("RSS of {} idle watchers (one member, 1000 per stream)", scale.watchers),
        scale.watchers_rss_mib,
        "MiB",
    );
    let per_watcher = scale.watchers_rss_mib.map(|m| m * 1048576.0 / scale.watchers.max(1) as f64);
    row(&mut s, "memory per idle watcher", per_watcher, "bytes");
    row(&mut s, &format!("time to load {} keys (256 clients)", scale.keys), scale.load_seconds, "s");
    row(&mut s, &format!("RSS with {} keys (largest member)", scale.keys), scale.rss_mib, "MiB");
    row(&mut s, &format!("data dir with {} keys (largest member)", scale.keys), scale.disk_mib, "MiB");
    row(&mut s, &format!("restart to serving reads, {} keys", scale.keys), scale.restart_seconds, "s");
    let peak = |v: &Vec<f64>| v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(" / ");
    let _ = writeln!(
        s,
        "| peak RSS per member over the whole run (MiB) | {} | {} | |",
        peak(&scale.peak_rss_mib[0]),
        peak(&scale.peak_rss_mib[1])
    );
    let _ = writeln!(s, "\nRaw figures: `{}`.", cfg.run_dir.join("compare.json").display());
    s
}
