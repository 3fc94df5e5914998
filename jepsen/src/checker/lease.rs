//! Leases: a key never outlives its lease, and a lease never ends early.
//!
//! History format: `grant` (ok `result.id`, `result.ttl`), `put`
//! (`value.key`, `value.lease`; ok `result.rev`), `keepalive`
//! (`value.lease`; ok `result.ttl`, 0 when the lease is gone), `revoke`
//! (`value.lease`), `read` and `final-read` (ok `result.keys`: objects with
//! `key`). Checks:
//!
//! - read-after-revoke: a read invoked after a revoke completed still sees
//!   a key of that lease;
//! - resurrected-key: a read invoked after a keepalive answered TTL 0 still
//!   sees a key of that lease;
//! - revoked-lease-alive: a keepalive invoked after a revoke completed
//!   answers a positive TTL;
//! - leaked-key: the final read (after every lease had time to expire)
//!   finds a key;
//! - early-expiry: a read that completed before the lease's guaranteed
//!   lifetime (last grant or keepalive invocation + TTL) ended misses a key
//!   put with that lease, and nobody revoked it. Leases run on the leader's
//!   clock, so when the nemesis skewed clocks this is measured, not judged.

use std::collections::HashMap;
use std::time::Instant;

use serde_json::{json, Value};

use super::Verdict;
use crate::history::{Entry, Op, Outcome};

const SECOND: u64 = 1_000_000_000;

fn keys_of(op: &Op) -> Vec<String> {
    op.result
        .get("keys")
        .and_then(Value::as_array)
        .map(|ks| ks.iter().filter_map(|k| k.get("key").and_then(Value::as_str).map(str::to_string)).collect())
        .unwrap_or_default()
}

fn lease_of(op: &Op) -> Option<i64> {
    op.value.get("lease").and_then(Value::as_i64)
}

pub fn check_leases(entries: &[Entry]) -> Verdict {
    let started = Instant::now();
    let clock_skew = entries.iter().any(|e| matches!(e, Entry::Nemesis(n) if n.f == "clock"));
    let ops = crate::history::ops(entries);
    let mut anomalies = Vec::new();
    let mut measured_early = Vec::new();

    // Per lease: attached keys, when it certainly ended, how long it is
    // certainly alive.
    let mut key_lease: HashMap<String, i64> = HashMap::new();
    let mut keys_by_lease: HashMap<i64, Vec<(String, u64)>> = HashMap::new();
    let mut ended_at: HashMap<i64, (u64, &'static str)> = HashMap::new();
    let mut alive_until: HashMap<i64, u64> = HashMap::new();
    let mut revoke_invoked: HashMap<i64, u64> = HashMap::new();
    for op in &ops {
        match (op.f.as_str(), op.outcome) {
            ("grant", Outcome::Ok) => {
                let (Some(id), Some(ttl)) =
                    (op.result.get("id").and_then(Value::as_i64), op.result.get("ttl").and_then(Value::as_i64))
                else {
                    continue;
                };
                let until = op.invoke + ttl.max(0) as u64 * SECOND;
                let e = alive_until.entry(id).or_insert(0);
                *e = (*e).max(until);
            }
            ("put", o) if o != Outcome::Fail => {
                let (Some(key), Some(id)) = (op.value.get("key").and_then(Value::as_str), lease_of(op)) else {
                    continue;
                };
                key_lease.insert(key.to_string(), id);
                if o == Outcome::Ok {
                    keys_by_lease.entry(id).or_default().push((key.to_string(), op.complete));
                }
            }
            ("keepalive", Outcome::Ok) => {
                let Some(id) = lease_of(op) else { continue };
                let ttl = op.result.get("ttl").and_then(Value::as_i64).unwrap_or(0);
                if ttl > 0 {
                    let e = alive_until.entry(id).or_insert(0);
                    *e = (*e).max(op.invoke + ttl as u64 * SECOND);
                } else {
                    let e = ended_at.entry(id).or_insert((op.complete, "keepalive-ttl-0"));
                    if op.complete < e.0 {
                        *e = (op.complete, "keepalive-ttl-0");
                    }
                }
            }
            ("revoke", o) => {
                let Some(id) = lease_of(op) else { continue };
                let e = revoke_invoked.entry(id).or_insert(op.invoke);
                *e = (*e).min(op.invoke);
                if o == Outcome::Ok {
                    let e = ended_at.entry(id).or_insert((op.complete, "revoke"));
                    if op.complete < e.0 {
                        *e = (op.complete, "revoke");
                    }
                }
            }
            _ => {}
        }
    }

    // Keepalives after a completed revoke.
    for op in ops.iter().filter(|o| o.f == "keepalive" && o.outcome == Outcome::Ok) {
        let Some(id) = lease_of(op) else { continue };
        let ttl = op.result.get("ttl").and_then(Value::as_i64).unwrap_or(0);
        if let Some((t, "revoke")) = ended_at.get(&id) {
            if op.invoke > *t && ttl > 0 {
                anomalies.push(json!({"type": "revoked-lease-alive", "lease": id, "op": op}));
            }
        }
    }

    let mut reads = 0;
    for op in ops.iter().filter(|o| (o.f == "read" || o.f == "final-read") && o.outcome == Outcome::Ok) {
        reads += 1;
        let seen = keys_of(op);
        if op.f == "final-read" {
            for k in &seen {
                anomalies.push(json!({"type": "leaked-key", "key": k, "lease": key_lease.get(k)}));
            }
            continue;
        }
        for k in &seen {
            let Some(id) = key_lease.get(k) else { continue };
            if let Some((t, how)) = ended_at.get(id) {
                if op.invoke > *t {
                    let kind = if *how == "revoke" { "read-after-revoke" } else { "resurrected-key" };
                    anomalies.push(json!({"type": kind, "key": k, "lease": id, "ended_at": t, "op": op}));
                }
            }
        }
        // Keys that must still be there.
        for (id, keys) in &keys_by_lease {
            let Some(until) = alive_until.get(id) else { continue };
            if op.complete >= *until || revoke_invoked.get(id).is_some_and(|r| *r < op.complete) {
                continue;
            }
            for (k, put_done) in keys {
                if op.invoke > *put_done && !seen.contains(k) {
                    let a = json!({"type": "early-expiry", "key": k, "lease": id, "alive_until": until, "op": op});
                    if clock_skew {
                        measured_early.push(a);
                    } else {
                        anomalies.push(a);
                    }
                }
            }
        }
    }
    let mut v = Verdict::new("lease", ops.len(), anomalies, started);
    v.measured = json!({
        "reads": reads,
        "leases": alive_until.len(),
        "early_expiry_under_clock_skew": measured_early.len(),
        "early_expiry_examples": measured_early.into_iter().take(3).collect::<Vec<_>>(),
    });
    v
}
