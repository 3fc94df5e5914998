//! etcd's concurrency recipes (clientv3/concurrency: Mutex and Election),
//! run inside the server for the v3lock and v3election services. Same key
//! layout as the client-side recipes (`<name>/<lease id in hex>`, oldest
//! create revision owns), so Go programs using either the services or the
//! client recipes interoperate on one cluster.
//!
//! A lock held through a lease is not a safety guarantee by itself: a
//! paused or partitioned holder can lose its lease while it still thinks
//! it holds the lock. Fence protected writes with the lock key's create
//! revision (see docs/COMPATIBILITY.md).

use std::sync::Arc;

use bytes::Bytes;
use keel_proto::etcdserverpb::{
    compare::{CompareResult, CompareTarget, TargetUnion},
    range_request::{SortOrder, SortTarget},
    request_op, response_op, Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, ResponseHeader,
    TxnRequest, TxnResponse,
};
use keel_proto::mvccpb::{event::EventType, KeyValue};

use super::kv::KvService;
use super::watch_session::Credentials;
use crate::auth::AuthInfo;
use crate::error::Error;
use crate::server::Server;
use crate::storage::keys::prefix_end;
use crate::watch::hub::WatchSpec;
use crate::watch::internal::InternalWatch;

/// Errors the Go recipes return as plain errors (gRPC code Unknown).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecipeError {
    #[error("election: not leader")]
    NotLeader,
    #[error("election: no leader")]
    NoLeader,
    #[error("mutex: session is expired")]
    SessionExpired,
    #[error("\"leader\" field must be provided")]
    MissingLeaderKey,
    #[error("lost watcher waiting for delete")]
    LostWatcher,
    #[error(transparent)]
    Kv(#[from] Error),
}

impl From<RecipeError> for tonic::Status {
    fn from(e: RecipeError) -> Self {
        match e {
            RecipeError::Kv(e) => e.into(),
            other => tonic::Status::unknown(other.to_string()),
        }
    }
}

pub type RecipeResult<T> = std::result::Result<T, RecipeError>;

pub struct Recipes {
    server: Arc<Server>,
    kv: KvService,
    /// Whose request this is: every KV operation runs with their rights,
    /// resolved again for each (as etcd passes the request's context), so
    /// a long wait survives unrelated auth changes.
    credentials: Option<Credentials>,
}

fn op(request: request_op::Request) -> RequestOp {
    RequestOp { request: Some(request) }
}

/// `pfx` sorted by create revision, first (ascending) or last (descending).
fn by_create(pfx: &[u8], order: SortOrder, max_create_rev: i64) -> RangeRequest {
    RangeRequest {
        key: Bytes::copy_from_slice(pfx),
        range_end: Bytes::from(prefix_end(pfx).unwrap_or_else(|| vec![0])),
        limit: 1,
        sort_order: order as i32,
        sort_target: SortTarget::Create as i32,
        max_create_revision: max_create_rev,
        ..Default::default()
    }
}

fn create_rev_is(key: &[u8], rev: i64) -> Compare {
    Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Create as i32,
        key: Bytes::copy_from_slice(key),
        target_union: Some(TargetUnion::CreateRevision(rev)),
        range_end: Bytes::new(),
    }
}

fn range_kvs(resp: &TxnResponse, i: usize) -> Vec<KeyValue> {
    match resp.responses.get(i).and_then(|r| r.response.as_ref()) {
        Some(response_op::Response::ResponseRange(r)) => r.kvs.clone(),
        _ => Vec::new(),
    }
}

impl Recipes {
    pub fn new(server: Arc<Server>) -> Self {
        let kv = KvService::new(server.clone());
        Self { server, kv, credentials: None }
    }

    /// The recipes acting for the sender of `req` (whose credentials are
    /// checked here once, so a bad token fails the call at once).
    pub async fn for_request<T>(&self, req: &tonic::Request<T>) -> Result<Arc<Recipes>, tonic::Status> {
        super::credentials::auth_info(&self.server, req).await?;
        let credentials = Credentials {
            metadata: req.metadata().clone(),
            common_name: req.extensions().get::<super::credentials::ClientCommonName>().cloned(),
        };
        Ok(Arc::new(Recipes {
            server: self.server.clone(),
            kv: KvService::new(self.server.clone()),
            credentials: Some(credentials),
        }))
    }

    /// Who the next KV operation acts for.
    async fn who(&self) -> Result<Option<AuthInfo>, Error> {
        match &self.credentials {
            None => Ok(None),
            Some(c) => super::credentials::from_parts(&self.server, &c.metadata, c.common_name.as_ref()).await,
        }
    }

    /// Completes a header with this member's identity.
    pub fn kv_header(&self, header: &mut ResponseHeader) {
        let mut h = Some(*header);
        self.server.fill_header(&mut h);
        *header = h.unwrap_or_default();
    }

    /// Waits until `key` is deleted, watching from revision `rev`.
    async fn wait_delete(&self, key: &[u8], rev: i64) -> RecipeResult<()> {
        let spec = WatchSpec::new(Bytes::copy_from_slice(key), None);
        let mut w = InternalWatch::start(&self.server.hub, &self.server.mvcc, spec, rev)?;
        loop {
            let (_, events) = w.next().await.map_err(|_| RecipeError::LostWatcher)?;
            if events.iter().any(|e| e.r#type == EventType::Delete as i32) {
                return Ok(());
            }
        }
    }

    /// Waits until no key under `pfx` with create revision <= `max_create_rev`
    /// remains; returns the header of the final check.
    async fn wait_deletes(&self, pfx: &[u8], max_create_rev: i64) -> RecipeResult<ResponseHeader> {
        loop {
            let resp = self
                .kv
                .range_inner(by_create(pfx, SortOrder::Descend, max_create_rev), self.who().await?.as_ref())
                .await?;
            let header = resp.header.unwrap_or_default();
            let Some(last) = resp.kvs.first() else { return Ok(header) };
            self.wait_delete(&last.key, header.revision).await?;
        }
    }

    /// concurrency.Mutex.Lock: returns the header and the ownership key.
    /// `cleanup` receives the key as soon as it exists, so a caller that
    /// goes away can delete it.
    pub async fn lock(
        &self,
        name: &[u8],
        lease: i64,
        cleanup: &tokio::sync::Mutex<Option<Bytes>>,
    ) -> RecipeResult<(ResponseHeader, Bytes)> {
        let mut pfx = name.to_vec();
        pfx.push(b'/');
        let my_key = Bytes::from([pfx.as_slice(), format!("{lease:x}").as_bytes()].concat());
        let owner = op(request_op::Request::RequestRange(by_create(&pfx, SortOrder::Ascend, 0)));
        let txn = TxnRequest {
            compare: vec![create_rev_is(&my_key, 0)],
            success: vec![
                op(request_op::Request::RequestPut(PutRequest { key: my_key.clone(), lease, ..Default::default() })),
                owner.clone(),
            ],
            failure: vec![
                op(request_op::Request::RequestRange(RangeRequest { key: my_key.clone(), ..Default::default() })),
                owner,
            ],
        };
        let resp = self.kv.txn_inner(txn, self.who().await?.as_ref()).await?;
        *cleanup.lock().await = Some(my_key.clone());
        let header = resp.header.unwrap_or_default();
        let my_rev = if resp.succeeded {
            header.revision
        } else {
            range_kvs(&resp, 0).first().map_or(header.revision, |kv| kv.create_revision)
        };
        let owners = range_kvs(&resp, 1);
        if owners.is_empty() || owners[0].create_revision == my_rev {
            return Ok((header, my_key));
        }
        let header = match self.wait_deletes(&pfx, my_rev - 1).await {
            Ok(h) => h,
            Err(e) => {
                let _ = self.unlock(&my_key).await;
                return Err(e);
            }
        };
        // The waiter's own key may have gone with its lease meanwhile.
        let mine = self
            .kv
            .range_inner(RangeRequest { key: my_key.clone(), ..Default::default() }, self.who().await?.as_ref())
            .await?;
        if mine.kvs.is_empty() {
            return Err(RecipeError::SessionExpired);
        }
        Ok((header, my_key))
    }

    pub async fn unlock(&self, key: &[u8]) -> RecipeResult<ResponseHeader> {
        let resp = self
            .kv
            .delete_inner(
                DeleteRangeRequest { key: Bytes::copy_from_slice(key), ..Default::default() },
                self.who().await?.as_ref(),
            )
            .await?;
        Ok(resp.header.unwrap_or_default())
    }

    /// concurrency.Election.Campaign: returns the header, the leader key
    /// and its create revision once this candidate leads.
    pub async fn campaign(
        &self,
        name: &[u8],
        lease: i64,
        value: Bytes,
        cleanup: &tokio::sync::Mutex<Option<(Bytes, i64)>>,
    ) -> RecipeResult<(ResponseHeader, Bytes, i64)> {
        let mut pfx = name.to_vec();
        pfx.push(b'/');
        let key = Bytes::from([pfx.as_slice(), format!("{lease:x}").as_bytes()].concat());
        let txn = TxnRequest {
            compare: vec![create_rev_is(&key, 0)],
            success: vec![op(request_op::Request::RequestPut(PutRequest {
                key: key.clone(),
                value: value.clone(),
                lease,
                ..Default::default()
            }))],
            failure: vec![op(request_op::Request::RequestRange(RangeRequest {
                key: key.clone(),
                ..Default::default()
            }))],
        };
        let resp = self.kv.txn_inner(txn, self.who().await?.as_ref()).await?;
        let header = resp.header.unwrap_or_default();
        let mut rev = header.revision;
        if !resp.succeeded {
            let kv = range_kvs(&resp, 0).into_iter().next().unwrap_or_default();
            rev = kv.create_revision;
            if kv.value != value {
                if let Err(e) = self.proclaim(&key, rev, lease, value.clone()).await {
                    let _ = self.resign(&key, rev).await;
                    return Err(e);
                }
            }
        }
        *cleanup.lock().await = Some((key.clone(), rev));
        self.wait_deletes(&pfx, rev - 1).await?;
        Ok((header, key, rev))
    }

    pub async fn proclaim(&self, key: &[u8], rev: i64, lease: i64, value: Bytes) -> RecipeResult<ResponseHeader> {
        let txn = TxnRequest {
            compare: vec![create_rev_is(key, rev)],
            success: vec![op(request_op::Request::RequestPut(PutRequest {
                key: Bytes::copy_from_slice(key),
                value,
                lease,
                ..Default::default()
            }))],
            failure: vec![],
        };
        let resp = self.kv.txn_inner(txn, self.who().await?.as_ref()).await?;
        if !resp.succeeded {
            return Err(RecipeError::NotLeader);
        }
        Ok(resp.header.unwrap_or_default())
    }

    pub async fn resign(&self, key: &[u8], rev: i64) -> RecipeResult<ResponseHeader> {
        let txn = TxnRequest {
            compare: vec![create_rev_is(key, rev)],
            success: vec![op(request_op::Request::RequestDeleteRange(DeleteRangeRequest {
                key: Bytes::copy_from_slice(key),
                ..Default::default()
            }))],
            failure: vec![],
        };
        Ok(self.kv.txn_inner(txn, self.who().await?.as_ref()).await?.header.unwrap_or_default())
    }

    /// concurrency.Election.Leader: the current leader's key-value.
    pub async fn leader(&self, name: &[u8]) -> RecipeResult<(ResponseHeader, KeyValue)> {
        let mut pfx = name.to_vec();
        pfx.push(b'/');
        let resp = self.kv.range_inner(by_create(&pfx, SortOrder::Ascend, 0), self.who().await?.as_ref()).await?;
        let header = resp.header.unwrap_or_default();
        let kv = resp.kvs.into_iter().next().ok_or(RecipeError::NoLeader)?;
        Ok((header, kv))
    }

    /// concurrency.Election.Observe: sends the leader's key-value at each
    /// change of leadership or value until `tx` closes.
    pub async fn observe(
        &self,
        name: &[u8],
        tx: tokio::sync::mpsc::Sender<RecipeResult<(ResponseHeader, KeyValue)>>,
    ) -> RecipeResult<()> {
        let mut pfx = name.to_vec();
        pfx.push(b'/');
        loop {
            let resp = self.kv.range_inner(by_create(&pfx, SortOrder::Ascend, 0), self.who().await?.as_ref()).await?;
            let mut header = resp.header.unwrap_or_default();
            let kv = match resp.kvs.into_iter().next() {
                Some(kv) => kv,
                None => {
                    // Wait for the first put under the prefix.
                    let end = Bytes::from(prefix_end(&pfx).unwrap_or_else(|| vec![0]));
                    let spec = WatchSpec { no_delete: true, ..WatchSpec::new(Bytes::from(pfx.clone()), Some(end)) };
                    let mut w = InternalWatch::start(&self.server.hub, &self.server.mvcc, spec, header.revision)?;
                    let (_, events) = w.next().await?;
                    let Some(kv) = events.into_iter().find_map(|e| e.kv) else { continue };
                    header.revision = kv.mod_revision;
                    kv
                }
            };
            if tx.send(Ok((header, kv.clone()))).await.is_err() {
                return Ok(());
            }
            let spec = WatchSpec::new(kv.key.clone(), None);
            let mut w = InternalWatch::start(&self.server.hub, &self.server.mvcc, spec, header.revision + 1)?;
            'leader: loop {
                let (rev, events) = w.next().await?;
                for ev in events {
                    if ev.r#type == EventType::Delete as i32 {
                        break 'leader;
                    }
                    let h = ResponseHeader { revision: rev, ..self.server.header(rev) };
                    if tx.send(Ok((h, ev.kv.unwrap_or_default()))).await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
    }
}
