//! Locks: fencing must hold; mutual exclusion is measured.
//!
//! A lease-based lock cannot promise that two clients never believe they
//! hold it at once (a client that stalls past its TTL still believes it
//! does), so overlapping holds are reported, not judged. What must hold is
//! fencing: writes made through `create_revision(lock key) == token`
//! guards, ordered by the revision they committed at, carry non-decreasing
//! tokens: a holder's write never lands after a later holder's.
//!
//! History format: `acquire` (ok `result.token`, `result.key`),
//! `fenced-write` (`value.token`; ok `result.succeeded`, `result.rev`),
//! `release` (`value.token`).

use std::collections::HashMap;
use std::time::Instant;

use serde_json::{json, Value};

use super::Verdict;
use crate::history::{Op, Outcome};

pub fn check_lock(ops: &[Op]) -> Verdict {
    let started = Instant::now();
    let mut anomalies = Vec::new();
    let tok = |o: &Op, src: &Value| {
        src.get("token").and_then(Value::as_i64).or_else(|| o.value.get("token").and_then(Value::as_i64))
    };

    // Fencing: succeeded writes in commit order.
    let mut writes: Vec<(i64, i64, &Op)> = ops
        .iter()
        .filter(|o| o.f == "fenced-write" && o.outcome == Outcome::Ok)
        .filter(|o| o.result.get("succeeded") == Some(&Value::Bool(true)))
        .filter_map(|o| Some((o.result.get("rev")?.as_i64()?, tok(o, &o.value)?, o)))
        // A write fenced by token 0 compares against "absent", which fences
        // nothing: the workload never issues one, older histories may.
        .filter(|w| w.1 > 0)
        .collect();
    writes.sort_by_key(|w| w.0);
    let mut highest: Option<(i64, &Op)> = None;
    for w in &writes {
        if let Some((t, by)) = highest {
            if w.1 < t {
                anomalies.push(json!({"type": "fencing-violation", "write": w.2, "after_token": t, "after": by}));
            }
        }
        if highest.is_none_or(|(t, _)| w.1 > t) {
            highest = Some((w.1, w.2));
        }
    }
    // Tokens are unique per acquisition.
    let mut holders: HashMap<i64, usize> = HashMap::new();
    for o in ops.iter().filter(|o| o.f == "acquire" && o.outcome == Outcome::Ok) {
        if let Some(t) = tok(o, &o.result).filter(|t| *t > 0) {
            if let Some(prev) = holders.insert(t, o.process) {
                anomalies.push(json!({"type": "duplicate-token", "token": t, "processes": [prev, o.process]}));
            }
        }
    }
    let stalled_rejected = ops
        .iter()
        .filter(|o| o.f == "fenced-write" && o.value.get("stalled") == Some(&Value::Bool(true)))
        .filter(|o| o.result.get("succeeded") == Some(&Value::Bool(false)))
        .count();

    // Mutual exclusion, measured: holds are [acquire completed, release
    // invoked] per token.
    let mut holds: Vec<(u64, u64, bool)> = Vec::new();
    for a in ops.iter().filter(|o| o.f == "acquire" && o.outcome == Outcome::Ok) {
        let Some(t) = tok(a, &a.result) else { continue };
        let release = ops.iter().filter(|o| o.f == "release" && tok(o, &o.value) == Some(t)).min_by_key(|o| o.invoke);
        let end = release.map_or(u64::MAX, |o| o.invoke);
        let stalled = release.is_some_and(|o| o.value.get("stalled") == Some(&Value::Bool(true)));
        holds.push((a.complete, end, stalled));
    }
    holds.sort();
    let (mut overlaps, mut overlaps_without_stalls) = (0, 0);
    for (i, a) in holds.iter().enumerate() {
        for b in holds[i + 1..].iter().take_while(|b| b.0 < a.1) {
            overlaps += 1;
            if !a.2 && !b.2 {
                overlaps_without_stalls += 1;
            }
        }
    }
    let mut v = Verdict::new("lock", ops.len(), anomalies, started);
    v.measured = json!({
        "acquisitions": holds.len(),
        "fenced_writes_committed": writes.len(),
        "overlapping_holds": overlaps,
        "overlaps_between_unstalled_holders": overlaps_without_stalls,
        "stalled_writes_fenced_off": stalled_rejected,
    });
    v
}
