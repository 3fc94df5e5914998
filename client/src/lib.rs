#![doc = include_str!("../README.md")]
//!
//! Module map: `error` (classification), `txn` (builder), `client`
//! (endpoints, leader discovery, KV, leases), `watch` (resumable watch).

mod client;
mod error;
mod txn;
mod watch;

pub use client::{Client, ClientConfig, Status};
pub use error::Error;
pub use keel_proto::etcdserverpb;
pub use keel_proto::mvccpb::{self, KeyValue};
pub use txn::{Compare, Op, Txn};
pub use watch::{WatchEvent, WatchOptions, Watcher};
