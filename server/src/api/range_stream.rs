//! `KV/RangeStream` (etcd 3.7): a range answered in chunks, so that a
//! member never holds a huge list in memory at once. The first chunk reads
//! 10 keys; each next one doubles while the last chunk was under half of
//! `--max-request-bytes` and halves while it was over twice that. The
//! revision is pinned at the first read, so later chunks see the same
//! snapshot (or fail as compacted), and only the last chunk carries the
//! header, `more` and `count`. Members reporting an older release answer
//! as that release did: the method does not exist.

use std::sync::Arc;

use keel_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use keel_proto::etcdserverpb::{RangeRequest, RangeResponse, RangeStreamResponse};
use prost::Message;
use tokio::sync::mpsc;
use tonic::Status;

use super::credentials::authorized_read;
use crate::apply::kv as semantics;
use crate::auth::AuthInfo;
use crate::error::{Error, Result};
use crate::server::Server;

/// Keys in the first chunk (etcd's `initialStreamChunkLimit`).
const FIRST_CHUNK_KEYS: i64 = 10;

/// Chunks produced ahead of the client: what bounds the member's memory.
const CHUNKS_AHEAD: usize = 2;

/// etcd's checks beyond Range's: the keys come in key order only, and
/// without revision filters.
pub fn check(r: &RangeRequest) -> std::result::Result<(), Status> {
    super::kv::check_range(r)?;
    let order = SortOrder::try_from(r.sort_order).unwrap_or(SortOrder::None);
    let target = SortTarget::try_from(r.sort_target).unwrap_or(SortTarget::Key);
    let default_order = order == SortOrder::None || (target == SortTarget::Key && order == SortOrder::Ascend);
    if !default_order {
        return Err(Status::unimplemented("RangeStream does not support custom sort orders"));
    }
    if r.min_mod_revision != 0 || r.max_mod_revision != 0 || r.min_create_revision != 0 || r.max_create_revision != 0 {
        return Err(Status::unimplemented("RangeStream does not support revision filters"));
    }
    Ok(())
}

/// etcd's `adjustChunkLimit`: the next chunk's key limit, aiming at
/// `target` bytes per chunk, never below 1.
pub fn next_limit(last_limit: i64, last_size: usize, target: usize) -> i64 {
    let limit = if last_size < target / 2 {
        last_limit.saturating_mul(2)
    } else if last_size > target.saturating_mul(2) {
        last_limit / 2
    } else {
        last_limit
    };
    limit.max(1)
}

pub type ChunkStream = tokio_stream::wrappers::ReceiverStream<std::result::Result<RangeStreamResponse, Status>>;

/// Starts streaming `r` (already checked) for `who`; the chunks come from
/// a task that stays at most [`CHUNKS_AHEAD`] ahead of the client.
pub fn start(server: Arc<Server>, r: RangeRequest, who: Option<AuthInfo>) -> ChunkStream {
    let (tx, rx) = mpsc::channel(CHUNKS_AHEAD);
    tokio::spawn(async move {
        if let Err(e) = stream(&server, r, who.as_ref(), &tx).await {
            let _ = tx.send(Err(e.into())).await;
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

type Sender = mpsc::Sender<std::result::Result<RangeStreamResponse, Status>>;

async fn stream(server: &Arc<Server>, r: RangeRequest, who: Option<&AuthInfo>, tx: &Sender) -> Result<()> {
    if !r.serializable {
        server.linearizable_barrier().await?;
    }
    let auth = server.auth.clone();
    let (key, end) = (r.key.clone(), r.range_end.clone());
    authorized_read(server, who, |who| auth.check_read(who, &key, &end), || send_chunks(server, r, tx)).await
}

/// One range read off the runtime.
async fn read(server: &Arc<Server>, r: RangeRequest) -> Result<RangeResponse> {
    let mvcc = server.mvcc.clone();
    tokio::task::spawn_blocking(move || semantics::range(&mvcc.read()?, &r))
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
}

async fn send_chunks(server: &Arc<Server>, mut r: RangeRequest, tx: &Sender) -> Result<()> {
    let send = |resp: RangeResponse| async move {
        // A client gone is the end of the stream, not an error.
        tx.send(Ok(RangeStreamResponse { range_response: Some(resp) })).await.is_ok()
    };
    if r.count_only {
        let resp = read(server, r).await?;
        let revision = resp.header.map(|h| h.revision).unwrap_or_default();
        send(RangeResponse { header: Some(server.header(revision)), count: resp.count, ..Default::default() }).await;
        return Ok(());
    }
    let total_limit = if r.limit == 0 { i64::MAX } else { r.limit };
    r.limit = FIRST_CHUNK_KEYS.min(total_limit);
    let target = server.settings.max_request_bytes;
    let mut count = 0i64;
    let mut header_rev = 0i64;
    loop {
        let resp = read(server, r.clone()).await?;
        if header_rev == 0 {
            header_rev = resp.header.map(|h| h.revision).unwrap_or_default();
            if r.revision == 0 {
                r.revision = header_rev;
            }
        }
        count += resp.kvs.len() as i64;
        let size = resp.encoded_len();
        let next_key = match (resp.more, resp.kvs.last()) {
            (true, Some(last)) => {
                let mut k = last.key.to_vec();
                k.push(0);
                Some(k)
            }
            _ => None,
        };
        let done = next_key.is_none() || count == total_limit;
        let mut out = RangeResponse { kvs: resp.kvs, ..Default::default() };
        if done {
            out.header = Some(server.header(header_rev));
            out.more = resp.more;
            out.count = count;
            if let (true, Some(next)) = (resp.more, &next_key) {
                let rest = RangeRequest {
                    key: next.clone().into(),
                    range_end: r.range_end.clone(),
                    revision: r.revision,
                    count_only: true,
                    ..Default::default()
                };
                out.count += read(server, rest).await?.count;
            }
        }
        if !send(out).await || done {
            return Ok(());
        }
        r.key = next_key.unwrap_or_default().into();
        r.limit = next_limit(r.limit, size, target).min(total_limit - count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_grow_and_shrink_toward_the_target_size() {
        assert_eq!(next_limit(10, 100, 1000), 20);
        assert_eq!(next_limit(10, 700, 1000), 10);
        assert_eq!(next_limit(10, 2500, 1000), 5);
        assert_eq!(next_limit(1, 5000, 1000), 1);
    }

    #[test]
    fn custom_orders_and_revision_filters_are_refused() {
        let base = RangeRequest { key: "a".into(), ..Default::default() };
        assert!(check(&base).is_ok());
        let key_ascend =
            RangeRequest { sort_order: SortOrder::Ascend as i32, sort_target: SortTarget::Key as i32, ..base.clone() };
        assert!(check(&key_ascend).is_ok());
        let descend = RangeRequest { sort_order: SortOrder::Descend as i32, ..base.clone() };
        let refused = check(&descend).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unimplemented);
        assert_eq!(refused.message(), "RangeStream does not support custom sort orders");
        let by_mod =
            RangeRequest { sort_order: SortOrder::Ascend as i32, sort_target: SortTarget::Mod as i32, ..base.clone() };
        assert!(check(&by_mod).is_err());
        let filtered = RangeRequest { min_mod_revision: 3, ..base.clone() };
        assert_eq!(check(&filtered).unwrap_err().message(), "RangeStream does not support revision filters");
        assert_eq!(check(&RangeRequest::default()).unwrap_err().message(), "etcdserver: key is not provided");
    }
}
