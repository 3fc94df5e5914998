//! Group commit for KV and lease writes. openraft 0.9 waits for the log
//! flush of every client write before it takes the next one, so one Raft
//! entry per request means one fsync per request. The batcher queues
//! concurrent puts, deletes, txns, lease grants and lease revocations and
//! proposes whatever queued while the previous
//! entries were in flight as one `InternalBatch` entry; apply gives each
//! request its own revision (see `apply::Applier::apply_batch`). A lone
//! request is proposed as itself, so an idle member's log looks as before.
//!
//! Other requests (checkpoints, members, alarms, compaction) bypass the queue:
//! they are rare, and apply handles them one per entry.

use std::sync::Arc;

use keel_proto::keelpb::InternalResponse;
use keel_proto::keelpb::{internal_request::Request, internal_response::Response, InternalBatch, InternalRequest};
use openraft::error::{ClientWriteError, Fatal, RaftError};
use prost::Message;
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::{Command, LogId, MemberNode, NodeId, Raft};

pub type WriteError = RaftError<NodeId, ClientWriteError<NodeId, MemberNode>>;
pub type WriteResult = Result<(InternalResponse, LogId), WriteError>;

/// Most requests in one entry.
const MAX_REQUESTS: usize = 1024;
/// Entries stop growing at this many encoded bytes (a single request may
/// be larger, up to --max-request-bytes).
const MAX_BYTES: usize = 1 << 20;
/// Batches proposed but not yet applied. Two let the next batch reach
/// Raft while the previous one replicates; more would only make batches
/// smaller.
const IN_FLIGHT: usize = 2;
/// Queued requests before callers wait (backpressure).
const QUEUE: usize = 8192;

struct Queued {
    req: InternalRequest,
    reply: oneshot::Sender<WriteResult>,
}

#[derive(Clone)]
pub struct Batcher {
    raft: Raft,
    queue: mpsc::Sender<Queued>,
}

/// Whether `req` may share an entry with others.
fn batchable(req: &InternalRequest) -> bool {
    req.request.as_ref().is_some_and(crate::apply::runs_in_write_txn)
}

/// Proposes one request as its own entry.
async fn write_one(raft: &Raft, req: InternalRequest) -> WriteResult {
    raft.client_write(Command(req)).await.map(|w| (w.data.0, w.log_id))
}

impl Batcher {
    /// Starts the batching task; it ends when every `Batcher` clone is gone.
    pub fn start(raft: Raft) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(raft.clone(), rx));
        Self { raft, queue }
    }

    /// Proposes `req` and returns what applying it produced and its entry's
    /// log id. Same errors as `Raft::client_write`.
    pub async fn write(&self, req: InternalRequest) -> WriteResult {
        if !batchable(&req) {
            return write_one(&self.raft, req).await;
        }
        let (reply, rx) = oneshot::channel();
        if self.queue.send(Queued { req, reply }).await.is_err() {
            return Err(RaftError::Fatal(Fatal::Stopped));
        }
        rx.await.unwrap_or(Err(RaftError::Fatal(Fatal::Stopped)))
    }
}

async fn run(raft: Raft, mut rx: mpsc::Receiver<Queued>) {
    let in_flight = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut carry: Option<Queued> = None;
    loop {
        let first = match carry.take() {
            Some(q) => q,
            None => match rx.recv().await {
                Some(q) => q,
                None => return,
            },
        };
        // Waiting for a slot is what lets a batch grow.
        let Ok(permit) = in_flight.clone().acquire_owned().await else { return };
        let mut bytes = first.req.encoded_len();
        let mut batch = vec![first];
        while batch.len() < MAX_REQUESTS {
            let Ok(next) = rx.try_recv() else { break };
            let len = next.req.encoded_len();
            if bytes + len > MAX_BYTES {
                carry = Some(next);
                break;
            }
            bytes += len;
            batch.push(next);
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            propose(&raft, batch).await;
            drop(permit);
        });
    }
}

async fn propose(raft: &Raft, mut batch: Vec<Queued>) {
    if batch.len() == 1 {
        let Some(q) = batch.pop() else { return };
        let _ = q.reply.send(write_one(raft, q.req).await);
        return;
    }
    let (requests, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|q| (q.req, q.reply)).unzip();
    let entry = InternalRequest { header: None, request: Some(Request::Batch(InternalBatch { requests })) };
    match raft.client_write(Command(entry)).await {
        Ok(written) => {
            let log_id = written.log_id;
            let responses = match written.data.0.response {
                Some(Response::Batch(b)) if b.responses.len() == replies.len() => b.responses,
                other => {
                    // Apply always answers a batch with one response per
                    // request; anything else is a bug, reported to every
                    // caller rather than guessed at.
                    let e = crate::error::Error::Internal(format!("batch entry answered with {other:?}"));
                    let resp = crate::apply::error_response(&e, written.data.0.revision);
                    vec![resp; replies.len()]
                }
            };
            for (reply, resp) in replies.into_iter().zip(responses) {
                let _ = reply.send(Ok((resp, log_id)));
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}
