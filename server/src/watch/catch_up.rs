//! The catch-up of a stream's watchers that are behind ("unsynced"):
//! MVCC history replayed to them in batches of at most
//! [`CATCH_UP_REVISIONS`] revisions, waiting whenever the stream's queue is
//! over its budget, so a client that does not read costs no memory beyond
//! its budget and no CPU. One loop per stream (gRPC or internal).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use keel_proto::mvccpb::{event::EventType, Event};
use tokio::sync::watch;

use super::hub::{StreamId, WatchHub, STREAM_BUDGET_BYTES};
use crate::error::Error;
use crate::mvcc::MvccStore;

/// Revisions replayed per catch-up batch (etcd's watchBatchMaxRevs).
pub const CATCH_UP_REVISIONS: i64 = 1000;

/// Catches up the unsynced watchers of stream `stream_id` until `stop`
/// fires; `wake` says a watcher became unsynced, `budget_freed` that the
/// stream's queue (`queued` bytes) drained.
pub async fn catch_up_loop(
    mvcc: Arc<MvccStore>,
    hub: Arc<WatchHub>,
    stream_id: StreamId,
    wake: Arc<tokio::sync::Notify>,
    queued: Arc<std::sync::atomic::AtomicUsize>,
    budget_freed: Arc<tokio::sync::Notify>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let behind = hub.unsynced(stream_id);
        if behind.is_empty() {
            tokio::select! {
                _ = wake.notified() => continue,
                _ = stop.changed() => return,
            }
        }
        // Respect the stream's budget: a client that does not read is not
        // fed from history either.
        while queued.load(Ordering::Acquire) >= STREAM_BUDGET_BYTES {
            tokio::select! {
                _ = budget_freed.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = stop.changed() => return,
            }
        }
        let compact_rev = mvcc.compact_rev();
        let mut live = Vec::new();
        for (id, spec, next_rev) in behind {
            if next_rev < compact_rev {
                hub.compacted(stream_id, id, compact_rev);
            } else {
                live.push((id, spec, next_rev));
            }
        }
        let Some(from) = live.iter().map(|(_, _, r)| *r).min() else { continue };
        let current = hub.rev();
        let to = current.min(from + CATCH_UP_REVISIONS - 1);
        let reader = mvcc.clone();
        let history = tokio::task::spawn_blocking(move || reader.history(from, to)).await;
        let events = match history {
            Ok(Ok(events)) => events,
            Ok(Err(Error::Compacted)) => continue,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "reading watch history failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(_) => return,
        };
        for (id, spec, next_rev) in live {
            if next_rev > to {
                // Ahead of this batch (started later); the next pass serves it.
                if next_rev > current {
                    hub.deliver_history(stream_id, id, Vec::new(), next_rev);
                }
                continue;
            }
            let mine: Vec<Event> = events
                .iter()
                .filter(|e| {
                    e.kv.as_ref().is_some_and(|kv| kv.mod_revision >= next_rev)
                        && spec.matches(e.kv.as_ref().map_or(&[][..], |kv| kv.key.as_ref()))
                        && !(e.r#type == EventType::Put as i32 && spec.no_put)
                        && !(e.r#type == EventType::Delete as i32 && spec.no_delete)
                })
                .cloned()
                .collect();
            hub.deliver_history(stream_id, id, mine, to + 1);
        }
    }
}
