//! `keel-bench`: etcd's benchmark tool, reimplemented for keel and etcd.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use keel_bench::catch_up::{catch_up, CatchUpConfig};
use keel_bench::compare::{compare, CompareConfig};
use keel_bench::load::{LoadConfig, Report};
use keel_bench::workloads::{self, Keys, Target, WatchLoad};

#[derive(Parser)]
#[command(name = "keel-bench", about = "Benchmark an etcd-compatible cluster (keel or etcd)")]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct Common {
    /// Comma-separated client URLs.
    #[arg(long, global = true, default_value = "http://127.0.0.1:2379", value_delimiter = ',')]
    endpoints: Vec<String>,
    /// HTTP/2 connections, shared by the clients.
    #[arg(long, global = true, default_value_t = 1)]
    conns: usize,
    /// Concurrent clients.
    #[arg(long, global = true, default_value_t = 1)]
    clients: usize,
    /// Operations to issue (default 10000 unless --duration is given).
    #[arg(long, global = true)]
    total: Option<u64>,
    /// Seconds to run instead of a total.
    #[arg(long, global = true)]
    duration: Option<u64>,
    /// Operations per second over all clients (0: unlimited).
    #[arg(long, global = true, default_value_t = 0.0)]
    rate: f64,
    #[arg(long, global = true, default_value_t = 8)]
    key_size: usize,
    #[arg(long, global = true, default_value_t = 8)]
    val_size: usize,
    #[arg(long, global = true, default_value_t = 1)]
    key_space_size: u64,
    #[arg(long, global = true)]
    sequential_keys: bool,
    /// Random bytes in every value (no storage can compress them).
    #[arg(long, global = true)]
    incompressible_values: bool,
    /// Send everything to the leader.
    #[arg(long, global = true)]
    target_leader: bool,
    /// Print the result as JSON.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Puts.
    Put,
    /// Gets of one key.
    Range {
        #[arg(default_value = "foo")]
        key: String,
        /// l: linearizable, s: serializable.
        #[arg(long, default_value = "l")]
        consistency: String,
    },
    /// Txns of puts.
    TxnPut {
        #[arg(long, default_value_t = 1)]
        txn_ops: usize,
    },
    /// Txns of reads and writes.
    TxnMixed {
        /// Reads per write.
        #[arg(long, default_value_t = 1.0)]
        rw_ratio: f64,
        #[arg(long, default_value = "l")]
        consistency: String,
    },
    /// Watch fan-out: many watchers of one key, some writers.
    Watch {
        #[arg(long, default_value_t = 10)]
        streams: usize,
        #[arg(long, default_value_t = 1000)]
        watchers: usize,
        #[arg(long, default_value_t = 1)]
        writers: usize,
        #[arg(long, default_value_t = 100)]
        puts: u64,
    },
    /// Put-to-delivery latency at a fixed put rate.
    WatchLatency {
        #[arg(long, default_value_t = 10)]
        streams: usize,
        #[arg(long, default_value_t = 100)]
        watchers: usize,
        #[arg(long, default_value_t = 100.0)]
        put_rate: f64,
        #[arg(long, default_value_t = 1000)]
        puts: u64,
    },
    /// Lease keepalive round trips.
    LeaseKeepalive,
    /// Lease churn: grant then revoke, per operation.
    LeaseGrant,
    /// Puts while every member is defragmented in turn (after a compaction).
    PutDuringDefrag,
    /// The Kubernetes API server's storage traffic.
    Kube {
        #[arg(long, default_value_t = 1000)]
        objects: u64,
        #[arg(long, default_value_t = 500)]
        page_size: i64,
    },
    /// A member added to a loaded cluster: time until it serves every key.
    /// Loads a 3-member cluster of each binary with --clients puts of
    /// incompressible --val-size values over --key-space-size keys for
    /// --duration seconds (default 40), then adds and starts a fourth.
    CatchUp {
        /// Server binaries to measure, one after the other (keel, etcd).
        #[arg(long = "binary", required = true)]
        binaries: Vec<PathBuf>,
        #[arg(long, default_value = "target/catch-up")]
        run_dir: PathBuf,
        /// Extra flags for every member.
        #[arg(long, allow_hyphen_values = true, value_delimiter = ' ')]
        member_args: Vec<String>,
        /// Seconds the new member has to serve every key.
        #[arg(long, default_value_t = 600)]
        deadline: u64,
    },
    /// keel against etcd, side by side; writes docs/BENCHMARKS.md.
    Compare {
        #[arg(long, default_value = "target/release/keel")]
        keel: PathBuf,
        #[arg(long, default_value = "/usr/bin/etcd")]
        etcd: PathBuf,
        #[arg(long, default_value = "target/bench-compare")]
        run_dir: PathBuf,
        #[arg(long, default_value = "docs/BENCHMARKS.md")]
        out: PathBuf,
        /// Smaller totals: under 5 minutes.
        #[arg(long)]
        quick: bool,
        /// Only the workloads whose name contains this (e.g. "watch
        /// fan-out"); prints their rows and writes no report.
        #[arg(long)]
        only: Option<String>,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = tokio::runtime::Runtime::new().map_err(anyhow::Error::from).and_then(|rt| rt.block_on(dispatch(cli)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keel-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> Result<()> {
    let c = cli.common;
    let target = Target { endpoints: c.endpoints.clone(), conns: c.conns, target_leader: c.target_leader };
    let keys = Keys {
        key_size: c.key_size,
        val_size: c.val_size,
        key_space: c.key_space_size,
        sequential: c.sequential_keys,
        incompressible: c.incompressible_values,
    };
    let cfg = |name: &str| LoadConfig {
        name: name.to_string(),
        clients: c.clients,
        total: match (c.total, c.duration) {
            (Some(t), _) => Some(t),
            (None, Some(_)) => None,
            (None, None) => Some(10_000),
        },
        duration: c.duration.map(Duration::from_secs),
        rate: (c.rate > 0.0).then_some(c.rate),
        progress: !c.json,
    };
    let report = match cli.command {
        Command::Put => workloads::put(&target, &keys, &cfg("put")).await?,
        Command::Range { key, consistency } => {
            workloads::range(&target, &key, consistency == "s", &cfg("range")).await?
        }
        Command::TxnPut { txn_ops } => workloads::txn_put(&target, &keys, txn_ops, &cfg("txn-put")).await?,
        Command::TxnMixed { rw_ratio, consistency } => {
            workloads::txn_mixed(&target, &keys, rw_ratio, consistency == "s", &cfg("txn-mixed")).await?
        }
        Command::Watch { streams, watchers, writers, puts } => {
            let load = WatchLoad { streams, watchers, writers, puts, put_rate: None };
            workloads::watch(&target, &load, "watch", !c.json).await?
        }
        Command::WatchLatency { streams, watchers, put_rate, puts } => {
            let load = WatchLoad { streams, watchers, writers: 1, puts, put_rate: Some(put_rate) };
            workloads::watch(&target, &load, "watch-latency", !c.json).await?
        }
        Command::LeaseKeepalive => workloads::lease_keepalive(&target, &cfg("lease-keepalive")).await?,
        Command::LeaseGrant => workloads::lease_grant_revoke(&target, &cfg("lease-grant")).await?,
        Command::PutDuringDefrag => workloads::put_during_defrag(&target, &keys, &cfg("put-during-defrag")).await?,
        Command::Kube { objects, page_size } => {
            workloads::kube(&target, objects, page_size, c.val_size, &cfg("kube")).await?
        }
        Command::CatchUp { binaries, run_dir, member_args, deadline } => {
            for binary in binaries {
                let cfg = CatchUpConfig {
                    binary,
                    run_dir: run_dir.clone(),
                    load: Duration::from_secs(c.duration.unwrap_or(40)),
                    clients: c.clients,
                    val_size: c.val_size,
                    key_space: c.key_space_size,
                    extra_args: member_args.iter().filter(|a| !a.is_empty()).cloned().collect(),
                    deadline: Duration::from_secs(deadline),
                    progress: !c.json,
                };
                let report = catch_up(&cfg).await?;
                if c.json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    println!("{}", report.render());
                }
            }
            return Ok(());
        }
        Command::Compare { keel, etcd, run_dir, out, quick, only } => {
            return compare(CompareConfig { keel, etcd, run_dir, out, quick, progress: !c.json, only }).await;
        }
    };
    if c.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}\n{}", Report::table_header(), report.table_row());
        if let Some(e) = &report.first_error {
            println!("first error: {e}");
        }
    }
    Ok(())
}
