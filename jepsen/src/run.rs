//! One run, end to end: start the cluster, run the workload with the
//! nemesis beside it, heal, check convergence, write the history, judge it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::json;
use tokio::sync::Mutex;

use crate::checker::{Validity, Verdict};
use crate::cluster::{ClusterSpec, Db, Network};
use crate::history::{write_jsonl, Entry, Recorder};
use crate::nemesis::{Fault, Nemesis};
use crate::workload::{Ctx, Workload};

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub binary: PathBuf,
    pub members: usize,
    pub dir: PathBuf,
    pub workload: Workload,
    pub faults: Vec<Fault>,
    pub duration: Duration,
    pub rate: f64,
    /// Size of the values the register and kube workloads write (0: as
    /// short as their text).
    pub value_size: usize,
    pub concurrency: usize,
    pub seed: u64,
    pub extra_args: Vec<String>,
    pub network: Network,
}

pub struct Report {
    pub workload: Workload,
    pub dir: PathBuf,
    pub ops: usize,
    pub faults: usize,
    pub verdicts: Vec<Verdict>,
    pub runtime: Duration,
}

impl Report {
    /// Valid only if every checker said so; unknown is not a pass.
    pub fn validity(&self) -> Validity {
        overall(&self.verdicts)
    }

    pub fn summary(&self) -> String {
        let mut counts: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
        for t in self.verdicts.iter().flat_map(|v| v.anomaly_types()) {
            *counts.entry(t).or_default() += 1;
        }
        let anomalies: Vec<String> = counts.iter().map(|(t, n)| format!("{t} x{n}")).collect();
        format!(
            "{:<9} {:?}: {} ops, {} faults, {:.0} s, checkers {} [{}]{}",
            self.workload.name(),
            self.validity(),
            self.ops,
            self.faults,
            self.runtime.as_secs_f64(),
            self.verdicts
                .iter()
                .map(|v| format!("{}={:?}/{}ms", v.checker, v.valid, v.millis))
                .collect::<Vec<_>>()
                .join(" "),
            self.dir.display(),
            if anomalies.is_empty() { String::new() } else { format!(" anomalies: {}", anomalies.join(",")) }
        )
    }
}

pub fn overall(verdicts: &[Verdict]) -> Validity {
    if verdicts.iter().any(|v| v.valid == Validity::Invalid) {
        Validity::Invalid
    } else if verdicts.is_empty() || verdicts.iter().any(|v| v.valid == Validity::Unknown) {
        Validity::Unknown
    } else {
        Validity::Valid
    }
}

pub async fn run(cfg: RunConfig) -> Result<Report> {
    let started = Instant::now();
    let dir = cfg.dir.join(cfg.workload.name());
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    let spec = ClusterSpec {
        binary: cfg.binary.clone(),
        members: cfg.members,
        run_dir: dir.clone(),
        extra_args: cfg.extra_args.clone(),
        network: cfg.network,
    };
    let db = Db::start(spec).await?;
    let client = db.client(Duration::from_secs(5)).await?;
    let db = Arc::new(Mutex::new(db));
    {
        let mut d = db.lock().await;
        d.wait_healthy(&client, Duration::from_secs(60)).await?;
    }
    let rec = Recorder::new();
    rec.nemesis("setup", json!({"members": cfg.members, "workload": cfg.workload.name(), "faults": cfg.faults.iter().map(|f| f.name()).collect::<Vec<_>>(), "seed": cfg.seed}));
    let until = Instant::now() + cfg.duration;
    let (healed_tx, healed_rx) = tokio::sync::watch::channel(false);
    let nemesis = Nemesis::new(db.clone(), client.clone(), rec.clone(), cfg.faults.clone(), cfg.seed);
    let nemesis_db = db.clone();
    let nemesis_client = client.clone();
    let nemesis_task = tokio::spawn(async move {
        let result = nemesis.run(until).await;
        let healthy = nemesis_db.lock().await.wait_healthy(&nemesis_client, Duration::from_secs(90)).await;
        let _ = healed_tx.send(true);
        result.and_then(|n| healthy.map(|_| n))
    });
    let ctx = Ctx {
        client: client.clone(),
        rec: rec.clone(),
        members: cfg.members,
        concurrency: cfg.concurrency,
        rate: cfg.rate,
        value_size: cfg.value_size,
        until,
        seed: cfg.seed,
        healed: healed_rx,
    };
    let workload_result = cfg.workload.run(ctx).await;
    let faults = match nemesis_task.await? {
        Ok(n) => n,
        Err(e) => {
            rec.nemesis("nemesis", json!({"phase": "error", "error": e.to_string()}));
            0
        }
    };
    if let Err(e) = &workload_result {
        rec.nemesis("workload", json!({"phase": "error", "error": e.to_string()}));
    }
    hash_members(&client, &rec, cfg.members).await;
    let entries = rec.entries();
    write_jsonl(&dir.join("history.jsonl"), &entries)?;
    let verdicts = cfg.workload.check(&entries);
    write_outputs(&dir, &entries, &verdicts, cfg.workload.name())?;
    // Stops the members (and tears the network down) now, not at exit.
    drop(db);
    let report = Report {
        workload: cfg.workload,
        dir,
        ops: crate::history::ops(&entries).len(),
        faults,
        verdicts,
        runtime: started.elapsed(),
    };
    workload_result?;
    Ok(report)
}

/// Writes verdicts.json and timeline.svg next to the history.
pub fn write_outputs(dir: &std::path::Path, entries: &[Entry], verdicts: &[Verdict], title: &str) -> Result<()> {
    std::fs::write(dir.join("verdicts.json"), serde_json::to_string_pretty(verdicts)?)?;
    std::fs::write(dir.join("timeline.svg"), crate::timeline::render(entries, title))?;
    Ok(())
}

/// Every member hashes its state at one revision that all have applied.
async fn hash_members(client: &keel_client::Client, rec: &Recorder, members: usize) {
    let Ok(rev) = crate::workload::watch::current_revision(client).await else { return };
    for i in 0..members {
        // Wait until the member has applied `rev`.
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            match client.status(i).await {
                Ok(s) if s.header.as_ref().is_some_and(|h| h.revision >= rev) => break,
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        let p = rec.invoke(4_000_000 + i, "hashkv", json!({"member": i, "rev": rev}));
        match client.hash_kv(i, rev).await {
            Ok(r) => {
                p.ok(json!({"hash": r.hash, "compact_revision": r.compact_revision}));
            }
            Err(e) => {
                p.error(&e);
            }
        }
    }
}
