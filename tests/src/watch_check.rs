//! A watch validator: records what watchers received and checks it against
//! the ground truth of what was written (assembled from the writers' own
//! responses, which carry revisions and prev_kv). Checks etcd's watch
//! guarantees: ordered, unique, atomic per revision, reliable (no gap),
//! bookmarkable (a progress notification at R means everything up to R
//! was delivered), resumable, prev_kv and filters correct.

use std::collections::BTreeMap;

use bytes::Bytes;
use keel_proto::etcdserverpb::{
    request_op, response_op, DeleteRangeResponse, PutResponse, RequestOp, TxnRequest, TxnResponse, WatchResponse,
};
use keel_proto::mvccpb::{event::EventType, Event, KeyValue};

/// Every change, by revision, in the order applied within the revision.
#[derive(Debug, Default, Clone)]
pub struct GroundTruth {
    pub by_rev: BTreeMap<i64, Vec<Event>>,
}

fn put_event(key: &Bytes, value: &Bytes, rev: i64, prev: Option<&KeyValue>) -> Event {
    let (create, version) = match prev {
        Some(p) => (p.create_revision, p.version + 1),
        None => (rev, 1),
    };
    Event {
        r#type: EventType::Put as i32,
        kv: Some(KeyValue {
            key: key.clone(),
            create_revision: create,
            mod_revision: rev,
            version,
            value: value.clone(),
            lease: 0,
        }),
        prev_kv: prev.cloned(),
    }
}

fn delete_event(prev: &KeyValue, rev: i64) -> Event {
    Event {
        r#type: EventType::Delete as i32,
        kv: Some(KeyValue { key: prev.key.clone(), mod_revision: rev, ..Default::default() }),
        prev_kv: Some(prev.clone()),
    }
}

impl GroundTruth {
    /// Records a Put sent with prev_kv=true.
    pub fn put(&mut self, key: &Bytes, value: &Bytes, resp: &PutResponse) {
        let rev = resp.header.as_ref().map_or(0, |h| h.revision);
        self.by_rev.entry(rev).or_default().push(put_event(key, value, rev, resp.prev_kv.as_ref()));
    }

    /// Records a DeleteRange sent with prev_kv=true.
    pub fn delete(&mut self, resp: &DeleteRangeResponse) {
        if resp.deleted == 0 {
            return;
        }
        let rev = resp.header.as_ref().map_or(0, |h| h.revision);
        let evs = self.by_rev.entry(rev).or_default();
        for p in &resp.prev_kvs {
            evs.push(delete_event(p, rev));
        }
    }

    /// Records a flat txn whose puts and deletes were all sent with
    /// prev_kv=true.
    pub fn txn(&mut self, req: &TxnRequest, resp: &TxnResponse) {
        let rev = resp.header.as_ref().map_or(0, |h| h.revision);
        let ops: &[RequestOp] = if resp.succeeded { &req.success } else { &req.failure };
        let mut evs = Vec::new();
        for (op, r) in ops.iter().zip(&resp.responses) {
            match (&op.request, &r.response) {
                (Some(request_op::Request::RequestPut(p)), Some(response_op::Response::ResponsePut(pr))) => {
                    evs.push(put_event(&p.key, &p.value, rev, pr.prev_kv.as_ref()));
                }
                (
                    Some(request_op::Request::RequestDeleteRange(_)),
                    Some(response_op::Response::ResponseDeleteRange(dr)),
                ) => {
                    for p in &dr.prev_kvs {
                        evs.push(delete_event(p, rev));
                    }
                }
                _ => {}
            }
        }
        if !evs.is_empty() {
            self.by_rev.entry(rev).or_default().extend(evs);
        }
    }

    pub fn last_rev(&self) -> i64 {
        self.by_rev.keys().next_back().copied().unwrap_or(1)
    }
}

/// What a watcher asked for.
#[derive(Debug, Clone)]
pub struct WatchSpec {
    pub key: Bytes,
    /// Empty: single key; "\0": from key; else [key, end).
    pub range_end: Bytes,
    pub start_rev: i64,
    pub no_put: bool,
    pub no_delete: bool,
    pub prev_kv: bool,
}

impl WatchSpec {
    fn matches(&self, key: &[u8]) -> bool {
        match self.range_end.as_ref() {
            [] => key == self.key.as_ref(),
            [0] => key >= self.key.as_ref(),
            end => key >= self.key.as_ref() && key < end,
        }
    }

    fn wants(&self, ev: &Event) -> bool {
        let put = ev.r#type == EventType::Put as i32;
        !(put && self.no_put || !put && self.no_delete) && ev.kv.as_ref().is_some_and(|kv| self.matches(&kv.key))
    }
}

/// The expected events for `spec` from `from` up to `to` (inclusive).
pub fn expected(truth: &GroundTruth, spec: &WatchSpec, from: i64, to: i64) -> Vec<Event> {
    let mut out = Vec::new();
    for (_, evs) in truth.by_rev.range(from..=to) {
        for ev in evs.iter().filter(|e| spec.wants(e)) {
            let mut ev = ev.clone();
            if !spec.prev_kv || (ev.r#type == EventType::Put as i32 && ev.kv.as_ref().is_some_and(|k| k.version == 1)) {
                ev.prev_kv = None;
            }
            out.push(ev);
        }
    }
    out
}

/// Checks what one logical watcher (possibly resumed several times)
/// received. `segments` are the responses of each connection in order;
/// each resumption started at the last seen revision + 1. `upto` is the
/// revision every watcher must have reached.
pub fn check(
    truth: &GroundTruth,
    spec: &WatchSpec,
    segments: &[Vec<WatchResponse>],
    upto: i64,
) -> Result<usize, String> {
    let start = if spec.start_rev == 0 { 1 } else { spec.start_rev };
    let mut got: Vec<Event> = Vec::new();
    let mut last_rev = 0i64;
    for (si, responses) in segments.iter().enumerate() {
        let mut pending_fragment: Vec<Event> = Vec::new();
        for (ri, r) in responses.iter().enumerate() {
            let header_rev = r.header.as_ref().map_or(0, |h| h.revision);
            if r.events.is_empty() && !r.created && !r.canceled && !r.fragment {
                // A progress notification (bookmark): everything up to its
                // revision must already be here.
                let want = expected(truth, spec, start, header_rev.min(upto));
                if got.len() < want.len() {
                    return Err(format!(
                        "segment {si} response {ri}: progress at {header_rev} but only {} of {} events delivered",
                        got.len(),
                        want.len()
                    ));
                }
                continue;
            }
            let mut evs = r.events.clone();
            if r.fragment {
                pending_fragment.extend(evs);
                continue;
            }
            if !pending_fragment.is_empty() {
                pending_fragment.extend(evs);
                evs = std::mem::take(&mut pending_fragment);
            }
            // Atomic: a revision's events never continue in a later response.
            if let (Some(first), true) = (evs.first(), last_rev > 0) {
                let rev = first.kv.as_ref().map_or(0, |k| k.mod_revision);
                if rev <= last_rev {
                    return Err(format!(
                        "segment {si} response {ri}: revision {rev} after {last_rev} (split or out of order)"
                    ));
                }
            }
            for w in evs.windows(2) {
                let (a, b) =
                    (w[0].kv.as_ref().map_or(0, |k| k.mod_revision), w[1].kv.as_ref().map_or(0, |k| k.mod_revision));
                if b < a {
                    return Err(format!("segment {si} response {ri}: events out of order ({a} then {b})"));
                }
            }
            if let Some(last) = evs.last() {
                last_rev = last.kv.as_ref().map_or(0, |k| k.mod_revision);
            }
            got.extend(evs);
        }
    }
    let want = expected(truth, spec, start, upto);
    let got_upto: Vec<Event> =
        got.iter().filter(|e| e.kv.as_ref().is_some_and(|k| k.mod_revision <= upto)).cloned().collect();
    if got_upto != want {
        let first_diff = got_upto.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(got_upto.len().min(want.len()));
        return Err(format!(
            "received {} events, expected {}; first difference at #{first_diff}: got {:?}, want {:?}",
            got_upto.len(),
            want.len(),
            got_upto.get(first_diff),
            want.get(first_diff)
        ));
    }
    Ok(got_upto.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_proto::etcdserverpb::ResponseHeader;

    fn truth() -> GroundTruth {
        let mut t = GroundTruth::default();
        for rev in 2..6 {
            let resp =
                PutResponse { header: Some(ResponseHeader { revision: rev, ..Default::default() }), prev_kv: None };
            t.put(&Bytes::from(format!("k{rev}")), &Bytes::from_static(b"v"), &resp);
        }
        t
    }

    fn spec() -> WatchSpec {
        WatchSpec {
            key: Bytes::from_static(b"k"),
            range_end: Bytes::from_static(b"l"),
            start_rev: 0,
            no_put: false,
            no_delete: false,
            prev_kv: false,
        }
    }

    fn resp(revs: &[i64], t: &GroundTruth) -> WatchResponse {
        WatchResponse {
            header: Some(ResponseHeader { revision: *revs.last().unwrap_or(&0), ..Default::default() }),
            events: revs.iter().flat_map(|r| t.by_rev[r].clone()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn accepts_a_correct_stream_and_rejects_gaps_duplicates_and_early_bookmarks() {
        let t = truth();
        let s = spec();
        assert_eq!(check(&t, &s, &[vec![resp(&[2, 3], &t), resp(&[4, 5], &t)]], 5), Ok(4));
        // Resumed after revision 3.
        assert_eq!(check(&t, &s, &[vec![resp(&[2, 3], &t)], vec![resp(&[4, 5], &t)]], 5), Ok(4));
        assert!(check(&t, &s, &[vec![resp(&[2], &t), resp(&[4, 5], &t)]], 5).is_err(), "gap");
        assert!(check(&t, &s, &[vec![resp(&[2, 3], &t), resp(&[3, 4, 5], &t)]], 5).is_err(), "duplicate");
        assert!(check(&t, &s, &[vec![resp(&[3, 2], &t), resp(&[4, 5], &t)]], 5).is_err(), "order");
        let bookmark =
            WatchResponse { header: Some(ResponseHeader { revision: 4, ..Default::default() }), ..Default::default() };
        assert!(check(&t, &s, &[vec![resp(&[2], &t), bookmark, resp(&[3, 4, 5], &t)]], 5).is_err(), "early bookmark");
    }
}
