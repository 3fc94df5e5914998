//! Shared leadership confirmations for linearizable reads (etcd's
//! `linearizableReadLoop`). Confirming leadership costs a heartbeat round
//! trip to a quorum; every read that arrived before a round started may
//! use that round's read index, so concurrent reads share one round
//! instead of queueing one each.
//!
//! A read must only use a round that began after the read arrived (an
//! earlier round could predate a write the read must see), so requests
//! that arrive while a round is in flight wait for the next one.
//!
//! A follower asks the leader for a read index over the peer link; the
//! same sharing applies there: reads that arrive while a request to the
//! leader is in flight share the next request (which the leader answers
//! from a round that starts after it arrives, so after every read in it).

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::network::PeerClients;
use super::{MemberNode, NodeId, Raft};
use crate::error::{Error, Result};

type Waiter = oneshot::Sender<Result<u64>>;

/// A follower's read waiting for the leader's read index.
struct Forwarded {
    leader: NodeId,
    node: MemberNode,
    deadline: Instant,
    reply: Waiter,
}

#[derive(Clone)]
pub struct ReadIndex {
    queue: mpsc::UnboundedSender<Waiter>,
    forwarded: mpsc::UnboundedSender<Forwarded>,
}

impl ReadIndex {
    /// Starts the confirmation loop and the follower's forwarding loop;
    /// they end when every clone is gone.
    pub fn start(raft: Raft, peers: Arc<PeerClients>) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(raft, rx));
        let (forwarded, rx) = mpsc::unbounded_channel();
        tokio::spawn(forward(peers, rx));
        Self { queue, forwarded }
    }

    /// The read index `leader` gives for a request sent after this call
    /// (on a follower). `NotLeader` when `leader` no longer leads, or the
    /// request went to another member that was believed to lead.
    pub async fn from_leader(&self, leader: NodeId, node: MemberNode, deadline: Instant) -> Result<u64> {
        let (reply, rx) = oneshot::channel();
        self.forwarded.send(Forwarded { leader, node, deadline, reply }).map_err(|_| Error::Stopped)?;
        match tokio::time::timeout_at(deadline.into(), rx).await {
            Ok(r) => r.unwrap_or(Err(Error::Stopped)),
            Err(_) => Err(Error::Timeout),
        }
    }

    /// The log index a linearizable read must wait for, from a leadership
    /// confirmation that started after this call. `NotLeader` on a member
    /// that does not lead.
    pub async fn get(&self) -> Result<u64> {
        let (tx, rx) = oneshot::channel();
        self.queue.send(tx).map_err(|_| Error::Stopped)?;
        rx.await.unwrap_or(Err(Error::Stopped))
    }
}

/// `first` and everything queued behind it: the requests one round serves.
fn with_queued<T>(first: T, rx: &mut mpsc::UnboundedReceiver<T>) -> Vec<T> {
    let mut batch = vec![first];
    while let Ok(next) = rx.try_recv() {
        batch.push(next);
    }
    batch
}

async fn run(raft: Raft, mut rx: mpsc::UnboundedReceiver<Waiter>) {
    while let Some(first) = rx.recv().await {
        let waiters = with_queued(first, &mut rx);
        let result = match raft.get_read_log_id().await {
            Ok((read, _applied)) => Ok(read.map_or(0, |l| l.index)),
            Err(openraft::error::RaftError::APIError(_)) => Err(Error::NotLeader),
            Err(openraft::error::RaftError::Fatal(_)) => Err(Error::Stopped),
        };
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }
}

async fn forward(peers: Arc<PeerClients>, mut rx: mpsc::UnboundedReceiver<Forwarded>) {
    while let Some(first) = rx.recv().await {
        let batch = with_queued(first, &mut rx);
        let leader = batch[0].leader;
        let node = batch[0].node.clone();
        let (same, other): (Vec<Forwarded>, Vec<Forwarded>) = batch.into_iter().partition(|f| f.leader == leader);
        for f in other {
            // Leadership moved while they queued: they look it up again.
            let _ = f.reply.send(Err(Error::NotLeader));
        }
        let deadline = same.iter().map(|f| f.deadline).max().unwrap_or_else(Instant::now);
        let remaining = deadline.saturating_duration_since(Instant::now());
        let result = peers.read_index(leader, &node, remaining).await;
        for f in same {
            let _ = f.reply.send(result.clone());
        }
    }
}
