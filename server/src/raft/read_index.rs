//! Shared leadership confirmations for linearizable reads (etcd's
//! `linearizableReadLoop`). Confirming leadership costs a heartbeat round
//! trip to a quorum; every read that arrived before a round started may
//! use that round's read index, so concurrent reads share one round
//! instead of queueing one each.
//!
//! A read must only use a round that began after the read arrived (an
//! earlier round could predate a write the read must see), so requests
//! that arrive while a round is in flight wait for the next one.

use tokio::sync::{mpsc, oneshot};

use super::Raft;
use crate::error::{Error, Result};

type Waiter = oneshot::Sender<Result<u64>>;

#[derive(Clone)]
pub struct ReadIndex {
    queue: mpsc::UnboundedSender<Waiter>,
}

impl ReadIndex {
    /// Starts the confirmation loop; it ends when every clone is gone.
    pub fn start(raft: Raft) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(raft, rx));
        Self { queue }
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

async fn run(raft: Raft, mut rx: mpsc::UnboundedReceiver<Waiter>) {
    while let Some(first) = rx.recv().await {
        let mut waiters = vec![first];
        while let Ok(w) = rx.try_recv() {
            waiters.push(w);
        }
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
