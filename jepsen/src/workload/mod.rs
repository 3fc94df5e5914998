//! Workloads: concurrent clients that drive the cluster while the nemesis
//! injects faults, recording every operation in the history. Each workload
//! has a main phase (until the deadline) and a final phase that runs once
//! the nemesis has healed the cluster (final reads, ground-truth watches),
//! and names the checkers that judge its history.

pub mod append;
pub mod kube;
pub mod lease;
pub mod lock;
pub mod register;
pub mod watch;

use std::time::{Duration, Instant};

use anyhow::Result;
use keel_client::Client;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tokio::sync::watch as signal;

use crate::checker::{self, Verdict};
use crate::history::{Entry, Outcome, Pending, Recorder};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// Linearizable read/write/cas registers.
    Register,
    /// Elle list-append transactions (strict serializability).
    Append,
    /// Watch guarantees against the ground-truth history.
    Watch,
    /// Lease expiry, revocation, keepalive.
    Lease,
    /// Lock service with fenced writes.
    Lock,
    /// What the Kubernetes API server does: guarded updates, paged lists,
    /// informers, compaction.
    Kube,
}

impl Workload {
    pub const ALL: [Workload; 6] =
        [Workload::Register, Workload::Append, Workload::Watch, Workload::Lease, Workload::Lock, Workload::Kube];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Register => "register",
            Workload::Append => "append",
            Workload::Watch => "watch",
            Workload::Lease => "lease",
            Workload::Lock => "lock",
            Workload::Kube => "kube",
        }
    }

    pub fn parse(s: &str) -> Option<Workload> {
        Workload::ALL.into_iter().find(|w| w.name() == s)
    }

    /// Drives the workload: main phase until `ctx.until`, then the final
    /// phase after the cluster healed.
    pub async fn run(self, ctx: Ctx) -> Result<()> {
        match self {
            Workload::Register => register::run(ctx).await,
            Workload::Append => append::run(ctx).await,
            Workload::Watch => watch::run(ctx).await,
            Workload::Lease => lease::run(ctx).await,
            Workload::Lock => lock::run(ctx).await,
            Workload::Kube => kube::run(ctx).await,
        }
    }

    /// Judges a history of this workload.
    pub fn check(self, entries: &[Entry]) -> Vec<Verdict> {
        let ops = crate::history::ops(entries);
        let mut verdicts = match self {
            Workload::Register => vec![checker::register::check_registers(&ops, Duration::from_secs(60))],
            Workload::Append => vec![checker::elle::check_append(&ops)],
            Workload::Watch => checker::watch::check_watch(&ops),
            Workload::Lease => vec![checker::lease::check_leases(entries)],
            Workload::Lock => vec![checker::lock::check_lock(&ops)],
            Workload::Kube => checker::kube::check_kube(&ops),
        };
        if ops.iter().any(|o| o.f == "hashkv") {
            verdicts.push(checker::convergence(&ops));
        }
        verdicts
    }
}

/// What every workload gets.
#[derive(Clone)]
pub struct Ctx {
    /// A client over every member.
    pub client: Client,
    pub rec: Recorder,
    pub members: usize,
    pub concurrency: usize,
    /// Target operations per second, over all workers.
    pub rate: f64,
    /// Bytes in each value the register and kube workloads write
    /// ([`crate::wire::padded`]).
    pub value_size: usize,
    /// End of the main phase.
    pub until: Instant,
    pub seed: u64,
    /// Becomes true once the nemesis has healed the cluster.
    pub healed: signal::Receiver<bool>,
}

impl Ctx {
    pub fn worker(&self, id: usize) -> Worker {
        let member = id % self.members.max(1);
        Worker {
            id,
            process: id,
            concurrency: self.concurrency,
            member,
            members: self.members.max(1),
            all: self.client.clone(),
            client: self.client.pinned(member),
            rng: StdRng::seed_from_u64(self.seed.wrapping_mul(1_000_003).wrapping_add(id as u64)),
            pace: Duration::from_secs_f64(self.concurrency as f64 / self.rate.max(0.1)),
            value_size: self.value_size,
            until: self.until,
            rec: self.rec.clone(),
        }
    }

    /// Waits until the nemesis has healed everything.
    pub async fn wait_healed(&self) {
        let mut rx = self.healed.clone();
        let _ = rx.wait_for(|h| *h).await;
    }
}

/// One logical client. It talks to one member (so faults on that member
/// are seen by it) and moves to the next member when its member is
/// unreachable. After an operation of unknown outcome it takes a new
/// process id, as Jepsen does: a process never has two operations in
/// flight.
pub struct Worker {
    pub id: usize,
    pub process: usize,
    concurrency: usize,
    pub member: usize,
    members: usize,
    /// A client over every member, for operations that may go anywhere.
    pub all: Client,
    /// A client pinned to `member`.
    pub client: Client,
    pub rng: StdRng,
    pace: Duration,
    /// See [`Ctx::value_size`].
    pub value_size: usize,
    until: Instant,
    pub rec: Recorder,
}

impl Worker {
    pub fn running(&self) -> bool {
        Instant::now() < self.until
    }

    /// Sleeps between operations so the workers together keep the rate.
    pub async fn pace(&mut self) {
        let d = self.pace.mul_f64(self.rng.gen_range(0.5..1.5));
        tokio::time::sleep(d).await;
    }

    pub fn invoke(&self, f: &str, value: Value) -> Pending {
        self.rec.invoke(self.process, f, value)
    }

    /// Records the outcome of a client call.
    pub fn finish<T>(&mut self, p: Pending, r: Result<T, keel_client::Error>, ok: impl FnOnce(T) -> Value) {
        match r {
            Ok(v) => {
                p.ok(ok(v));
            }
            Err(e) => self.failed(p, &e),
        }
    }

    /// Records a client error and reacts to it.
    pub fn failed(&mut self, p: Pending, e: &keel_client::Error) {
        let op = p.error(e);
        self.after(op.outcome, matches!(e, keel_client::Error::Unreachable(_)));
    }

    /// After an operation: a new process id after an unknown outcome; the
    /// next member after an unreachable one.
    pub fn after(&mut self, outcome: Outcome, unreachable: bool) {
        if outcome == Outcome::Info {
            self.process += self.concurrency;
        }
        if unreachable || outcome == Outcome::Info {
            self.member = (self.member + 1) % self.members;
            self.client = self.all.pinned(self.member);
        }
    }
}

/// When a watcher may stop: after the main phase, once the cluster has
/// healed, it must reach the revision current at that moment; it gives up
/// a minute later.
#[derive(Default)]
pub struct CatchUp {
    target: Option<i64>,
    give_up: Option<Instant>,
}

impl CatchUp {
    /// Fixes the target as soon as the run allows.
    pub async fn poll(&mut self, ctx: &Ctx) {
        if self.target.is_none() && Instant::now() >= ctx.until && *ctx.healed.borrow() {
            if let Ok(t) = watch::current_revision(&ctx.client).await {
                self.target = Some(t);
                self.give_up = Some(Instant::now() + Duration::from_secs(60));
            }
        }
    }

    pub fn target(&self) -> Option<i64> {
        self.target
    }

    pub fn reached(&self, attested: i64) -> bool {
        self.target.is_some_and(|t| attested >= t)
    }

    pub fn gave_up(&self) -> bool {
        self.give_up.is_some_and(|d| Instant::now() > d)
    }
}

/// Runs `n` workers to completion.
pub async fn spawn_workers<F, Fut>(ctx: &Ctx, n: usize, body: F) -> Result<()>
where
    F: Fn(Worker) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let tasks: Vec<_> = (0..n).map(|i| tokio::spawn(body(ctx.worker(i)))).collect();
    for t in tasks {
        t.await?;
    }
    Ok(())
}

/// Ends a value list in etcd as "1,2,3".
pub fn encode_list(v: &[i64]) -> String {
    v.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
}

pub fn decode_list(s: &[u8]) -> Vec<i64> {
    std::str::from_utf8(s).unwrap_or("").split(',').filter_map(|x| x.parse().ok()).collect()
}
