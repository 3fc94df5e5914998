//! `keel-jepsen`: run workloads against a cluster under faults, or re-check
//! a saved history.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use keel_jepsen::checker::Validity;
use keel_jepsen::cluster::Network;
use keel_jepsen::history::read_jsonl;
use keel_jepsen::nemesis::{parse_faults, Fault};
use keel_jepsen::run::{overall, run, write_outputs, RunConfig};
use keel_jepsen::workload::Workload;

#[derive(Parser)]
#[command(name = "keel-jepsen", about = "Fault injection and history checking for keel (or etcd)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a cluster, run workloads under faults, check the histories.
    Run(RunArgs),
    /// Re-check a saved history.jsonl.
    Check {
        history: PathBuf,
        #[arg(long)]
        workload: String,
    },
    /// Check every history in a corpus directory; names say what to
    /// expect: `<workload>--valid--...jsonl` or
    /// `<workload>--anomaly-<type>--...jsonl`.
    Selftest { corpus: PathBuf },
}

#[derive(clap::Args)]
struct RunArgs {
    /// register, append, watch, lease, lock, kube, or all (one after another).
    #[arg(long, default_value = "register")]
    workload: String,
    /// Comma-separated faults, "all" or "none": kill, pause, partition,
    /// drop, delay, clock, membership, learner, compaction, corrupt.
    #[arg(long, default_value = "kill,pause,partition")]
    faults: String,
    /// Seconds of workload (per workload).
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Target operations per second.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    #[arg(long, default_value_t = 3)]
    members: usize,
    /// The server binary: keel or etcd.
    #[arg(long, default_value = "target/release/keel")]
    binary: PathBuf,
    #[arg(long, default_value = "target/jepsen")]
    run_dir: PathBuf,
    #[arg(long)]
    seed: Option<u64>,
    /// Bytes in every value the register and kube workloads write: the
    /// value's text padded with incompressible bytes (large values make
    /// catch-up after the membership and learner faults move real data).
    #[arg(long, default_value_t = 0)]
    value_size: usize,
    /// etcd's --snapshot-count for every member (small values exercise
    /// snapshot installation).
    #[arg(long)]
    snapshot_count: Option<u64>,
    /// --experimental-snapshot-catchup-entries for every member: with a
    /// small --snapshot-count, a small value makes a rejoining member
    /// catch up by snapshot (etcd 3.4 lacks the flag).
    #[arg(long)]
    snapshot_catchup_entries: Option<u64>,
    /// How members are networked: namespaces (root; iptables/tc faults),
    /// proxies (a loopback address per member and a fault-injecting proxy
    /// on every peer link), loopback (no network faults), or auto
    /// (namespaces when root, else proxies).
    #[arg(long, default_value = "auto")]
    network: String,
    /// Network slot (0-200): lets runs proceed side by side on separate
    /// bridges and subnets (10.77.<slot>.0/24).
    #[arg(long, default_value_t = 0)]
    net_slot: usize,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt.block_on(dispatch(cli.command)),
        Err(e) => Err(e.into()),
    };
    match result {
        Ok(Validity::Valid) => ExitCode::SUCCESS,
        Ok(Validity::Invalid) => ExitCode::from(1),
        Ok(Validity::Unknown) => ExitCode::from(2),
        Err(e) => {
            eprintln!("keel-jepsen: {e:#}");
            ExitCode::from(3)
        }
    }
}

async fn dispatch(command: Command) -> Result<Validity> {
    match command {
        Command::Run(args) => run_all(args).await,
        Command::Check { history, workload } => {
            let w = Workload::parse(&workload).with_context(|| format!("unknown workload {workload:?}"))?;
            let entries = read_jsonl(&history)?;
            let verdicts = w.check(&entries);
            println!("{}", serde_json::to_string_pretty(&verdicts)?);
            if let Some(dir) = history.parent() {
                write_outputs(dir, &entries, &verdicts, w.name())?;
            }
            Ok(overall(&verdicts))
        }
        Command::Selftest { corpus } => selftest(&corpus),
    }
}

async fn run_all(args: RunArgs) -> Result<Validity> {
    keel_jepsen::cluster::set_network_slot(args.net_slot);
    let mut faults = parse_faults(&args.faults)?;
    let network = match args.network.as_str() {
        "auto" => Network::best_available(),
        "namespaces" if keel_jepsen::cluster::can_isolate() => Network::Namespaces,
        "namespaces" => bail!("--network namespaces needs root, ip and iptables"),
        "proxies" => Network::Proxies,
        "loopback" => Network::Loopback,
        other => bail!("unknown --network {other:?} (auto, namespaces, proxies, loopback)"),
    };
    if network == Network::Loopback {
        let dropped: Vec<&str> = faults.iter().filter(|f| f.is_network()).map(|f| f.name()).collect();
        if !dropped.is_empty() {
            eprintln!("keel-jepsen: --network loopback; skipping {}", dropped.join(", "));
        }
        faults.retain(|f| !f.is_network());
    }
    let workloads: Vec<Workload> = if args.workload == "all" {
        Workload::ALL.to_vec()
    } else {
        args.workload
            .split(',')
            .map(|w| Workload::parse(w).with_context(|| format!("unknown workload {w:?}")))
            .collect::<Result<_>>()?
    };
    if !args.binary.exists() {
        bail!("server binary {} not found (build it with `make build`)", args.binary.display());
    }
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_secs())
    });
    let mut extra_args = Vec::new();
    if let Some(n) = args.snapshot_count {
        extra_args.extend(["--snapshot-count".to_string(), n.to_string()]);
    }
    if let Some(n) = args.snapshot_catchup_entries {
        extra_args.extend(["--experimental-snapshot-catchup-entries".to_string(), n.to_string()]);
    }
    let mut verdicts = Vec::new();
    let mut reports = Vec::new();
    for w in workloads {
        let mut faults = faults.clone();
        if w == Workload::Watch {
            // The ground truth is a replay of the whole history, which
            // compaction would erase; the kube workload covers watches
            // under compaction.
            faults.retain(|f| *f != Fault::Compaction);
        }
        let cfg = RunConfig {
            binary: args.binary.clone(),
            members: args.members,
            dir: args.run_dir.clone(),
            workload: w,
            faults,
            duration: Duration::from_secs(args.duration),
            rate: args.rate,
            value_size: args.value_size,
            concurrency: args.concurrency.max(1),
            seed,
            extra_args: extra_args.clone(),
            network,
        };
        let report = run(cfg).await?;
        println!("{}", report.summary());
        verdicts.extend(report.verdicts.clone());
        reports.push(report);
    }
    let v = overall(&verdicts);
    println!("overall: {v:?} (seed {seed})");
    Ok(v)
}

/// Checks every history of a corpus against the verdict its name promises.
fn selftest(corpus: &std::path::Path) -> Result<Validity> {
    let results = keel_jepsen::corpus::check_corpus(corpus)?;
    for r in &results {
        println!("{} {}: {:?} {:?}", if r.ok { "ok  " } else { "FAIL" }, r.name, r.got, r.anomalies);
    }
    let failures = results.iter().filter(|r| !r.ok).count();
    println!("{} histories, {failures} unexpected verdicts", results.len());
    Ok(if failures == 0 && !results.is_empty() { Validity::Valid } else { Validity::Invalid })
}
