//! Wires a member together: storage, MVCC, Raft, the peer and client
//! servers, and the start-up sequence that ends in etcd's readiness log
//! lines. [`start`] takes a validated [`Config`] and returns a running
//! member; tests and `main` both use it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use keel_proto::etcdserverpb::{
    auth_server::AuthServer, cluster_server::ClusterServer, kv_server::KvServer, lease_server::LeaseServer,
    maintenance_server::MaintenanceServer,
};
use keel_proto::keelpb::{internal_request, raft_peer_server::RaftPeerServer, InternalRequest, MemberAttributes};
use keel_proto::v3electionpb::election_server::ElectionServer;
use keel_proto::v3lockpb::lock_server::LockServer;

use crate::alarm::AlarmStore;
use crate::api;
use crate::api::peer::PeerService;
use crate::apply::{Applier, Compactor, Stores};
use crate::auth::AuthStore;
use crate::cluster::{cluster_id, member_id, MemberRegistry};
use crate::config::{ClusterState, Config};
use crate::lease::LeaseIdGen;
use crate::lease::Lessor;
use crate::mvcc::{CompactionJob, MvccStore};
use crate::raft::batcher::Batcher;
use crate::raft::log_store::LogStore;
use crate::raft::network::{max_peer_message, NetworkFactory, PeerClients};
use crate::raft::read_index::ReadIndex;
use crate::raft::state_machine::{Reloadable, StateMachine};
use crate::raft::{codec, MemberNode, Raft};
use crate::scratch::ScratchDir;
use crate::server::Server;
use crate::storage::keys::{BOOTSTRAP_MEMBERS, LOCAL_IDENTITY};
use crate::storage::rocks::RocksEngine;
use crate::storage::{SharedEngine, StorageError, Table, WriteBatch};
use crate::tasks::MemberTasks;
use crate::transport::{self, Http2Options, PeerConnector, Security, ServerTls};
use crate::watch::WatchHub;

/// gRPC message overhead etcd allows above --max-request-bytes.
const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

/// How long shutdown waits for the member's tasks: listeners stop at
/// once, connections get a second to close gracefully, duties stop at
/// their next await point.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A running member.
pub struct Node {
    pub server: Arc<Server>,
    /// Every task the member started: listeners, their connections, the
    /// duties.
    tasks: MemberTasks,
    /// Addresses the client listeners actually bound (port 0 resolved).
    pub client_addrs: Vec<std::net::SocketAddr>,
    pub peer_addrs: Vec<std::net::SocketAddr>,
}

/// Deletes compacted history on its own thread, in order.
struct CompactionThread {
    tx: std::sync::Mutex<std::sync::mpsc::Sender<CompactionJob>>,
}

impl CompactionThread {
    fn start(mvcc: Arc<MvccStore>) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<CompactionJob>();
        std::thread::Builder::new().name("mvcc-compaction".into()).spawn(move || {
            while let Ok(job) = rx.recv() {
                let rev = job.rev;
                match mvcc.finish_compaction(job) {
                    Ok(()) => tracing::info!(revision = rev, "finished scheduled compaction"),
                    Err(e) => tracing::error!(revision = rev, error = %e, "compaction failed"),
                }
            }
        })?;
        Ok(Self { tx: std::sync::Mutex::new(tx) })
    }
}

impl Compactor for CompactionThread {
    fn schedule(&self, job: CompactionJob) {
        if let Ok(tx) = self.tx.lock() {
            let _ = tx.send(job);
        }
    }
}

/// Rebuilds in-memory state after a snapshot install.
struct Reloader {
    engine: SharedEngine,
    stores: Stores,
    hub: Arc<WatchHub>,
}

impl Reloadable for Reloader {
    fn reload(&self) -> Result<(), StorageError> {
        let Stores { mvcc, members, leases, alarms, auth } = &self.stores;
        mvcc.reload().map_err(|e| StorageError::Io(e.to_string()))?;
        leases.reload(&self.engine, mvcc)?;
        alarms.reload(&self.engine)?;
        auth.reload(&self.engine)?;
        self.hub.reset(mvcc.current_rev());
        members.reload(&self.engine)
    }
}

fn host_of(url: &str) -> Option<String> {
    match transport::parse_address(url).ok()?.1 {
        transport::Address::Tcp { host, .. } => Some(host),
        transport::Address::Unix(_) => None,
    }
}

/// Keeps the log store told whether this member leads: a leader's appends
/// are flushed in the background, a follower's inline (see `log_store`).
async fn tell_log_store_the_role(
    mut metrics: tokio::sync::watch::Receiver<openraft::RaftMetrics<crate::raft::NodeId, MemberNode>>,
    log_store: LogStore,
) {
    loop {
        log_store.set_leading(metrics.borrow_and_update().state == openraft::ServerState::Leader);
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// The restored data is in the state machine, not in the Raft log: a
/// member joining later must get it as a snapshot, not by replaying the
/// log. So once the bootstrap membership applies, take a snapshot and
/// purge the log it covers.
async fn snapshot_restored_state(raft: Raft) {
    let wait = Some(Duration::from_secs(600));
    if raft.wait(wait).applied_index_at_least(Some(0), "restored membership applied").await.is_err() {
        return;
    }
    if let Err(e) = raft.trigger().snapshot().await {
        tracing::warn!(error = %e, "cannot snapshot the restored state");
        return;
    }
    let built = raft.wait(wait).metrics(|m| m.snapshot.is_some(), "snapshot of the restored state").await;
    let Ok(metrics) = built else {
        tracing::warn!("no snapshot of the restored state; members added later will replay the log");
        return;
    };
    if let Some(last) = metrics.snapshot {
        if let Err(e) = raft.trigger().purge_log(last.index).await {
            tracing::warn!(error = %e, "cannot purge the log behind the restored state's snapshot");
        }
    }
}

/// Determines this member's id and the cluster id: from the data dir when
/// it was initialised before, from the bootstrap flags for a new cluster,
/// or by asking the existing cluster's members (`--initial-cluster-state
/// existing`), which know the id MemberAdd gave this member.
async fn identity(
    engine: &SharedEngine,
    config: &Config,
    peers: &PeerClients,
) -> anyhow::Result<(u64, u64, Bootstrap)> {
    if let Some(bytes) = engine.get(Table::RaftState, LOCAL_IDENTITY)? {
        let (id, cid): (u64, u64) = codec::decode(&bytes)?;
        return Ok((id, cid, Bootstrap::Restart));
    }
    let token = &config.settings.initial_cluster_token;
    if config.initial_cluster_state == ClusterState::Existing {
        let mut own_urls = config.initial_advertise_peer_urls.clone();
        own_urls.sort();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            for (name, urls) in &config.initial_cluster {
                if *name == config.settings.name {
                    continue;
                }
                for url in urls {
                    let Ok(info) = peers.cluster_info(url, Duration::from_secs(2)).await else { continue };
                    let me = info.members.iter().find(|m| {
                        let mut urls = m.peer_ur_ls.clone();
                        urls.sort();
                        urls == own_urls
                    });
                    return match me {
                        Some(m) => Ok((m.id, info.cluster_id, Bootstrap::Join)),
                        None => Err(anyhow!(
                            "error validating peerURLs: member with peer URLs {} is not in the existing cluster (add it with MemberAdd first)",
                            own_urls.join(",")
                        )),
                    };
                }
            }
            if std::time::Instant::now() > deadline {
                return Err(anyhow!("cannot fetch cluster info from peer URLs in --initial-cluster"));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let ids: Vec<u64> = config.initial_cluster.iter().map(|(_, urls)| member_id(urls, token, None)).collect();
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    if unique.len() != ids.len() {
        return Err(anyhow!("--initial-cluster has members with identical peer URLs"));
    }
    let id = member_id(&config.initial_advertise_peer_urls, token, None);
    Ok((id, cluster_id(&ids), Bootstrap::New))
}

/// How this start relates to the data dir.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bootstrap {
    /// First start of a member of a new cluster.
    New,
    /// First start of a member added to a running cluster.
    Join,
    /// Restart from an existing data dir.
    Restart,
}

fn raft_config(config: &Config) -> anyhow::Result<openraft::Config> {
    let election = config.settings.election_timeout.as_millis() as u64;
    let heartbeat = config.settings.heartbeat_interval.as_millis() as u64;
    // openraft waits for its leader lease (= election_timeout_max) plus a
    // random election timeout in [min, max) before campaigning. With
    // [et/2, et) a follower campaigns 1.5-2 election timeouts after losing
    // its leader, close to etcd's randomized [et, 2et).
    let c = openraft::Config {
        cluster_name: config.settings.initial_cluster_token.clone(),
        heartbeat_interval: heartbeat,
        election_timeout_min: (election / 2).max(heartbeat + 1),
        election_timeout_max: election.max(heartbeat + 2),
        install_snapshot_timeout: (election * 10).max(5_000),
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(config.snapshot_count),
        max_in_snapshot_log_to_keep: config.snapshot_catchup_entries,
        snapshot_max_chunk_size: 1 << 20,
        max_payload_entries: 512,
        ..Default::default()
    };
    Ok(c.validate()?)
}

/// Which listeners a TLS setting is for.
#[derive(Clone, Copy)]
enum Side {
    Client,
    Peer,
}

/// The TLS acceptor for one side: certificate files if given, else a
/// self-signed certificate under `<data-dir>/fixtures/<side>` when auto
/// TLS is on, naming the hosts the side listens on and advertises.
fn tls_acceptor(config: &Config, side: Side) -> anyhow::Result<Option<ServerTls>> {
    let (files, auto, fixtures, listen, advertise) = match side {
        Side::Client => (
            &config.client_tls,
            config.client_auto_tls,
            "client",
            &config.listen_client_urls,
            &config.settings.advertise_client_urls,
        ),
        Side::Peer => (
            &config.peer_tls,
            config.peer_auto_tls,
            "peer",
            &config.listen_peer_urls,
            &config.initial_advertise_peer_urls,
        ),
    };
    if let Some(files) = files {
        return Ok(Some(transport::server_tls(files)?));
    }
    if !auto {
        return Ok(None);
    }
    let mut hosts: Vec<String> = listen.iter().chain(advertise).filter_map(|u| host_of(u)).collect();
    hosts.sort();
    hosts.dedup();
    let dir = config.settings.data_dir.join("fixtures").join(fixtures);
    Ok(Some(transport::server_tls(&transport::self_signed(&dir, &hosts, &config.tls_policy)?)?))
}

/// One listener per address: `http://` and `https://` URLs naming the same
/// address share a port, as etcd allows.
fn listeners(urls: &[String], tls: &Option<ServerTls>) -> anyhow::Result<Vec<(String, Security)>> {
    let mut by_address: Vec<(transport::Address, String, bool, bool)> = Vec::new();
    for url in urls {
        let (secure, address) = transport::parse_address(url)?;
        match by_address.iter_mut().find(|(a, ..)| *a == address) {
            Some((_, _, plain, tls)) => {
                *plain |= !secure;
                *tls |= secure;
            }
            None => by_address.push((address, url.clone(), !secure, secure)),
        }
    }
    by_address
        .into_iter()
        .map(|(_, url, plain, secure)| {
            let security = match (plain, secure, tls) {
                (_, false, _) => Security::Plain,
                (true, true, Some(a)) => Security::Both(a.clone()),
                (false, true, Some(a)) => Security::Tls(a.clone()),
                (_, true, None) => return Err(anyhow!("{url}: TLS is not configured")),
            };
            Ok((url, security))
        })
        .collect()
}

/// Opens storage, starts Raft and the servers, and returns once the
/// member has joined its cluster and serves clients.
pub async fn start(config: Config) -> anyhow::Result<Node> {
    // An etcd member's data dir is taken over on the first start.
    crate::etcd_data_dir::convert_if_etcd(&config.settings.data_dir)?;
    let member_dir = config.settings.data_dir.join("member");
    let db_dir = member_dir.join("db");
    std::fs::create_dir_all(&db_dir).with_context(|| format!("cannot create data dir {}", db_dir.display()))?;
    let engine: SharedEngine = Arc::new(RocksEngine::open(&db_dir)?);
    match start_on(config, engine.clone(), &member_dir).await {
        Ok(node) => Ok(node),
        Err(e) => {
            // The process exits with this error next: close the database
            // first, so RocksDB's background threads do not outlive the C++
            // runtime (seen as an abort, "pthread lock: Invalid argument",
            // after a member refused to start).
            if let Err(close) = engine.close() {
                tracing::warn!(error = %close, "cannot close the database");
            }
            Err(e)
        }
    }
}

/// The member's state: what applying entries changes, and the Raft
/// storage over it.
struct MemberState {
    stores: Stores,
    hub: Arc<WatchHub>,
    state_machine: StateMachine,
    log_store: LogStore,
}

/// Loads the in-memory state from the engine and opens the state machine
/// and log store.
fn open_state(
    config: &Config,
    engine: &SharedEngine,
    member_dir: &std::path::Path,
    scratch: &ScratchDir,
) -> anyhow::Result<MemberState> {
    let mvcc = Arc::new(MvccStore::open(engine.clone())?);
    let members = Arc::new(MemberRegistry::load(engine)?);
    let compactor: Arc<dyn Compactor> = Arc::new(CompactionThread::start(mvcc.clone())?);
    let hub = Arc::new(WatchHub::new(mvcc.current_rev()));
    let leases = Arc::new(Lessor::load(engine, &mvcc)?);
    let alarms = Arc::new(AlarmStore::load(engine)?);
    let auth = Arc::new(AuthStore::load(engine, config.auth_tokens.provider())?);
    let stores = Stores { mvcc, members, leases, alarms, auth };
    let applier = Applier::new(engine.clone(), stores.clone(), hub.clone(), compactor);
    let reloader = Arc::new(Reloader { engine: engine.clone(), stores: stores.clone(), hub: hub.clone() });
    let state_machine =
        StateMachine::open(engine.clone(), applier, member_dir.join("snap"), scratch.clone(), reloader)?;
    let log_store = LogStore::open_checked(engine.clone(), &member_dir.join("journal"), &member_dir.join("raft.ack"))?;
    Ok(MemberState { stores, hub, state_machine, log_store })
}

/// Starts Raft, and on a first start bootstraps the cluster (a new one,
/// or one restored from a snapshot) and records the member's identity.
async fn start_raft(
    config: &Config,
    (id, cid, bootstrap): (u64, u64, Bootstrap),
    engine: &SharedEngine,
    peers: &Arc<PeerClients>,
    state: &MemberState,
    tasks: &MemberTasks,
) -> anyhow::Result<Raft> {
    let network = NetworkFactory { clients: peers.clone() };
    let raft =
        Raft::new(id, Arc::new(raft_config(config)?), network, state.log_store.clone(), state.state_machine.clone())
            .await
            .map_err(|e| anyhow!("cannot start raft: {e}"))?;
    // Ends with Raft (its metrics channel closes), which shuts down after
    // the member's tasks: not one of them.
    tokio::spawn(tell_log_store_the_role(raft.metrics(), state.log_store.clone()));

    // A restored member bootstraps the membership given to the restore.
    if bootstrap == Bootstrap::Restart && !raft.is_initialized().await.map_err(|e| anyhow!("{e}"))? {
        if let Some(bytes) = engine.get(Table::RaftState, BOOTSTRAP_MEMBERS)? {
            let members: Vec<(u64, Vec<String>)> = codec::decode(&bytes)?;
            let nodes: BTreeMap<u64, MemberNode> =
                members.into_iter().map(|(id, urls)| (id, MemberNode { peer_urls: urls })).collect();
            raft.initialize(nodes).await.map_err(|e| anyhow!("cannot bootstrap the restored cluster: {e}"))?;
            tracing::info!("bootstrapped a cluster restored from a snapshot");
            tasks.spawn_until_stopped(snapshot_restored_state(raft.clone()));
        }
    }
    if bootstrap != Bootstrap::Restart {
        if bootstrap == Bootstrap::New && !raft.is_initialized().await.map_err(|e| anyhow!("{e}"))? {
            let mut nodes = BTreeMap::new();
            for (_, urls) in &config.initial_cluster {
                nodes.insert(
                    member_id(urls, &config.settings.initial_cluster_token, None),
                    MemberNode { peer_urls: urls.clone() },
                );
            }
            raft.initialize(nodes).await.map_err(|e| anyhow!("cannot bootstrap the cluster: {e}"))?;
        }
        let mut b = WriteBatch::new();
        b.put(Table::RaftState, LOCAL_IDENTITY, codec::encode(&(id, cid))?);
        engine.write(b, true)?;
    }
    Ok(raft)
}

/// The HTTP/2 settings of client listeners: etcd's flags.
fn client_http2(config: &Config) -> Http2Options {
    Http2Options {
        max_concurrent_streams: config.settings.max_concurrent_streams,
        keepalive_min_time: config.grpc_keepalive_min_time,
        keepalive_interval: config.grpc_keepalive_interval,
        keepalive_timeout: config.grpc_keepalive_timeout,
        authority_shim: true,
    }
}

/// The HTTP/2 settings of peer listeners: peers keep long-lived
/// append-entries streams open (and ping over them every 10 s), which a
/// small stream limit or a long minimum ping interval would starve or cut
/// off; they are keel members, which need no authority repair.
fn peer_http2(config: &Config) -> Http2Options {
    Http2Options {
        max_concurrent_streams: u32::MAX,
        keepalive_min_time: Duration::ZERO,
        authority_shim: false,
        ..client_http2(config)
    }
}

/// Serves keel's peer service on every peer URL; returns the bound
/// addresses.
async fn serve_peers(
    config: &Config,
    server: &Arc<Server>,
    peer_message_limit: usize,
    tasks: &MemberTasks,
) -> anyhow::Result<Vec<std::net::SocketAddr>> {
    let peer_tls = tls_acceptor(config, Side::Peer)?;
    let router = tonic::service::Routes::new(
        RaftPeerServer::new(PeerService::new(server.clone()))
            .max_decoding_message_size(peer_message_limit)
            .max_encoding_message_size(peer_message_limit),
    )
    .prepare()
    .into_axum_router();
    let http2 = peer_http2(config);
    let mut addrs = Vec::new();
    for (url, security) in listeners(&config.listen_peer_urls, &peer_tls)? {
        let listener = transport::bind(&url).await.with_context(|| format!("cannot listen on peer URL {url}"))?;
        addrs.extend(listener.local_addr());
        tracing::info!(address = %url, "listening for peers");
        tasks.spawn(transport::serve(listener, security, router.clone(), http2, tasks.clone()));
    }
    Ok(addrs)
}

/// Every gRPC service etcd serves, behind the middleware every call
/// passes first.
fn grpc_router(config: &Config, server: &Arc<Server>, tasks: &MemberTasks) -> axum::Router {
    let max_msg = config.settings.max_request_bytes + GRPC_OVERHEAD_BYTES;
    let mut routes = tonic::service::Routes::new(
        KvServer::new(api::kv::KvService::new(server.clone()))
            .max_decoding_message_size(max_msg)
            .max_encoding_message_size(usize::MAX),
    );
    routes = routes
        .add_service(api::watch::WatchServer::new(server.clone(), server.hub.clone(), max_msg))
        .add_service(LeaseServer::new(api::lease::LeaseService::new(server.clone())).max_decoding_message_size(max_msg))
        .add_service(
            ClusterServer::new(api::cluster::ClusterService::new(server.clone())).max_decoding_message_size(max_msg),
        )
        .add_service(
            MaintenanceServer::new(api::maintenance::MaintenanceService::new(server.clone()))
                .max_decoding_message_size(max_msg),
        )
        .add_service(AuthServer::new(api::auth::AuthService::new(server.clone())).max_decoding_message_size(max_msg))
        .add_service(LockServer::new(api::lock::LockService::new(server.clone())).max_decoding_message_size(max_msg))
        .add_service(
            ElectionServer::new(api::election::ElectionService::new(server.clone())).max_decoding_message_size(max_msg),
        );
    // The standard gRPC health service: SERVING while a leader is known.
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    routes = routes.add_service(health_service);
    tasks.spawn_until_stopped(report_grpc_health(server.clone(), health_reporter));
    routes
        .prepare()
        .into_axum_router()
        .layer(axum::middleware::from_fn_with_state(server.clone(), api::grpc_call::grpc_call))
}

/// /health, /livez, /readyz, /metrics, /version and (unless turned off)
/// the JSON gateway.
fn http_router(config: &Config, server: &Arc<Server>) -> axum::Router {
    let monitoring = crate::http::monitoring(server.clone());
    if config.enable_grpc_gateway {
        monitoring.merge(crate::http::gateway::routes(server.clone()))
    } else {
        monitoring
    }
}

/// Keeps the gRPC health service's status in step with the leader.
async fn report_grpc_health(server: Arc<Server>, reporter: tonic_health::server::HealthReporter) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let mut last = None;
    loop {
        ticker.tick().await;
        let serving = server.leader().is_some();
        if last != Some(serving) {
            let status =
                if serving { tonic_health::ServingStatus::Serving } else { tonic_health::ServingStatus::NotServing };
            reporter.set_service_status("", status).await;
            last = Some(serving);
        }
    }
}

/// etcd's line for each client listener (scripts and tests wait for it).
fn note_client_security(url: &str, security: &Security) {
    match security {
        Security::Plain => {
            tracing::warn!(address = %url, "serving client traffic insecurely; this is strongly discouraged!")
        }
        _ => tracing::info!(address = %url, "serving client traffic securely"),
    }
}

/// Serves clients on every client URL, and /metrics and /health on every
/// metrics URL; returns the bound client addresses.
async fn serve_clients(
    config: &Config,
    server: &Arc<Server>,
    tasks: &MemberTasks,
) -> anyhow::Result<Vec<std::net::SocketAddr>> {
    let client_tls = tls_acceptor(config, Side::Client)?;
    let http2 = client_http2(config);
    let grpc = grpc_router(config, server, tasks);
    let http = http_router(config, server);
    // With HTTP-only listeners, the client URLs serve gRPC alone (etcd 3.6).
    let router = if config.listen_client_http_urls.is_empty() { http.clone().merge(grpc) } else { grpc };
    let mut addrs = Vec::new();
    for (url, security) in listeners(&config.listen_client_urls, &client_tls)? {
        let listener = transport::bind(&url).await.with_context(|| format!("cannot listen on client URL {url}"))?;
        addrs.extend(listener.local_addr());
        note_client_security(&url, &security);
        tasks.spawn(transport::serve(listener, security, router.clone(), http2, tasks.clone()));
    }
    for (url, security) in listeners(&config.listen_client_http_urls, &client_tls)? {
        let listener = transport::bind(&url).await.with_context(|| format!("cannot listen on client URL {url}"))?;
        note_client_security(&url, &security);
        tasks.spawn(transport::serve(listener, security, http.clone(), http2, tasks.clone()));
    }
    for url in &config.listen_metrics_urls {
        let listener = transport::bind(url).await.with_context(|| format!("cannot listen on metrics URL {url}"))?;
        let secure = url.starts_with("https") || url.starts_with("unixs");
        let security = match (secure, &client_tls) {
            (true, Some(tls)) => Security::Tls(tls.clone()),
            (true, None) => return Err(anyhow!("{url}: https metrics URLs need client TLS")),
            (false, _) => Security::Plain,
        };
        tracing::info!(address = %url, "serving metrics and health");
        let router = crate::http::monitoring(server.clone());
        tasks.spawn(transport::serve(listener, security, router, http2, tasks.clone()));
    }
    Ok(addrs)
}

/// Starts the work the member does on its own; it runs until shutdown.
fn start_duties(config: &Config, server: &Arc<Server>, tasks: &MemberTasks) {
    use crate::duties::{compaction, corruption, downgrade, lease, promotion};
    tasks.spawn_until_stopped(promotion::run_learner_promotion(server.clone(), server.members.clone()));
    let interval = config.downgrade_check_time;
    tasks.spawn_until_stopped(downgrade::run_downgrade_monitor(server.clone(), server.members.clone(), interval));
    let s = server.clone();
    tasks.spawn_until_stopped(async move { s.check_quorum().await });
    tasks.spawn_until_stopped(lease::run_lease_clocks(server.clone()));
    let s = server.clone();
    tasks.spawn_until_stopped(async move { s.export_metrics().await });
    if let Some(retention) = config.auto_compaction {
        tasks.spawn_until_stopped(compaction::run_auto_compaction(server.clone(), server.mvcc.clone(), retention));
    }
    if !config.corrupt_check_interval.is_zero() {
        let every = config.corrupt_check_interval;
        tasks.spawn_until_stopped(corruption::run_corruption_check(server.clone(), server.mvcc.clone(), every));
    }
}

/// etcd's `--bootstrap-defrag-threshold-megabytes`: before serving,
/// defragment when at least that many MiB of the database are free space.
fn bootstrap_defrag(engine: &SharedEngine, threshold_megabytes: u64) -> anyhow::Result<()> {
    if threshold_megabytes == 0 {
        return Ok(());
    }
    let size = engine.size(&crate::storage::Table::STATE_MACHINE)?;
    let free = size.total_bytes.saturating_sub(size.live_bytes);
    if free < threshold_megabytes << 20 {
        tracing::info!(
            "current-db-size-bytes" = size.total_bytes,
            "current-db-size-in-use-bytes" = size.live_bytes,
            "free-space-bytes" = free,
            "threshold-megabytes" = threshold_megabytes,
            "Skipping defragmentation"
        );
        return Ok(());
    }
    let started = std::time::Instant::now();
    engine.defragment()?;
    tracing::info!(took = ?started.elapsed(), "defragmented at start");
    Ok(())
}

/// The rest of [`start`], on the opened engine.
async fn start_on(config: Config, engine: SharedEngine, member_dir: &std::path::Path) -> anyhow::Result<Node> {
    let peer_tls_client = match (&config.peer_tls, config.peer_auto_tls) {
        (Some(files), _) => Some(transport::peer_client_tls(Some(files), &config.tls_policy)?),
        (None, true) => Some(transport::peer_client_tls(None, &config.tls_policy)?),
        (None, false) => None,
    };
    let connector = PeerConnector {
        tls: peer_tls_client,
        connect_timeout: Duration::from_secs(1),
        loopback_source: crate::transport::loopback_source(&config.listen_peer_urls),
    };
    let peer_message_limit = max_peer_message(config.settings.max_request_bytes);
    let peers = Arc::new(PeerClients::new(connector, peer_message_limit));
    let identity = identity(&engine, &config, &peers).await?;
    let (id, cid, _) = identity;
    let settings = &config.settings;
    crate::metrics::init(id, &settings.etcd_version, &settings.etcd_cluster_version(), settings.quota_backend_bytes);
    tracing::info!(
        name = %settings.name,
        data_dir = %settings.data_dir.display(),
        member_id = %format!("{id:x}"),
        cluster_id = %format!("{cid:x}"),
        keel_version = crate::version::KEEL_VERSION,
        "snapshot-count" = config.snapshot_count,
        "snapshot-catchup-entries" = config.snapshot_catchup_entries,
        "max-learners" = settings.max_learners,
        // keel has no v2 store: what etcd 3.6 enforces.
        "v2-deprecation" = "write-only",
        "starting keel member"
    );

    let tasks = MemberTasks::new();
    // A start that fails from here on stops the tasks it started.
    let stop_on_failure = tasks.stop_signal().drop_guard();
    let scratch = ScratchDir::open_swept(&member_dir.join("tmp"))?;
    bootstrap_defrag(&engine, config.bootstrap_defrag_threshold_megabytes)?;
    let state = open_state(&config, &engine, member_dir, &scratch)?;
    let members = &state.stores.members;
    crate::downgrade::check_start_version(
        &config.settings.etcd_version,
        &members.published_versions(),
        members.downgrade_target().as_deref(),
    )
    .map_err(|e| anyhow!(e))?;
    let raft = start_raft(&config, identity, &engine, &peers, &state, &tasks).await?;
    let MemberState { stores: Stores { mvcc, members, leases, alarms, auth }, hub, state_machine, log_store } = state;
    let server = Arc::new(Server {
        id,
        cluster_id: cid,
        settings: config.settings.clone(),
        raft: raft.clone(),
        proposals: Batcher::start(raft.clone()),
        read_index: ReadIndex::start(raft.clone(), peers.clone()),
        engine: engine.clone(),
        mvcc,
        state_machine,
        log_store,
        members,
        leases,
        alarms,
        auth,
        hub,
        db_size: std::sync::atomic::AtomicU64::new(0),
        lease_ids: LeaseIdGen::new(id),
        peers,
        transfer_gate: tokio::sync::RwLock::new(()),
        scratch,
    });

    // Peers first: the rest of the cluster needs us to elect a leader.
    let peer_addrs = serve_peers(&config, &server, peer_message_limit, &tasks).await?;
    let client_addrs = serve_clients(&config, &server, &tasks).await?;

    // A sole voter need not wait for an election timeout.
    let sole_voter = {
        let m = raft.metrics().borrow().membership_config.clone();
        let voters: Vec<u64> = m.membership().voter_ids().collect();
        voters == vec![id]
    };
    if sole_voter {
        let _ = raft.trigger().elect().await;
    }
    start_duties(&config, &server, &tasks);

    publish(&server).await?;
    if config.initial_corrupt_check {
        let check = crate::duties::corruption::CorruptionCheck::new(server.clone(), server.mvcc.clone());
        let bad = check.mismatched_members().await?;
        if !bad.is_empty() {
            let ids: Vec<String> = bad.iter().map(|id| format!("{id:x}")).collect();
            return Err(anyhow!("initial corruption check failed: data differs from members {}", ids.join(", ")));
        }
        tracing::info!("initial corruption check passed");
    }
    let cluster_version = settings.etcd_cluster_version();
    tracing::info!(cluster_version = %cluster_version, "enabled capabilities for version {cluster_version}");
    for url in config.listen_client_urls.iter().chain(&config.listen_client_http_urls) {
        tracing::info!(address = %url, "ready to serve client requests");
    }
    stop_on_failure.disarm();
    Ok(Node { server, tasks, client_addrs, peer_addrs })
}

/// Announces this member's name and client URLs through Raft (etcd's
/// "publish"), retrying until it is committed.
async fn publish(server: &Arc<Server>) -> anyhow::Result<()> {
    let attrs = MemberAttributes {
        member_id: server.id,
        name: server.settings.name.clone(),
        client_urls: server.settings.advertise_client_urls.clone(),
        is_learner: false,
        version: server.settings.etcd_version.clone(),
    };
    let current = server.members.get(server.id);
    if current.is_some_and(|c| c.name == attrs.name && c.client_urls == attrs.client_urls && c.version == attrs.version)
    {
        tracing::info!(member_id = %format!("{:x}", server.id), "published local member to cluster");
        return Ok(());
    }
    loop {
        let req =
            InternalRequest { header: None, request: Some(internal_request::Request::PublishMember(attrs.clone())) };
        match server.propose(req).await {
            Ok(_) => {
                tracing::info!(
                    member_id = %format!("{:x}", server.id),
                    cluster_id = %format!("{:x}", server.cluster_id),
                    "published local member to cluster"
                );
                return Ok(());
            }
            Err(crate::error::Error::Stopped) => return Err(anyhow!("stopped before publishing")),
            Err(_) if server.members.is_removed(server.id) || *server.peers.subscribe_removed().borrow() => {
                return Err(anyhow!("the member has been permanently removed from the cluster"));
            }
            Err(e) => {
                tracing::warn!(error = %e, "failed to publish local member to cluster; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

impl Node {
    /// Stops serving and the duties, shuts Raft down and makes every
    /// write durable.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let left = self.tasks.stop(SHUTDOWN_GRACE).await;
        if left > 0 {
            tracing::warn!(tasks = left, "tasks still running after {SHUTDOWN_GRACE:?}; stopping anyway");
        }
        self.server.raft.shutdown().await.map_err(|e| anyhow!("raft shutdown: {e}"))?;
        self.server.engine.close()?;
        Ok(())
    }

    pub fn data_dir(&self) -> PathBuf {
        self.server.settings.data_dir.clone()
    }

    /// Resolves once this member learns that the cluster removed it.
    pub async fn removed(&self) {
        let mut from_peers = self.server.peers.subscribe_removed();
        let mut removals = self.server.members.subscribe_removals();
        loop {
            if *from_peers.borrow_and_update() || self.server.members.is_removed(self.server.id) {
                return;
            }
            tokio::select! {
                r = from_peers.changed() => if r.is_err() { std::future::pending::<()>().await },
                r = removals.changed() => if r.is_err() { std::future::pending::<()>().await },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// etcd's HTTP/2 rules are for clients: the authority repair and the
    /// ping policy stay off peer links, as do the stream limit.
    #[test]
    fn peer_listeners_skip_the_client_http2_rules() -> Result<(), Box<dyn std::error::Error>> {
        let flags = crate::config::Flags::try_parse_from(["keel", "--grpc-keepalive-min-time", "5s"])?;
        let config = flags.validate()?;
        let (client, peer) = (client_http2(&config), peer_http2(&config));
        assert!(client.authority_shim);
        assert_eq!(client.keepalive_min_time, Duration::from_secs(5));
        assert!(!peer.authority_shim);
        assert_eq!(peer.keepalive_min_time, Duration::ZERO);
        assert_eq!(peer.max_concurrent_streams, u32::MAX);
        Ok(())
    }
}
