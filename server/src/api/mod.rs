//! The etcd v3 gRPC API: one file per service. Handlers validate requests
//! as etcd's v3rpc layer does, then read local state or propose through
//! Raft via [`crate::server::Server`]; `errors.rs` maps every failure to
//! etcd's status code and message; `peer.rs` is keel's own peer service;
//! `range_stream.rs` is KV/RangeStream (3.7).

pub mod auth;
pub mod cluster;
pub mod credentials;
pub mod election;
pub mod errors;
pub mod grpc_call;
pub mod grpc_metrics;
pub mod kv;
pub mod lease;
pub mod lock;
pub mod maintenance;
pub mod peer;
pub mod range_stream;
pub mod recipes;
pub mod require_leader;
pub mod watch;
pub mod watch_session;
