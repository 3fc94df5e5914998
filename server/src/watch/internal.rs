//! Watches used inside the server (the lock and election recipes wait for
//! keys to be deleted or changed). Same hub, same catch-up from history as
//! a gRPC stream; events are read directly instead of being sent.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use keel_proto::mvccpb::Event;
use tokio::sync::watch;

use super::catch_up::catch_up_loop;
use super::hub::{Outgoing, StreamQueue, WatchHub, WatchSpec};
use crate::error::{Error, Result};
use crate::mvcc::MvccStore;

pub struct InternalWatch {
    hub: Arc<WatchHub>,
    queue: StreamQueue,
    budget_freed: Arc<tokio::sync::Notify>,
    stop: watch::Sender<bool>,
}

impl InternalWatch {
    /// Watches `spec` from revision `start_rev` (0: the next one).
    pub fn start(hub: &Arc<WatchHub>, mvcc: &Arc<MvccStore>, spec: WatchSpec, start_rev: i64) -> Result<Self> {
        let hub = hub.clone();
        let queue = hub.open_stream();
        let (stop, stop_rx) = watch::channel(false);
        let budget_freed = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(catch_up_loop(
            mvcc.clone(),
            hub.clone(),
            queue.id,
            queue.catch_up.clone(),
            queue.queued.clone(),
            budget_freed.clone(),
            stop_rx,
        ));
        let w = Self { hub, queue, budget_freed, stop };
        w.hub.create(w.queue.id, 0, spec, start_rev).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        Ok(w)
    }

    /// The next batch of events with its header revision. Fails with
    /// `Compacted` if the start revision was compacted away.
    pub async fn next(&mut self) -> Result<(i64, Vec<Event>)> {
        loop {
            let msg = self.queue.rx.recv().await.ok_or(Error::Stopped)?;
            self.queue.queued.fetch_sub(msg.bytes(), Ordering::AcqRel);
            self.budget_freed.notify_waiters();
            match msg {
                Outgoing::Events { revision, events, .. } | Outgoing::Shared { revision, events, .. } => {
                    return Ok((revision, events))
                }
                Outgoing::Control { response, .. } if response.compact_revision != 0 => return Err(Error::Compacted),
                Outgoing::Control { .. } => {}
            }
        }
    }
}

impl Drop for InternalWatch {
    fn drop(&mut self) {
        self.hub.close_stream(self.queue.id);
        let _ = self.stop.send(true);
    }
}
