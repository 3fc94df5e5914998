//! keel's Jepsen-style harness: it runs a real cluster of real server
//! processes (keel or etcd), drives it with concurrent clients while a
//! nemesis injects faults, records every operation, and checks the history.
//!
//! Module map:
//! - `cluster`: starts members (in network namespaces when root), kills,
//!   pauses, restarts, replaces them;
//! - `proxy`: peer-link proxies that inject network faults without root;
//! - `nemesis`: the fault schedule (kill, pause, partitions, packet loss,
//!   slow links, clock skew, membership changes, compaction storms, WAL
//!   corruption) and healing;
//! - `workload`: the clients (register, append, watch, lease, lock, kube),
//!   each with a main phase and a final phase after healing;
//! - `history`: operations and faults as JSON lines;
//! - `checker`: judges a history without looking at the system: a
//!   linearizability search (`linearizable`, `register`), Elle's
//!   list-append cycle detection (`elle`), watch guarantees (`watch`),
//!   leases, fencing, and the Kubernetes storage contract (`kube`);
//! - `run`: one run end to end, writing `history.jsonl`, `verdicts.json`
//!   and `timeline.svg`;
//! - `corpus`: histories with known verdicts, the checkers' own test;
//! - `timeline`: the SVG picture of a run; `wire`: JSON forms of etcd types.

pub mod checker;
pub mod cluster;
pub mod corpus;
pub mod history;
pub mod nemesis;
pub mod proxy;
pub mod run;
pub mod timeline;
pub mod wire;
pub mod workload;
