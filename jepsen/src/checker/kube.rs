//! The Kubernetes storage contract.
//!
//! - lost-update: two conditional writes (`create`, `update`, `delete`,
//!   guarded by `value.expect` = the mod_revision they read) that both
//!   succeeded from the same revision of the same key (creates, guarded
//!   by "absent", are exempt: a key is absent again after each delete);
//! - inconsistent-paged-list: a paged list at revision R differs from an
//!   unpaged read of the same revision on another member;
//! - future-read: a list at R holds an object modified after R;
//! - wrong-count: a count-only read at R disagrees with the list at R;
//! - stale-list: a list started after a write was acknowledged at revision
//!   r, yet its revision is below r;
//! - informer anomalies, replaying each informer's lists and events: an
//!   event at or below the cache's revision (duplicate or out of order), a
//!   create of a cached key, a change of an unknown one, or a prev_kv that
//!   is not the cached version (informer-inconsistent), and a final cache that differs from the final
//!   list (informer-divergence).

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use serde_json::{json, Value};

use super::Verdict;
use crate::history::{Op, Outcome};

type Cache = BTreeMap<String, i64>;

fn items(v: Option<&Value>) -> Option<Cache> {
    v?.as_array()?.iter().map(|i| Some((i.get("key")?.as_str()?.to_string(), i.get("mod")?.as_i64()?))).collect()
}

fn int(v: &Value, f: &str) -> Option<i64> {
    v.get(f).and_then(Value::as_i64)
}

pub fn check_kube(ops: &[Op]) -> Vec<Verdict> {
    let started = Instant::now();
    let mut anomalies = Vec::new();

    // Guarded writes.
    let writes: Vec<&Op> = ops
        .iter()
        .filter(|o| matches!(o.f.as_str(), "create" | "update" | "delete") && o.outcome == Outcome::Ok)
        .collect();
    let mut from: HashMap<(String, i64), &Op> = HashMap::new();
    for w in writes.iter().filter(|w| w.result.get("succeeded") == Some(&Value::Bool(true))) {
        let key = w.value.get("key").and_then(Value::as_str).unwrap_or("").to_string();
        let expect = int(&w.value, "expect").unwrap_or(-1);
        // mod_revision 0 means "absent", which recurs after every delete.
        if expect == 0 {
            continue;
        }
        if let Some(other) = from.insert((key.clone(), expect), w) {
            anomalies.push(json!({"type": "lost-update", "key": key, "expect": expect, "ops": [other, w]}));
        }
    }

    // Lists.
    let mut acked: Vec<(u64, i64)> = writes
        .iter()
        .filter(|w| w.result.get("succeeded") == Some(&Value::Bool(true)))
        .filter_map(|w| Some((w.complete, int(&w.result, "rev")?)))
        .collect();
    acked.sort();
    let mut lists = 0;
    for l in ops.iter().filter(|o| o.f == "list" && o.outcome == Outcome::Ok) {
        lists += 1;
        let rev = int(&l.result, "rev").unwrap_or(0);
        let paged = items(l.result.get("paged")).unwrap_or_default();
        if let Some(whole) = items(l.result.get("whole")) {
            if whole != paged {
                anomalies.push(json!({"type": "inconsistent-paged-list", "op": l}));
            }
        }
        if let Some(count) = l.result.get("count").and_then(Value::as_i64) {
            if count != paged.len() as i64 {
                anomalies.push(json!({"type": "wrong-count", "count": count, "listed": paged.len(), "op": l}));
            }
        }
        if let Some((k, m)) = paged.iter().find(|(_, m)| **m > rev) {
            anomalies.push(json!({"type": "future-read", "key": k, "mod": m, "op": l}));
        }
        let newest_acked = acked.iter().take_while(|(c, _)| *c < l.invoke).map(|(_, r)| *r).max().unwrap_or(0);
        if rev < newest_acked {
            anomalies.push(json!({"type": "stale-list", "rev": rev, "acknowledged": newest_acked, "op": l}));
        }
    }

    // Informers.
    let final_list = ops.iter().find(|o| o.f == "final-list" && o.outcome == Outcome::Ok);
    let final_rev = final_list.and_then(|f| int(&f.result, "rev"));
    let final_items = final_list.and_then(|f| items(f.result.get("items")));
    let mut events_replayed = 0;
    let mut informers = 0;
    for inf in ops.iter().filter(|o| o.f == "informer" && o.outcome == Outcome::Ok) {
        informers += 1;
        let segments = inf.result.get("segments").and_then(Value::as_array).cloned().unwrap_or_default();
        let mut last_cache: Option<(Cache, i64)> = None;
        'segments: for (si, seg) in segments.iter().enumerate() {
            let list = seg.get("list").cloned().unwrap_or(Value::Null);
            let mut rev = int(&list, "rev").unwrap_or(0);
            let mut cache = items(list.get("items")).unwrap_or_default();
            for e in seg.get("events").and_then(Value::as_array).into_iter().flatten() {
                events_replayed += 1;
                let Some(ev) = crate::wire::event_from(e) else { continue };
                let Some(kv) = ev.kv else { continue };
                let key = String::from_utf8_lossy(&kv.key).into_owned();
                let bad = |kind: &str, why: &str| json!({"type": kind, "informer": inf.value, "segment": si, "key": key, "revision": kv.mod_revision, "why": why});
                if kv.mod_revision < rev || (kv.mod_revision == rev && cache.get(&key) == Some(&kv.mod_revision)) {
                    anomalies.push(bad("informer-out-of-order", "event at or below the cache's revision"));
                    break 'segments;
                }
                rev = kv.mod_revision;
                // prev_kv must be the version the cache holds.
                if let Some(prev) = &ev.prev_kv {
                    if cache.get(&key) != Some(&prev.mod_revision) {
                        anomalies.push(bad("informer-inconsistent", "prev_kv differs from the cached version"));
                        break 'segments;
                    }
                }
                let delete = ev.r#type == keel_client::mvccpb::event::EventType::Delete as i32;
                let known = cache.contains_key(&key);
                if delete {
                    if cache.remove(&key).is_none() {
                        anomalies.push(bad("informer-inconsistent", "delete of an object not in the cache"));
                        break 'segments;
                    }
                } else if (kv.version == 1) == known {
                    let why = if known { "create of a cached object" } else { "update of an object not in the cache" };
                    anomalies.push(bad("informer-inconsistent", why));
                    break 'segments;
                } else {
                    cache.insert(key, kv.mod_revision);
                }
            }
            last_cache = Some((cache, rev));
        }
        let attested = int(&inf.result, "attested").unwrap_or(0);
        if let (Some((cache, _)), Some(fr), Some(fi)) = (&last_cache, final_rev, &final_items) {
            if attested >= fr && cache != fi {
                let missing: Vec<&String> = fi.keys().filter(|k| !cache.contains_key(*k)).collect();
                let extra: Vec<&String> = cache.keys().filter(|k| !fi.contains_key(*k)).collect();
                anomalies.push(json!({"type": "informer-divergence", "informer": inf.value, "final_rev": fr, "missing": missing, "extra": extra}));
            }
        }
    }
    let mut v = Verdict::new("kube", writes.len() + lists + informers, anomalies, started);
    v.measured = json!({"guarded_writes": writes.len(), "lists": lists, "informers": informers, "events_replayed": events_replayed, "compactions": ops.iter().filter(|o| o.f == "compact" && o.outcome == Outcome::Ok).count()});
    vec![v]
}
