//! The system under test: 3 or 5 members of a real server binary (keel, or
//! etcd for calibration), each with its own data dir and log under the run
//! directory.
//!
//! How members are networked ([`Network`]):
//! - as root, every member runs in its own network namespace (`kj<i>`)
//!   with its own address on a bridge (`kjbr0`, 10.77.0.0/24; the harness
//!   is 10.77.0.254; `--net-slot` picks another bridge and subnet), so
//!   partitions and packet loss are real iptables/tc rules that cut real
//!   TCP traffic;
//! - without root, every member gets its own loopback address and a
//!   userspace proxy in front of its peer listener (`proxy`), which
//!   applies the same faults to peer traffic;
//! - plain loopback (benchmarks): no network faults.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use keel_client::{Client, ClientConfig};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::proxy::PeerProxies;

/// Which network this process uses, so two harness runs (say keel and
/// etcd) can run side by side: slot `s` uses bridge `kjbr<s>`, namespaces
/// `kj<s>-<i>` and subnet 10.77.<s>.0/24.
static SLOT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

pub fn set_network_slot(slot: usize) {
    SLOT.store(slot.min(200), std::sync::atomic::Ordering::Relaxed);
}

fn slot() -> usize {
    SLOT.load(std::sync::atomic::Ordering::Relaxed)
}

fn bridge() -> String {
    format!("kjbr{}", slot())
}

fn host_ip() -> String {
    format!("10.77.{}.254", slot())
}

fn member_ip(i: usize) -> String {
    format!("10.77.{}.{}", slot(), i + 1)
}
const CLIENT_PORT: u16 = 2379;
const PEER_PORT: u16 = 2380;
const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";
/// etcd's (and keel's) readiness marker.
const READY: &str = "ready to serve client requests";

/// How to build the cluster.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub binary: PathBuf,
    pub members: usize,
    pub run_dir: PathBuf,
    /// Extra flags for every member (e.g. `--snapshot-count 100`).
    pub extra_args: Vec<String>,
    pub network: Network,
}

/// How members are connected, and so which network faults are possible.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    /// A network namespace per member; faults are iptables/tc rules (root).
    Namespaces,
    /// A loopback address per member and a fault-injecting proxy on every
    /// peer link (no root needed; partitions need members that dial from
    /// their own address, as keel does).
    Proxies,
    /// Shared loopback, no network faults.
    Loopback,
}

impl Network {
    /// Namespaces when this process can create them, else proxies.
    pub fn best_available() -> Network {
        if can_isolate() {
            Network::Namespaces
        } else {
            Network::Proxies
        }
    }
}

/// A libfaketime setting for one member's process.
#[derive(Debug, Clone, PartialEq)]
pub struct Clock {
    /// libfaketime's FAKETIME value, e.g. "+30s" or "+0 x1.5".
    pub faketime: String,
}

pub struct Node {
    pub name: String,
    /// Network namespace, when isolated.
    pub ns: Option<String>,
    pub ip: String,
    pub client_url: String,
    /// The advertised peer URL (the proxy's, with proxies).
    pub peer_url: String,
    /// Where the member listens for peers.
    pub listen_peer_url: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub clock: Option<Clock>,
    /// Whether the next start joins an existing cluster.
    pub initial_cluster: String,
    pub initial_state: &'static str,
    child: Option<Child>,
    log_offset: u64,
    paused: bool,
}

pub struct Db {
    pub spec: ClusterSpec,
    pub nodes: Vec<Node>,
    /// The peer-link proxies, with [`Network::Proxies`].
    pub proxies: Option<PeerProxies>,
    token: String,
}

fn sh(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("cannot run {}", args[0]))?;
    if !out.status.success() {
        bail!("{} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Runs `args` inside namespace `ns`.
pub fn in_ns(ns: &str, args: &[&str]) -> Result<()> {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(args);
    sh(&full)
}

/// Whether this process can create network namespaces.
pub fn can_isolate() -> bool {
    nix::unistd::geteuid().is_root()
        && Command::new("ip").args(["netns", "list"]).output().is_ok_and(|o| o.status.success())
        && Command::new("iptables").arg("--version").output().is_ok_and(|o| o.status.success())
}

fn ns_name(i: usize) -> String {
    format!("kj{}-{i}", slot())
}

/// Removes namespaces and the bridge left by an earlier run.
pub fn teardown_network(max_members: usize) {
    for i in 0..max_members {
        let _ = Command::new("ip").args(["netns", "del", &ns_name(i)]).output();
    }
    let _ = Command::new("ip").args(["link", "del", &bridge()]).output();
}

fn setup_network(n: usize) -> Result<()> {
    teardown_network(9);
    let br = bridge();
    sh(&["ip", "link", "add", &br, "type", "bridge"])?;
    sh(&["ip", "addr", "add", &format!("{}/24", host_ip()), "dev", &br])?;
    sh(&["ip", "link", "set", &br, "up"])?;
    for i in 0..n {
        let ns = ns_name(i);
        let veth = format!("kjv{}-{i}", slot());
        sh(&["ip", "netns", "add", &ns])?;
        let _ = Command::new("ip").args(["link", "del", &veth]).output();
        sh(&["ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
        sh(&["ip", "link", "set", &veth, "master", &br, "up"])?;
        in_ns(&ns, &["ip", "addr", "add", &format!("{}/24", member_ip(i)), "dev", "eth0"])?;
        in_ns(&ns, &["ip", "link", "set", "eth0", "up"])?;
        in_ns(&ns, &["ip", "link", "set", "lo", "up"])?;
    }
    Ok(())
}

fn free_port(ip: &str) -> Result<u16> {
    Ok(std::net::TcpListener::bind((ip, 0))?.local_addr()?.port())
}

/// An address, a client URL and a peer URL on shared loopback.
fn loopback_addresses() -> Result<(String, String, String)> {
    let ip = "127.0.0.1".to_string();
    let client = format!("http://{ip}:{}", free_port(&ip)?);
    let peer = format!("http://{ip}:{}", free_port(&ip)?);
    Ok((ip, client, peer))
}

/// Where a member is reached and listens.
struct Addresses {
    ns: Option<String>,
    ip: String,
    client_url: String,
    peer_url: String,
    listen_peer_url: String,
}

impl Node {
    /// A member named `name`, not running, with its data dir and log under
    /// `run_dir`.
    fn new(run_dir: &Path, name: String, a: Addresses, initial_state: &'static str) -> Node {
        Node {
            data_dir: run_dir.join(format!("{name}.data")),
            log: run_dir.join(format!("{name}.log")),
            name,
            ns: a.ns,
            ip: a.ip,
            client_url: a.client_url,
            peer_url: a.peer_url,
            listen_peer_url: a.listen_peer_url,
            clock: None,
            initial_cluster: String::new(),
            initial_state,
            child: None,
            log_offset: 0,
            paused: false,
        }
    }
}

impl Db {
    /// Creates the network and data directories and starts every member.
    pub async fn start(spec: ClusterSpec) -> Result<Db> {
        std::fs::create_dir_all(&spec.run_dir)?;
        if spec.network == Network::Namespaces {
            setup_network(spec.members)?;
        }
        let mut nodes = Vec::new();
        let mut routes = Vec::new();
        for i in 0..spec.members {
            let name = format!("n{}", i + 1);
            let (ns, ip, client_url, peer_url, listen_peer_url) = match spec.network {
                Network::Namespaces => {
                    let ip = member_ip(i);
                    let peer = format!("http://{ip}:{PEER_PORT}");
                    (Some(ns_name(i)), ip.clone(), format!("http://{ip}:{CLIENT_PORT}"), peer.clone(), peer)
                }
                Network::Proxies => {
                    let ip = crate::proxy::member_ip(slot(), i).to_string();
                    let (proxy, listen) = (free_port(&ip)?, free_port(&ip)?);
                    routes.push((format!("{ip}:{proxy}").parse()?, format!("{ip}:{listen}").parse()?));
                    let client = format!("http://{ip}:{}", free_port(&ip)?);
                    (None, ip.clone(), client, format!("http://{ip}:{proxy}"), format!("http://{ip}:{listen}"))
                }
                Network::Loopback => {
                    let (ip, client, peer) = loopback_addresses()?;
                    (None, ip, client, peer.clone(), peer)
                }
            };
            let addresses = Addresses { ns, ip, client_url, peer_url, listen_peer_url };
            nodes.push(Node::new(&spec.run_dir, name, addresses, "new"));
        }
        let initial: Vec<String> = nodes.iter().map(|n| format!("{}={}", n.name, n.peer_url)).collect();
        for n in &mut nodes {
            n.initial_cluster = initial.join(",");
        }
        let proxies = match spec.network {
            Network::Proxies => Some(PeerProxies::start(slot(), &routes).await?),
            _ => None,
        };
        let mut db = Db { spec, nodes, proxies, token: format!("keel-jepsen-{}", std::process::id()) };
        for i in 0..db.nodes.len() {
            db.spawn(i)?;
        }
        for i in 0..db.nodes.len() {
            db.wait_ready(i, Duration::from_secs(60)).await?;
        }
        Ok(db)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn client_urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.client_url.clone()).collect()
    }

    /// A client over every member.
    pub async fn client(&self, timeout: Duration) -> Result<Client> {
        let config = ClientConfig { request_timeout: timeout, connect_timeout: Duration::from_secs(1) };
        Ok(Client::connect_with(self.client_urls(), config).await?)
    }

    fn args(&self, i: usize) -> Vec<String> {
        let n = &self.nodes[i];
        let mut args: Vec<String> = [
            "--name",
            &n.name,
            "--data-dir",
            &n.data_dir.display().to_string(),
            "--listen-client-urls",
            &n.client_url,
            "--advertise-client-urls",
            &n.client_url,
            "--listen-peer-urls",
            &n.listen_peer_url,
            "--initial-advertise-peer-urls",
            &n.peer_url,
            "--initial-cluster",
            &n.initial_cluster,
            "--initial-cluster-state",
            n.initial_state,
            "--initial-cluster-token",
            &self.token,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(self.spec.extra_args.iter().cloned());
        args
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let args = self.args(i);
        let binary = self.spec.binary.clone();
        let n = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&n.log)?;
        n.log_offset = log.metadata()?.len();
        let mut cmd = match &n.ns {
            // `ip netns exec` execs the program, so the pid is the member's.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&binary);
                c
            }
            None => Command::new(&binary),
        };
        for (k, _) in std::env::vars() {
            if k.starts_with("ETCD_") {
                cmd.env_remove(k);
            }
        }
        if let Some(clock) = &n.clock {
            cmd.env("LD_PRELOAD", FAKETIME_LIB).env("FAKETIME", &clock.faketime).env("FAKETIME_NO_CACHE", "1");
        }
        let child = cmd
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        n.child = Some(child);
        n.paused = false;
        Ok(())
    }

    /// Waits for the readiness marker in the member's log.
    pub async fn wait_ready(&mut self, i: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let n = &mut self.nodes[i];
            let text = std::fs::read(&n.log).unwrap_or_default();
            let fresh = text.get(n.log_offset as usize..).unwrap_or_default();
            if String::from_utf8_lossy(fresh).contains(READY) {
                return Ok(());
            }
            if let Some(child) = n.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    n.child = None;
                    bail!("{} exited ({status}) before becoming ready", n.name);
                }
            } else {
                bail!("{} is not running", n.name);
            }
            if Instant::now() > deadline {
                bail!("{} not ready after {timeout:?}", n.name);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn is_running(&mut self, i: usize) -> bool {
        match self.nodes[i].child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn pid(&self, i: usize) -> Option<Pid> {
        self.nodes[i].child.as_ref().map(|c| Pid::from_raw(c.id() as i32))
    }

    /// kill -9.
    pub fn kill(&mut self, i: usize) -> Result<()> {
        self.resume(i)?;
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        Ok(())
    }

    /// Starts a member that is not running, and waits until it serves.
    pub async fn start_member(&mut self, i: usize) -> Result<()> {
        if self.is_running(i) {
            return Ok(());
        }
        self.spawn(i)?;
        self.wait_ready(i, Duration::from_secs(60)).await
    }

    pub fn pause(&mut self, i: usize) -> Result<()> {
        if let Some(pid) = self.pid(i) {
            kill(pid, Signal::SIGSTOP)?;
            self.nodes[i].paused = true;
        }
        Ok(())
    }

    pub fn resume(&mut self, i: usize) -> Result<()> {
        if let Some(pid) = self.pid(i) {
            if self.nodes[i].paused {
                kill(pid, Signal::SIGCONT)?;
            }
        }
        self.nodes[i].paused = false;
        Ok(())
    }

    /// Waits for a member's process to exit on its own.
    pub async fn wait_exit(&mut self, i: usize, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(c) = self.nodes[i].child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.nodes[i].child = None;
                    return Some(status);
                }
            } else {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    /// Index of the member that currently leads, as members report it.
    pub async fn leader(&self, client: &Client) -> Option<usize> {
        for i in 0..self.nodes.len() {
            if let Ok(s) = client.status(i).await {
                if s.leader != 0 && s.header.as_ref().is_some_and(|h| h.member_id == s.leader) {
                    return Some(i);
                }
            }
        }
        None
    }

    /// Waits until some member leads and every running member answers.
    pub async fn wait_healthy(&mut self, client: &Client, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut ok = self.leader(client).await.is_some();
            for i in 0..self.nodes.len() {
                ok &= self.is_running(i) && client.status(i).await.is_ok_and(|s| s.leader != 0);
            }
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("cluster not healthy after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Removes member `i` from the cluster, wipes its data and adds it back
    /// (as a learner that is then promoted, when `learner`).
    pub async fn rejoin(&mut self, i: usize, client: &Client, learner: bool) -> Result<String> {
        let name = self.nodes[i].name.clone();
        let members = client.member_list().await?.members;
        if let Some(m) = members.iter().find(|m| m.name == name || m.peer_ur_ls.contains(&self.nodes[i].peer_url)) {
            // Removing the leader can cut the connection that carried the
            // request: then look whether it went through.
            if let Err(e) = client.member_remove(m.id).await {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let still = client.member_list().await.map(|l| l.members.iter().any(|x| x.id == m.id));
                if e.is_definite() || !matches!(still, Ok(false)) {
                    return Err(e.into());
                }
            }
            if self.wait_exit(i, Duration::from_secs(15)).await.is_none() {
                self.kill(i)?;
            }
        }
        self.kill(i)?;
        if self.nodes[i].data_dir.exists() {
            std::fs::remove_dir_all(&self.nodes[i].data_dir)?;
        }
        let id = self.join(i, client, learner).await?;
        self.wait_ready(i, Duration::from_secs(60)).await?;
        if learner {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                match client.member_promote(id).await {
                    Ok(_) => break,
                    Err(e) if Instant::now() > deadline => bail!("cannot promote {name}: {e}"),
                    Err(e) if e.to_string().contains("not a learner") => break,
                    Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
        }
        Ok(format!("{id:x}"))
    }

    /// Adds member `i` (stopped, with an empty data dir) to the cluster as
    /// etcdctl's `member add` does, then starts it with
    /// `--initial-cluster-state existing` without waiting for it to serve;
    /// returns its member id.
    pub async fn join(&mut self, i: usize, client: &Client, learner: bool) -> Result<u64> {
        let added = add_member(client, &self.nodes[i].peer_url, learner).await?;
        let id = added.member.as_ref().map_or(0, |m| m.id);
        let mut initial = Vec::new();
        for m in &added.members {
            let mname = if m.id == id { self.nodes[i].name.clone() } else { m.name.clone() };
            for u in &m.peer_ur_ls {
                initial.push(format!("{mname}={u}"));
            }
        }
        self.nodes[i].initial_cluster = initial.join(",");
        self.nodes[i].initial_state = "existing";
        self.spawn(i)?;
        Ok(id)
    }

    /// Defines one more member on a loopback cluster, not yet started or
    /// added (see [`Db::join`]); returns its index.
    pub fn define_member(&mut self) -> Result<usize> {
        if self.spec.network != Network::Loopback {
            bail!("members can only be defined on a loopback cluster");
        }
        let i = self.nodes.len();
        let (ip, client_url, peer) = loopback_addresses()?;
        let addresses = Addresses { ns: None, ip, client_url, peer_url: peer.clone(), listen_peer_url: peer };
        self.nodes.push(Node::new(&self.spec.run_dir, format!("n{}", i + 1), addresses, "existing"));
        Ok(i)
    }

    /// Stops every member (SIGKILL after resuming paused ones).
    pub fn stop_all(&mut self) {
        for i in 0..self.nodes.len() {
            let _ = self.kill(i);
        }
    }

    /// The newest write-ahead log file of member `i` holding records:
    /// keel's Raft log journal segment (`journal`), else RocksDB's
    /// `NNNNNN.log` (keel) or etcd's `*.wal`.
    pub fn newest_wal(&self, i: usize, journal: bool) -> Option<PathBuf> {
        let mut found = Vec::new();
        collect_wal(&self.nodes[i].data_dir, &mut found);
        found
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "journal") == journal)
            // A journal segment is allocated in full: it holds records when
            // its first length is not zero.
            .filter(|p| {
                if journal {
                    first_bytes(p).is_ok_and(|b| b != [0; 4])
                } else {
                    p.metadata().is_ok_and(|m| m.len() > 0)
                }
            })
            .max_by_key(|p| (p.metadata().and_then(|m| m.modified()).ok(), p.file_name().map(|f| f.to_os_string())))
    }
}

/// MemberAdd, retried while the cluster is briefly unable to take it
/// (e.g. right after a removal, while it has no leader).
async fn add_member(
    client: &Client,
    peer_url: &str,
    learner: bool,
) -> Result<keel_client::etcdserverpb::MemberAddResponse> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match client.member_add(vec![peer_url.to_string()], learner).await {
            Ok(r) => return Ok(r),
            Err(e) if !e.is_definite() => {
                // It may have been added: look before adding again.
                tokio::time::sleep(Duration::from_secs(1)).await;
                if let Ok(list) = client.member_list().await {
                    if let Some(m) = list.members.iter().find(|m| m.peer_ur_ls.iter().any(|u| u == peer_url)) {
                        return Ok(keel_client::etcdserverpb::MemberAddResponse {
                            header: list.header,
                            member: Some(m.clone()),
                            members: list.members,
                        });
                    }
                }
            }
            Err(e) if Instant::now() > deadline => bail!("cannot add {peer_url}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// Where the records of write-ahead log file `path` (contents `bytes`)
/// end. A keel journal segment is allocated in full: its records are
/// `len u32 | crc u32 | body`, followed by zeros; other logs end at their
/// size.
pub fn records_end(path: &Path, bytes: &[u8]) -> usize {
    if path.extension().is_none_or(|e| e != "journal") {
        return bytes.len();
    }
    let mut at = 0;
    while let Some(len) = bytes.get(at..at + 4) {
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if len == 0 || at + 8 + len > bytes.len() {
            break;
        }
        at += 8 + len;
    }
    at
}

fn first_bytes(path: &Path) -> std::io::Result<[u8; 4]> {
    use std::io::Read;
    let mut b = [0u8; 4];
    std::fs::File::open(path)?.read_exact(&mut b)?;
    Ok(b)
}

fn collect_wal(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect_wal(&p, out);
        } else if let Some(name) = p.file_name().and_then(|f| f.to_str()) {
            let rocks_wal =
                name.strip_suffix(".log").is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()));
            if rocks_wal || name.ends_with(".wal") || name.ends_with(".journal") {
                out.push(p);
            }
        }
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        self.stop_all();
        if self.spec.network == Network::Namespaces {
            teardown_network(self.nodes.len().max(9));
        }
    }
}
