//! JSON forms of etcd's key-values, events and watch responses, so that
//! histories hold everything a checker needs and stay readable. Keys and
//! values are the workloads' ASCII strings, values optionally padded to a
//! size ([`padded`]); histories hold only their text.

use bytes::Bytes;
use keel_client::etcdserverpb::{ResponseHeader, WatchResponse};
use keel_client::mvccpb::{event::EventType, Event, KeyValue};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// `text` as a stored value of at least `size` bytes: the text, a zero
/// byte, then pseudo-random bytes seeded by the text, so that no storage
/// compresses them and the same text always gives the same value (a
/// compare on the value can name it). Text of `size` or more is stored as
/// it is.
pub fn padded(text: &str, size: usize) -> Vec<u8> {
    let mut v = text.as_bytes().to_vec();
    if size <= v.len() + 1 {
        return v;
    }
    v.push(0);
    let seed = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let start = v.len();
    v.resize(size, 0);
    StdRng::seed_from_u64(seed).fill(&mut v[start..]);
    v
}

/// The text a [`padded`] value starts with.
pub fn unpadded(value: &[u8]) -> &[u8] {
    value.split(|&b| b == 0).next().unwrap_or(value)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub fn kv_json(kv: &KeyValue) -> Value {
    json!({"key": text(&kv.key), "value": text(unpadded(&kv.value)), "create": kv.create_revision, "mod": kv.mod_revision, "version": kv.version, "lease": kv.lease})
}

pub fn kv_from(v: &Value) -> Option<KeyValue> {
    let int = |f: &str| v.get(f).and_then(Value::as_i64).unwrap_or(0);
    Some(KeyValue {
        key: Bytes::from(v.get("key")?.as_str()?.to_string()),
        value: Bytes::from(v.get("value").and_then(Value::as_str).unwrap_or("").to_string()),
        create_revision: int("create"),
        mod_revision: int("mod"),
        version: int("version"),
        lease: int("lease"),
    })
}

pub fn event_json(e: &Event) -> Value {
    let kind = if e.r#type == EventType::Delete as i32 { "delete" } else { "put" };
    json!({"type": kind, "kv": e.kv.as_ref().map(kv_json), "prev": e.prev_kv.as_ref().map(kv_json)})
}

pub fn event_from(v: &Value) -> Option<Event> {
    let kind = if v.get("type")?.as_str()? == "delete" { EventType::Delete } else { EventType::Put };
    Some(Event { r#type: kind as i32, kv: Some(kv_from(v.get("kv")?)?), prev_kv: v.get("prev").and_then(kv_from) })
}

pub fn response_json(r: &WatchResponse) -> Value {
    let mut v = json!({
        "rev": r.header.as_ref().map_or(0, |h| h.revision),
        "events": r.events.iter().map(event_json).collect::<Vec<_>>(),
    });
    for (flag, name) in [(r.created, "created"), (r.canceled, "canceled"), (r.fragment, "fragment")] {
        if flag {
            v[name] = json!(true);
        }
    }
    if r.compact_revision != 0 {
        v["compact_revision"] = json!(r.compact_revision);
    }
    v
}

pub fn response_from(v: &Value) -> Option<WatchResponse> {
    let flag = |f: &str| v.get(f).and_then(Value::as_bool).unwrap_or(false);
    Some(WatchResponse {
        header: Some(ResponseHeader { revision: v.get("rev")?.as_i64()?, ..Default::default() }),
        events: v.get("events")?.as_array()?.iter().map(event_from).collect::<Option<Vec<_>>>()?,
        created: flag("created"),
        canceled: flag("canceled"),
        fragment: flag("fragment"),
        compact_revision: v.get("compact_revision").and_then(Value::as_i64).unwrap_or(0),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padded_values_keep_their_text_and_do_not_repeat() {
        let v = padded("42", 65_536);
        assert_eq!(v.len(), 65_536);
        assert_eq!(unpadded(&v), b"42");
        assert_eq!(v, padded("42", 65_536), "the same text must give the same value");
        assert_ne!(v[3..], padded("43", 65_536)[3..]);
        // Random bytes: no byte value takes more than a few percent.
        let mut counts = [0usize; 256];
        v[3..].iter().for_each(|&b| counts[b as usize] += 1);
        assert!(counts.iter().all(|&c| c < 1_000), "padding looks compressible");
        assert_eq!(padded("12345", 4), b"12345");
        assert_eq!(unpadded(b"plain"), b"plain");
        assert_eq!(kv_json(&KeyValue { value: v.into(), ..Default::default() })["value"], "42");
    }
}
