//! keel-bench: load generation against any etcd-compatible endpoint, and
//! the keel-versus-etcd comparison.
//!
//! Module map: `load` (concurrent clients, rate limiting, latency
//! histograms, reports), `workloads` (each benchmark over etcd's gRPC API),
//! `compare` (two clusters, one suite, the Markdown report), `catch_up`
//! (a member added to a loaded cluster, timed until it serves), `chart` (its
//! throughput-ratio chart, SVG),
//! `watch_decode` (the fan-out benchmark's cheap reading of watch
//! responses). The criterion
//! micro-benchmarks of keel's hot paths are in `benches/hot_paths.rs`.

pub mod catch_up;
pub mod chart;
pub mod compare;
pub mod load;
pub mod watch_decode;
pub mod workloads;
