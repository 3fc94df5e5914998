//! etcd's command line: the same flag names, defaults and `ETCD_*`
//! environment variables, parsed with clap, then validated into a
//! [`Config`]. Flags for features keel does not have are still recognised:
//! accepted when ignoring them is harmless (they only tune something keel
//! does differently), rejected with a clear message otherwise. Unknown
//! flags fail, as in etcd.

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser};

use crate::auth::tokens::TokenSpec;
use crate::cluster::{parse_url, parse_urls};
use crate::duties::compaction::CompactionMode;
use crate::go_duration::parse_go_duration;
use crate::server::Settings;
use crate::transport::tls_policy::AllowedClient;
use crate::transport::{TlsFiles, TlsPolicy};

use crate::version::ETCD_API_VERSION;

pub mod etcd_releases;
use etcd_releases::FeatureGates;

/// Default backend quota (etcd: 2 GiB).
pub const DEFAULT_QUOTA_BYTES: u64 = 2 << 30;

/// An etcd 3.x release number, "3.MINOR.PATCH".
fn parse_etcd_version(s: &str) -> Result<String, String> {
    let parts: Vec<&str> = s.split('.').collect();
    let numeric = parts.iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    if parts.len() != 3 || !numeric || parts[0] != "3" {
        return Err(format!("{s:?} is not an etcd 3.x version (3.MINOR.PATCH)"));
    }
    Ok(s.to_string())
}

pub(crate) fn parse_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(format!("invalid boolean value {s:?}")),
    }
}

macro_rules! go_bool {
    () => {
        ArgAction::Set
    };
}

/// etcd-compatible flags. Field docs are the `--help` text.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "keel",
    about = "keel: an etcd-compatible, Raft-replicated key-value store",
    disable_version_flag = true,
    disable_help_subcommand = true,
    // Go's flag package lets a flag repeat (the last one wins); etcd's
    // test harness relies on it.
    args_override_self = true
)]
pub struct Flags {
    /// Print the version and exit.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", require_equals = true, value_parser = parse_bool, default_value = "false", action = go_bool!())]
    pub version: bool,

    /// Path to the server configuration file (not supported by keel).
    #[arg(long, env = "ETCD_CONFIG_FILE", default_value = "")]
    pub config_file: String,

    // ---- Member ----
    /// Human-readable name for this member.
    #[arg(long, env = "ETCD_NAME", default_value = "default")]
    pub name: String,
    /// Path to the data directory (default: ${name}.etcd).
    #[arg(long, env = "ETCD_DATA_DIR", default_value = "")]
    pub data_dir: String,
    /// Path to the dedicated wal directory (keel keeps its log with its data).
    #[arg(long, env = "ETCD_WAL_DIR", default_value = "")]
    pub wal_dir: String,
    /// Number of applied entries between state-machine snapshots.
    #[arg(long, env = "ETCD_SNAPSHOT_COUNT", default_value_t = 10_000)]
    pub snapshot_count: u64,
    /// Time (in milliseconds) of a heartbeat interval.
    #[arg(long, env = "ETCD_HEARTBEAT_INTERVAL", default_value_t = 100)]
    pub heartbeat_interval: u64,
    /// Time (in milliseconds) for an election to timeout.
    #[arg(long, env = "ETCD_ELECTION_TIMEOUT", default_value_t = 1000)]
    pub election_timeout: u64,
    /// Whether to fast-forward initial election ticks on boot.
    #[arg(long, env = "ETCD_INITIAL_ELECTION_TICK_ADVANCE", num_args = 0..=1, default_missing_value = "true", require_equals = true, value_parser = parse_bool, default_value = "true", action = go_bool!())]
    pub initial_election_tick_advance: bool,
    /// List of URLs to listen on for peer traffic.
    #[arg(long, env = "ETCD_LISTEN_PEER_URLS", default_value = "http://localhost:2380")]
    pub listen_peer_urls: String,
    /// List of URLs to listen on for client traffic.
    #[arg(long, env = "ETCD_LISTEN_CLIENT_URLS", default_value = "http://localhost:2379")]
    pub listen_client_urls: String,
    /// Maximum number of snapshot files to retain (0 is unlimited).
    #[arg(long, env = "ETCD_MAX_SNAPSHOTS", default_value_t = 5)]
    pub max_snapshots: u64,
    /// Maximum number of wal files to retain (0 is unlimited).
    #[arg(long, env = "ETCD_MAX_WALS", default_value_t = 5)]
    pub max_wals: u64,
    /// Raise alarms when backend size exceeds the given quota (0: 2 GiB).
    #[arg(long, env = "ETCD_QUOTA_BACKEND_BYTES", default_value_t = 0)]
    pub quota_backend_bytes: i64,
    /// Maximum time before committing the backend transaction (bbolt tuning; ignored).
    #[arg(long, env = "ETCD_BACKEND_BATCH_INTERVAL", default_value = "")]
    pub backend_batch_interval: String,
    /// Maximum operations before committing the backend transaction (bbolt tuning; ignored).
    #[arg(long, env = "ETCD_BACKEND_BATCH_LIMIT", default_value_t = 0)]
    pub backend_batch_limit: u64,
    /// bbolt freelist type (ignored: keel does not use bbolt).
    #[arg(long, env = "ETCD_BACKEND_BBOLT_FREELIST_TYPE", default_value = "map")]
    pub backend_bbolt_freelist_type: String,
    /// Maximum number of operations permitted in a transaction.
    #[arg(long, env = "ETCD_MAX_TXN_OPS", default_value_t = 128)]
    pub max_txn_ops: u32,
    /// Maximum client request size in bytes the server will accept.
    #[arg(long, env = "ETCD_MAX_REQUEST_BYTES", default_value_t = 1_572_864)]
    pub max_request_bytes: u32,
    /// Maximum concurrent streams that each client can open at a time.
    #[arg(long, env = "ETCD_MAX_CONCURRENT_STREAMS", default_value_t = u32::MAX)]
    pub max_concurrent_streams: u32,
    /// Minimum interval a client should wait before pinging the server.
    #[arg(long, env = "ETCD_GRPC_KEEPALIVE_MIN_TIME", default_value = "5s", value_parser = parse_go_duration)]
    pub grpc_keepalive_min_time: Duration,
    /// Frequency of server-to-client pings to check a connection is alive (0 disables).
    #[arg(long, env = "ETCD_GRPC_KEEPALIVE_INTERVAL", default_value = "2h", value_parser = parse_go_duration)]
    pub grpc_keepalive_interval: Duration,
    /// Additional wait before closing a non-responsive connection (0 disables).
    #[arg(long, env = "ETCD_GRPC_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = parse_go_duration)]
    pub grpc_keepalive_timeout: Duration,
    /// Disables fsync (unsafe: loses data on power failure).
    #[arg(long, env = "ETCD_UNSAFE_NO_FSYNC", num_args = 0..=1, default_missing_value = "true", require_equals = true, value_parser = parse_bool, default_value = "false", action = go_bool!())]
    pub unsafe_no_fsync: bool,

    // ---- Clustering ----
    /// This member's peer URLs to advertise to the rest of the cluster.
    #[arg(long, env = "ETCD_INITIAL_ADVERTISE_PEER_URLS", default_value = "http://localhost:2380")]
    pub initial_advertise_peer_urls: String,
    /// Initial cluster configuration for bootstrapping.
    #[arg(long, env = "ETCD_INITIAL_CLUSTER", default_value = "")]
    pub initial_cluster: String,
    /// Initial cluster state ('new' or 'existing').
    #[arg(long, env = "ETCD_INITIAL_CLUSTER_STATE", default_value = "new")]
    pub initial_cluster_state: String,
    /// Initial cluster token for the cluster during bootstrap.
    #[arg(long, env = "ETCD_INITIAL_CLUSTER_TOKEN", default_value = "etcd-cluster")]
    pub initial_cluster_token: String,
    /// This member's client URLs to advertise to the public.
    #[arg(long, env = "ETCD_ADVERTISE_CLIENT_URLS", default_value = "http://localhost:2379")]
    pub advertise_client_urls: String,
    /// Discovery URL used to bootstrap the cluster (not supported).
    #[arg(long, env = "ETCD_DISCOVERY", default_value = "")]
    pub discovery: String,
    /// Behaviour when discovery fails.
    #[arg(long, env = "ETCD_DISCOVERY_FALLBACK", default_value = "proxy")]
    pub discovery_fallback: String,
    /// HTTP proxy for discovery (not supported).
    #[arg(long, env = "ETCD_DISCOVERY_PROXY", default_value = "")]
    pub discovery_proxy: String,
    /// DNS srv domain used to bootstrap the cluster (not supported).
    #[arg(long, env = "ETCD_DISCOVERY_SRV", default_value = "")]
    pub discovery_srv: String,
    /// Suffix to the dns srv name queried when bootstrapping.
    #[arg(long, env = "ETCD_DISCOVERY_SRV_NAME", default_value = "")]
    pub discovery_srv_name: String,
    /// Reject reconfiguration requests that would cause quorum loss.
    #[arg(long, env = "ETCD_STRICT_RECONFIG_CHECK", num_args = 0..=1, default_missing_value = "true", require_equals = true, value_parser = parse_bool, default_value = "true", action = go_bool!())]
    pub strict_reconfig_check: bool,
    /// Enable the Raft pre-vote phase (keel's Raft always avoids disruptive elections this way).
    #[arg(long, env = "ETCD_PRE_VOTE", num_args = 0..=1, default_missing_value = "true", require_equals = true, value_parser = parse_bool, default_value = "false", action = go_bool!())]
    pub pre_vote: bool,
    /// Auto compaction retention length. 0 disables auto compaction.
    #[arg(long, env = "ETCD_AUTO_COMPACTION_RETENTION", default_value = "0")]
    pub auto_compaction_retention: String,
    /// Interpret auto-compaction-retention as 'periodic' or 'revision'.
    #[arg(long, env = "ETCD_AUTO_COMPACTION_MODE", default_value = "periodic")]
    pub auto_compaction_mode: String,
    /// Accept etcd v2 client requests (not supported).
    #[arg(long, env = "ETCD_ENABLE_V2", num_args = 0..=1, default_missing_value = "true", require_equals = true, value_parser = parse_bool, default_value = "false", action = go_bool!())]
    pub enable_v2: bool,

    // ---- Security ----
    /// Path to the client server TLS cert file.
    #[arg(long, env = "ETCD_CERT_FILE", default_value = "")]
    pub cert_file: String,
    /// Path to the client server TLS key file.
    #[arg(long, env = "ETCD_KEY_FILE", default_value = "")]
    pub key_file: String,
    /// Enable client cert authentication.
    #[arg(long, env = "ETCD_CLIENT_CERT_AUTH", num_args = 0..=1, default_missing_value = "true", require_equals = true, value_parser = parse_bool, default_value = "false", action = go_bool!())]
    pub client_cert_auth: bool,
    /// Path to the client certificate revocation list file.
    #[arg(long, env = "ETCD_CLIENT_CRL_FILE", default_value = "")]
    pub client_crl_file: String,
    /// Allowed TLS hostname for client cert authentication.
    #[arg(long, env = "ETCD_CLIENT_CERT_ALLOWED_HOSTNAME", default_value = "")]
    pub client_cert_allowed_hostname: String,
    /// Path to the client server TLS trusted CA cert file.
    #[arg(long, env = "ETCD_TRUSTED_CA_FILE", default_value = "")]
    pub trusted_ca_file: String,
    /// Client TLS using generated certificates.
    #[arg(long, env = "ETCD_AUTO_TLS", num_args = 0..=1, default_missing_value = "true", require_equals = true, value_parser = parse_bool, default_value = "false", action = go_bool!())]
    pub auto_tls: bool,
    /// Path to the peer server TLS cert file.
    #[arg(long, env = "ETCD_PEER_CERT_FILE", default_value = "")]
    pub peer_cert_file: String,
    /// Path to the peer server TLS key file.
    #[arg(long, env = "ETCD_PEER_KEY_FILE", default_value = "")]
    pub peer_key_file: String,
    /// Enable peer client cert authentication.
    #[arg(long, env = "ETCD_PEER_CLIENT_CERT_AUTH", num_args = 0..=1, default_missing_value = "true", require_equals = true, value_parser = parse_bool, default_value = "false", action = go_bool!())]
    pub peer_client_cert_auth: bool,
    /// Path to the peer server TLS trusted CA file.
    #[arg(long, env = "ETCD_PEER_TRUSTED_CA_FILE", default_value = "")]
    pub peer_trusted_ca_file: String,
    /// Required CN for client certs connecting to the peer endpoint.
    #[arg(long, env = "ETCD_PEER_CERT_ALLOWED_CN", default_value = "")]
    pub peer_cert_allowed_cn: String,
    /// Allowed TLS hostname for inter peer authentication.
    #[arg(long, env = "ETCD_PEER_CERT_ALLOWED_HOSTNAME", default_value = "")]
    pub peer_cert_allowed_hostname: String,
    /// Peer TLS using self-generated certificates.
    #[arg(long, env = "ETCD_PEER_AUTO_TLS", num_args = 0..=1, default_missing_value = "true", require_equals = true, value_parser = parse_bool, default_value = "false", action = go_bool!())]
    pub peer_auto_tls: bool,
    /// Path to the peer certificate revocation list file.
    #[arg(long, env = "ETCD_PEER_CRL_FILE", default_value = "")]
    pub peer_crl_file: String,
    /// Comma-separated list of supported TLS cipher suites.
    #[arg(long, env = "ETCD_CIPHER_SUITES", default_value = "")]
    pub cipher_suites: String,
    /// Minimum TLS version (TLS1.2 or TLS1.3).
    #[arg(long, env = "ETCD_TLS_MIN_VERSION", default_value = "TLS1.2")]
    pub tls_min_version: String,
    /// Maximum TLS version.
    #[arg(long, env = "ETCD_TLS_MAX_VERSION", default_value = "")]
    pub tls_max_version: String,
    /// Comma-separated whitelist of origins for CORS.
    #[arg(long, env = "ETCD_CORS", default_value = "*")]
    pub cors: String,
    /// Acceptable hostnames from HTTP client requests.
    #[arg(long, env = "ETCD_HOST_WHITELIST", default_value = "*")]
    pub host_whitelist: String,
    /// Skip verification of SAN field in client certificate for peer connections.
    #[arg(long, env = "ETCD_PEER_SKIP_CLIENT_SAN_VERIFICATION", num_args = 0..=1, default_missing_value = "true", require_equals = true, value_parser = parse_bool, default_value = "false", action = go_bool!())]
    pub peer_skip_client_san_verification: bool,

    // ---- Auth ----
    /// Authentication token type and options ('simple' or 'jwt,...').
    #[arg(long, env = "ETCD_AUTH_TOKEN", default_value = "simple")]
    pub auth_token: String,
    /// bcrypt cost for hashing auth passwords (4..=31).
    #[arg(long, env = "ETCD_BCRYPT_COST", default_value_t = 10)]
    pub bcrypt_cost: u32,
    /// Time (in seconds) an auth token stays valid.
    #[arg(long, env = "ETCD_AUTH_TOKEN_TTL", default_value_t = 300)]
    pub auth_token_ttl: u64,

    // ---- Monitoring ----
    /// Enable runtime profiling data via HTTP server (not supported).
    #[arg(long, env = "ETCD_ENABLE_PPROF", num_args = 0..=1, default_missing_value = "true", require_equals = true, value_parser = parse_bool, default_value = "false", action = go_bool!())]
    pub enable_pprof: bool,
    /// Level of detail for exported metrics ('basic' or 'extensive').
    #[arg(long, env = "ETCD_METRICS", default_value = "basic")]
    pub metrics: String,
    /// List of URLs to listen on for the metrics and health endpoints.
    #[arg(long, env = "ETCD_LISTEN_METRICS_URLS", default_value = "")]
    pub listen_metrics_urls: String,

    // ---- Logging ----
    /// Logger ('zap' or 'capnslog'); keel always logs structured lines.
    #[arg(long, env = "ETCD_LOGGER", default_value = "zap")]
    pub logger: String,
    /// Log outputs: 'default', 'stderr', 'stdout', or file paths.
    #[arg(long, env = "ETCD_LOG_OUTPUTS", default_value = "default")]
    pub log_outputs: String,
    /// Log level: debug, info, warn, error, panic, or fatal.
    #[arg(long, env = "ETCD_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Log format: json or console.
    #[arg(long, env = "ETCD_LOG_FORMAT", default_value = "json")]
    pub log_format: String,
    /// Enable debug-level logging (deprecated: use --log-level=debug).
    #[arg(long, env = "ETCD_DEBUG", num_args = 0..=1, default_missing_value = "true", require_equals = true, value_parser = parse_bool, default_value = "false", action = go_bool!())]
    pub debug: bool,
    /// Per-package log levels (deprecated; ignored).
    #[arg(long, env = "ETCD_LOG_PACKAGE_LEVELS", default_value = "")]
    pub log_package_levels: String,

    // ---- v2 proxy ----
    /// v2 proxy mode ('off' only: keel has no v2 proxy).
    #[arg(long, env = "ETCD_PROXY", default_value = "off")]
    pub proxy: String,
    #[arg(long, env = "ETCD_PROXY_FAILURE_WAIT", default_value_t = 5000, hide = true)]
    pub proxy_failure_wait: u64,
    #[arg(long, env = "ETCD_PROXY_REFRESH_INTERVAL", default_value_t = 30000, hide = true)]
    pub proxy_refresh_interval: u64,
    #[arg(long, env = "ETCD_PROXY_DIAL_TIMEOUT", default_value_t = 1000, hide = true)]
    pub proxy_dial_timeout: u64,
    #[arg(long, env = "ETCD_PROXY_WRITE_TIMEOUT", default_value_t = 5000, hide = true)]
    pub proxy_write_timeout: u64,
    #[arg(long, env = "ETCD_PROXY_READ_TIMEOUT", default_value_t = 0, hide = true)]
    pub proxy_read_timeout: u64,

    // ---- Experimental ----
    /// Check data corruption before serving any client/peer traffic.
    #[arg(long, env = "ETCD_EXPERIMENTAL_INITIAL_CORRUPT_CHECK", num_args = 0..=1, default_missing_value = "true", require_equals = true, value_parser = parse_bool, default_value = "false", action = go_bool!())]
    pub experimental_initial_corrupt_check: bool,
    /// Duration between cluster corruption check passes (0 disables).
    #[arg(long, env = "ETCD_CORRUPT_CHECK_TIME", default_value = "0s", value_parser = parse_go_duration)]
    pub corrupt_check_time: Duration,
    /// Serve v2 requests through the v3 backend (not supported).
    #[arg(long, env = "ETCD_EXPERIMENTAL_ENABLE_V2V3", default_value = "")]
    pub experimental_enable_v2v3: String,
    /// bbolt freelist type (ignored).
    #[arg(long, env = "ETCD_EXPERIMENTAL_BACKEND_BBOLT_FREELIST_TYPE", default_value = "array")]
    pub experimental_backend_bbolt_freelist_type: String,
    /// Persist remaining lease TTLs through Raft (keel always checkpoints).
    #[arg(long, env = "ETCD_EXPERIMENTAL_ENABLE_LEASE_CHECKPOINT", num_args = 0..=1, default_missing_value = "true", require_equals = true, value_parser = parse_bool, default_value = "false", action = go_bool!())]
    pub experimental_enable_lease_checkpoint: bool,
    /// Persist lease checkpoints across restarts (keel always does).
    #[arg(long, env = "ETCD_EXPERIMENTAL_ENABLE_LEASE_CHECKPOINT_PERSIST", num_args = 0..=1, default_missing_value = "true", require_equals = true, value_parser = parse_bool, default_value = "false", action = go_bool!())]
    pub experimental_enable_lease_checkpoint_persist: bool,
    /// keel extension: the etcd version to report (Status, /version,
    /// metrics), e.g. 3.5.13.
    #[arg(long, env = "ETCD_ADVERTISE_ETCD_VERSION", default_value = ETCD_API_VERSION, value_parser = parse_etcd_version)]
    pub advertise_etcd_version: String,
    /// How often the leader checkpoints remaining lease TTLs through Raft.
    #[arg(long, env = "ETCD_EXPERIMENTAL_LEASE_CHECKPOINT_INTERVAL", default_value = "5m", value_parser = parse_go_duration)]
    pub experimental_lease_checkpoint_interval: Duration,
    /// Maximum revisions deleted in each compaction batch.
    #[arg(long, env = "ETCD_COMPACTION_BATCH_LIMIT", default_value_t = 1000)]
    pub compaction_batch_limit: u64,
    /// Duration of periodic watch progress notifications.
    #[arg(long, env = "ETCD_WATCH_PROGRESS_NOTIFY_INTERVAL", default_value = "10m", value_parser = parse_go_duration)]
    pub watch_progress_notify_interval: Duration,
    /// Warn when applying a request takes longer than this.
    #[arg(long, env = "ETCD_WARNING_APPLY_DURATION", default_value = "100ms", value_parser = parse_go_duration)]
    pub warning_apply_duration: Duration,
    /// Entries a slow follower may catch up from the log before it needs a snapshot.
    #[arg(long, env = "ETCD_SNAPSHOT_CATCHUP_ENTRIES", default_value_t = 5000)]
    pub snapshot_catchup_entries: u64,

    // ---- Added or renamed in etcd 3.6 (old spellings: `etcd_releases`) ----
    /// Server feature gates, `Name=true|false,...` (etcd's gates; see
    /// docs/COMPATIBILITY.md for what each does in keel).
    #[arg(long, env = "ETCD_FEATURE_GATES", default_value = "")]
    pub feature_gates: String,
    /// Check hashes of compacted revisions across members (keel: the
    /// periodic corruption check).
    #[arg(long, env = "ETCD_EXPERIMENTAL_COMPACT_HASH_CHECK_ENABLED", num_args = 0..=1, default_missing_value = "true", require_equals = true, value_parser = parse_bool, default_value = "false", action = go_bool!())]
    pub experimental_compact_hash_check_enabled: bool,
    /// Duration between compacted-revision hash checks.
    #[arg(long, env = "ETCD_COMPACT_HASH_CHECK_TIME", default_value = "1m", value_parser = parse_go_duration)]
    pub compact_hash_check_time: Duration,
    /// Report the gRPC health service NOT_SERVING during defragmentation
    /// (keel defragments in the background without blocking requests).
    #[arg(long, env = "ETCD_EXPERIMENTAL_STOP_GRPC_SERVICE_ON_DEFRAG", num_args = 0..=1, default_missing_value = "true", require_equals = true, value_parser = parse_bool, default_value = "false", action = go_bool!())]
    pub experimental_stop_grpc_service_on_defrag: bool,
    /// bbolt write-buffer sharing for write transactions (ignored).
    #[arg(long, env = "ETCD_EXPERIMENTAL_TXN_MODE_WRITE_WITH_SHARED_BUFFER", num_args = 0..=1, default_missing_value = "true", require_equals = true, value_parser = parse_bool, default_value = "true", action = go_bool!())]
    pub experimental_txn_mode_write_with_shared_buffer: bool,
    /// Defragment at start when this many MiB could be freed.
    #[arg(long, env = "ETCD_BOOTSTRAP_DEFRAG_THRESHOLD_MEGABYTES", default_value_t = 0)]
    pub bootstrap_defrag_threshold_megabytes: u64,
    /// Lock the member's memory (not supported by keel).
    #[arg(long, env = "ETCD_MEMORY_MLOCK", num_args = 0..=1, default_missing_value = "true", require_equals = true, value_parser = parse_bool, default_value = "false", action = go_bool!())]
    pub memory_mlock: bool,
    /// Pause between compaction batches.
    #[arg(long, env = "ETCD_COMPACTION_SLEEP_INTERVAL", default_value = "10ms", value_parser = parse_go_duration)]
    pub compaction_sleep_interval: Duration,
    /// How often the leader checks whether a downgrade has finished.
    #[arg(long, env = "ETCD_DOWNGRADE_CHECK_TIME", default_value = "5s", value_parser = parse_go_duration)]
    pub downgrade_check_time: Duration,
    /// Warn when a unary request takes longer than this.
    #[arg(long, env = "ETCD_WARNING_UNARY_REQUEST_DURATION", default_value = "300ms", value_parser = parse_go_duration)]
    pub warning_unary_request_duration: Duration,
    /// OpenTelemetry tracing (not supported by keel).
    #[arg(long, env = "ETCD_ENABLE_DISTRIBUTED_TRACING", num_args = 0..=1, default_missing_value = "true", require_equals = true, value_parser = parse_bool, default_value = "false", action = go_bool!())]
    pub enable_distributed_tracing: bool,
    #[arg(long, env = "ETCD_DISTRIBUTED_TRACING_ADDRESS", default_value = "localhost:4317")]
    pub distributed_tracing_address: String,
    #[arg(long, env = "ETCD_DISTRIBUTED_TRACING_SERVICE_NAME", default_value = "etcd")]
    pub distributed_tracing_service_name: String,
    #[arg(long, env = "ETCD_DISTRIBUTED_TRACING_INSTANCE_ID", default_value = "")]
    pub distributed_tracing_instance_id: String,
    #[arg(long, env = "ETCD_DISTRIBUTED_TRACING_SAMPLING_RATE", default_value_t = 0)]
    pub distributed_tracing_sampling_rate: i64,
    /// The most learners a cluster may have.
    #[arg(long, env = "ETCD_MAX_LEARNERS", default_value_t = 1)]
    pub max_learners: usize,
    /// URLs serving only HTTP (JSON gateway, /health, /metrics, /version);
    /// when set, --listen-client-urls serve gRPC only.
    #[arg(long, env = "ETCD_LISTEN_CLIENT_HTTP_URLS", default_value = "")]
    pub listen_client_http_urls: String,
    /// Client certificate and key a member presents when it dials client
    /// URLs (keel dials none, so they are only checked to exist).
    #[arg(long, env = "ETCD_CLIENT_CERT_FILE", default_value = "")]
    pub client_cert_file: String,
    #[arg(long, env = "ETCD_CLIENT_KEY_FILE", default_value = "")]
    pub client_key_file: String,
    /// Client certificate and key for dialing peers (keel presents its
    /// peer server certificate; only checked to exist).
    #[arg(long, env = "ETCD_PEER_CLIENT_CERT_FILE", default_value = "")]
    pub peer_client_cert_file: String,
    #[arg(long, env = "ETCD_PEER_CLIENT_KEY_FILE", default_value = "")]
    pub peer_client_key_file: String,
    /// Validity in years of auto-TLS certificates.
    #[arg(long, env = "ETCD_SELF_SIGNED_CERT_VALIDITY", default_value_t = 1)]
    pub self_signed_cert_validity: u32,
    /// SO_REUSEPORT and SO_REUSEADDR on listeners (ignored).
    #[arg(long, env = "ETCD_SOCKET_REUSE_PORT", num_args = 0..=1, default_missing_value = "true", require_equals = true, value_parser = parse_bool, default_value = "false", action = go_bool!())]
    pub socket_reuse_port: bool,
    #[arg(long, env = "ETCD_SOCKET_REUSE_ADDRESS", num_args = 0..=1, default_missing_value = "true", require_equals = true, value_parser = parse_bool, default_value = "false", action = go_bool!())]
    pub socket_reuse_address: bool,
    /// rafthttp connection timeouts (keel's peer transport is gRPC; ignored).
    #[arg(long, env = "ETCD_RAFT_READ_TIMEOUT", default_value = "5s", value_parser = parse_go_duration)]
    pub raft_read_timeout: Duration,
    #[arg(long, env = "ETCD_RAFT_WRITE_TIMEOUT", default_value = "5s", value_parser = parse_go_duration)]
    pub raft_write_timeout: Duration,
    /// Serve the JSON gateway (/v3/...).
    #[arg(long, env = "ETCD_ENABLE_GRPC_GATEWAY", num_args = 0..=1, default_missing_value = "true", require_equals = true, value_parser = parse_bool, default_value = "true", action = go_bool!())]
    pub enable_grpc_gateway: bool,
    /// Rotate log files (not supported by keel).
    #[arg(long, env = "ETCD_ENABLE_LOG_ROTATION", num_args = 0..=1, default_missing_value = "true", require_equals = true, value_parser = parse_bool, default_value = "false", action = go_bool!())]
    pub enable_log_rotation: bool,
    #[arg(long, env = "ETCD_LOG_ROTATION_CONFIG_JSON", default_value = "")]
    pub log_rotation_config_json: String,
    /// v2 store deprecation stage (keel has no v2 store; ignored).
    #[arg(long, env = "ETCD_V2_DEPRECATION", default_value = "")]
    pub v2_deprecation: String,
    /// v3 discovery (not supported by keel).
    #[arg(long, env = "ETCD_DISCOVERY_ENDPOINTS", default_value = "")]
    pub discovery_endpoints: String,
    #[arg(long, env = "ETCD_DISCOVERY_TOKEN", default_value = "")]
    pub discovery_token: String,

    /// Old flag names used (from [`etcd_releases::normalize_args`]).
    #[arg(skip)]
    pub old_names: Vec<String>,
    /// Old names whose new spelling was given too.
    #[arg(skip)]
    pub given_twice: Vec<String>,

    // ---- Unsafe ----
    /// Force to create a new one-member cluster (not supported yet).
    #[arg(long, env = "ETCD_FORCE_NEW_CLUSTER", num_args = 0..=1, default_missing_value = "true", require_equals = true, value_parser = parse_bool, default_value = "false", action = go_bool!())]
    pub force_new_cluster: bool,
}

/// Whether a new member creates the cluster or joins an existing one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterState {
    New,
    Existing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Console,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// What the member core and the layers above it read.
    pub settings: Settings,
    pub snapshot_count: u64,
    pub snapshot_catchup_entries: u64,
    pub listen_peer_urls: Vec<String>,
    pub listen_client_urls: Vec<String>,
    /// HTTP-only client listeners; when any, the client URLs serve gRPC only.
    pub listen_client_http_urls: Vec<String>,
    pub listen_metrics_urls: Vec<String>,
    pub initial_advertise_peer_urls: Vec<String>,
    /// (name, peer URLs) of the initial members.
    pub initial_cluster: Vec<(String, Vec<String>)>,
    pub initial_cluster_state: ClusterState,
    pub grpc_keepalive_min_time: Duration,
    pub grpc_keepalive_interval: Duration,
    pub grpc_keepalive_timeout: Duration,
    /// None: auto compaction off.
    pub auto_compaction: Option<crate::duties::compaction::Retention>,
    pub peer_auto_tls: bool,
    pub client_auto_tls: bool,
    /// Client-port certificates from files (--cert-file ...).
    pub client_tls: Option<TlsFiles>,
    /// Peer certificates from files (--peer-cert-file ...).
    pub peer_tls: Option<TlsFiles>,
    /// `--cipher-suites` and the TLS version flags, for both sides (with
    /// auto TLS too) and for dials to peers.
    pub tls_policy: TlsPolicy,
    pub log_level: String,
    pub log_format: LogFormat,
    pub log_outputs: Vec<String>,
    pub corrupt_check_interval: Duration,
    pub initial_corrupt_check: bool,
    pub unsafe_no_fsync: bool,
    /// `--auth-token` (and `--auth-token-ttl` for simple tokens), with
    /// JWT keys loaded.
    pub auth_tokens: TokenSpec,
    /// `--enable-grpc-gateway`.
    pub enable_grpc_gateway: bool,
    /// How often the leader checks whether a downgrade finished.
    pub downgrade_check_time: Duration,
    /// Defragment at start when this many MiB are free (0: never).
    pub bootstrap_defrag_threshold_megabytes: u64,
    /// Said once logging is up (deprecated flag names).
    pub warnings: Vec<String>,
}

/// Why a configuration was refused; printed before exiting non-zero.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn reject(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

/// Certificate, key and CA flags of one side (client or peer).
fn tls_files(prefix: &str, cert: &str, key: &str, ca: &str, crl: &str) -> Result<Option<TlsFiles>, ConfigError> {
    match (cert.is_empty(), key.is_empty()) {
        (true, true) => {
            if !ca.is_empty() {
                return Err(reject(format!(
                    "--{prefix}trusted-ca-file needs --{prefix}cert-file and --{prefix}key-file"
                )));
            }
            Ok(None)
        }
        (false, false) => {
            if !crl.is_empty() && ca.is_empty() {
                return Err(reject(format!("--{prefix}crl-file needs --{prefix}trusted-ca-file")));
            }
            for (flag, path) in [("cert-file", cert), ("key-file", key), ("trusted-ca-file", ca), ("crl-file", crl)] {
                if !path.is_empty() && !std::path::Path::new(path).exists() {
                    return Err(reject(format!("--{prefix}{flag}: {path}: no such file")));
                }
            }
            Ok(Some(TlsFiles {
                cert: PathBuf::from(cert),
                key: PathBuf::from(key),
                trusted_ca: (!ca.is_empty()).then(|| PathBuf::from(ca)),
                crl: (!crl.is_empty()).then(|| PathBuf::from(crl)),
                policy: TlsPolicy::default(),
                allowed_client: None,
            }))
        }
        _ => Err(reject(format!("--{prefix}cert-file and --{prefix}key-file must be given together"))),
    }
}

fn urls(flag: &str, value: &str) -> Result<Vec<String>, ConfigError> {
    parse_urls(value).map_err(|e| reject(format!("--{flag}: {e}")))
}

/// Parses etcd's `name=url,name=url` initial-cluster syntax.
pub fn parse_initial_cluster(s: &str) -> Result<Vec<(String, Vec<String>)>, String> {
    let mut members: Vec<(String, Vec<String>)> = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (name, url) = part.split_once('=').ok_or_else(|| format!("invalid member {part:?}: want name=peerURL"))?;
        let url = parse_url(url)?;
        match members.iter_mut().find(|(n, _)| n == name) {
            Some((_, urls)) => urls.push(url),
            None => members.push((name.to_string(), vec![url])),
        }
    }
    Ok(members)
}

/// What the TLS flags of both sides come to.
struct TlsConfig {
    policy: TlsPolicy,
    client: Option<TlsFiles>,
    peer: Option<TlsFiles>,
}

/// The URLs a member listens on and advertises.
struct Urls {
    listen_peer: Vec<String>,
    listen_client: Vec<String>,
    listen_client_http: Vec<String>,
    advertise_client: Vec<String>,
    initial_advertise_peer: Vec<String>,
    listen_metrics: Vec<String>,
}

impl Flags {
    /// Parses a command line (program name first) and the `ETCD_*`
    /// variables `env` finds, taking every release's flag spellings.
    pub fn from_command_line(
        args: impl IntoIterator<Item = String>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, clap::Error> {
        use clap::{CommandFactory, FromArgMatches};
        let normalized = etcd_releases::normalize_args(args, env);
        let matches = Self::command().try_get_matches_from(normalized.args)?;
        let mut flags = Self::from_arg_matches(&matches)?;
        flags.old_names = normalized.old_names;
        flags.given_twice = normalized.given_twice;
        // Flags 3.6 deprecated outright: warned about only when given.
        for (id, name) in [("max_snapshots", "max-snapshots"), ("v2_deprecation", "v2-deprecation")] {
            let given = matches.value_source(id).is_some_and(|s| s != clap::parser::ValueSource::DefaultValue);
            if given {
                flags.old_names.push(name.to_string());
            }
        }
        Ok(flags)
    }

    /// Checks every flag and builds the configuration, or explains what is
    /// wrong.
    pub fn validate(&self) -> Result<Config, ConfigError> {
        self.refuse_unsupported()?;
        let warnings = self.old_name_warnings()?;
        if let Some(name) = self.old_names.iter().find(|n| self.given_twice.contains(n)) {
            let plain = name.trim_start_matches("experimental-");
            return Err(reject(format!("both --{name} and --{plain} flags are set. Use only --{plain}")));
        }
        let gates = FeatureGates::parse(&self.feature_gates).map_err(|e| reject(format!("--feature-gates: {e}")))?;
        let tls = self.tls()?;
        self.check_raft_timing()?;
        if !(4..=31).contains(&self.bcrypt_cost) {
            return Err(reject(format!("--bcrypt-cost {} out of range [4, 31]", self.bcrypt_cost)));
        }
        let auth_tokens = TokenSpec::from_flag(&self.auth_token, Duration::from_secs(self.auth_token_ttl))
            .map_err(|e| reject(format!("--auth-token {}: {e}", self.auth_token)))?;
        if self.max_request_bytes == 0 {
            return Err(reject("--max-request-bytes must be > 0"));
        }
        let initial_cluster_state = match self.initial_cluster_state.as_str() {
            "new" => ClusterState::New,
            "existing" => ClusterState::Existing,
            other => return Err(reject(format!("--initial-cluster-state {other:?}: must be 'new' or 'existing'"))),
        };
        let auto_compaction_mode = match self.auto_compaction_mode.as_str() {
            "periodic" => CompactionMode::Periodic,
            "revision" => CompactionMode::Revision,
            other => return Err(reject(format!("--auto-compaction-mode {other:?}: must be 'periodic' or 'revision'"))),
        };
        let auto_compaction =
            crate::duties::compaction::parse_retention(auto_compaction_mode, &self.auto_compaction_retention)
                .map_err(|e| reject(format!("--auto-compaction-retention: {e}")))?;
        let (log_level, log_format) = self.logging()?;
        if !matches!(self.tls_min_version.as_str(), "TLS1.2" | "TLS1.3") {
            return Err(reject(format!("--tls-min-version {:?}: must be TLS1.2 or TLS1.3", self.tls_min_version)));
        }
        if !matches!(self.metrics.as_str(), "basic" | "extensive") {
            return Err(reject(format!("--metrics {:?}: must be 'basic' or 'extensive'", self.metrics)));
        }
        let urls = self.urls(&tls)?;
        let initial_cluster = self.initial_cluster(&urls.initial_advertise_peer)?;
        let data_dir = if self.data_dir.is_empty() { format!("{}.etcd", self.name) } else { self.data_dir.clone() };
        let quota = match self.quota_backend_bytes {
            q if q < 0 => return Err(reject("--quota-backend-bytes must not be negative")),
            0 => DEFAULT_QUOTA_BYTES,
            q => q as u64,
        };
        let log_outputs: Vec<String> =
            self.log_outputs.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();

        Ok(Config {
            settings: Settings {
                name: self.name.clone(),
                data_dir: PathBuf::from(data_dir),
                heartbeat_interval: Duration::from_millis(self.heartbeat_interval),
                election_timeout: Duration::from_millis(self.election_timeout),
                advertise_client_urls: urls.advertise_client,
                initial_cluster_token: self.initial_cluster_token.clone(),
                strict_reconfig_check: self.strict_reconfig_check,
                quota_backend_bytes: quota,
                max_txn_ops: self.max_txn_ops as usize,
                max_request_bytes: self.max_request_bytes as usize,
                etcd_version: self.advertise_etcd_version.clone(),
                max_concurrent_streams: self.max_concurrent_streams,
                watch_progress_notify_interval: self.watch_progress_notify_interval,
                lease_checkpoint_interval: self.experimental_lease_checkpoint_interval,
                bcrypt_cost: self.bcrypt_cost,
                client_cert_auth: self.client_cert_auth,
                max_learners: self.max_learners,
                warning_unary_request_duration: self.warning_unary_request_duration,
            },
            snapshot_count: self.snapshot_count.max(1),
            snapshot_catchup_entries: self.snapshot_catchup_entries,
            listen_peer_urls: urls.listen_peer,
            listen_client_urls: urls.listen_client,
            listen_client_http_urls: urls.listen_client_http,
            listen_metrics_urls: urls.listen_metrics,
            initial_advertise_peer_urls: urls.initial_advertise_peer,
            initial_cluster,
            initial_cluster_state,
            grpc_keepalive_min_time: self.grpc_keepalive_min_time,
            grpc_keepalive_interval: self.grpc_keepalive_interval,
            grpc_keepalive_timeout: self.grpc_keepalive_timeout,
            auto_compaction,
            peer_auto_tls: self.peer_auto_tls,
            client_auto_tls: self.auto_tls,
            client_tls: tls.client,
            peer_tls: tls.peer,
            tls_policy: tls.policy,
            log_level,
            log_format,
            log_outputs,
            corrupt_check_interval: self.corrupt_check_time,
            initial_corrupt_check: self.experimental_initial_corrupt_check || gates.enabled("InitialCorruptCheck"),
            unsafe_no_fsync: self.unsafe_no_fsync,
            auth_tokens,
            enable_grpc_gateway: self.enable_grpc_gateway,
            downgrade_check_time: self.downgrade_check_time,
            bootstrap_defrag_threshold_megabytes: self.bootstrap_defrag_threshold_megabytes,
            warnings,
        })
    }

    /// etcd features keel does not have: refused by name rather than
    /// ignored.
    fn refuse_unsupported(&self) -> Result<(), ConfigError> {
        if !self.config_file.is_empty() {
            return Err(reject("--config-file is not supported by keel; pass flags or ETCD_* environment variables"));
        }
        if !self.discovery.is_empty() || !self.discovery_srv.is_empty() {
            return Err(reject(
                "discovery (--discovery, --discovery-srv) is not supported by keel; use --initial-cluster",
            ));
        }
        if self.enable_v2 || !self.experimental_enable_v2v3.is_empty() {
            return Err(reject("the etcd v2 API (--enable-v2, --experimental-enable-v2v3) is not supported by keel"));
        }
        if self.proxy != "off" {
            return Err(reject(format!("--proxy={}: keel has no v2 proxy mode (only 'off')", self.proxy)));
        }
        if self.force_new_cluster {
            return Err(reject("--force-new-cluster is not supported by keel yet"));
        }
        if self.enable_pprof {
            return Err(reject("--enable-pprof is not supported by keel"));
        }
        if !self.discovery_endpoints.is_empty() || !self.discovery_token.is_empty() {
            return Err(reject(
                "v3 discovery (--discovery-endpoints, --discovery-token) is not supported by keel; use --initial-cluster",
            ));
        }
        let unsupported = [
            (self.enable_distributed_tracing, "--enable-distributed-tracing (OpenTelemetry)"),
            (self.memory_mlock, "--memory-mlock"),
            (self.enable_log_rotation, "--enable-log-rotation"),
        ];
        if let Some((_, flag)) = unsupported.iter().find(|(on, _)| *on) {
            return Err(reject(format!("{flag} is not supported by keel")));
        }
        for (flag, path) in [
            ("client-cert-file", &self.client_cert_file),
            ("client-key-file", &self.client_key_file),
            ("peer-client-cert-file", &self.peer_client_cert_file),
            ("peer-client-key-file", &self.peer_client_key_file),
        ] {
            if !path.is_empty() && !std::path::Path::new(path).exists() {
                return Err(reject(format!("--{flag}: {path}: no such file")));
            }
        }
        Ok(())
    }

    /// Old flag spellings: a deprecation warning each while keel reports
    /// 3.6 or older, refused as unknown flags from 3.7 on (etcd's rule).
    fn old_name_warnings(&self) -> Result<Vec<String>, ConfigError> {
        let minor = crate::version::minor(&self.advertise_etcd_version);
        let notices = self.old_names.iter().map(|name| etcd_releases::old_name_notice(name, minor).map_err(reject));
        notices.filter_map(Result::transpose).collect()
    }

    fn tls(&self) -> Result<TlsConfig, ConfigError> {
        let allowed_client = match (self.peer_cert_allowed_cn.as_str(), self.peer_cert_allowed_hostname.as_str()) {
            ("", "") => None,
            (cn, "") => Some(AllowedClient::CommonName(cn.split(',').map(|c| c.trim().to_string()).collect())),
            ("", host) => Some(AllowedClient::Hostname(host.to_string())),
            (cn, host) => {
                return Err(reject(format!(
                    "AllowedCN and AllowedHostname are mutually exclusive (cn={cn:?}, hostname={host:?})"
                )))
            }
        };
        let policy =
            TlsPolicy::from_flags(&self.cipher_suites, &self.tls_min_version, &self.tls_max_version).map_err(reject)?;
        let client_tls = tls_files("", &self.cert_file, &self.key_file, &self.trusted_ca_file, &self.client_crl_file)?
            .map(|f| TlsFiles { policy: policy.clone(), ..f });
        let peer_tls = tls_files(
            "peer-",
            &self.peer_cert_file,
            &self.peer_key_file,
            &self.peer_trusted_ca_file,
            &self.peer_crl_file,
        )?
        .map(|f| TlsFiles { policy: policy.clone(), allowed_client: allowed_client.clone(), ..f });
        if self.client_cert_auth && self.trusted_ca_file.is_empty() {
            return Err(reject("--client-cert-auth needs --trusted-ca-file to verify client certificates"));
        }
        if self.peer_client_cert_auth && self.peer_trusted_ca_file.is_empty() {
            return Err(reject("--peer-client-cert-auth needs --peer-trusted-ca-file to verify peer certificates"));
        }
        Ok(TlsConfig { policy, client: client_tls, peer: peer_tls })
    }

    /// etcd's rules for the heartbeat and election timeout.
    fn check_raft_timing(&self) -> Result<(), ConfigError> {
        if self.heartbeat_interval == 0 {
            return Err(reject("--heartbeat-interval must be > 0"));
        }
        if self.election_timeout < 5 * self.heartbeat_interval {
            return Err(reject(format!(
                "--election-timeout[{}ms] should be at least as 5 times as --heartbeat-interval[{}ms]",
                self.election_timeout, self.heartbeat_interval
            )));
        }
        if self.election_timeout > 50_000 {
            return Err(reject(format!(
                "--election-timeout[{}ms] is too long, and should be set less than 50000ms",
                self.election_timeout
            )));
        }
        Ok(())
    }

    /// The log level and format.
    fn logging(&self) -> Result<(String, LogFormat), ConfigError> {
        let log_level = match self.log_level.as_str() {
            "debug" | "info" | "warn" | "error" => self.log_level.clone(),
            "panic" | "fatal" => "error".to_string(),
            other => {
                return Err(reject(format!("--log-level {other:?}: must be debug, info, warn, error, panic, or fatal")))
            }
        };
        let log_level = if self.debug { "debug".to_string() } else { log_level };
        let log_format = match self.log_format.as_str() {
            "json" => LogFormat::Json,
            "console" => LogFormat::Console,
            other => return Err(reject(format!("--log-format {other:?}: must be json or console"))),
        };
        if !matches!(self.logger.as_str(), "zap" | "capnslog") {
            return Err(reject(format!("--logger {:?}: must be 'zap' or 'capnslog'", self.logger)));
        }
        Ok((log_level, log_format))
    }

    fn urls(&self, tls: &TlsConfig) -> Result<Urls, ConfigError> {
        let listen_peer_urls = urls("listen-peer-urls", &self.listen_peer_urls)?;
        let listen_client_urls = urls("listen-client-urls", &self.listen_client_urls)?;
        let advertise_client_urls = urls("advertise-client-urls", &self.advertise_client_urls)?;
        let initial_advertise_peer_urls = urls("initial-advertise-peer-urls", &self.initial_advertise_peer_urls)?;
        let optional = |flag: &str, value: &str| if value.is_empty() { Ok(Vec::new()) } else { urls(flag, value) };
        let listen_metrics_urls = optional("listen-metrics-urls", &self.listen_metrics_urls)?;
        let listen_client_http = optional("listen-client-http-urls", &self.listen_client_http_urls)?;
        let secure = |u: &String| u.starts_with("https://") || u.starts_with("unixs://");
        if listen_metrics_urls.iter().any(secure) && !self.auto_tls && tls.client.is_none() {
            // etcd's ErrMissingClientTLSInfoForMetricsURL, word for word.
            return Err(reject(
                "client TLS key/cert (--cert-file, --key-file) must be provided for metrics secure url",
            ));
        }
        if listen_client_urls.iter().chain(&listen_client_http).any(secure) && !self.auto_tls && tls.client.is_none() {
            return Err(reject("https client URLs need TLS certificates: --cert-file and --key-file, or --auto-tls"));
        }
        if listen_peer_urls.iter().any(secure) && !self.peer_auto_tls && tls.peer.is_none() {
            return Err(reject(
                "https peer URLs need TLS certificates: --peer-cert-file and --peer-key-file, or --peer-auto-tls",
            ));
        }

        Ok(Urls {
            listen_peer: listen_peer_urls,
            listen_client: listen_client_urls,
            listen_client_http,
            advertise_client: advertise_client_urls,
            initial_advertise_peer: initial_advertise_peer_urls,
            listen_metrics: listen_metrics_urls,
        })
    }

    /// `--initial-cluster` (by default, this member alone), which must
    /// name this member with its advertised peer URLs.
    fn initial_cluster(
        &self,
        initial_advertise_peer_urls: &[String],
    ) -> Result<Vec<(String, Vec<String>)>, ConfigError> {
        let initial_cluster_str = if self.initial_cluster.is_empty() {
            format!("{}={}", self.name, initial_advertise_peer_urls.join(&format!(",{}=", self.name)))
        } else {
            self.initial_cluster.clone()
        };
        let initial_cluster =
            parse_initial_cluster(&initial_cluster_str).map_err(|e| reject(format!("--initial-cluster: {e}")))?;
        match initial_cluster.iter().find(|(n, _)| *n == self.name) {
            None => {
                return Err(reject(format!(
                    "couldn't find local name {:?} in the initial cluster configuration",
                    self.name
                )))
            }
            Some((_, urls)) => {
                let mut a = urls.clone();
                let mut b = initial_advertise_peer_urls.to_vec();
                a.sort();
                b.sort();
                if a != b {
                    return Err(reject(format!(
                        "--initial-cluster has {}={} but missing from --initial-advertise-peer-urls={} (\"{}\"(resolved from \"{}\") != \"{}\"(resolved from \"{}\"))",
                        self.name,
                        a.join(","),
                        b.join(","),
                        b.join(","),
                        b.join(","),
                        a.join(","),
                        a.join(",")
                    )));
                }
            }
        }

        Ok(initial_cluster)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let argv = std::iter::once("keel".to_string()).chain(args.iter().map(|s| s.to_string()));
        let flags = Flags::from_command_line(argv, |_| None).map_err(|e| e.to_string())?;
        flags.validate().map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_match_etcd() -> Result<(), String> {
        let c = parse(&[])?;
        assert_eq!(c.settings.name, "default");
        assert_eq!(c.settings.data_dir, PathBuf::from("default.etcd"));
        assert_eq!(c.listen_client_urls, vec!["http://localhost:2379"]);
        assert_eq!(c.initial_cluster, vec![("default".to_string(), vec!["http://localhost:2380".to_string()])]);
        assert_eq!(c.settings.max_txn_ops, 128);
        assert_eq!(c.settings.max_request_bytes, 1_572_864);
        assert_eq!(c.settings.quota_backend_bytes, 2 << 30);
        assert_eq!(c.grpc_keepalive_interval, Duration::from_secs(7200));
        Ok(())
    }

    #[test]
    fn go_style_flags_are_accepted() -> Result<(), String> {
        let c = parse(&[
            "-name",
            "n1",
            "--data-dir=/tmp/x",
            "--strict-reconfig-check=false",
            "--initial-cluster",
            "n1=http://localhost:2380",
        ])?;
        assert_eq!(c.settings.name, "n1");
        assert_eq!(c.settings.data_dir, PathBuf::from("/tmp/x"));
        assert!(!c.settings.strict_reconfig_check);
        Ok(())
    }

    #[test]
    fn bad_input_fails_fast_with_a_reason() {
        assert!(parse(&["--no-such-flag"]).is_err());
        assert!(parse(&["--initial-cluster-state", "maybe"]).unwrap_err().contains("new"));
        assert!(parse(&["--election-timeout", "100"]).unwrap_err().contains("5 times"));
        assert!(parse(&["--listen-client-urls", "ftp://x:1"]).is_err());
        assert!(parse(&["--name", "a", "--initial-cluster", "b=http://localhost:2380"])
            .unwrap_err()
            .contains("local name"));
        assert!(parse(&["--snapshot-count", "lots"]).is_err());
    }

    #[test]
    fn releases_spellings_are_taken_and_3_7_refuses_the_old_ones() -> Result<(), String> {
        let c = parse(&["--experimental-corrupt-check-time=3s", "--feature-gates=InitialCorruptCheck=true"])?;
        assert_eq!(c.corrupt_check_interval, Duration::from_secs(3));
        assert!(c.initial_corrupt_check);
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        let c =
            parse(&["--corrupt-check-time=4s", "--max-learners=3", "--listen-client-http-urls=http://localhost:2399"])?;
        assert_eq!(c.corrupt_check_interval, Duration::from_secs(4));
        assert_eq!(c.settings.max_learners, 3);
        assert_eq!(c.listen_client_http_urls, vec!["http://localhost:2399"]);
        assert!(c.warnings.is_empty());
        let refused = parse(&["--advertise-etcd-version=3.7.4", "--experimental-corrupt-check-time=3s"]);
        assert_eq!(refused.err().as_deref(), Some("flag provided but not defined: -experimental-corrupt-check-time"));
        assert!(parse(&["--feature-gates=NoSuchGate=true"])
            .unwrap_err()
            .contains("unrecognized feature gate: NoSuchGate"));
        Ok(())
    }
}
