//! Endpoints, leader discovery, deadlines and safe retries.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
pub use keel_proto::etcdserverpb::StatusResponse as Status;
use keel_proto::etcdserverpb::{
    cluster_client::ClusterClient, kv_client::KvClient, lease_client::LeaseClient,
    maintenance_client::MaintenanceClient, watch_client::WatchClient, CompactionRequest, CompactionResponse,
    DefragmentRequest, DeleteRangeRequest, DeleteRangeResponse, HashKvRequest, HashKvResponse, LeaseGrantRequest,
    LeaseGrantResponse, LeaseKeepAliveRequest, LeaseRevokeRequest, LeaseRevokeResponse, LeaseTimeToLiveRequest,
    LeaseTimeToLiveResponse, MemberAddRequest, MemberAddResponse, MemberListRequest, MemberListResponse,
    MemberPromoteRequest, MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse, PutRequest, PutResponse,
    RangeRequest, RangeResponse, StatusRequest, TxnResponse,
};
use keel_proto::mvccpb::KeyValue;
use keel_proto::v3lockpb::{lock_client::LockClient, LockRequest, LockResponse, UnlockRequest, UnlockResponse};
use tonic::transport::{Channel, Endpoint};

use crate::error::Error;
use crate::txn::Txn;

/// Connection settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Deadline of each request.
    pub request_timeout: Duration,
    /// How long to wait for a TCP connection.
    pub connect_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self { request_timeout: Duration::from_secs(5), connect_timeout: Duration::from_secs(2) }
    }
}

struct Inner {
    endpoints: Vec<String>,
    channels: Vec<Channel>,
    /// Where writes go: the leader, as last discovered.
    leader: AtomicUsize,
    /// Where reads go next (round robin on failure).
    current: AtomicUsize,
    config: ClientConfig,
}

/// A client for a keel (or etcd) cluster. Cloning is cheap.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// Whether a request may be sent again after an unknown outcome.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
}

impl Client {
    /// Connects to `endpoints` (URLs such as `http://127.0.0.1:2379`)
    /// with the default configuration and finds the leader.
    pub async fn connect<E: AsRef<str>>(endpoints: impl IntoIterator<Item = E>) -> Result<Client, Error> {
        Self::connect_with(endpoints, ClientConfig::default()).await
    }

    pub async fn connect_with<E: AsRef<str>>(
        endpoints: impl IntoIterator<Item = E>,
        config: ClientConfig,
    ) -> Result<Client, Error> {
        let endpoints: Vec<String> = endpoints.into_iter().map(|e| e.as_ref().to_string()).collect();
        if endpoints.is_empty() {
            return Err(Error::InvalidArgument("no endpoints".into()));
        }
        let mut channels = Vec::new();
        for e in &endpoints {
            let url = if e.contains("://") { e.clone() } else { format!("http://{e}") };
            let ep = Endpoint::from_shared(url)
                .map_err(|err| Error::InvalidArgument(format!("{e}: {err}")))?
                .connect_timeout(config.connect_timeout)
                .tcp_nodelay(true);
            channels.push(ep.connect_lazy());
        }
        let client = Client {
            inner: Arc::new(Inner {
                endpoints,
                channels,
                leader: AtomicUsize::new(0),
                current: AtomicUsize::new(0),
                config,
            }),
        };
        client.discover_leader().await;
        Ok(client)
    }

    pub fn endpoints(&self) -> &[String] {
        &self.inner.endpoints
    }

    /// A client that only talks to endpoint `i` (for per-member checks).
    pub fn pinned(&self, i: usize) -> Client {
        Client {
            inner: Arc::new(Inner {
                endpoints: vec![self.inner.endpoints[i].clone()],
                channels: vec![self.inner.channels[i].clone()],
                leader: AtomicUsize::new(0),
                current: AtomicUsize::new(0),
                config: self.inner.config.clone(),
            }),
        }
    }

    /// The gRPC channel to endpoint `i`, for services this client does not
    /// wrap.
    pub fn channel(&self, i: usize) -> Channel {
        self.inner.channels[i % self.inner.channels.len()].clone()
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.inner.config.request_timeout
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(self.inner.config.request_timeout);
        r
    }

    /// Asks every endpoint for its status; remembers which one leads.
    /// Returns the leader's index if found.
    pub async fn discover_leader(&self) -> Option<usize> {
        for i in 0..self.inner.channels.len() {
            let mut m = MaintenanceClient::new(self.channel(i));
            let mut req = tonic::Request::new(StatusRequest {});
            req.set_timeout(Duration::from_secs(1));
            if let Ok(s) = m.status(req).await {
                let s = s.into_inner();
                if s.leader != 0 && s.header.is_some_and(|h| h.member_id == s.leader) {
                    self.inner.leader.store(i, Ordering::Relaxed);
                    return Some(i);
                }
            }
        }
        None
    }

    /// Runs `f` against endpoints until it succeeds or fails in a way that
    /// retrying cannot fix (or, for writes, could duplicate).
    async fn call<T, F, Fut>(&self, kind: Kind, f: F) -> Result<T, Error>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let n = self.inner.channels.len();
        let start = match kind {
            Kind::Write => self.inner.leader.load(Ordering::Relaxed),
            Kind::Read => self.inner.current.load(Ordering::Relaxed),
        };
        let mut last = Error::Unreachable("no attempt".into());
        for attempt in 0..(2 * n).max(2) {
            let i = (start + attempt) % n;
            match f(self.channel(i)).await {
                Ok(resp) => {
                    if kind == Kind::Read {
                        self.inner.current.store(i, Ordering::Relaxed);
                    }
                    return Ok(resp.into_inner());
                }
                Err(status) => {
                    let err = Error::from_status(status, true);
                    let retry = match (&err, kind) {
                        (Error::Unreachable(_), _) => true,
                        (e, Kind::Read) => e.is_retriable(),
                        // A write is only resent if it certainly did not
                        // take effect.
                        (e, Kind::Write) => e.is_retriable() && e.is_definite(),
                    };
                    if !retry {
                        return Err(err);
                    }
                    if kind == Kind::Write {
                        if let Some(l) = self.discover_leader().await {
                            if l != (i + 1) % n {
                                self.inner.leader.store(l, Ordering::Relaxed);
                            }
                        }
                    }
                    last = err;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        Err(last)
    }

    pub async fn range(&self, req: RangeRequest) -> Result<RangeResponse, Error> {
        self.call(Kind::Read, |ch| {
            let r = self.request(req.clone());
            async move { KvClient::new(ch).range(r).await }
        })
        .await
    }

    /// The current value of one key.
    pub async fn get(&self, key: impl Into<Bytes>) -> Result<Option<KeyValue>, Error> {
        let resp = self.range(RangeRequest { key: key.into(), ..Default::default() }).await?;
        Ok(resp.kvs.into_iter().next())
    }

    pub async fn put_req(&self, req: PutRequest) -> Result<PutResponse, Error> {
        self.call(Kind::Write, |ch| {
            let r = self.request(req.clone());
            async move { KvClient::new(ch).put(r).await }
        })
        .await
    }

    pub async fn put(&self, key: impl Into<Bytes>, value: impl Into<Bytes>) -> Result<PutResponse, Error> {
        self.put_req(PutRequest { key: key.into(), value: value.into(), ..Default::default() }).await
    }

    pub async fn delete_req(&self, req: DeleteRangeRequest) -> Result<DeleteRangeResponse, Error> {
        self.call(Kind::Write, |ch| {
            let r = self.request(req.clone());
            async move { KvClient::new(ch).delete_range(r).await }
        })
        .await
    }

    pub async fn delete(&self, key: impl Into<Bytes>) -> Result<DeleteRangeResponse, Error> {
        self.delete_req(DeleteRangeRequest { key: key.into(), ..Default::default() }).await
    }

    /// Runs a txn; read-only txns are retried like reads.
    pub async fn txn(&self, txn: Txn) -> Result<TxnResponse, Error> {
        let kind = if txn.is_read_only() { Kind::Read } else { Kind::Write };
        self.call(kind, |ch| {
            let r = self.request(txn.0.clone());
            async move { KvClient::new(ch).txn(r).await }
        })
        .await
    }

    pub async fn compact(&self, revision: i64, physical: bool) -> Result<CompactionResponse, Error> {
        self.call(Kind::Write, |ch| {
            let r = self.request(CompactionRequest { revision, physical });
            async move { KvClient::new(ch).compact(r).await }
        })
        .await
    }

    pub async fn lease_grant(&self, ttl: i64) -> Result<LeaseGrantResponse, Error> {
        self.call(Kind::Write, |ch| {
            let r = self.request(LeaseGrantRequest { ttl, id: 0 });
            async move { LeaseClient::new(ch).lease_grant(r).await }
        })
        .await
    }

    pub async fn lease_revoke(&self, id: i64) -> Result<LeaseRevokeResponse, Error> {
        self.call(Kind::Write, |ch| {
            let r = self.request(LeaseRevokeRequest { id });
            async move { LeaseClient::new(ch).lease_revoke(r).await }
        })
        .await
    }

    pub async fn lease_time_to_live(&self, id: i64, keys: bool) -> Result<LeaseTimeToLiveResponse, Error> {
        self.call(Kind::Read, |ch| {
            let r = self.request(LeaseTimeToLiveRequest { id, keys });
            async move { LeaseClient::new(ch).lease_time_to_live(r).await }
        })
        .await
    }

    /// One keepalive round trip; returns the TTL (0: the lease is gone).
    pub async fn lease_keep_alive_once(&self, id: i64) -> Result<i64, Error> {
        self.call(Kind::Read, |ch| {
            let timeout = self.timeout();
            async move {
                let mut c = LeaseClient::new(ch);
                let mut req = tonic::Request::new(tokio_stream::iter([LeaseKeepAliveRequest { id }]));
                req.set_timeout(timeout);
                let mut stream = c.lease_keep_alive(req).await?.into_inner();
                match stream.message().await? {
                    Some(resp) => Ok(tonic::Response::new(resp.ttl)),
                    None => Err(tonic::Status::unavailable("keepalive stream closed")),
                }
            }
        })
        .await
    }

    /// Keeps `id` alive every `interval` until the returned handle is
    /// dropped or the lease is gone.
    pub fn keep_alive(&self, id: i64, interval: Duration) -> KeepAlive {
        let client = self.clone();
        let task = tokio::spawn(async move {
            loop {
                match client.lease_keep_alive_once(id).await {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(e) => tracing::debug!(lease = id, error = %e, "keepalive failed; retrying"),
                }
                tokio::time::sleep(interval).await;
            }
        });
        KeepAlive { task }
    }

    /// Status of endpoint `i`.
    pub async fn status(&self, i: usize) -> Result<Status, Error> {
        MaintenanceClient::new(self.channel(i))
            .status(self.request(StatusRequest {}))
            .await
            .map(|r| r.into_inner())
            .map_err(|s| Error::from_status(s, true))
    }

    pub async fn member_list(&self) -> Result<MemberListResponse, Error> {
        self.call(Kind::Read, |ch| {
            let r = self.request(MemberListRequest { linearizable: false });
            async move { ClusterClient::new(ch).member_list(r).await }
        })
        .await
    }

    /// Adds a member (a learner if `learner`); not retried.
    pub async fn member_add(&self, peer_urls: Vec<String>, learner: bool) -> Result<MemberAddResponse, Error> {
        self.call(Kind::Write, |ch| {
            let r = self.request(MemberAddRequest { peer_ur_ls: peer_urls.clone(), is_learner: learner });
            async move { ClusterClient::new(ch).member_add(r).await }
        })
        .await
    }

    pub async fn member_remove(&self, id: u64) -> Result<MemberRemoveResponse, Error> {
        self.call(Kind::Write, |ch| {
            let r = self.request(MemberRemoveRequest { id });
            async move { ClusterClient::new(ch).member_remove(r).await }
        })
        .await
    }

    pub async fn member_promote(&self, id: u64) -> Result<MemberPromoteResponse, Error> {
        self.call(Kind::Write, |ch| {
            let r = self.request(MemberPromoteRequest { id });
            async move { ClusterClient::new(ch).member_promote(r).await }
        })
        .await
    }

    /// The hash of endpoint `i`'s MVCC history up to `revision` (0: all).
    pub async fn hash_kv(&self, i: usize, revision: i64) -> Result<HashKvResponse, Error> {
        MaintenanceClient::new(self.channel(i))
            .hash_kv(self.request(HashKvRequest { revision }))
            .await
            .map(|r| r.into_inner())
            .map_err(|s| Error::from_status(s, true))
    }

    /// Defragments endpoint `i`'s storage.
    pub async fn defragment(&self, i: usize) -> Result<(), Error> {
        let mut req = tonic::Request::new(DefragmentRequest {});
        req.set_timeout(self.timeout().max(Duration::from_secs(60)));
        MaintenanceClient::new(self.channel(i))
            .defragment(req)
            .await
            .map(|_| ())
            .map_err(|s| Error::from_status(s, true))
    }

    /// Acquires the lock `name` held by `lease` (etcd's Lock service);
    /// returns the owner key, whose create revision fences the holder.
    /// Waits for as long as the lock is held by someone else, up to the
    /// request deadline.
    pub async fn lock(&self, name: impl Into<Bytes>, lease: i64) -> Result<LockResponse, Error> {
        let name = name.into();
        self.call(Kind::Write, |ch| {
            let r = self.request(LockRequest { name: name.clone(), lease });
            async move { LockClient::new(ch).lock(r).await }
        })
        .await
    }

    pub async fn unlock(&self, key: impl Into<Bytes>) -> Result<UnlockResponse, Error> {
        let key = key.into();
        self.call(Kind::Write, |ch| {
            let r = self.request(UnlockRequest { key: key.clone() });
            async move { LockClient::new(ch).unlock(r).await }
        })
        .await
    }

    pub(crate) fn watch_client(&self, i: usize) -> WatchClient<Channel> {
        WatchClient::new(self.channel(i)).max_decoding_message_size(64 << 20)
    }
}

/// A running lease keepalive; stops when dropped.
pub struct KeepAlive {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.task.abort();
    }
}
