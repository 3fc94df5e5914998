//! The member-wide watcher registry (etcd's watchableStore).

use std::collections::{BTreeMap, BTreeSet};

// Fx hashing for maps keyed by stream and watch ids (small integers the
// member assigns), looked up thousands of times per revision, where
// SipHash showed in profiles. Maps keyed by client-chosen bytes keep
// std's seeded hasher, so nobody can precompute colliding keys.
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use keel_proto::mvccpb::{event::EventType, Event};
use tokio::sync::{mpsc, Notify};

use crate::apply::CommitObserver;

/// A stream may have this many bytes of responses queued before its
/// synced watchers fall back to catching up from history.
pub const STREAM_BUDGET_BYTES: usize = 4 << 20;
/// The watch id etcd uses for responses not tied to one watcher.
pub const INVALID_WATCH_ID: i64 = -1;

pub type StreamId = u64;
pub type WatchId = i64;

/// What a watcher wants.
#[derive(Debug, Clone)]
pub struct WatchSpec {
    pub key: Bytes,
    /// None: the single key; Some(empty): every key from `key`.
    pub end: Option<Bytes>,
    pub no_put: bool,
    pub no_delete: bool,
    pub prev_kv: bool,
    pub fragment: bool,
    pub progress_notify: bool,
}

impl WatchSpec {
    /// Every event on `key` (`end`: None for the single key, as in
    /// [`WatchSpec::end`]), no filters, no prev_kv.
    pub fn new(key: Bytes, end: Option<Bytes>) -> Self {
        WatchSpec { key, end, no_put: false, no_delete: false, prev_kv: false, fragment: false, progress_notify: false }
    }

    pub fn matches(&self, key: &[u8]) -> bool {
        match &self.end {
            None => key == self.key.as_ref(),
            Some(end) if end.is_empty() => key >= self.key.as_ref(),
            Some(end) => key >= self.key.as_ref() && key < end.as_ref(),
        }
    }

    fn wants(&self, ev: &Event) -> bool {
        let is_put = ev.r#type == EventType::Put as i32;
        if (is_put && self.no_put) || (!is_put && self.no_delete) {
            return false;
        }
        ev.kv.as_ref().is_some_and(|kv| self.matches(&kv.key))
    }
}

/// What a session sends, in order.
#[derive(Debug)]
pub enum Outgoing {
    /// Events of one or more whole revisions for one watcher; `revision`
    /// is the header revision.
    Events { watch_id: WatchId, revision: i64, events: Vec<Event>, bytes: usize, prev_kv: bool, fragment: bool },
    /// One revision's events for the two or more watchers of the stream
    /// that get exactly these events (for a revision changing one key,
    /// every watcher of the stream that wants it; a lone one gets
    /// `Events`). One queue entry per stream
    /// instead of one per watcher keeps the apply path's work per
    /// revision proportional to the streams, not the watchers.
    Shared { watchers: Vec<Recipient>, revision: i64, events: Vec<Event>, bytes: usize },
    /// A response built by the hub or the session (created, canceled,
    /// progress, compacted); `revision` is the header revision.
    Control { response: keel_proto::etcdserverpb::WatchResponse, revision: i64 },
}

/// A watcher receiving a [`Outgoing::Shared`] revision, with its options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recipient {
    pub watch_id: WatchId,
    pub prev_kv: bool,
    pub fragment: bool,
}

impl Outgoing {
    pub fn bytes(&self) -> usize {
        match self {
            Outgoing::Events { bytes, .. } | Outgoing::Shared { bytes, .. } => *bytes,
            Outgoing::Control { .. } => 64,
        }
    }
}

struct Watcher {
    spec: WatchSpec,
    /// Unsynced: the next revision to deliver. Synced: the first revision
    /// it wants (later than the present for a watch that starts ahead).
    next_rev: i64,
    /// The start revision the client asked for (0: none).
    start_rev: i64,
    synced: bool,
    /// Progress-notify bookkeeping: no events sent since the last tick.
    quiet: bool,
}

impl Watcher {
    /// etcd 3.6's condition for a progress notification: synced, and the
    /// store has reached the revision the watch asked to start from.
    fn progress_due(&self, rev: i64) -> bool {
        self.synced && rev >= self.start_rev
    }
}

/// How a stream answers RequestProgress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressRequests {
    /// etcd 3.4.31/3.5.13: answered once every watcher has caught up.
    Deferred,
    /// etcd 3.6 (`progressIfSync`): answered only if every watcher is
    /// caught up now, dropped otherwise.
    IfSynced,
}

/// The hub's side of a session.
struct StreamEntry {
    tx: mpsc::UnboundedSender<Outgoing>,
    queued: Arc<AtomicUsize>,
    /// Woken when a watcher of this stream needs catching up.
    catch_up: Arc<Notify>,
    /// A RequestProgress waits for every watcher to catch up.
    deferred_progress: bool,
    next_auto_id: WatchId,
    watchers: HashSet<WatchId>,
}

#[derive(Default)]
struct HubState {
    rev: i64,
    next_stream: StreamId,
    streams: HashMap<StreamId, StreamEntry>,
    watchers: HashMap<(StreamId, WatchId), Watcher>,
    /// Synced single-key watchers by key, in (stream, id) order so a
    /// revision's recipients come out grouped by stream without a sort.
    synced_keys: std::collections::HashMap<Bytes, BTreeSet<(StreamId, WatchId)>>,
    /// Synced range watchers by (start, stream, id).
    synced_ranges: BTreeMap<(Bytes, StreamId, WatchId), ()>,
}

/// Why a watch cannot be created (etcd's messages, sent as cancel_reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WatchError {
    #[error("mvcc: watcher range is empty")]
    EmptyRange,
    #[error("mvcc: duplicate watch ID provided on the WatchStream")]
    DuplicateId,
}

pub struct WatchHub {
    state: Mutex<HubState>,
}

/// The session's handle on its queue.
pub struct StreamQueue {
    pub id: StreamId,
    pub rx: mpsc::UnboundedReceiver<Outgoing>,
    pub queued: Arc<AtomicUsize>,
    pub catch_up: Arc<Notify>,
}

fn approx_size(events: &[Event]) -> usize {
    events.iter().map(|e| e.kv.as_ref().map_or(0, |kv| kv.key.len() + kv.value.len() + 32) + 8).sum::<usize>() + 32
}

impl HubState {
    fn index(&mut self, key: (StreamId, WatchId)) {
        let Some(w) = self.watchers.get(&key) else { return };
        match &w.spec.end {
            None => {
                self.synced_keys.entry(w.spec.key.clone()).or_default().insert(key);
            }
            Some(_) => {
                self.synced_ranges.insert((w.spec.key.clone(), key.0, key.1), ());
            }
        }
    }

    fn unindex(&mut self, key: (StreamId, WatchId)) {
        let Some(w) = self.watchers.get(&key) else { return };
        match &w.spec.end {
            None => {
                if let Some(set) = self.synced_keys.get_mut(&w.spec.key) {
                    set.remove(&key);
                    if set.is_empty() {
                        self.synced_keys.remove(&w.spec.key);
                    }
                }
            }
            Some(_) => {
                self.synced_ranges.remove(&(w.spec.key.clone(), key.0, key.1));
            }
        }
    }

    /// Appends the synced watchers whose range contains `key` to `out`, in
    /// (stream, id) order.
    fn matching(&self, key: &[u8], out: &mut Vec<(StreamId, WatchId)>) {
        let start = out.len();
        if let Some(set) = self.synced_keys.get(key) {
            out.extend(set.iter().copied());
        }
        let single_key = out.len();
        let upper = (Bytes::copy_from_slice(key), StreamId::MAX, WatchId::MAX);
        for ((_, s, id), ()) in self.synced_ranges.range(..=upper) {
            if let Some(w) = self.watchers.get(&(*s, *id)) {
                if w.spec.matches(key) {
                    out.push((*s, *id));
                }
            }
        }
        if out.len() > single_key {
            out[start..].sort_unstable();
        }
    }

    fn send(&self, stream: StreamId, msg: Outgoing) -> bool {
        let Some(entry) = self.streams.get(&stream) else { return false };
        entry.queued.fetch_add(msg.bytes(), Ordering::AcqRel);
        entry.tx.send(msg).is_ok()
    }

    /// Moves a synced watcher to catch-up mode, starting at `from`.
    fn desync(&mut self, key: (StreamId, WatchId), from: i64) {
        self.unindex(key);
        if let Some(w) = self.watchers.get_mut(&key) {
            w.synced = false;
            w.next_rev = w.next_rev.max(from);
        }
        if let Some(s) = self.streams.get(&key.0) {
            s.catch_up.notify_one();
        }
    }

    /// Sends the deferred progress notification of `stream` once all its
    /// watchers are synced.
    fn maybe_progress(&mut self, stream: StreamId) {
        let rev = self.rev;
        let Some(entry) = self.streams.get(&stream) else { return };
        if !entry.deferred_progress || !self.all_progress_due(stream) {
            return;
        }
        if let Some(entry) = self.streams.get_mut(&stream) {
            entry.deferred_progress = false;
        }
        self.send(stream, progress_response(INVALID_WATCH_ID, rev));
    }

    fn all_progress_due(&self, stream: StreamId) -> bool {
        let rev = self.rev;
        self.streams.get(&stream).is_some_and(|e| {
            e.watchers.iter().all(|id| self.watchers.get(&(stream, *id)).is_some_and(|w| w.progress_due(rev)))
        })
    }
}

fn progress_response(watch_id: WatchId, rev: i64) -> Outgoing {
    Outgoing::Control {
        response: keel_proto::etcdserverpb::WatchResponse { watch_id, ..Default::default() },
        revision: rev,
    }
}

impl WatchHub {
    pub fn new(current_rev: i64) -> Self {
        Self { state: Mutex::new(HubState { rev: current_rev, ..Default::default() }) }
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        // A panic while holding the lock cannot leave the maps half
        // updated in a way later calls misread; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Latest revision the hub has seen committed.
    pub fn rev(&self) -> i64 {
        self.lock().rev
    }

    pub fn open_stream(&self) -> StreamQueue {
        let mut st = self.lock();
        let id = st.next_stream;
        st.next_stream += 1;
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let catch_up = Arc::new(Notify::new());
        st.streams.insert(
            id,
            StreamEntry {
                tx,
                queued: queued.clone(),
                catch_up: catch_up.clone(),
                deferred_progress: false,
                next_auto_id: 0,
                watchers: HashSet::default(),
            },
        );
        StreamQueue { id, rx, queued, catch_up }
    }

    /// Drops a stream and every watcher on it.
    pub fn close_stream(&self, stream: StreamId) {
        let mut st = self.lock();
        let ids: Vec<WatchId> =
            st.streams.get(&stream).map(|e| e.watchers.iter().copied().collect()).unwrap_or_default();
        for id in ids {
            st.unindex((stream, id));
            st.watchers.remove(&(stream, id));
        }
        st.streams.remove(&stream);
    }

    /// Creates a watcher starting at `start_rev` (0: the next revision).
    /// Queues the "created" response before any event, and returns the
    /// watch id.
    pub fn create(
        &self,
        stream: StreamId,
        requested_id: WatchId,
        spec: WatchSpec,
        start_rev: i64,
    ) -> Result<(WatchId, i64), WatchError> {
        if let Some(end) = &spec.end {
            if !end.is_empty() && spec.key.as_ref() >= end.as_ref() {
                return Err(WatchError::EmptyRange);
            }
        }
        let mut st = self.lock();
        let rev = st.rev;
        let entry = st.streams.get_mut(&stream).ok_or(WatchError::EmptyRange)?;
        let id = if requested_id == 0 {
            while entry.watchers.contains(&entry.next_auto_id) {
                entry.next_auto_id += 1;
            }
            let id = entry.next_auto_id;
            entry.next_auto_id += 1;
            id
        } else if entry.watchers.contains(&requested_id) {
            return Err(WatchError::DuplicateId);
        } else {
            requested_id
        };
        entry.watchers.insert(id);
        let next_rev = if start_rev == 0 { rev + 1 } else { start_rev };
        let synced = next_rev > rev;
        let created = keel_proto::etcdserverpb::WatchResponse { watch_id: id, created: true, ..Default::default() };
        st.send(stream, Outgoing::Control { response: created, revision: rev });
        st.watchers.insert((stream, id), Watcher { spec, next_rev, start_rev, synced, quiet: true });
        if synced {
            st.index((stream, id));
        } else if let Some(e) = st.streams.get(&stream) {
            e.catch_up.notify_one();
        }
        Ok((id, rev))
    }

    /// Cancels a watcher; queues etcd's "canceled" response. Unknown ids
    /// are ignored, as etcd does.
    pub fn cancel(&self, stream: StreamId, id: WatchId) {
        let mut st = self.lock();
        if !st.watchers.contains_key(&(stream, id)) {
            return;
        }
        st.unindex((stream, id));
        st.watchers.remove(&(stream, id));
        if let Some(e) = st.streams.get_mut(&stream) {
            e.watchers.remove(&id);
        }
        let rev = st.rev;
        let resp = keel_proto::etcdserverpb::WatchResponse { watch_id: id, canceled: true, ..Default::default() };
        st.send(stream, Outgoing::Control { response: resp, revision: rev });
        st.maybe_progress(stream);
    }

    /// etcd's RequestProgress: a progress response at the current
    /// revision (watch id -1) when every watcher of the stream has caught
    /// up to it, now or (`Deferred`) once they have. A stream without
    /// watchers gets none.
    pub fn request_progress(&self, stream: StreamId, mode: ProgressRequests) {
        let mut st = self.lock();
        if let Some(e) = st.streams.get_mut(&stream) {
            if e.deferred_progress {
                return;
            }
            if e.watchers.is_empty() {
                return;
            }
            e.deferred_progress = true;
        }
        st.maybe_progress(stream);
        if mode == ProgressRequests::IfSynced {
            if let Some(e) = st.streams.get_mut(&stream) {
                e.deferred_progress = false;
            }
        }
    }

    /// The periodic progress notification (`progress_notify` watchers):
    /// each synced watcher that got no events since the last tick hears
    /// the current revision.
    pub fn progress_tick(&self, stream: StreamId) {
        let mut st = self.lock();
        let rev = st.rev;
        let ids: Vec<WatchId> =
            st.streams.get(&stream).map(|e| e.watchers.iter().copied().collect()).unwrap_or_default();
        for id in ids {
            let notify = match st.watchers.get_mut(&(stream, id)) {
                Some(w) if w.spec.progress_notify => {
                    let due = w.quiet && w.progress_due(rev);
                    w.quiet = true;
                    due
                }
                _ => false,
            };
            if notify {
                st.send(stream, progress_response(id, rev));
            }
        }
    }

    /// The unsynced watchers of a stream: (id, spec, next revision).
    pub fn unsynced(&self, stream: StreamId) -> Vec<(WatchId, WatchSpec, i64)> {
        let st = self.lock();
        let Some(e) = st.streams.get(&stream) else { return Vec::new() };
        e.watchers
            .iter()
            .filter_map(|id| {
                st.watchers.get(&(stream, *id)).filter(|w| !w.synced).map(|w| (*id, w.spec.clone(), w.next_rev))
            })
            .collect()
    }

    /// Queues a response the session built (e.g. a refused create).
    pub fn send_control(&self, stream: StreamId, response: keel_proto::etcdserverpb::WatchResponse, revision: i64) {
        self.lock().send(stream, Outgoing::Control { response, revision });
    }

    /// Delivers history to an unsynced watcher: `events` cover every
    /// revision before `next_rev` that it had not seen. If `next_rev` is
    /// past the present, the watcher is synced again. Returns false if the
    /// watcher is gone (canceled meanwhile).
    pub fn deliver_history(&self, stream: StreamId, id: WatchId, events: Vec<Event>, next_rev: i64) -> bool {
        let mut st = self.lock();
        let rev = st.rev;
        let Some(w) = st.watchers.get_mut(&(stream, id)) else { return false };
        if w.synced {
            return true;
        }
        w.next_rev = next_rev;
        let (prev_kv, fragment) = (w.spec.prev_kv, w.spec.fragment);
        if !events.is_empty() {
            w.quiet = false;
            let bytes = approx_size(&events);
            st.send(stream, Outgoing::Events { watch_id: id, revision: rev, events, bytes, prev_kv, fragment });
        }
        if next_rev > rev {
            if let Some(w) = st.watchers.get_mut(&(stream, id)) {
                w.synced = true;
            }
            st.index((stream, id));
            st.maybe_progress(stream);
        }
        true
    }

    #[cfg(test)]
    fn caught_up_to(&self, stream: StreamId, id: WatchId, next_rev: i64, _sent: bool) -> bool {
        self.deliver_history(stream, id, Vec::new(), next_rev)
    }

    /// Ends a watcher whose history was compacted away: etcd's compacted
    /// response, which cancels it.
    pub fn compacted(&self, stream: StreamId, id: WatchId, compact_rev: i64) {
        let mut st = self.lock();
        if st.watchers.remove(&(stream, id)).is_none() {
            return;
        }
        if let Some(e) = st.streams.get_mut(&stream) {
            e.watchers.remove(&id);
        }
        let resp = keel_proto::etcdserverpb::WatchResponse {
            watch_id: id,
            canceled: true,
            compact_revision: compact_rev,
            ..Default::default()
        };
        // etcd sends this with a zero header revision.
        st.send(stream, Outgoing::Control { response: resp, revision: 0 });
        st.maybe_progress(stream);
    }

    /// After the store was replaced by a snapshot at revision `rev`:
    /// every synced watcher catches up from history from where it was.
    pub fn reset(&self, rev: i64) {
        let mut st = self.lock();
        let from = st.rev + 1;
        let synced: Vec<(StreamId, WatchId)> = st.watchers.iter().filter(|(_, w)| w.synced).map(|(k, _)| *k).collect();
        for key in synced {
            st.desync(key, from);
        }
        st.rev = rev;
    }

    pub fn watcher_count(&self) -> usize {
        self.lock().watchers.len()
    }
}

impl CommitObserver for WatchHub {
    fn committed(&self, rev: i64, events: &[Event]) {
        let mut st = self.lock();
        st.rev = rev;
        let mut found = Vec::new();
        if let [ev] = events {
            // Most revisions change one key: every watcher that wants it
            // gets the same events, so a stream gets one shared entry.
            let Some(kv) = &ev.kv else { return };
            st.matching(&kv.key, &mut found);
            for group in found.chunk_by(|a, b| a.0 == b.0) {
                st.deliver(group, rev, vec![ev.clone()], |w| rev >= w.next_rev && w.spec.wants(ev));
            }
            return;
        }
        let mut per_watcher: HashMap<(StreamId, WatchId), Vec<Event>> = HashMap::default();
        for ev in events {
            let Some(kv) = &ev.kv else { continue };
            found.clear();
            st.matching(&kv.key, &mut found);
            for key in &found {
                if let Some(w) = st.watchers.get(key) {
                    // A watch that starts in the future skips earlier revisions.
                    if rev >= w.next_rev && w.spec.wants(ev) {
                        per_watcher.entry(*key).or_default().push(ev.clone());
                    }
                }
            }
        }
        for (key, events) in per_watcher {
            st.deliver(&[key], rev, events, |_| true);
        }
    }
}

impl HubState {
    /// Queues one revision's `events` once for the watchers of `group`
    /// (all of one stream) that `wants` them. A watcher whose copy would
    /// take the stream over its budget is moved to catching up from this
    /// revision instead: the client is not keeping up, so it reads
    /// history at its own pace.
    fn deliver(
        &mut self,
        group: &[(StreamId, WatchId)],
        rev: i64,
        events: Vec<Event>,
        wants: impl Fn(&Watcher) -> bool,
    ) {
        let Some(&(stream, _)) = group.first() else { return };
        let Some(queued) = self.streams.get(&stream).map(|s| s.queued.load(Ordering::Acquire)) else { return };
        let each = approx_size(&events);
        let mut taken = Vec::with_capacity(group.len());
        let mut bytes = 0;
        for &key in group {
            // One lookup per watcher: with thousands of watchers of a key
            // each lookup is a cache miss.
            let Some(w) = self.watchers.get_mut(&key) else { continue };
            if !wants(w) {
                continue;
            }
            let pending = queued + bytes;
            if pending > 0 && pending + each > STREAM_BUDGET_BYTES {
                self.desync(key, rev);
                continue;
            }
            w.quiet = false;
            taken.push(Recipient { watch_id: key.1, prev_kv: w.spec.prev_kv, fragment: w.spec.fragment });
            bytes += each;
        }
        // A revision for one watcher (the usual case for revisions that
        // change several keys) has nothing to share.
        let out = match <[Recipient; 1]>::try_from(taken) {
            Ok([one]) => Outgoing::Events {
                watch_id: one.watch_id,
                revision: rev,
                events,
                bytes,
                prev_kv: one.prev_kv,
                fragment: one.fragment,
            },
            Err(taken) if taken.is_empty() => return,
            Err(taken) => Outgoing::Shared { watchers: taken, revision: rev, events, bytes },
        };
        self.send(stream, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_proto::mvccpb::KeyValue;

    fn put(key: &str, rev: i64) -> Event {
        Event {
            r#type: EventType::Put as i32,
            kv: Some(KeyValue {
                key: Bytes::from(key.to_string()),
                mod_revision: rev,
                version: 1,
                ..Default::default()
            }),
            prev_kv: None,
        }
    }

    fn spec(key: &str, end: Option<&str>) -> WatchSpec {
        WatchSpec::new(Bytes::from(key.to_string()), end.map(|e| Bytes::from(e.to_string())))
    }

    fn drain(q: &mut StreamQueue) -> Vec<Outgoing> {
        let mut out = Vec::new();
        while let Ok(m) = q.rx.try_recv() {
            q.queued.fetch_sub(m.bytes(), Ordering::AcqRel);
            out.push(m);
        }
        out
    }

    /// (watch id, events) of every event delivery drained.
    fn deliveries(q: &mut StreamQueue) -> Vec<(WatchId, Vec<Event>)> {
        let mut got = Vec::new();
        for m in drain(q) {
            match m {
                Outgoing::Events { watch_id, events, .. } => got.push((watch_id, events)),
                Outgoing::Shared { watchers, events, .. } => {
                    got.extend(watchers.iter().map(|r| (r.watch_id, events.clone())));
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        got.sort_by_key(|(id, _)| *id);
        got
    }

    #[test]
    fn a_single_event_revision_is_queued_once_per_stream() {
        let hub = WatchHub::new(1);
        let mut a = hub.open_stream();
        let mut b = hub.open_stream();
        for _ in 0..3 {
            hub.create(a.id, 0, spec("k", None), 0).unwrap();
        }
        hub.create(b.id, 0, spec("k", Some("l")), 0).unwrap();
        hub.create(b.id, 0, spec("x", None), 0).unwrap();
        drain(&mut a);
        drain(&mut b);
        hub.committed(2, &[put("k", 2)]);
        let queued_a = drain(&mut a);
        assert!(
            matches!(&queued_a[..], [Outgoing::Shared { watchers, revision: 2, events, .. }]
                if watchers.iter().map(|r| r.watch_id).collect::<Vec<_>>() == vec![0, 1, 2] && events.len() == 1),
            "{queued_a:?}"
        );
        hub.committed(3, &[put("k", 3)]);
        hub.committed(4, &[put("x", 4)]);
        let got: Vec<(WatchId, i64)> = deliveries(&mut b)
            .into_iter()
            .map(|(id, evs)| (id, evs[0].kv.as_ref().map_or(0, |kv| kv.mod_revision)))
            .collect();
        assert_eq!(got, vec![(0, 2), (0, 3), (1, 4)], "each watcher of b gets only its own keys");
    }

    #[test]
    fn key_and_range_watchers_of_a_stream_share_one_entry() {
        let hub = WatchHub::new(1);
        let mut a = hub.open_stream();
        let mut b = hub.open_stream();
        hub.create(a.id, 0, spec("k", None), 0).unwrap();
        hub.create(b.id, 0, spec("a", Some("z")), 0).unwrap();
        hub.create(a.id, 0, spec("j", Some("l")), 0).unwrap();
        hub.create(b.id, 0, spec("k", None), 0).unwrap();
        drain(&mut a);
        drain(&mut b);
        hub.committed(2, &[put("k", 2)]);
        for q in [&mut a, &mut b] {
            let queued = drain(q);
            assert!(
                matches!(&queued[..], [Outgoing::Shared { watchers, revision: 2, .. }]
                    if watchers.iter().map(|r| r.watch_id).collect::<Vec<_>>() == vec![0, 1]),
                "{queued:?}"
            );
        }
    }

    #[test]
    fn a_shared_revision_stops_at_the_budget_and_the_rest_catch_up() {
        let hub = WatchHub::new(1);
        let mut q = hub.open_stream();
        for _ in 0..4 {
            hub.create(q.id, 0, spec("k", None), 0).unwrap();
        }
        drain(&mut q);
        let each = approx_size(&[put("k", 2)]);
        // Room for exactly two more copies of the event.
        q.queued.store(STREAM_BUDGET_BYTES - 2 * each, Ordering::Release);
        hub.committed(2, &[put("k", 2)]);
        let got: Vec<WatchId> = match q.rx.try_recv() {
            Ok(Outgoing::Shared { watchers, .. }) => watchers.iter().map(|r| r.watch_id).collect(),
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(got, vec![0, 1]);
        let mut behind: Vec<(WatchId, i64)> = hub.unsynced(q.id).into_iter().map(|(id, _, from)| (id, from)).collect();
        behind.sort();
        assert_eq!(behind, vec![(2, 2), (3, 2)], "the others catch up from the undelivered revision");
    }

    #[test]
    fn routes_events_to_matching_synced_watchers_once() {
        let hub = WatchHub::new(1);
        let mut q = hub.open_stream();
        let (a, _) = hub.create(q.id, 0, spec("a", None), 0).unwrap();
        let (p, _) = hub.create(q.id, 0, spec("p/", Some("p0")), 0).unwrap();
        let (all, _) = hub.create(q.id, 0, spec("\0", Some("")), 0).unwrap();
        assert_eq!((a, p, all), (0, 1, 2));
        assert_eq!(drain(&mut q).len(), 3, "three created responses");

        hub.committed(2, &[put("a", 2), put("p/x", 2), put("q", 2)]);
        let got: Vec<(i64, usize)> = deliveries(&mut q).into_iter().map(|(id, evs)| (id, evs.len())).collect();
        assert_eq!(got, vec![(0, 1), (1, 1), (2, 3)], "one response per watcher, all events of the revision");
        hub.committed(3, &[put("p/y", 3)]);
        let got: Vec<(i64, usize)> = deliveries(&mut q).into_iter().map(|(id, evs)| (id, evs.len())).collect();
        assert_eq!(got, vec![(1, 1), (2, 1)], "a single-event revision reaches the same watchers");
    }

    #[test]
    fn client_ids_duplicates_and_empty_ranges() {
        let hub = WatchHub::new(1);
        let q = hub.open_stream();
        assert_eq!(hub.create(q.id, 7, spec("a", None), 0).map(|r| r.0), Ok(7));
        assert_eq!(hub.create(q.id, 7, spec("a", None), 0), Err(WatchError::DuplicateId));
        assert_eq!(hub.create(q.id, 0, spec("b", Some("a")), 0), Err(WatchError::EmptyRange));
    }

    #[test]
    fn a_full_stream_moves_watchers_to_catch_up_without_losing_the_revision() {
        let hub = WatchHub::new(1);
        let mut q = hub.open_stream();
        let (id, _) = hub.create(q.id, 0, spec("k", None), 0).unwrap();
        drain(&mut q);
        // Pretend the client has not read a large backlog.
        q.queued.store(STREAM_BUDGET_BYTES, Ordering::Release);
        hub.committed(2, &[put("k", 2)]);
        assert!(q.rx.try_recv().is_err(), "nothing queued past the budget");
        let unsynced = hub.unsynced(q.id);
        assert_eq!(unsynced.len(), 1);
        assert_eq!(unsynced[0].2, 2, "catch-up starts at the undelivered revision");
        // Catching up to the present makes it synced again.
        assert!(hub.caught_up_to(q.id, id, 3, true));
        assert!(hub.unsynced(q.id).is_empty());
    }

    #[test]
    fn closing_a_stream_frees_its_watchers() {
        let hub = WatchHub::new(1);
        let a = hub.open_stream();
        let b = hub.open_stream();
        for _ in 0..3 {
            hub.create(a.id, 0, spec("k", None), 0).unwrap();
            hub.create(b.id, 0, spec("p", Some("q")), 0).unwrap();
        }
        assert_eq!(hub.watcher_count(), 6);
        hub.close_stream(a.id);
        assert_eq!(hub.watcher_count(), 3);
        let st = hub.lock();
        assert!(st.synced_keys.is_empty(), "no index entries left for the closed stream");
        assert_eq!(st.synced_ranges.len(), 3);
    }

    #[test]
    fn request_progress_waits_until_every_watcher_is_synced() {
        let hub = WatchHub::new(5);
        let mut q = hub.open_stream();
        let (behind, _) = hub.create(q.id, 0, spec("k", None), 3).unwrap();
        drain(&mut q);
        hub.request_progress(q.id, ProgressRequests::Deferred);
        assert!(drain(&mut q).is_empty(), "a watcher is still catching up");
        hub.caught_up_to(q.id, behind, 6, false);
        let out = drain(&mut q);
        assert!(
            matches!(&out[..], [Outgoing::Control { response, revision: 5 }] if response.watch_id == INVALID_WATCH_ID)
        );
    }

    #[test]
    fn request_progress_if_synced_answers_now_or_never() {
        let hub = WatchHub::new(5);
        let mut q = hub.open_stream();
        hub.request_progress(q.id, ProgressRequests::IfSynced);
        assert!(drain(&mut q).is_empty(), "no watchers, no progress");
        let (behind, _) = hub.create(q.id, 0, spec("k", None), 3).unwrap();
        drain(&mut q);
        hub.request_progress(q.id, ProgressRequests::IfSynced);
        hub.caught_up_to(q.id, behind, 6, false);
        assert!(drain(&mut q).is_empty(), "dropped while a watcher was behind, not sent later");
        hub.request_progress(q.id, ProgressRequests::IfSynced);
        let out = drain(&mut q);
        assert!(
            matches!(&out[..], [Outgoing::Control { response, revision: 5 }] if response.watch_id == INVALID_WATCH_ID)
        );
        let (_ahead, _) = hub.create(q.id, 0, spec("j", None), 9).unwrap();
        drain(&mut q);
        hub.request_progress(q.id, ProgressRequests::IfSynced);
        assert!(drain(&mut q).is_empty(), "a watch starting at 9 has not been reached at 5");
    }
}
