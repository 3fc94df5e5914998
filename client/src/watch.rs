//! Resumable watches: when a member fails, the watch continues on another
//! one from the revision after the last it delivered, so the stream of
//! events has no gap and no duplicate across failovers.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use keel_proto::etcdserverpb::{
    watch_create_request::FilterType, watch_request::RequestUnion, WatchCreateRequest, WatchProgressRequest,
    WatchRequest,
};
use keel_proto::mvccpb::Event;
use tokio::sync::mpsc;

use crate::client::Client;
use crate::error::Error;

/// What to watch.
#[derive(Debug, Clone, Default)]
pub struct WatchOptions {
    /// Empty: the key alone; "\0": every key from `key`.
    pub range_end: Bytes,
    /// First revision to deliver (0: from now).
    pub start_revision: i64,
    pub prev_kv: bool,
    pub no_put: bool,
    pub no_delete: bool,
    pub progress_notify: bool,
}

impl WatchOptions {
    /// Every key starting with the watched key.
    pub fn prefix(key: &[u8]) -> Self {
        let mut end = key.to_vec();
        while let Some(last) = end.pop() {
            if last < 0xff {
                end.push(last + 1);
                break;
            }
        }
        Self { range_end: Bytes::from(if end.is_empty() { vec![0] } else { end }), ..Default::default() }
    }
}

/// What a watcher delivers.
#[derive(Debug, Clone)]
pub enum WatchEvent {
    /// The events of one or more whole revisions, in order; `revision` is
    /// the response header's.
    Events { revision: i64, events: Vec<Event> },
    /// Everything up to `revision` has been delivered.
    Progress { revision: i64 },
    /// The watch resumed on endpoint `endpoint` after a failure.
    Resumed { endpoint: usize, from_revision: i64 },
    /// History before `compact_revision` is gone; the watch ended.
    Compacted { compact_revision: i64 },
}

/// A running watch; dropping it cancels the watch.
pub struct Watcher {
    rx: mpsc::Receiver<WatchEvent>,
    control: mpsc::UnboundedSender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    /// The next event, or None once the watch ended.
    pub async fn next(&mut self) -> Option<WatchEvent> {
        self.rx.recv().await
    }

    /// Asks for a progress notification (etcd's RequestProgress).
    pub fn request_progress(&self) {
        let _ = self.control.send(());
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn create(key: &Bytes, opts: &WatchOptions, start: i64) -> WatchRequest {
    let mut filters = Vec::new();
    if opts.no_put {
        filters.push(FilterType::Noput as i32);
    }
    if opts.no_delete {
        filters.push(FilterType::Nodelete as i32);
    }
    WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: key.clone(),
            range_end: opts.range_end.clone(),
            start_revision: start,
            progress_notify: opts.progress_notify,
            filters,
            prev_kv: opts.prev_kv,
            ..Default::default()
        })),
    }
}

impl Client {
    /// Watches `key` (see [`WatchOptions`]) with failover.
    pub async fn watch(&self, key: impl Into<Bytes>, opts: WatchOptions) -> Result<Watcher, Error> {
        let key = key.into();
        let (tx, rx) = mpsc::channel(64);
        let (control, mut control_rx) = mpsc::unbounded_channel::<()>();
        let client = self.clone();
        let task = tokio::spawn(async move {
            // Next revision to deliver; 0 until something was delivered.
            let mut next = opts.start_revision;
            let mut endpoint = 0usize;
            let n = client.endpoints().len();
            let mut first = true;
            loop {
                let (req_tx, req_rx) = mpsc::unbounded_channel();
                if req_tx.send(create(&key, &opts, next)).is_err() {
                    return;
                }
                let stream = client
                    .watch_client(endpoint)
                    .watch(tokio_stream::wrappers::UnboundedReceiverStream::new(req_rx))
                    .await;
                let mut stream = match stream {
                    Ok(s) => s.into_inner(),
                    Err(_) => {
                        endpoint = (endpoint + 1) % n;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if !first && tx.send(WatchEvent::Resumed { endpoint, from_revision: next }).await.is_err() {
                    return;
                }
                first = false;
                loop {
                    tokio::select! {
                        msg = stream.next() => {
                            let resp = match msg {
                                Some(Ok(r)) => r,
                                _ => break,
                            };
                            let revision = resp.header.as_ref().map_or(0, |h| h.revision);
                            if resp.compact_revision != 0 {
                                let _ = tx.send(WatchEvent::Compacted { compact_revision: resp.compact_revision }).await;
                                return;
                            }
                            if resp.canceled {
                                break;
                            }
                            if resp.created {
                                // Pin "from now" to a revision, so a resume
                                // after failover misses nothing.
                                if next == 0 {
                                    next = revision + 1;
                                }
                                continue;
                            }
                            let event = if resp.events.is_empty() {
                                next = next.max(revision + 1);
                                WatchEvent::Progress { revision }
                            } else {
                                if let Some(last) = resp.events.last().and_then(|e| e.kv.as_ref()) {
                                    if !resp.fragment {
                                        next = last.mod_revision + 1;
                                    }
                                }
                                WatchEvent::Events { revision, events: resp.events }
                            };
                            if tx.send(event).await.is_err() {
                                return;
                            }
                        }
                        c = control_rx.recv() => {
                            if c.is_none() {
                                return;
                            }
                            let _ = req_tx.send(WatchRequest {
                                request_union: Some(RequestUnion::ProgressRequest(WatchProgressRequest {})),
                            });
                        }
                    }
                }
                // The stream failed: resume on the next member.
                endpoint = (endpoint + 1) % n;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Ok(Watcher { rx, control, task })
    }
}
