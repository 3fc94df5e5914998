//! The client side of the peer transport: openraft's RPCs and keel's
//! leader-bound requests (forwarded writes, read index) over gRPC to a
//! peer's URL. Channels connect lazily and reconnect on their own, so a
//! restarted peer is picked up without intervention; an unreachable peer
//! makes openraft back off.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_proto::etcdserverpb::{LeaseKeepAliveRequest, LeaseTimeToLiveRequest, Member};
use keel_proto::keelpb::raft_peer_client::RaftPeerClient;
use keel_proto::keelpb::{
    ClusterChangeRequest, ClusterInfoRequest, ClusterInfoResponse, Empty, ForwardRequest, InternalRequest,
    InternalResponse, RaftPayload, ReadIndexRequest,
};
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::Channel;
use tonic::Status;

use super::{codec, MemberNode, NodeId, TypeConfig};
use crate::error::Error;
use crate::lease::LeaseInfo;
use crate::transport::PeerConnector;

/// Largest peer message (an append-entries batch or snapshot chunk) when
/// requests are of etcd's default size; see [`max_peer_message`].
const DEFAULT_MAX_PEER_MESSAGE: usize = 64 << 20;

/// Largest peer message on a member taking requests of up to
/// `max_request_bytes`: one Raft entry must always fit, and an entry is a
/// batch of up to 1 MiB plus one request (`raft::batcher`), or a forwarded
/// request, plus framing.
pub fn max_peer_message(max_request_bytes: usize) -> usize {
    DEFAULT_MAX_PEER_MESSAGE.max(max_request_bytes.saturating_add(4 << 20))
}

/// The slowest rate, in bytes per second, at which a healthy peer link and
/// a follower's disk are assumed to take an append-entries message. The
/// timeout of a message is the heartbeat interval plus its bytes at this
/// rate, so a large message (a lagging member's catch-up, a large value)
/// is given the time to cross instead of being cancelled and resent
/// forever; a dead peer is still noticed within a second or so, since
/// catch-up messages are bounded by `log_store::APPEND_BYTES_BUDGET`.
const MIN_PEER_BYTES_PER_SEC: f64 = (8 << 20) as f64;

/// The timeout of an append-entries message carrying `bytes` of entries.
fn append_timeout(base: Duration, bytes: usize) -> Duration {
    base + Duration::from_secs_f64(bytes as f64 / MIN_PEER_BYTES_PER_SEC)
}

/// A peer as the transport knows it: its id and the URL it is reached at.
type PeerKey = (NodeId, String);

/// Idle append-entries streams kept per peer: the replication stream's,
/// plus one for the occasional extra sender (a read-index heartbeat).
const IDLE_APPEND_STREAMS: usize = 2;

/// gRPC clients to every peer, created on first use.
pub struct PeerClients {
    connector: PeerConnector,
    /// Largest message sent or received ([`max_peer_message`]).
    max_message: usize,
    clients: Mutex<HashMap<PeerKey, RaftPeerClient<Channel>>>,
    /// Open append-entries streams not in use, by peer.
    idle_append_streams: Mutex<HashMap<PeerKey, Vec<AppendStream>>>,
    /// Peers that answered the stream with Unimplemented (a keel from
    /// before it existed): they get unary append-entries calls until this
    /// member restarts. In a rolling upgrade, members upgraded before a
    /// peer keep using unary calls to it until their own next restart,
    /// which costs speed, not correctness.
    unary_append_peers: Mutex<HashSet<PeerKey>>,
    removed: tokio::sync::watch::Sender<bool>,
    /// Since when each peer has answered Raft messages without a break
    /// (etcd's `ActiveSince`); a failed message removes the peer.
    active_since: Mutex<HashMap<NodeId, std::time::Instant>>,
}

/// An open append-entries stream to one peer. The peer answers every
/// request with exactly one reply, in order; a stream is used by one sender
/// at a time (taken from the idle pool, put back after its reply), so the
/// next reply is always the answer to the last request.
struct AppendStream {
    requests: tokio::sync::mpsc::Sender<RaftPayload>,
    replies: tonic::Streaming<RaftPayload>,
}

impl AppendStream {
    /// Opens a stream whose first message is `first`; returns the stream and
    /// `first`'s reply. The message is queued before the call so it goes out
    /// with the stream's headers instead of a round trip later.
    async fn open(mut client: RaftPeerClient<Channel>, first: RaftPayload) -> Result<(Self, RaftPayload), Status> {
        let (requests, outgoing) = tokio::sync::mpsc::channel(1);
        requests.try_send(first).map_err(|_| Status::internal("new append stream refused its first message"))?;
        let replies = client.append_entries_stream(tokio_stream::wrappers::ReceiverStream::new(outgoing)).await?;
        let mut stream = Self { requests, replies: replies.into_inner() };
        let reply = stream.next_reply().await?;
        Ok((stream, reply))
    }

    /// Sends `payload` and waits for its reply.
    async fn exchange(&mut self, payload: RaftPayload) -> Result<RaftPayload, Status> {
        self.requests.send(payload).await.map_err(|_| Status::unavailable("append stream closed"))?;
        self.next_reply().await
    }

    async fn next_reply(&mut self) -> Result<RaftPayload, Status> {
        self.replies.message().await?.ok_or_else(|| Status::unavailable("peer ended the append stream"))
    }
}

impl PeerClients {
    /// Clients that send and accept messages of up to `max_message` bytes
    /// ([`max_peer_message`]).
    pub fn new(connector: PeerConnector, max_message: usize) -> Self {
        Self {
            connector,
            max_message,
            clients: Mutex::new(HashMap::new()),
            idle_append_streams: Mutex::new(HashMap::new()),
            unary_append_peers: Mutex::new(HashSet::new()),
            removed: tokio::sync::watch::Sender::new(false),
            active_since: Mutex::new(HashMap::new()),
        }
    }

    /// Records whether a Raft message to `id` was answered.
    fn note_answer(&self, id: NodeId, answered: bool) {
        if let Ok(mut active) = self.active_since.lock() {
            if answered {
                active.entry(id).or_insert_with(std::time::Instant::now);
            } else {
                active.remove(&id);
            }
        }
    }

    /// Peers that have answered without a break since at least `since`
    /// ago (etcd's `isConnectedSince` checks).
    pub fn active_for(&self, since: Duration) -> Vec<NodeId> {
        let active = match self.active_since.lock() {
            Ok(a) => a.clone(),
            Err(_) => return Vec::new(),
        };
        active.into_iter().filter(|(_, t)| t.elapsed() >= since).map(|(id, _)| id).collect()
    }

    fn key(id: NodeId, node: &MemberNode) -> Result<PeerKey, Error> {
        let url =
            node.peer_urls.first().cloned().ok_or_else(|| Error::Internal(format!("member {id:x} has no peer URL")))?;
        Ok((id, url))
    }

    /// Sends one append-entries message to `id` over a stream and returns
    /// the reply; `Ok(None)` if the peer only takes unary calls.
    async fn append_streamed(
        &self,
        id: NodeId,
        node: &MemberNode,
        payload: RaftPayload,
    ) -> Result<Option<RaftPayload>, Status> {
        let key = Self::key(id, node).map_err(|e| Status::unavailable(e.to_string()))?;
        if lock(&self.unary_append_peers)?.contains(&key) {
            return Ok(None);
        }
        let idle = lock(&self.idle_append_streams)?.get_mut(&key).and_then(Vec::pop);
        let replied = match idle {
            Some(mut stream) => match stream.exchange(payload.clone()).await {
                Ok(reply) => Ok((stream, reply)),
                // An idle stream dies with its connection (the peer
                // restarted) and says so only when used. Raft messages are
                // safe to deliver twice, so retry on a fresh stream.
                Err(_) => self.open_append_stream(id, node, &key, payload).await,
            },
            None => self.open_append_stream(id, node, &key, payload).await,
        };
        let (stream, reply) = match replied {
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                lock(&self.unary_append_peers)?.insert(key);
                return Ok(None);
            }
            other => other?,
        };
        let mut idle = lock(&self.idle_append_streams)?;
        let pool = idle.entry(key).or_default();
        if pool.len() < IDLE_APPEND_STREAMS {
            pool.push(stream);
        }
        Ok(Some(reply))
    }

    async fn open_append_stream(
        &self,
        id: NodeId,
        node: &MemberNode,
        key: &PeerKey,
        first: RaftPayload,
    ) -> Result<(AppendStream, RaftPayload), Status> {
        let client = self.client(id, node).map_err(|e| Status::unavailable(e.to_string()))?;
        let opened = AppendStream::open(client, first).await;
        if opened.is_err() {
            // Streams that shared the broken connection are likely dead too.
            lock(&self.idle_append_streams)?.remove(key);
        }
        opened
    }

    /// The client for `id` at the first of `node`'s peer URLs.
    pub fn client(&self, id: NodeId, node: &MemberNode) -> Result<RaftPeerClient<Channel>, Error> {
        let (id, url) = Self::key(id, node)?;
        let mut clients = self.clients.lock().map_err(|_| Error::Internal("peer client lock poisoned".into()))?;
        if let Some(c) = clients.get(&(id, url.clone())) {
            return Ok(c.clone());
        }
        let channel = self.connector.channel(&url).map_err(|e| Error::Internal(format!("peer URL {url}: {e}")))?;
        let client = RaftPeerClient::new(channel)
            .max_decoding_message_size(self.max_message)
            .max_encoding_message_size(self.max_message);
        clients.insert((id, url), client.clone());
        Ok(client)
    }

    /// Sends a write to the leader; returns its apply result and log index.
    pub async fn forward(
        &self,
        leader: NodeId,
        node: &MemberNode,
        req: InternalRequest,
        timeout: Duration,
    ) -> Result<(InternalResponse, u64), Error> {
        let mut client = self.client(leader, node)?;
        let mut request = tonic::Request::new(ForwardRequest { request: Some(req) });
        request.set_timeout(timeout);
        match client.forward(request).await {
            Ok(resp) => {
                let resp = resp.into_inner();
                Ok((resp.response.unwrap_or_default(), resp.log_index))
            }
            // Only a request that never reached the leader may be sent
            // again: one that did may be applied even though its answer
            // was lost (the leader died), and proposing it twice would
            // apply it twice (found by the Jepsen append workload: a txn
            // applied, then retried, failed its own compare). As etcd,
            // answer "possibly due to previous leader failure" instead.
            Err(status) => match peer_status_error(status.clone()) {
                Error::Unhealthy if !never_sent(&status) => Err(Error::TimeoutDueToLeaderFail),
                other => Err(other),
            },
        }
    }

    /// Asks the leader for a linearizable read index.
    pub async fn read_index(&self, leader: NodeId, node: &MemberNode, timeout: Duration) -> Result<u64, Error> {
        let mut client = self.client(leader, node)?;
        let mut request = tonic::Request::new(ReadIndexRequest {});
        request.set_timeout(timeout);
        match client.read_index(request).await {
            Ok(resp) => Ok(resp.into_inner().read_index),
            Err(status) => Err(peer_status_error(status)),
        }
    }
}

impl PeerClients {
    /// Runs a Cluster-service change on the leader; returns the added
    /// member (MemberAdd) and the change's log index.
    pub async fn cluster_change(
        &self,
        leader: NodeId,
        node: &MemberNode,
        req: ClusterChangeRequest,
        timeout: Duration,
    ) -> Result<(Option<Member>, u64), Error> {
        let mut client = self.client(leader, node)?;
        let mut request = tonic::Request::new(req);
        request.set_timeout(timeout);
        let resp = client.cluster_change(request).await.map_err(peer_status_error)?.into_inner();
        match resp.error {
            Some(e) => Err(Error::from_apply_code(e.kind, e.detail)),
            None => Ok((resp.member, resp.log_index)),
        }
    }

    /// A member's HashKV at `rev`: (hash, compact revision).
    pub async fn hash_kv(
        &self,
        id: NodeId,
        node: &MemberNode,
        rev: i64,
        timeout: Duration,
    ) -> Result<(u32, i64), Error> {
        let mut client = self.client(id, node)?;
        let mut request = tonic::Request::new(keel_proto::etcdserverpb::HashKvRequest { revision: rev });
        request.set_timeout(timeout);
        let resp = client.hash_kv(request).await.map_err(|s| match s.message() {
            m if m.contains("future revision") => Error::FutureRevision,
            m if m.contains("compacted") => Error::Compacted,
            _ => peer_status_error(s),
        })?;
        let resp = resp.into_inner();
        Ok((resp.hash, resp.compact_revision))
    }

    /// Asks a member to start an election now.
    pub async fn campaign(&self, id: NodeId, node: &MemberNode, timeout: Duration) -> Result<(), Error> {
        let mut client = self.client(id, node)?;
        let mut request = tonic::Request::new(Empty {});
        request.set_timeout(timeout);
        client.campaign(request).await.map_err(peer_status_error)?;
        Ok(())
    }

    /// Asks the member at `url` which cluster it belongs to (used by a
    /// member joining an existing cluster).
    pub async fn cluster_info(&self, url: &str, timeout: Duration) -> Result<ClusterInfoResponse, Error> {
        let channel = self.connector.channel(url).map_err(|e| Error::Internal(format!("peer URL {url}: {e}")))?;
        let mut client = RaftPeerClient::new(channel);
        let mut request = tonic::Request::new(ClusterInfoRequest {});
        request.set_timeout(timeout);
        Ok(client.cluster_info(request).await.map_err(peer_status_error)?.into_inner())
    }

    /// Renews a lease on the leader; returns its TTL (0: not found).
    pub async fn lease_keep_alive(
        &self,
        leader: NodeId,
        node: &MemberNode,
        req: LeaseKeepAliveRequest,
        timeout: Duration,
    ) -> Result<i64, Error> {
        let mut client = self.client(leader, node)?;
        let mut request = tonic::Request::new(req);
        request.set_timeout(timeout);
        Ok(client.lease_keep_alive(request).await.map_err(peer_status_error)?.into_inner().ttl)
    }

    /// A lease's remaining and granted TTL from the leader (None: no such
    /// lease).
    pub async fn lease_time_to_live(
        &self,
        leader: NodeId,
        node: &MemberNode,
        req: LeaseTimeToLiveRequest,
        timeout: Duration,
    ) -> Result<Option<LeaseInfo>, Error> {
        let mut client = self.client(leader, node)?;
        let mut request = tonic::Request::new(req);
        request.set_timeout(timeout);
        let resp = client.lease_time_to_live(request).await.map_err(peer_status_error)?.into_inner();
        Ok((resp.ttl != -1).then_some(LeaseInfo { ttl: resp.ttl, granted_ttl: resp.granted_ttl, keys: resp.keys }))
    }

    /// Fires when a peer told us that this member was removed.
    pub fn subscribe_removed(&self) -> tokio::sync::watch::Receiver<bool> {
        self.removed.subscribe()
    }

    fn mark_removed(&self) {
        self.removed.send_replace(true);
    }
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>, Status> {
    m.lock().map_err(|_| Status::internal("peer transport lock poisoned"))
}

/// The status a member answers peers it has removed from the cluster.
pub const MEMBER_REMOVED: &str = "the member has been permanently removed from the cluster";

/// Maps a peer's gRPC failure to what the proposer should do.
/// Whether any error in `status`'s source chain mentions one of `needles`
/// (transport errors reach us only as text).
fn chain_mentions(status: &tonic::Status, needles: &[&str]) -> bool {
    let mut cur: Option<&dyn std::error::Error> = Some(status);
    while let Some(e) = cur {
        let text = e.to_string();
        if needles.iter().any(|n| text.contains(n)) {
            return true;
        }
        cur = e.source();
    }
    false
}

/// Whether a failed call failed while connecting, so the peer never saw
/// the request.
fn never_sent(status: &tonic::Status) -> bool {
    chain_mentions(status, &["tcp connect error", "Connection refused", "dns error"])
}

fn peer_status_error(status: tonic::Status) -> Error {
    match status.code() {
        tonic::Code::FailedPrecondition if status.message() == "not leader" => Error::NotLeader,
        tonic::Code::DeadlineExceeded => Error::Timeout,
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => Error::Unhealthy,
        _ => Error::Internal(format!("peer: {}", status.message())),
    }
}

/// openraft's network factory: one [`PeerNetwork`] per target.
#[derive(Clone)]
pub struct NetworkFactory {
    pub clients: Arc<PeerClients>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: NodeId, node: &MemberNode) -> PeerNetwork {
        PeerNetwork { target, node: node.clone(), clients: self.clients.clone() }
    }
}

pub struct PeerNetwork {
    target: NodeId,
    node: MemberNode,
    clients: Arc<PeerClients>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportError(String);

type RpcError<E> = RPCError<NodeId, MemberNode, RaftError<NodeId, E>>;
type RpcResult<T, E> = Result<T, RpcError<E>>;

/// Serializes a peer request.
fn encode_rpc<Req: Serialize, E: std::error::Error>(req: &Req) -> Result<Vec<u8>, RpcError<E>> {
    codec::encode(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))
}

/// Logs a peer's refusal of this member's certificate with Go's TLS error
/// text, which operators' scripts (and etcd's tests) look for; at most
/// every ten seconds.
fn note_tls_refusal(target: NodeId, status: &tonic::Status) {
    static LAST_LOGGED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    if !chain_mentions(status, &["BadCertificate"]) {
        return;
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let last = LAST_LOGGED.load(std::sync::atomic::Ordering::Relaxed);
    if now >= last + 10
        && LAST_LOGGED
            .compare_exchange(last, now, std::sync::atomic::Ordering::Relaxed, std::sync::atomic::Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(peer = %format!("{target:x}"), "peer refused this member's certificate: remote error: tls: bad certificate");
    }
}

impl PeerNetwork {
    /// Sends an encoded request (see [`encode_rpc`]) and decodes the reply.
    async fn call<Resp, E, F, Fut>(&self, payload: RaftPayload, option: &RPCOption, send: F) -> RpcResult<Resp, E>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
        F: FnOnce(RaftPeerClient<Channel>, tonic::Request<RaftPayload>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<RaftPayload>, tonic::Status>>,
    {
        let client = self
            .clients
            .client(self.target, &self.node)
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&TransportError(e.to_string()))))?;
        let mut request = tonic::Request::new(payload);
        request.set_timeout(option.hard_ttl());
        let reply = send(client, request).await.map_err(|status| self.rpc_error(status))?;
        self.clients.note_answer(self.target, true);
        self.decode_reply(&reply.into_inner())
    }

    /// What openraft is told about a failed call.
    fn rpc_error<E: std::error::Error>(&self, status: Status) -> RpcError<E> {
        note_tls_refusal(self.target, &status);
        self.clients.note_answer(self.target, false);
        if status.code() == tonic::Code::FailedPrecondition && status.message() == MEMBER_REMOVED {
            self.clients.mark_removed();
        }
        let err = TransportError(format!("{}: {}", status.code(), status.message()));
        match status.code() {
            tonic::Code::Unavailable | tonic::Code::Unknown => RPCError::Unreachable(Unreachable::new(&err)),
            _ => RPCError::Network(NetworkError::new(&err)),
        }
    }

    fn decode_reply<Resp, E>(&self, reply: &RaftPayload) -> RpcResult<Resp, E>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let result: Result<Resp, RaftError<NodeId, E>> =
            codec::decode(&reply.data).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new_with_node(self.target, self.node.clone(), e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, openraft::error::Infallible> {
        // The log reader already bounds a run of entries by bytes; should a
        // run still not fit in one peer message, ask openraft to send fewer.
        let data = encode_rpc(&rpc)?;
        let limit = self.clients.max_message - (1 << 20);
        let n = rpc.entries.len();
        if data.len() > limit && n > 1 {
            let hint = (n * limit / data.len()).clamp(1, n - 1) as u64;
            return Err(RPCError::PayloadTooLarge(openraft::error::PayloadTooLarge::new_entries_hint(hint)));
        }
        let payload = RaftPayload { data: data.into() };
        let streamed = self.clients.append_streamed(self.target, &self.node, payload.clone());
        match tokio::time::timeout(option.hard_ttl(), streamed).await {
            Ok(Ok(Some(reply))) => {
                self.clients.note_answer(self.target, true);
                self.decode_reply(&reply)
            }
            Ok(Ok(None)) => self.call(payload, &option, |mut c, r| async move { c.append_entries(r).await }).await,
            Ok(Err(status)) => Err(self.rpc_error(status)),
            Err(_) => Err(self.rpc_error(Status::deadline_exceeded("append-entries reply timed out"))),
        }
    }

    fn append_entries_timeout(&self, rpc: &AppendEntriesRequest<TypeConfig>, base: Duration) -> Duration {
        append_timeout(base, rpc.entries.iter().map(super::entry_size).sum())
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        self.call(RaftPayload { data: encode_rpc(&rpc)?.into() }, &option, |mut c, r| async move {
            c.install_snapshot(r).await
        })
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, openraft::error::Infallible> {
        self.call(RaftPayload { data: encode_rpc(&rpc)?.into() }, &option, |mut c, r| async move { c.vote(r).await })
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use keel_proto::etcdserverpb::{HashKvRequest, HashKvResponse, LeaseKeepAliveResponse, LeaseTimeToLiveResponse};
    use keel_proto::keelpb::raft_peer_server::{RaftPeer, RaftPeerServer};
    use keel_proto::keelpb::{ClusterChangeResponse, ForwardResponse, ReadIndexResponse};
    use tonic::{Request, Response, Streaming};

    use super::*;
    use crate::api::peer::AppendReplies;
    use crate::transport::{self, Http2Options, Security};

    /// A peer that answers append-entries with "stream:<request>" over the
    /// stream (or refuses the stream, like a keel from before it) and with
    /// an encoded success to the unary call.
    #[derive(Default)]
    struct FakePeer {
        refuse_streams: bool,
        stream_attempts: AtomicUsize,
        unary_calls: AtomicUsize,
        /// Fail the next message received on a stream, ending that stream.
        break_next_stream: AtomicBool,
        streams_opened: AtomicUsize,
        stream_messages: AtomicUsize,
    }

    fn tagged(tag: &str, p: &RaftPayload) -> RaftPayload {
        RaftPayload { data: [tag.as_bytes(), &p.data].concat().into() }
    }

    /// The gRPC service of a shared [`FakePeer`].
    struct FakeService(Arc<FakePeer>);

    #[tonic::async_trait]
    impl RaftPeer for FakeService {
        async fn append_entries(&self, _: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
            self.0.unary_calls.fetch_add(1, Ordering::SeqCst);
            let ok: Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> = Ok(AppendEntriesResponse::Success);
            let data = codec::encode(&ok).map_err(|e| Status::internal(e.to_string()))?;
            Ok(Response::new(RaftPayload { data: data.into() }))
        }

        type AppendEntriesStreamStream = AppendReplies;

        async fn append_entries_stream(
            &self,
            req: Request<Streaming<RaftPayload>>,
        ) -> Result<Response<AppendReplies>, Status> {
            self.0.stream_attempts.fetch_add(1, Ordering::SeqCst);
            if self.0.refuse_streams {
                return Err(Status::unimplemented("no such method"));
            }
            self.0.streams_opened.fetch_add(1, Ordering::SeqCst);
            let peer = self.0.clone();
            let replies = futures::stream::try_unfold(req.into_inner(), move |mut requests| {
                let peer = peer.clone();
                async move {
                    let Some(payload) = requests.message().await? else { return Ok(None) };
                    peer.stream_messages.fetch_add(1, Ordering::SeqCst);
                    if peer.break_next_stream.swap(false, Ordering::SeqCst) {
                        return Err(Status::unavailable("connection lost"));
                    }
                    Ok(Some((tagged("stream:", &payload), requests)))
                }
            });
            Ok(Response::new(Box::pin(replies)))
        }

        async fn vote(&self, _: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
            Err(Status::unimplemented("fake"))
        }
        async fn install_snapshot(&self, _: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
            Err(Status::unimplemented("fake"))
        }
        async fn forward(&self, _: Request<ForwardRequest>) -> Result<Response<ForwardResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }
        async fn read_index(&self, _: Request<ReadIndexRequest>) -> Result<Response<ReadIndexResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }
        async fn lease_keep_alive(
            &self,
            _: Request<LeaseKeepAliveRequest>,
        ) -> Result<Response<LeaseKeepAliveResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }
        async fn lease_time_to_live(
            &self,
            _: Request<LeaseTimeToLiveRequest>,
        ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }
        async fn cluster_change(
            &self,
            _: Request<ClusterChangeRequest>,
        ) -> Result<Response<ClusterChangeResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }
        async fn cluster_info(&self, _: Request<ClusterInfoRequest>) -> Result<Response<ClusterInfoResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }
        async fn campaign(&self, _: Request<Empty>) -> Result<Response<Empty>, Status> {
            Err(Status::unimplemented("fake"))
        }
        async fn hash_kv(&self, _: Request<HashKvRequest>) -> Result<Response<HashKvResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }
    }

    /// Serves `peer` on a loopback port through keel's own server; returns
    /// the peer's node and a guard that stops the server when dropped.
    async fn serve(peer: Arc<FakePeer>) -> (MemberNode, tokio_util::sync::DropGuard) {
        let listener = transport::bind("http://127.0.0.1:0").await.expect("bind a loopback port");
        let addr = listener.local_addr().expect("a TCP listener has an address");
        let router = tonic::service::Routes::new(RaftPeerServer::new(FakeService(peer))).prepare().into_axum_router();
        let opts = Http2Options {
            max_concurrent_streams: u32::MAX,
            keepalive_min_time: Duration::ZERO,
            keepalive_interval: Duration::ZERO,
            keepalive_timeout: Duration::from_secs(20),
            authority_shim: false,
        };
        let tasks = crate::tasks::MemberTasks::new();
        tasks.spawn(transport::serve(listener, Security::Plain, router, opts, tasks.clone()));
        (MemberNode { peer_urls: vec![format!("http://{addr}")] }, tasks.stop_signal().drop_guard())
    }

    fn clients() -> PeerClients {
        PeerClients::new(
            PeerConnector { tls: None, connect_timeout: Duration::from_secs(5), loopback_source: None },
            max_peer_message(0),
        )
    }

    fn payload(i: usize) -> RaftPayload {
        RaftPayload { data: format!("m{i}").into_bytes().into() }
    }

    #[tokio::test]
    async fn messages_share_one_stream_and_each_gets_its_own_reply() {
        let peer = Arc::new(FakePeer::default());
        let (node, _stop) = serve(peer.clone()).await;
        let clients = clients();
        for i in 0..5 {
            let reply = clients.append_streamed(7, &node, payload(i)).await.expect("append over the stream");
            assert_eq!(reply, Some(tagged("stream:", &payload(i))));
        }
        assert_eq!(peer.streams_opened.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_broken_stream_is_replaced_and_the_message_resent() {
        let peer = Arc::new(FakePeer::default());
        let (node, _stop) = serve(peer.clone()).await;
        let clients = clients();
        clients.append_streamed(7, &node, payload(0)).await.expect("first append");
        peer.break_next_stream.store(true, Ordering::SeqCst);
        let reply = clients.append_streamed(7, &node, payload(1)).await.expect("append after the break");
        assert_eq!(reply, Some(tagged("stream:", &payload(1))));
        assert_eq!(peer.streams_opened.load(Ordering::SeqCst), 2);
        // m0 once, m1 on the broken stream and again on the new one.
        assert_eq!(peer.stream_messages.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_peer_without_the_stream_gets_unary_calls() {
        let peer = Arc::new(FakePeer { refuse_streams: true, ..FakePeer::default() });
        let (node, _stop) = serve(peer.clone()).await;
        let mut network = PeerNetwork { target: 7, node, clients: Arc::new(clients()) };
        for calls in 1..=2 {
            let heartbeat = AppendEntriesRequest::<TypeConfig> {
                vote: openraft::Vote::new_committed(1, 1),
                prev_log_id: None,
                entries: Vec::new(),
                leader_commit: None,
            };
            let reply = network.append_entries(heartbeat, RPCOption::new(Duration::from_secs(5))).await;
            assert!(matches!(reply, Ok(AppendEntriesResponse::Success)), "{reply:?}");
            assert_eq!(peer.unary_calls.load(Ordering::SeqCst), calls);
        }
        // Asked once; the refusal is remembered.
        assert_eq!(peer.stream_attempts.load(Ordering::SeqCst), 1);
    }
}
