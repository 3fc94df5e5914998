//! Watch guarantees: ordered, unique, atomic per revision, reliable (no
//! gap), bookmarkable, resumable, prev_kv and filters correct, and the same
//! history on every member.
//!
//! The ground truth is the complete event history that each member
//! returns, after the run, to a watch from the workload's first revision
//! (ops `f = "truth"`); the members must agree on it, it must have no
//! revision hole, and it must contain every acknowledged write of the
//! history at the revision the write was acknowledged with (and no write
//! that certainly failed). Each watcher (`f = "watch"`, its responses per
//! connection in `result.segments`) is then compared with it.
//!
//! Writer format: `f` = "put" (`value.key`, `value.value`; ok result `rev`,
//! `prev`) or "delete" (`value.key`; ok result `rev`, `deleted`).

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use bytes::Bytes;
use keel_client::etcdserverpb::WatchResponse;
use keel_client::mvccpb::{event::EventType, Event};
use keel_tests::watch_check::{check, GroundTruth, WatchSpec};
use serde_json::{json, Value};

use super::Verdict;
use crate::history::{Op, Outcome};
use crate::wire::{event_from, kv_from, response_from};

fn spec_from(v: &Value) -> Option<WatchSpec> {
    let flag = |f: &str| v.get(f).and_then(Value::as_bool).unwrap_or(false);
    Some(WatchSpec {
        key: Bytes::from(v.get("key")?.as_str()?.to_string()),
        range_end: Bytes::from(v.get("range_end").and_then(Value::as_str).unwrap_or("").to_string()),
        start_rev: v.get("start_rev").and_then(Value::as_i64).unwrap_or(0),
        no_put: flag("no_put"),
        no_delete: flag("no_delete"),
        prev_kv: flag("prev_kv"),
    })
}

fn ev_rev(e: &Event) -> i64 {
    e.kv.as_ref().map_or(0, |k| k.mod_revision)
}

fn ev_key(e: &Event) -> Bytes {
    e.kv.as_ref().map(|k| k.key.clone()).unwrap_or_default()
}

/// Structural checks on one watcher's responses that name the anomaly
/// precisely: duplicates, a revision split across responses, reordering.
fn structure(segments: &[Vec<WatchResponse>]) -> Option<Value> {
    let mut seen: HashSet<(i64, Bytes)> = HashSet::new();
    let mut last_rev = 0;
    for (si, seg) in segments.iter().enumerate() {
        let mut fragment = false;
        for (ri, r) in seg.iter().enumerate() {
            for (ei, e) in r.events.iter().enumerate() {
                let rev = ev_rev(e);
                if !seen.insert((rev, ev_key(e))) {
                    return Some(
                        json!({"type": "duplicate-event", "segment": si, "response": ri, "revision": rev, "key": String::from_utf8_lossy(&ev_key(e))}),
                    );
                }
                if rev < last_rev {
                    return Some(
                        json!({"type": "out-of-order", "segment": si, "response": ri, "revision": rev, "after": last_rev}),
                    );
                }
                // The first event of a new (non-continuation) response must
                // start a new revision.
                if ei == 0 && !fragment && rev == last_rev {
                    return Some(
                        json!({"type": "non-atomic-revision", "segment": si, "response": ri, "revision": rev}),
                    );
                }
                last_rev = rev;
            }
            fragment = r.fragment;
        }
    }
    None
}

pub fn check_watch(ops: &[Op]) -> Vec<Verdict> {
    let started = Instant::now();
    let truths: Vec<&Op> = ops.iter().filter(|o| o.f == "truth" && o.outcome == Outcome::Ok).collect();
    let Some(first) = truths.first() else {
        return vec![Verdict::unknown(
            "watch",
            "no ground truth was collected (cluster not healthy at the end?)",
            started,
        )];
    };
    let events = |o: &Op| -> Vec<Event> {
        o.result
            .get("events")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(event_from).collect())
            .unwrap_or_default()
    };
    let truth_events = events(first);
    let mut anomalies = Vec::new();
    for other in &truths[1..] {
        let evs = events(other);
        if evs != truth_events {
            let at =
                evs.iter().zip(&truth_events).position(|(a, b)| a != b).unwrap_or(evs.len().min(truth_events.len()));
            anomalies.push(json!({
                "type": "divergent-members",
                "members": [first.value.get("member"), other.value.get("member")],
                "first_difference": at,
                "lengths": [truth_events.len(), evs.len()],
            }));
        }
    }
    let mut gt = GroundTruth::default();
    for e in &truth_events {
        gt.by_rev.entry(ev_rev(e)).or_default().push(e.clone());
    }
    let from = first.result.get("from").and_then(Value::as_i64).unwrap_or(1);
    let to = first.result.get("to").and_then(Value::as_i64).unwrap_or_else(|| gt.last_rev());
    if first.result.get("contiguous").and_then(Value::as_bool).unwrap_or(false) {
        if let Some(missing) = (from..=to).find(|r| !gt.by_rev.contains_key(r)) {
            anomalies.push(json!({"type": "missing-revision", "revision": missing, "from": from, "to": to}));
        }
    }

    // Acknowledged writes against the truth.
    let mut values_in_truth: HashMap<(Bytes, Bytes), i64> = HashMap::new();
    for e in truth_events.iter().filter(|e| e.r#type == EventType::Put as i32) {
        if let Some(kv) = &e.kv {
            values_in_truth.insert((kv.key.clone(), kv.value.clone()), kv.mod_revision);
        }
    }
    let mut writes = 0;
    for op in ops.iter().filter(|o| o.f == "put" || o.f == "delete") {
        writes += 1;
        let key = Bytes::from(op.value.get("key").and_then(Value::as_str).unwrap_or("").to_string());
        match (op.f.as_str(), op.outcome) {
            ("put", Outcome::Ok) => {
                let rev = op.result.get("rev").and_then(Value::as_i64).unwrap_or(0);
                let value = Bytes::from(op.value.get("value").and_then(Value::as_str).unwrap_or("").to_string());
                let prev = op.result.get("prev").and_then(kv_from);
                let found = gt.by_rev.get(&rev).and_then(|evs| {
                    evs.iter()
                        .find(|e| e.r#type == EventType::Put as i32 && e.kv.as_ref().is_some_and(|k| k.key == key))
                });
                match found {
                    None => anomalies.push(json!({"type": "lost-write", "op": op})),
                    Some(e) if e.kv.as_ref().map(|k| &k.value) != Some(&value) => {
                        anomalies.push(json!({"type": "wrong-value", "op": op, "truth": crate::wire::event_json(e)}))
                    }
                    Some(e) if e.prev_kv != prev => {
                        anomalies.push(json!({"type": "wrong-prev-kv", "op": op, "truth": crate::wire::event_json(e)}))
                    }
                    Some(_) => {}
                }
            }
            ("put", Outcome::Fail) => {
                let value = Bytes::from(op.value.get("value").and_then(Value::as_str).unwrap_or("").to_string());
                if let Some(rev) = values_in_truth.get(&(key.clone(), value)) {
                    anomalies.push(json!({"type": "failed-write-applied", "op": op, "revision": rev}));
                }
            }
            ("delete", Outcome::Ok) => {
                let rev = op.result.get("rev").and_then(Value::as_i64).unwrap_or(0);
                let deleted = op.result.get("deleted").and_then(Value::as_array).map_or(0, Vec::len);
                if deleted > 0 {
                    let found = gt.by_rev.get(&rev).is_some_and(|evs| {
                        evs.iter().any(|e| {
                            e.r#type == EventType::Delete as i32 && e.kv.as_ref().is_some_and(|k| k.key == key)
                        })
                    });
                    if !found {
                        anomalies.push(json!({"type": "lost-write", "op": op}));
                    }
                }
            }
            _ => {}
        }
    }

    // Every watcher against the truth.
    let mut delivered = 0;
    let mut watchers = 0;
    for op in ops.iter().filter(|o| o.f == "watch" && o.outcome == Outcome::Ok) {
        watchers += 1;
        let Some(spec) = spec_from(&op.value) else { continue };
        let segments: Vec<Vec<WatchResponse>> = op
            .result
            .get("segments")
            .and_then(Value::as_array)
            .map(|segs| {
                segs.iter()
                    .map(|s| s.as_array().map(|rs| rs.iter().filter_map(response_from).collect()).unwrap_or_default())
                    .collect()
            })
            .unwrap_or_default();
        let upto = op.result.get("upto").and_then(Value::as_i64).unwrap_or(to).min(to);
        let id = op.value.get("id").cloned().unwrap_or(Value::Null);
        if let Some(mut a) = structure(&segments) {
            a["watcher"] = id;
            anomalies.push(a);
            continue;
        }
        match check(&gt, &spec, &segments, upto) {
            Ok(n) => delivered += n,
            Err(msg) => {
                let kind = if msg.contains("progress at") {
                    "early-bookmark"
                } else if let Some((got, want)) = counts(&msg) {
                    if got < want {
                        "gap"
                    } else {
                        "unexpected-event"
                    }
                } else {
                    "wrong-event"
                };
                anomalies.push(json!({"type": kind, "watcher": id, "detail": msg}));
            }
        }
    }
    let mut v = Verdict::new("watch", writes + watchers, anomalies, started);
    v.measured = json!({"watchers": watchers, "events_delivered": delivered, "truth_events": truth_events.len(), "revisions": [from, to], "members_compared": truths.len()});
    vec![v]
}

/// Parses "received N events, expected M".
fn counts(msg: &str) -> Option<(usize, usize)> {
    let rest = msg.strip_prefix("received ")?;
    let (got, rest) = rest.split_once(" events, expected ")?;
    let want = rest.split(|c: char| !c.is_ascii_digit()).next()?;
    Some((got.parse().ok()?, want.parse().ok()?))
}
