//! Watch: every committed change reaches every matching watcher, in
//! revision order, exactly once, without letting a slow client stall the
//! apply loop or other watchers.
//!
//! - [`hub`]: the member-wide registry. The apply loop hands it each
//!   committed revision; watchers that are caught up ("synced") get the
//!   revision's events at once, through their stream's bounded queue.
//! - [`catch_up`]: catches up a stream's watchers that are behind
//!   ("unsynced") from MVCC history, in batches, only as fast as the
//!   client reads.
//! - [`internal`]: watches inside the member (the lock and election
//!   recipes). A gRPC Watch stream is `api::watch_session`: create /
//!   cancel / progress requests, queued events turned into responses
//!   (prev_kv, fragments).
//! - [`response`]: responses as they leave the member; a revision going to
//!   many watchers of a stream is encoded once, not once per watcher.
//!
//! A watcher is synced or unsynced, never both: the hub delivers only to
//! synced ones, the catch-up loop only to unsynced ones, and the switch
//! happens under the hub lock at a revision boundary. That is what makes
//! delivery gap-free and duplicate-free.

pub mod catch_up;
pub mod hub;
pub mod internal;
pub mod response;

pub use hub::WatchHub;
