//! A reusable harness for black-box tests: clusters of real server
//! processes (keel, or etcd for reference runs) on loopback, each with its
//! own data dir and log, that tests can kill, stop, restart, pause and
//! drive with `etcdctl` or gRPC clients.

pub mod watch_check;

use std::fs::File;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The keel binary under test: `$KEEL_BIN`, else `target/release/keel`
/// next to this test executable.
pub fn keel_bin() -> PathBuf {
    if let Ok(p) = std::env::var("KEEL_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    // target/release/deps/<test> -> target/release/keel
    exe.parent().and_then(Path::parent).map(|d| d.join("keel")).unwrap_or_else(|| PathBuf::from("target/release/keel"))
}

/// Real etcd from Debian's etcd-server, the reference implementation.
pub fn etcd_bin() -> Option<PathBuf> {
    let p = PathBuf::from(std::env::var("ETCD_BIN").unwrap_or_else(|_| "/usr/bin/etcd".into()));
    p.exists().then_some(p)
}

/// Real etcd of release line `line` ("3.6"), as `make etcd-releases`
/// built it: the directory holding its etcd, etcdctl and etcdutl
/// (`ETCD_RELEASES`, default `<target>/etcd-releases`, has one directory
/// per pinned tag).
pub fn etcd_release(line: &str) -> Result<PathBuf> {
    let root = std::env::var("ETCD_RELEASES").map(PathBuf::from).unwrap_or_else(|_| {
        let target = keel_bin().parent().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_default();
        target.join("etcd-releases")
    });
    let prefix = format!("v{line}.");
    let found =
        std::fs::read_dir(&root).ok().into_iter().flatten().flatten().map(|e| e.path()).find(|p| {
            p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&prefix)) && p.join("etcd").exists()
        });
    found.ok_or_else(|| anyhow!("etcd {line} not built under {}: run `make etcd-releases`", root.display()))
}

pub fn etcdctl_bin() -> PathBuf {
    PathBuf::from(std::env::var("ETCDCTL_BIN").unwrap_or_else(|_| "/usr/bin/etcdctl".into()))
}

/// Ports handed to test members: below the kernel's ephemeral range
/// (32768-60999 by default), so a member's port stays its own while the
/// member is down for a restart. An ephemeral port does not: any outgoing
/// connection on the machine may take it as its source port meanwhile (a
/// restarted member once failed with "Address already in use" that way).
const PORTS: std::ops::Range<u16> = 15000..32000;

/// A TCP port that was free a moment ago and that no other member of this
/// test process was given.
pub fn free_port() -> Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let span = u32::from(PORTS.end - PORTS.start);
    // Test processes running side by side start at different places.
    let start = std::process::id().wrapping_mul(2654435761) % span;
    for _ in 0..span {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = PORTS.start + u16::try_from(offset)?;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port in {PORTS:?}")
}

pub struct Member {
    pub name: String,
    pub data_dir: PathBuf,
    pub client_url: String,
    pub peer_url: String,
    pub log: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    /// Log length when the current process started (readiness is looked
    /// for after it).
    log_offset: u64,
}

pub struct Cluster {
    binary: PathBuf,
    _dir: tempfile::TempDir,
    pub members: Vec<Member>,
}

/// Options for starting a cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub size: usize,
    pub binary: PathBuf,
    pub extra_args: Vec<String>,
    pub token: String,
    /// Build every member's data dir with `keel snapshot restore` first.
    pub restore_from: Option<PathBuf>,
    /// Peer URLs use https (the caller passes the peer TLS flags).
    pub peer_tls: bool,
    /// The program that runs `snapshot restore` for `restore_from`
    /// (default: the server binary; etcdctl takes the same flags).
    pub restore_tool: Option<PathBuf>,
}

impl ClusterOptions {
    pub fn keel(size: usize) -> Self {
        Self {
            size,
            binary: keel_bin(),
            extra_args: Vec::new(),
            token: "keel-test".into(),
            restore_from: None,
            peer_tls: false,
            restore_tool: None,
        }
    }

    pub fn args(mut self, args: &[&str]) -> Self {
        self.extra_args.extend(args.iter().map(|s| s.to_string()));
        self
    }
}

const READY: &[&str] = &["ready to serve client requests"];

impl Cluster {
    /// Starts `size` keel members and waits until each serves clients.
    pub fn start(size: usize) -> Result<Cluster> {
        Self::start_with(ClusterOptions::keel(size))
    }

    /// Starts a cluster; when a member loses the race for one of its
    /// freshly picked ports (another test bound it first), starts over on
    /// new ports.
    pub fn start_with(opts: ClusterOptions) -> Result<Cluster> {
        let mut attempt = 0;
        loop {
            match Self::start_once(opts.clone()) {
                Err(e) if attempt < 3 && format!("{e:#}").contains("Address already in use") => attempt += 1,
                other => return other,
            }
        }
    }

    fn start_once(opts: ClusterOptions) -> Result<Cluster> {
        let dir = tempfile::tempdir()?;
        let mut members = Vec::new();
        for i in 0..opts.size {
            let name = format!("m{i}");
            members.push(Member {
                data_dir: dir.path().join(format!("{name}.data")),
                log: dir.path().join(format!("{name}.log")),
                client_url: format!("http://127.0.0.1:{}", free_port()?),
                peer_url: format!("{}://127.0.0.1:{}", if opts.peer_tls { "https" } else { "http" }, free_port()?),
                name,
                args: Vec::new(),
                child: None,
                log_offset: 0,
            });
        }
        let initial: Vec<String> = members.iter().map(|m| format!("{}={}", m.name, m.peer_url)).collect();
        for m in &mut members {
            m.args = vec![
                "--name".into(),
                m.name.clone(),
                "--data-dir".into(),
                m.data_dir.display().to_string(),
                "--listen-client-urls".into(),
                m.client_url.clone(),
                "--advertise-client-urls".into(),
                m.client_url.clone(),
                "--listen-peer-urls".into(),
                m.peer_url.clone(),
                "--initial-advertise-peer-urls".into(),
                m.peer_url.clone(),
                "--initial-cluster".into(),
                initial.join(","),
                "--initial-cluster-token".into(),
                opts.token.clone(),
            ];
            m.args.extend(opts.extra_args.iter().cloned());
        }
        if let Some(backup) = &opts.restore_from {
            for m in &members {
                let out = Command::new(opts.restore_tool.as_ref().unwrap_or(&opts.binary))
                    .env("ETCDCTL_API", "3")
                    .args(["snapshot", "restore"])
                    .arg(backup)
                    .args(["--name", &m.name, "--data-dir"])
                    .arg(&m.data_dir)
                    .args(["--initial-cluster", &initial.join(","), "--initial-cluster-token", &opts.token])
                    .args(["--initial-advertise-peer-urls", &m.peer_url])
                    .output()?;
                if !out.status.success() {
                    bail!("restore failed: {}", String::from_utf8_lossy(&out.stderr));
                }
            }
        }
        let mut cluster = Cluster { binary: opts.binary, _dir: dir, members };
        for i in 0..cluster.members.len() {
            cluster.spawn(i)?;
        }
        for i in 0..cluster.members.len() {
            cluster.wait_ready(i, Duration::from_secs(60))?;
        }
        Ok(cluster)
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let binary = self.binary.clone();
        let m = &mut self.members[i];
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&m.log)?;
        m.log_offset = log.metadata()?.len();
        let child = Command::new(&binary)
            .args(&m.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        m.child = Some(child);
        Ok(())
    }

    /// Defines a new member that will join this cluster (after the caller
    /// added it with MemberAdd); start it with [`Cluster::restart`].
    pub fn define_joining_member(&mut self, name: &str, extra_args: &[&str]) -> Result<usize> {
        let dir = self.members[0].data_dir.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut m = Member {
            data_dir: dir.join(format!("{name}.data")),
            log: dir.join(format!("{name}.log")),
            client_url: format!("http://127.0.0.1:{}", free_port()?),
            peer_url: format!("http://127.0.0.1:{}", free_port()?),
            name: name.to_string(),
            args: Vec::new(),
            child: None,
            log_offset: 0,
        };
        let mut initial: Vec<String> = self.members.iter().map(|m| format!("{}={}", m.name, m.peer_url)).collect();
        initial.push(format!("{}={}", m.name, m.peer_url));
        m.args = vec![
            "--name".into(),
            m.name.clone(),
            "--data-dir".into(),
            m.data_dir.display().to_string(),
            "--listen-client-urls".into(),
            m.client_url.clone(),
            "--advertise-client-urls".into(),
            m.client_url.clone(),
            "--listen-peer-urls".into(),
            m.peer_url.clone(),
            "--initial-advertise-peer-urls".into(),
            m.peer_url.clone(),
            "--initial-cluster".into(),
            initial.join(","),
            "--initial-cluster-state".into(),
            "existing".into(),
        ];
        m.args.extend(extra_args.iter().map(|s| s.to_string()));
        self.members.push(m);
        Ok(self.members.len() - 1)
    }

    /// Status of member `i` over gRPC.
    pub async fn status(&self, i: usize) -> Result<keel_proto::etcdserverpb::StatusResponse> {
        let mut client = keel_proto::etcdserverpb::maintenance_client::MaintenanceClient::connect(
            self.members[i].client_url.clone(),
        )
        .await?;
        let mut req = tonic::Request::new(keel_proto::etcdserverpb::StatusRequest {});
        req.set_timeout(Duration::from_secs(2));
        Ok(client.status(req).await?.into_inner())
    }

    /// The index of the member that currently leads, as the running
    /// members agree; waits up to `timeout` for one.
    pub async fn leader(&mut self, timeout: Duration) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            for i in 0..self.members.len() {
                if !self.is_running(i) {
                    continue;
                }
                if let Ok(s) = self.status(i).await {
                    let id = s.header.as_ref().map_or(0, |h| h.member_id);
                    if s.leader != 0 && s.leader == id {
                        return Ok(i);
                    }
                }
            }
            if Instant::now() > deadline {
                bail!("no leader within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until member `i` logs that it serves clients.
    pub fn wait_ready(&mut self, i: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let m = &mut self.members[i];
            let mut text = String::new();
            let mut f = File::open(&m.log)?;
            f.read_to_string(&mut text)?;
            let fresh = text.get(m.log_offset as usize..).unwrap_or("");
            if READY.iter().any(|r| fresh.contains(r)) {
                return Ok(());
            }
            if let Some(child) = m.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("{} exited with {status} before becoming ready; log:\n{fresh}", m.name);
                }
            }
            if Instant::now() > deadline {
                bail!("{} not ready after {timeout:?}; log:\n{fresh}", m.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self, i: usize) -> Result<Pid> {
        let child = self.members[i].child.as_ref().ok_or_else(|| anyhow!("member {i} is not running"))?;
        Ok(Pid::from_raw(child.id() as i32))
    }

    /// SIGKILL: the process dies without any chance to flush.
    pub fn kill(&mut self, i: usize) -> Result<()> {
        kill(self.pid(i)?, Signal::SIGKILL)?;
        if let Some(mut c) = self.members[i].child.take() {
            c.wait()?;
        }
        Ok(())
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self, i: usize) -> Result<std::process::ExitStatus> {
        kill(self.pid(i)?, Signal::SIGTERM)?;
        let mut c = self.members[i].child.take().ok_or_else(|| anyhow!("not running"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = c.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                bail!("member {i} did not stop within 30s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops every member, runs `prepare` on each stopped member's data
    /// dir, then starts them all with `binary` (all at once: a member
    /// reports ready only once a quorum is up).
    pub fn swap_binary(&mut self, binary: &Path, mut prepare: impl FnMut(&Member) -> Result<()>) -> Result<()> {
        for i in 0..self.members.len() {
            if self.is_running(i) {
                let status = self.stop(i)?;
                if !status.success() && status.code().is_some() {
                    bail!("member {i} exited with {status} when stopped");
                }
            }
        }
        for m in &self.members {
            prepare(m)?;
        }
        self.binary = binary.to_path_buf();
        for i in 0..self.members.len() {
            self.spawn(i)?;
        }
        for i in 0..self.members.len() {
            self.wait_ready(i, Duration::from_secs(60))?;
        }
        Ok(())
    }

    /// Starts a stopped member again from its data dir.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        self.spawn(i)?;
        self.wait_ready(i, Duration::from_secs(60))
    }

    /// Starts a stopped member again with `extra` flags after its own (a
    /// repeated flag's last value wins), for this and later restarts.
    pub fn restart_with(&mut self, i: usize, extra: &[&str]) -> Result<()> {
        self.members[i].args.extend(extra.iter().map(|s| s.to_string()));
        self.restart(i)
    }

    pub fn pause(&self, i: usize) -> Result<()> {
        Ok(kill(self.pid(i)?, Signal::SIGSTOP)?)
    }

    pub fn resume(&self, i: usize) -> Result<()> {
        Ok(kill(self.pid(i)?, Signal::SIGCONT)?)
    }

    pub fn is_running(&mut self, i: usize) -> bool {
        match self.members[i].child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.members[i].log).unwrap_or_default()
    }

    /// Client URLs of all members, comma-separated (etcdctl --endpoints).
    pub fn endpoints(&self) -> String {
        self.members.iter().map(|m| m.client_url.clone()).collect::<Vec<_>>().join(",")
    }

    /// Runs etcdctl (API v3) against the given members.
    pub fn etcdctl_at(&self, members: &[usize], args: &[&str], stdin: Option<&str>) -> Result<Output> {
        let endpoints: Vec<String> = members.iter().map(|&i| self.members[i].client_url.clone()).collect();
        let mut cmd = Command::new(etcdctl_bin());
        cmd.env("ETCDCTL_API", "3").arg("--endpoints").arg(endpoints.join(",")).args(args);
        cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().context("cannot run etcdctl (install etcd-client)")?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            use std::io::Write;
            pipe.write_all(input.as_bytes())?;
        }
        Ok(child.wait_with_output()?)
    }

    /// etcdctl against every member; fails unless it exits 0; returns stdout.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        let all: Vec<usize> = (0..self.members.len()).collect();
        let out = self.etcdctl_at(&all, args, None)?;
        if !out.status.success() {
            bail!(
                "etcdctl {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}
