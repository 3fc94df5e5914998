//! Prometheus metrics under the names etcd's alerts and dashboards use.
//! Process-wide (one member per process), registered in the default
//! registry and rendered by `/metrics`.

use std::sync::LazyLock;

use prometheus::{
    exponential_buckets, register_gauge_vec, register_histogram, register_histogram_vec, register_int_counter,
    register_int_counter_vec, register_int_gauge, register_int_gauge_vec, Encoder, GaugeVec, Histogram, HistogramVec,
    IntCounter, IntCounterVec, IntGauge, IntGaugeVec, TextEncoder,
};

macro_rules! metric {
    ($name:ident: $ty:ty = $init:expr) => {
        pub static $name: LazyLock<$ty> = LazyLock::new(|| $init.expect(concat!("metric ", stringify!($name))));
    };
}

// mvcc
metric!(PUT_TOTAL: IntCounter = register_int_counter!("etcd_mvcc_put_total", "Total number of puts seen by this member."));
metric!(DELETE_TOTAL: IntCounter = register_int_counter!("etcd_mvcc_delete_total", "Total number of deletes seen by this member."));
metric!(RANGE_TOTAL: IntCounter = register_int_counter!("etcd_mvcc_range_total", "Total number of ranges seen by this member."));
metric!(TXN_TOTAL: IntCounter = register_int_counter!("etcd_mvcc_txn_total", "Total number of txns seen by this member."));
metric!(KEYS_TOTAL: IntGauge = register_int_gauge!("etcd_debugging_mvcc_keys_total", "Total number of keys."));
metric!(WATCHERS: IntGauge = register_int_gauge!("etcd_debugging_mvcc_watcher_total", "Total number of watchers."));
metric!(WATCH_STREAMS: IntGauge = register_int_gauge!("etcd_debugging_mvcc_watch_stream_total", "Total number of watch streams."));
metric!(DB_TOTAL_SIZE: IntGauge = register_int_gauge!("etcd_mvcc_db_total_size_in_bytes", "Total size of the underlying database physically allocated in bytes."));
metric!(DB_IN_USE: IntGauge = register_int_gauge!("etcd_mvcc_db_total_size_in_use_in_bytes", "Total size of the underlying database logically in use in bytes."));
metric!(COMPACTIONS: IntCounter = register_int_counter!("etcd_debugging_mvcc_db_compaction_total", "Number of compactions run."));

// server
metric!(HAS_LEADER: IntGauge = register_int_gauge!("etcd_server_has_leader", "Whether or not a leader exists. 1 is existence, 0 is not."));
metric!(IS_LEADER: IntGauge = register_int_gauge!("etcd_server_is_leader", "Whether or not this member is a leader. 1 if is, 0 otherwise."));
metric!(IS_LEARNER: IntGauge = register_int_gauge!("etcd_server_is_learner", "Whether or not this member is a learner. 1 if is, 0 otherwise."));
metric!(LEADER_CHANGES: IntCounter = register_int_counter!("etcd_server_leader_changes_seen_total", "The number of leader changes seen."));
metric!(PROPOSALS_COMMITTED: IntGauge = register_int_gauge!("etcd_server_proposals_committed_total", "The total number of consensus proposals committed."));
metric!(PROPOSALS_APPLIED: IntGauge = register_int_gauge!("etcd_server_proposals_applied_total", "The total number of consensus proposals applied."));
metric!(PROPOSALS_PENDING: IntGauge = register_int_gauge!("etcd_server_proposals_pending", "The current number of pending proposals to commit."));
metric!(PROPOSALS_FAILED: IntCounter = register_int_counter!("etcd_server_proposals_failed_total", "The total number of failed proposals seen."));
metric!(QUOTA_BYTES: IntGauge = register_int_gauge!("etcd_server_quota_backend_bytes", "Current backend storage quota size in bytes."));
metric!(SERVER_ID: IntGaugeVec = register_int_gauge_vec!("etcd_server_id", "Server or member ID in hexadecimal format. 1 for 'server_id' label with current ID.", &["server_id"]));
metric!(SERVER_VERSION: IntGaugeVec = register_int_gauge_vec!("etcd_server_version", "Which version is running. 1 for 'server_version' label with current version.", &["server_version"]));
metric!(CLUSTER_VERSION: IntGaugeVec = register_int_gauge_vec!("etcd_cluster_version", "Which version is running. 1 for 'cluster_version' label with current cluster version", &["cluster_version"]));
metric!(KEEL_VERSION: IntGaugeVec = register_int_gauge_vec!("keel_build_info", "keel's own version. 1 for 'version' label.", &["version"]));
metric!(HEALTH_SUCCESS: IntCounter = register_int_counter!("etcd_server_health_success", "The total number of successful health checks"));
metric!(HEALTH_FAILURES: IntCounter = register_int_counter!("etcd_server_health_failures", "The total number of failed health checks"));
metric!(SNAPSHOT_APPLY_IN_PROGRESS: IntGauge = register_int_gauge!("etcd_server_snapshot_apply_in_progress_total", "1 if the server is applying the incoming snapshot. 0 if none."));
metric!(SLOW_APPLY: IntCounter = register_int_counter!("etcd_server_slow_apply_total", "The total number of slow apply requests (likely overloaded from slow disk)."));

// disk
metric!(WAL_FSYNC: Histogram = register_histogram!(
    "etcd_disk_wal_fsync_duration_seconds",
    "The latency distributions of fsync called by WAL.",
    exponential_buckets(0.001, 2.0, 14).unwrap_or_default()
));
metric!(BACKEND_COMMIT: Histogram = register_histogram!(
    "etcd_disk_backend_commit_duration_seconds",
    "The latency distributions of commit called by backend.",
    exponential_buckets(0.001, 2.0, 14).unwrap_or_default()
));
metric!(SNAPSHOT_SAVE: Histogram = register_histogram!(
    "etcd_debugging_snap_save_total_duration_seconds",
    "The total latency distributions of save called by snapshot.",
    exponential_buckets(0.001, 2.0, 14).unwrap_or_default()
));

// network
metric!(PEER_RTT: HistogramVec = register_histogram_vec!(
    "etcd_network_peer_round_trip_time_seconds",
    "Round-Trip-Time histogram between peers",
    &["To"],
    exponential_buckets(0.0001, 2.0, 16).unwrap_or_default()
));
metric!(PEER_SENT_FAILURES: IntCounterVec = register_int_counter_vec!("etcd_network_peer_sent_failures_total", "The total number of send failures from peers.", &["To"]));

// gRPC (go-grpc-prometheus names)
metric!(GRPC_STARTED: IntCounterVec = register_int_counter_vec!(
    "grpc_server_started_total",
    "Total number of RPCs started on the server.",
    &["grpc_type", "grpc_service", "grpc_method"]
));
metric!(GRPC_HANDLED: IntCounterVec = register_int_counter_vec!(
    "grpc_server_handled_total",
    "Total number of RPCs completed on the server, regardless of success or failure.",
    &["grpc_type", "grpc_service", "grpc_method", "grpc_code"]
));
metric!(GRPC_HANDLING: HistogramVec = register_histogram_vec!(
    "grpc_server_handling_seconds",
    "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
    &["grpc_type", "grpc_service", "grpc_method"],
    exponential_buckets(0.0005, 2.0, 16).unwrap_or_default()
));

metric!(ALARMS: GaugeVec = register_gauge_vec!("etcd_server_alarms", "Active alarms by member and type.", &["member_id", "alarm"]));

/// The Prometheus text exposition of every registered metric.
pub fn render() -> String {
    let mut buf = Vec::new();
    let families = prometheus::gather();
    if TextEncoder::new().encode(&families, &mut buf).is_err() {
        return String::new();
    }
    String::from_utf8(buf).unwrap_or_default()
}

/// Sets the static labels of this member.
pub fn init(member_id: u64, api_version: &str, cluster_version: &str, quota: u64) {
    SERVER_ID.with_label_values(&[&format!("{member_id:x}")]).set(1);
    SERVER_VERSION.with_label_values(&[api_version]).set(1);
    CLUSTER_VERSION.with_label_values(&[cluster_version]).set(1);
    KEEL_VERSION.with_label_values(&[crate::version::KEEL_VERSION]).set(1);
    QUOTA_BYTES.set(quota as i64);
}
