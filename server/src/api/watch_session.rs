//! One gRPC Watch stream: requests in, responses out, and the catch-up of
//! its watchers that are behind. Three tasks share the stream:
//!
//! - the request loop (create / cancel / progress, the progress-notify
//!   ticker, and the WithRequireLeader check);
//! - the sender, which turns queued events into responses (headers,
//!   prev_kv, fragments; a revision for many watchers encoded once) and
//!   hands them to gRPC, freeing queue budget;
//! - the catch-up loop, which replays MVCC history to unsynced watchers in
//!   batches of at most `watch::catch_up::CATCH_UP_REVISIONS` revisions, waiting whenever
//!   the stream's queue is over budget, so a client that does not read
//!   costs no memory beyond its budget and no CPU.
//!
//! When the client goes away, every watcher of the stream is dropped.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use keel_proto::etcdserverpb::{
    watch_create_request::FilterType, watch_request::RequestUnion, WatchRequest, WatchResponse,
};
use keel_proto::mvccpb::{event::EventType, Event};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tonic::Status;

use crate::error::Error;
use crate::server::Server;
use crate::watch::catch_up::catch_up_loop;
use crate::watch::hub::{
    Outgoing, ProgressRequests, Recipient, StreamId, StreamQueue, WatchHub, WatchSpec, INVALID_WATCH_ID,
};
use crate::watch::response::{SharedResponse, WatchOut};

/// Batches buffered between the sender and gRPC. A batch leaves the
/// stream's byte budget when it enters this channel, and one can be as
/// large as the budget (a revision for every watcher of the stream), so
/// the channel stays short: at most this many budgets' worth of responses
/// sit here for a client that stopped reading.
const GRPC_BUFFER: usize = 2;

pub type ResponseStream =
    futures::stream::FlatMap<tokio_stream::wrappers::ReceiverStream<Batch>, BatchItems, fn(Batch) -> BatchItems>;

/// A batch's responses, one by one.
pub type BatchItems = futures::stream::Iter<std::vec::IntoIter<Result<WatchOut, Status>>>;

/// Responses handed to gRPC together: a shared revision's responses for
/// every recipient on the stream cost one channel operation, not one each.
pub type Batch = Vec<Result<WatchOut, Status>>;

/// The session's side of the response stream.
type Outbox = mpsc::Sender<Batch>;

/// Starts serving one Watch stream; returns the response stream.
pub fn start<S>(server: Arc<Server>, hub: Arc<WatchHub>, requests: S, options: StreamOptions) -> ResponseStream
where
    S: futures::Stream<Item = Result<WatchRequest, Status>> + Send + Unpin + 'static,
{
    let (out_tx, out_rx) = mpsc::channel(GRPC_BUFFER);
    let queue = hub.open_stream();
    let stream_id = queue.id;
    let (stop_tx, stop_rx) = watch::channel(false);
    let budget_freed = Arc::new(tokio::sync::Notify::new());
    let catch_up_wake = queue.catch_up.clone();
    let queued = queue.queued.clone();

    tokio::spawn(send_loop(server.clone(), queue, out_tx.clone(), budget_freed.clone(), stop_tx.clone()));
    tokio::spawn(catch_up_loop(
        server.mvcc.clone(),
        hub.clone(),
        stream_id,
        catch_up_wake,
        queued,
        budget_freed,
        stop_rx.clone(),
    ));
    tokio::spawn(async move {
        request_loop(&server, &hub, stream_id, requests, &options, out_tx, stop_rx).await;
        hub.close_stream(stream_id);
        let _ = stop_tx.send(true);
    });
    let flatten: fn(Batch) -> BatchItems = futures::stream::iter;
    tokio_stream::wrappers::ReceiverStream::new(out_rx).flat_map(flatten)
}

/// What a watch stream was opened with.
pub struct StreamOptions {
    /// Cancel the stream when this member has no leader (`hasleader`).
    pub require_leader: bool,
    pub credentials: Credentials,
}

/// The stream's credentials: checked again at every create, as etcd
/// does, so a token that expired or an auth change is noticed.
pub struct Credentials {
    pub metadata: tonic::metadata::MetadataMap,
    pub common_name: Option<super::credentials::ClientCommonName>,
}

/// etcd's isWatchPermitted: read permission on the watched range. The
/// refusal's cancel reason is the text of etcd's gRPC error.
async fn watch_refusal(
    server: &Server,
    credentials: &Credentials,
    create: &keel_proto::etcdserverpb::WatchCreateRequest,
) -> Option<String> {
    if !server.auth.is_enabled() && credentials.metadata.get("token").is_none() {
        return None;
    }
    // The range as the watch will use it (etcd: an empty key is "\0").
    let key: &[u8] = if create.key.is_empty() { b"\0" } else { &create.key };
    let who = super::credentials::from_parts(server, &credentials.metadata, credentials.common_name.as_ref())
        .await
        .and_then(|who| server.auth.check_read(&who.unwrap_or_default(), key, &create.range_end));
    let e = match who {
        Ok(()) => return None,
        Err(e @ (Error::InvalidAuthToken | Error::AuthOldRevision | Error::UserEmpty)) => e,
        Err(_) => Error::PermissionDenied,
    };
    let (code, msg) = super::errors::code_and_message(&e);
    Some(format!("rpc error: code = {code:?} desc = {msg}"))
}

/// RequestProgress as the cluster's release answers it: 3.6 drops one that
/// finds a watcher behind, earlier releases answer once all caught up.
fn progress_requests(server: &Server) -> ProgressRequests {
    if crate::version::minor(&server.cluster_version()) >= 6 {
        ProgressRequests::IfSynced
    } else {
        ProgressRequests::Deferred
    }
}

fn spec_from(create: &keel_proto::etcdserverpb::WatchCreateRequest) -> WatchSpec {
    // etcd: an empty key means "\0", the smallest key; range_end "\0"
    // means every key from `key`.
    let key = if create.key.is_empty() { Bytes::from_static(b"\0") } else { create.key.clone() };
    let end = match create.range_end.as_ref() {
        [] => None,
        [0] => Some(Bytes::new()),
        _ => Some(create.range_end.clone()),
    };
    WatchSpec {
        key,
        end,
        no_put: create.filters.contains(&(FilterType::Noput as i32)),
        no_delete: create.filters.contains(&(FilterType::Nodelete as i32)),
        prev_kv: create.prev_kv,
        fragment: create.fragment,
        progress_notify: create.progress_notify,
    }
}

async fn request_loop<S>(
    server: &Arc<Server>,
    hub: &Arc<WatchHub>,
    stream_id: StreamId,
    mut requests: S,
    options: &StreamOptions,
    out_tx: Outbox,
    mut stop: watch::Receiver<bool>,
) where
    S: futures::Stream<Item = Result<WatchRequest, Status>> + Send + Unpin + 'static,
{
    let mut progress =
        tokio::time::interval(server.settings.watch_progress_notify_interval.max(Duration::from_millis(10)));
    progress.tick().await;
    let mut leader_check = tokio::time::interval(server.settings.election_timeout);
    let mut leaderless_ticks = 0;
    loop {
        tokio::select! {
            req = requests.next() => {
                let req = match req {
                    Some(Ok(req)) => req,
                    // As etcd, a request that cannot be read ends the
                    // stream with its status (unless the client is not
                    // reading: waiting for room would keep its watchers).
                    Some(Err(status)) => {
                        let _ = out_tx.try_send(vec![Err(super::errors::as_grpc_go(status))]);
                        return;
                    }
                    None => return,
                };
                match req.request_union {
                    Some(RequestUnion::CreateRequest(create)) => {
                        if let Some(reason) = watch_refusal(server, &options.credentials, &create).await {
                            let refused = WatchResponse {
                                watch_id: INVALID_WATCH_ID,
                                created: true,
                                canceled: true,
                                cancel_reason: reason,
                                ..Default::default()
                            };
                            hub.send_control(stream_id, refused, server.mvcc.current_rev());
                            continue;
                        }
                        let spec = spec_from(&create);
                        if let Err(e) = hub.create(stream_id, create.watch_id, spec, create.start_revision) {
                            let refused = WatchResponse {
                                watch_id: INVALID_WATCH_ID,
                                created: true,
                                canceled: true,
                                cancel_reason: e.to_string(),
                                ..Default::default()
                            };
                            hub.send_control(stream_id, refused, server.mvcc.current_rev());
                        }
                    }
                    Some(RequestUnion::CancelRequest(cancel)) => hub.cancel(stream_id, cancel.watch_id),
                    Some(RequestUnion::ProgressRequest(_)) => hub.request_progress(stream_id, progress_requests(server)),
                    None => {}
                }
            }
            _ = progress.tick() => hub.progress_tick(stream_id),
            _ = leader_check.tick(), if options.require_leader => {
                // etcd cancels a WithRequireLeader watch stream once its
                // member has been without a leader for a while.
                if server.leader().is_none() {
                    leaderless_ticks += 1;
                    if leaderless_ticks >= 3 {
                        let _ = out_tx.send(vec![Err(Status::from(Error::NoLeader))]).await;
                        return;
                    }
                } else {
                    leaderless_ticks = 0;
                }
            }
            _ = stop.changed() => return,
        }
    }
}

/// A PUT that created its key has no previous value to look up.
fn is_create(ev: &Event) -> bool {
    ev.r#type == EventType::Put as i32 && ev.kv.as_ref().is_some_and(|kv| kv.version == 1)
}

async fn send_loop(
    server: Arc<Server>,
    mut queue: StreamQueue,
    out_tx: Outbox,
    budget_freed: Arc<tokio::sync::Notify>,
    stop: watch::Sender<bool>,
) {
    let limit = server.settings.max_request_bytes;
    while let Some(msg) = queue.rx.recv().await {
        let bytes = msg.bytes();
        let batch: Batch = match msg {
            Outgoing::Control { mut response, revision } => {
                response.header = Some(server.header(revision));
                vec![Ok(WatchOut::Message(response))]
            }
            Outgoing::Events { watch_id, revision, events, prev_kv, fragment, .. } => {
                let to = Recipient { watch_id, prev_kv, fragment };
                one_watcher(&server, to, revision, events, limit)
            }
            Outgoing::Shared { watchers, revision, events, .. } => {
                let header = server.header(revision);
                // Encoded once for the watchers without prev_kv and once
                // for those with it.
                let mut shared: [Option<Arc<SharedResponse>>; 2] = [None, None];
                let mut batch = Vec::with_capacity(watchers.len());
                for to in watchers {
                    let response = shared[usize::from(to.prev_kv)].get_or_insert_with(|| {
                        let mut events = events.clone();
                        if to.prev_kv {
                            fill_prev_kv(&server, &mut events);
                        }
                        Arc::new(SharedResponse::new(header, events))
                    });
                    if to.fragment && response.encoded_len(to.watch_id) >= limit {
                        let events = response.events().to_vec();
                        batch.extend(messages(responses(to, Some(header), events, limit)));
                    } else {
                        batch.push(Ok(WatchOut::Shared { response: response.clone(), watch_id: to.watch_id }));
                    }
                }
                batch
            }
        };
        let sent = out_tx.send(batch).await.is_ok();
        queue.queued.fetch_sub(bytes, Ordering::AcqRel);
        budget_freed.notify_waiters();
        if !sent {
            break;
        }
    }
    let _ = stop.send(true);
}

/// Looks up each event's previous value (a create has none).
fn fill_prev_kv(server: &Server, events: &mut [Event]) {
    for ev in events.iter_mut().filter(|e| !is_create(e)) {
        if let Some(kv) = &ev.kv {
            ev.prev_kv = server.mvcc.get_at(&kv.key, kv.mod_revision - 1).ok().flatten();
        }
    }
}

/// The response(s) for one watcher's events at `revision`.
fn one_watcher(server: &Server, to: Recipient, revision: i64, mut events: Vec<Event>, limit: usize) -> Batch {
    if to.prev_kv {
        fill_prev_kv(server, &mut events);
    }
    messages(responses(to, Some(server.header(revision)), events, limit))
}

fn messages(responses: Vec<WatchResponse>) -> Batch {
    responses.into_iter().map(|r| Ok(WatchOut::Message(r))).collect()
}

/// One watcher's response for `events`, in fragments if it asked for them
/// and it is too large (etcd's sendFragments: a response over `limit`
/// bytes with more than one event goes out in pieces, each marked
/// `fragment` but the last).
fn responses(
    to: Recipient,
    header: Option<keel_proto::etcdserverpb::ResponseHeader>,
    events: Vec<Event>,
    limit: usize,
) -> Vec<WatchResponse> {
    let response = WatchResponse { header, watch_id: to.watch_id, events, ..Default::default() };
    if !to.fragment || response.encoded_len() < limit || response.events.len() < 2 {
        return vec![response];
    }
    let mut pieces = Vec::new();
    let mut rest = response.events.into_iter().peekable();
    let template = WatchResponse { events: Vec::new(), fragment: true, ..response };
    loop {
        let mut cur = template.clone();
        while let Some(ev) = rest.peek() {
            cur.events.push(ev.clone());
            if cur.events.len() > 1 && cur.encoded_len() >= limit {
                cur.events.pop();
                break;
            }
            rest.next();
        }
        let last = rest.peek().is_none();
        if last {
            cur.fragment = false;
        }
        pieces.push(cur);
        if last {
            return pieces;
        }
    }
}
