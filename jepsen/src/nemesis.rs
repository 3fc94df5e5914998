//! Faults, injected one at a time on a random schedule, each start and
//! heal recorded in the history (`value.phase` is "start" or "stop").
//!
//! Network faults are iptables/tc rules inside the members' namespaces, so
//! they cut real TCP traffic, or, without root, rules of the peer-link
//! proxies (`proxy`). Either way only peer traffic suffers: the harness
//! keeps reaching every member, as Jepsen's control node does, so clients
//! on both sides of a partition keep issuing requests.

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use keel_client::etcdserverpb::RangeRequest;
use keel_client::Client;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::sync::Mutex;

use crate::cluster::{in_ns, Clock, Db};
use crate::history::Recorder;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
    /// kill -9 a member (often the leader), restart it later.
    Kill,
    /// SIGSTOP a member, SIGCONT later.
    Pause,
    /// Isolate one member or the leader, split majority/minority, bridge,
    /// or cut one direction only.
    Partition,
    /// Drop a share of the packets on peer links.
    Drop,
    /// Slow peer links down (netem is not in every kernel: a rate limit
    /// delays peer traffic by queueing instead).
    Delay,
    /// Restart a member with a skewed clock or a clock running fast/slow.
    Clock,
    /// Remove a member, wipe it, add it back.
    Membership,
    /// Remove a member, add it back as a learner, promote it.
    Learner,
    /// Compact at the head revision and defragment members, repeatedly.
    Compaction,
    /// Kill a member, then append a torn record to its write-ahead log,
    /// truncate it, or flip a bit in it, and restart it: it must recover
    /// without losing an acknowledged write, or refuse to start (and is
    /// then replaced).
    Corrupt,
}

impl Fault {
    pub const ALL: [Fault; 10] = [
        Fault::Kill,
        Fault::Pause,
        Fault::Partition,
        Fault::Drop,
        Fault::Delay,
        Fault::Clock,
        Fault::Membership,
        Fault::Learner,
        Fault::Compaction,
        Fault::Corrupt,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::Kill => "kill",
            Fault::Pause => "pause",
            Fault::Partition => "partition",
            Fault::Drop => "drop",
            Fault::Delay => "delay",
            Fault::Clock => "clock",
            Fault::Membership => "membership",
            Fault::Learner => "learner",
            Fault::Compaction => "compaction",
            Fault::Corrupt => "corrupt",
        }
    }

    /// Acts on the network (needs namespaces or proxies).
    pub fn is_network(self) -> bool {
        matches!(self, Fault::Partition | Fault::Drop | Fault::Delay)
    }
}

impl FromStr for Fault {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Fault::ALL.into_iter().find(|f| f.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
            anyhow::anyhow!("unknown fault {s:?} (known: {})", names.join(", "))
        })
    }
}

/// Parses "kill,pause,partition", "all" or "none".
pub fn parse_faults(s: &str) -> Result<Vec<Fault>> {
    match s {
        "none" | "" => Ok(Vec::new()),
        "all" => Ok(Fault::ALL.to_vec()),
        _ => s.split(',').map(|f| f.trim().parse()).collect(),
    }
}

pub struct Nemesis {
    pub db: Arc<Mutex<Db>>,
    pub client: Client,
    pub rec: Recorder,
    pub faults: Vec<Fault>,
    pub rng: StdRng,
    /// Mean quiet time between faults.
    pub interval: Duration,
}

/// What is broken right now, so it can be healed.
enum Active {
    Killed(usize),
    Paused(usize),
    Network,
    Clock(usize),
    Storm,
}

impl Nemesis {
    pub fn new(db: Arc<Mutex<Db>>, client: Client, rec: Recorder, faults: Vec<Fault>, seed: u64) -> Self {
        Nemesis { db, client, rec, faults, rng: StdRng::seed_from_u64(seed), interval: Duration::from_secs(4) }
    }

    /// Injects faults until `until`, then heals everything.
    pub async fn run(mut self, until: Instant) -> Result<usize> {
        let mut count = 0;
        if self.faults.is_empty() {
            return Ok(0);
        }
        loop {
            let quiet = self.interval.mul_f64(self.rng.gen_range(0.5..1.5));
            if Instant::now() + quiet + Duration::from_secs(3) >= until {
                break;
            }
            tokio::time::sleep(quiet).await;
            let fault = *self.faults.choose(&mut self.rng).unwrap_or(&Fault::Kill);
            let hold = Duration::from_millis(self.rng.gen_range(2000..7000));
            match self.inject(fault, hold, until).await {
                Ok(()) => count += 1,
                Err(e) => {
                    self.rec.nemesis(fault.name(), json!({"phase": "error", "error": e.to_string()}));
                    self.heal_all().await?;
                }
            }
        }
        self.heal_all().await?;
        Ok(count)
    }

    async fn inject(&mut self, fault: Fault, hold: Duration, until: Instant) -> Result<()> {
        let active = match fault {
            Fault::Kill => {
                let i = self.target(true).await;
                let mut db = self.db.lock().await;
                db.kill(i)?;
                self.rec.nemesis("kill", json!({"phase": "start", "node": db.nodes[i].name}));
                Active::Killed(i)
            }
            Fault::Pause => {
                let i = self.target(true).await;
                let mut db = self.db.lock().await;
                db.pause(i)?;
                self.rec.nemesis("pause", json!({"phase": "start", "node": db.nodes[i].name}));
                Active::Paused(i)
            }
            Fault::Partition => {
                let desc = self.partition().await?;
                self.rec.nemesis("partition", json!({"phase": "start", "grudge": desc}));
                Active::Network
            }
            Fault::Drop => {
                let p: f64 = *[0.1, 0.2, 0.4].choose(&mut self.rng).unwrap_or(&0.2);
                drop_packets(&*self.db.lock().await, p)?;
                self.rec.nemesis("drop", json!({"phase": "start", "probability": p}));
                Active::Network
            }
            Fault::Delay => {
                let rate = *["256kbit", "1mbit"].choose(&mut self.rng).unwrap_or(&"1mbit");
                slow_links(&*self.db.lock().await, rate)?;
                self.rec.nemesis("delay", json!({"phase": "start", "peer_link_rate": rate}));
                Active::Network
            }
            Fault::Clock => {
                let i = self.target(false).await;
                let faketime = ["+120s", "-120s", "+0 x1.5", "+0 x0.6"].choose(&mut self.rng).unwrap_or(&"+120s");
                let mut db = self.db.lock().await;
                db.kill(i)?;
                db.nodes[i].clock = Some(Clock { faketime: faketime.to_string() });
                let name = db.nodes[i].name.clone();
                self.rec.nemesis("clock", json!({"phase": "start", "node": name, "faketime": faketime}));
                db.start_member(i).await?;
                Active::Clock(i)
            }
            Fault::Membership | Fault::Learner => {
                let i = self.target(false).await;
                let learner = fault == Fault::Learner;
                let mut db = self.db.lock().await;
                let name = db.nodes[i].name.clone();
                self.rec.nemesis(fault.name(), json!({"phase": "start", "node": name, "learner": learner}));
                let id = db.rejoin(i, &self.client, learner).await?;
                self.rec.nemesis(fault.name(), json!({"phase": "stop", "node": name, "new_id": id}));
                return Ok(());
            }
            Fault::Compaction => {
                self.rec.nemesis("compaction", json!({"phase": "start"}));
                Active::Storm
            }
            Fault::Corrupt => {
                self.corrupt().await?;
                return Ok(());
            }
        };
        let stop = (Instant::now() + hold).min(until);
        if let Active::Storm = active {
            self.storm(stop).await;
        } else {
            tokio::time::sleep_until(stop.into()).await;
        }
        self.heal(active, fault).await
    }

    /// A random member; the leader half of the time when `prefer_leader`.
    async fn target(&mut self, prefer_leader: bool) -> usize {
        let db = self.db.lock().await;
        let n = db.len();
        if prefer_leader && self.rng.gen_bool(0.5) {
            if let Some(l) = db.leader(&self.client).await {
                return l;
            }
        }
        self.rng.gen_range(0..n)
    }

    async fn partition(&mut self) -> Result<String> {
        let db = self.db.lock().await;
        let n = db.len();
        let leader = db.leader(&self.client).await;
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut self.rng);
        let kind = *["isolate-one", "isolate-leader", "halves", "bridge", "one-way"]
            .choose(&mut self.rng)
            .unwrap_or(&"halves");
        // Pairs (a, b): a stops hearing b; `both` also cuts b from a.
        let mut cuts: Vec<(usize, usize)> = Vec::new();
        let mut both = true;
        let desc;
        match kind {
            "isolate-one" | "isolate-leader" => {
                let victim = if kind == "isolate-leader" { leader.unwrap_or(order[0]) } else { order[0] };
                for j in (0..n).filter(|&j| j != victim) {
                    cuts.push((victim, j));
                }
                desc = format!("{kind}: {} alone", db.nodes[victim].name);
            }
            "bridge" => {
                // Two halves that can only talk through one member.
                let bridge = order[0];
                let (left, right) = order[1..].split_at((n - 1) / 2);
                for &a in left {
                    for &b in right {
                        cuts.push((a, b));
                    }
                }
                desc = format!("bridge through {}", db.nodes[bridge].name);
            }
            "one-way" => {
                let victim = leader.unwrap_or(order[0]);
                for j in (0..n).filter(|&j| j != victim) {
                    cuts.push((j, victim));
                }
                both = false;
                desc = format!("one-way: nobody hears {}", db.nodes[victim].name);
            }
            _ => {
                let (minority, majority) = order.split_at(n / 2);
                for &a in minority {
                    for &b in majority {
                        cuts.push((a, b));
                    }
                }
                let names = |s: &[usize]| s.iter().map(|&i| db.nodes[i].name.clone()).collect::<Vec<_>>().join(",");
                desc = format!("halves: [{}] | [{}]", names(minority), names(majority));
            }
        }
        for (a, b) in cuts {
            cut_link(&db, a, b)?;
            if both {
                cut_link(&db, b, a)?;
            }
        }
        if let Some(proxies) = &db.proxies {
            // Connections from an address that is no member's (etcd does
            // not dial from its own address) escape the cut: say so.
            let unattributed = proxies.unattributed_connections();
            if unattributed > 0 {
                return Ok(format!(
                    "{desc} (proxies: {unattributed} peer connections not attributable to a member pass through)"
                ));
            }
        }
        Ok(desc)
    }

    /// Compacts at (nearly) the head revision and defragments members until
    /// `stop`.
    async fn storm(&mut self, stop: Instant) {
        let mut compactions = 0;
        let mut defrags = 0;
        while Instant::now() < stop {
            let head = self
                .client
                .range(RangeRequest {
                    key: b"\0".to_vec().into(),
                    range_end: vec![0].into(),
                    count_only: true,
                    ..Default::default()
                })
                .await
                .ok()
                .and_then(|r| r.header.map(|h| h.revision));
            if let Some(rev) = head {
                if rev > 10 && self.client.compact(rev - 5, false).await.is_ok() {
                    compactions += 1;
                }
            }
            let n = self.db.lock().await.len();
            let i = self.rng.gen_range(0..n);
            if self.client.defragment(i).await.is_ok() {
                defrags += 1;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        self.rec
            .nemesis("compaction", json!({"phase": "progress", "compactions": compactions, "defragments": defrags}));
    }

    async fn corrupt(&mut self) -> Result<()> {
        let i = self.target(false).await;
        let damage = self.rng.gen_range(0..3);
        let mut db = self.db.lock().await;
        let name = db.nodes[i].name.clone();
        db.kill(i)?;
        // keel makes appends durable in its journal and also writes them to
        // RocksDB's log: damage either.
        let journal = self.rng.gen_bool(0.5);
        let Some(wal) = db.newest_wal(i, journal).or_else(|| db.newest_wal(i, !journal)) else {
            db.start_member(i).await?;
            bail!("no write-ahead log with records found for {name}")
        };
        let mut bytes = std::fs::read(&wal)?;
        let preallocated = wal.extension().is_some_and(|e| e == "journal");
        let len = crate::cluster::records_end(&wal, &bytes);
        let what = if damage == 0 {
            // What a crash in the middle of appending leaves: part of a
            // record that was never acknowledged.
            let extra = self.rng.gen_range(1..=64);
            let torn: Vec<u8> = (0..extra).map(|_| self.rng.gen::<u8>()).collect();
            // Over the records' end; a preallocated file keeps its size.
            let size = bytes.len();
            bytes.truncate(len);
            bytes.extend(&torn);
            bytes.resize(bytes.len().max(size), 0);
            format!("appended a torn record of {extra} bytes to {len}")
        } else if damage == 1 {
            // A disk that lost synced data: acknowledged records vanish.
            let cut = self.rng.gen_range(1..=len.min(4096));
            if preallocated {
                bytes[len - cut..len].fill(0);
            } else {
                bytes.truncate(len - cut);
            }
            format!("truncated the last {cut} of {len} bytes")
        } else {
            let at = self.rng.gen_range(0..len);
            let bit = self.rng.gen_range(0..8);
            bytes[at] ^= 1 << bit;
            format!("flipped bit {bit} of byte {at} of {len}")
        };
        std::fs::write(&wal, &bytes)?;
        let file = wal.file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_default();
        self.rec.nemesis("corrupt", json!({"phase": "start", "node": name, "file": file, "damage": what}));
        let started = match db.start_member(i).await {
            Ok(()) => true,
            Err(e) => {
                tracing::info!(node = %name, error = %e, "member refused its damaged log");
                false
            }
        };
        if started {
            self.rec.nemesis("corrupt", json!({"phase": "stop", "node": name, "result": "recovered"}));
        } else {
            db.kill(i)?;
            let id = db.rejoin(i, &self.client, false).await?;
            self.rec.nemesis(
                "corrupt",
                json!({"phase": "stop", "node": name, "result": "refused to start; replaced", "new_id": id}),
            );
        }
        Ok(())
    }

    async fn heal(&mut self, active: Active, fault: Fault) -> Result<()> {
        let mut db = self.db.lock().await;
        match active {
            Active::Killed(i) => {
                db.start_member(i).await?;
                self.rec.nemesis("kill", json!({"phase": "stop", "node": db.nodes[i].name}));
            }
            Active::Paused(i) => {
                db.resume(i)?;
                self.rec.nemesis("pause", json!({"phase": "stop", "node": db.nodes[i].name}));
            }
            Active::Network => {
                heal_network(&db);
                self.rec.nemesis(fault.name(), json!({"phase": "stop"}));
            }
            Active::Clock(i) => {
                db.kill(i)?;
                db.nodes[i].clock = None;
                db.start_member(i).await?;
                self.rec.nemesis("clock", json!({"phase": "stop", "node": db.nodes[i].name}));
            }
            Active::Storm => self.rec.nemesis("compaction", json!({"phase": "stop"})),
        }
        Ok(())
    }

    /// Undoes every fault: network rules, paused and stopped members,
    /// faked clocks; a member that cannot start again is replaced.
    pub async fn heal_all(&mut self) -> Result<()> {
        let mut db = self.db.lock().await;
        heal_network(&db);
        for i in 0..db.len() {
            db.resume(i)?;
            if db.nodes[i].clock.is_some() {
                db.kill(i)?;
                db.nodes[i].clock = None;
            }
        }
        for i in 0..db.len() {
            if !db.is_running(i) {
                if let Err(e) = db.start_member(i).await {
                    tracing::warn!(error = %e, "member cannot restart; replacing it");
                    db.kill(i)?;
                    db.rejoin(i, &self.client, false).await?;
                }
            }
        }
        // A membership change interrupted by another fault can leave a
        // member removed but running (it exits once it learns): add such
        // members back, empty.
        tokio::time::sleep(Duration::from_secs(2)).await;
        if let Ok(list) = self.client.member_list().await {
            for i in 0..db.len() {
                let url = db.nodes[i].peer_url.clone();
                if !list.members.iter().any(|m| m.peer_ur_ls.contains(&url)) {
                    tracing::warn!(node = %db.nodes[i].name, "member was removed; adding it back");
                    db.kill(i)?;
                    db.rejoin(i, &self.client, false).await?;
                }
            }
        }
        self.rec.nemesis("heal", json!({"phase": "stop"}));
        Ok(())
    }
}

fn ns_of(n: &crate::cluster::Node) -> Result<&str> {
    n.ns.as_deref().ok_or_else(|| anyhow::anyhow!("network faults need namespaces or proxies (--network)"))
}

// Network faults act on the peer-link proxies when the cluster has them,
// else as iptables/tc rules inside the members' namespaces.

/// From now on member `hearer` receives nothing from member `speaker`.
fn cut_link(db: &Db, hearer: usize, speaker: usize) -> Result<()> {
    match &db.proxies {
        Some(proxies) => {
            proxies.cut(hearer, speaker);
            Ok(())
        }
        None => {
            let source = &db.nodes[speaker].ip;
            in_ns(ns_of(&db.nodes[hearer])?, &["iptables", "-A", "INPUT", "-s", source, "-j", "DROP"])
        }
    }
}

/// Loses share `p` of peer packets.
fn drop_packets(db: &Db, p: f64) -> Result<()> {
    if let Some(proxies) = &db.proxies {
        proxies.set_loss(p);
        return Ok(());
    }
    let prob = format!("{p}");
    for n in &db.nodes {
        for dir in ["--dport", "--sport"] {
            in_ns(
                ns_of(n)?,
                &[
                    "iptables",
                    "-A",
                    "INPUT",
                    "-p",
                    "tcp",
                    dir,
                    "2380",
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    &prob,
                    "-j",
                    "DROP",
                ],
            )?;
        }
    }
    Ok(())
}

/// Limits peer links to `rate` (tc's notation: "256kbit", "1mbit").
fn slow_links(db: &Db, rate: &str) -> Result<()> {
    if let Some(proxies) = &db.proxies {
        let bits: u64 = match rate.strip_suffix("kbit") {
            Some(k) => k.parse::<u64>()? * 1_000,
            None => rate.strip_suffix("mbit").unwrap_or(rate).parse::<u64>()? * 1_000_000,
        };
        proxies.set_rate(bits / 8);
        return Ok(());
    }
    for n in &db.nodes {
        slow_peer_link(ns_of(n)?, rate)?;
    }
    Ok(())
}

/// Lifts every network fault.
fn heal_network(db: &Db) {
    if let Some(proxies) = &db.proxies {
        proxies.heal();
    }
    for ns in db.nodes.iter().filter_map(|n| n.ns.as_deref()) {
        clear_network(ns);
    }
}

fn clear_network(ns: &str) {
    let _ = in_ns(ns, &["iptables", "-F", "INPUT"]);
    let _ = in_ns(ns, &["iptables", "-F", "OUTPUT"]);
    let _ = in_ns(ns, &["tc", "qdisc", "del", "dev", "eth0", "root"]);
}

/// Routes peer traffic (port 2380 either way) through a slow class.
fn slow_peer_link(ns: &str, rate: &str) -> Result<()> {
    in_ns(ns, &["tc", "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb", "default", "10", "r2q", "1000"])?;
    in_ns(ns, &["tc", "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:10", "htb", "rate", "1000mbit"])?;
    in_ns(
        ns,
        &["tc", "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:20", "htb", "rate", rate, "ceil", rate],
    )?;
    for port in ["dport", "sport"] {
        in_ns(
            ns,
            &[
                "tc", "filter", "add", "dev", "eth0", "parent", "1:", "protocol", "ip", "prio", "1", "u32", "match",
                "ip", port, "2380", "0xffff", "flowid", "1:20",
            ],
        )?;
    }
    Ok(())
}
