//! Poll before parking: once the runtime's worker has woken for work, it
//! keeps looking for more for a short while before it sleeps again.
//!
//! Why: a write crosses processes four times (client -> leader ->
//! follower -> leader -> client) and each crossing wakes a sleeping
//! thread. When that thread's CPU is idle, a virtual machine has halted
//! it, and the wake costs an exit to the hypervisor and back: 50 us on
//! average on the 2-vCPU benchmark machine (`perf sched latency`), more
//! than the work done at most hops. Go's scheduler, and so etcd, spins
//! briefly before parking for the same reason.
//!
//! How: after every real unpark of a worker, a task yields in a loop until
//! no message has arrived on any of the member's connections for
//! `window`. tokio runs a yielded task again only after polling the I/O
//! driver without blocking, so a message that arrives meanwhile is
//! handled at once, on a CPU that never halted. Each round also yields the
//! CPU to the kernel (`sched_yield`), so any other runnable thread on it,
//! a peer on the same machine included, goes first: without that, the
//! spinning starved the other members on 2 cores and writes got 30%
//! slower; with it, 1-client writes on a 3-member cluster got 30-40%
//! faster (docs/BENCHMARKS.md).
//!
//! Cost: one worker's CPU for `window` after the last message; nothing
//! while the member is idle. `transport::Stream` counts the reads that
//! brought data ([`note_input`]). `KEEL_BUSY_POLL_US` sets the window
//! (0 turns polling off).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// How long a worker keeps polling after the last message, unless
/// `KEEL_BUSY_POLL_US` says otherwise. Long enough to span a follower's
/// flush (the leader waits that long for the acknowledgement) and a
/// client's turnaround between two requests.
const DEFAULT_WINDOW: Duration = Duration::from_micros(300);

/// Reads that brought data, on any connection of the process.
static INPUTS: AtomicU64 = AtomicU64::new(0);

/// Counts a read that brought data.
pub fn note_input() {
    INPUTS.fetch_add(1, Ordering::Relaxed);
}

/// The polling window from `KEEL_BUSY_POLL_US`; `None` when polling is
/// off. An unparsable value is an error, like an invalid flag.
pub fn window_from_env() -> Result<Option<Duration>, String> {
    window_from(std::env::var("KEEL_BUSY_POLL_US").ok().as_deref())
}

fn window_from(microseconds: Option<&str>) -> Result<Option<Duration>, String> {
    match microseconds.map(|v| (v, v.trim().parse::<u64>())) {
        None => Ok(Some(DEFAULT_WINDOW)),
        Some((_, Ok(0))) => Ok(None),
        Some((_, Ok(us))) => Ok(Some(Duration::from_micros(us))),
        Some((v, Err(_))) => Err(format!("invalid KEEL_BUSY_POLL_US {v:?}: want microseconds")),
    }
}

/// The polling task of one runtime; [`BusyPoll::install`] hooks it to the
/// workers' unparks, [`BusyPoll::run`] is spawned on the runtime.
pub struct BusyPoll {
    unparked: Arc<Notify>,
    window: Duration,
}

impl BusyPoll {
    pub fn install(runtime: &mut tokio::runtime::Builder, window: Duration) -> Self {
        let unparked = Arc::new(Notify::new());
        let hook = unparked.clone();
        runtime.on_thread_unpark(move || hook.notify_one());
        Self { unparked, window }
    }

    /// Runs for the runtime's lifetime.
    pub async fn run(self) {
        loop {
            self.unparked.notified().await;
            self.poll_until_quiet().await;
        }
    }

    async fn poll_until_quiet(&self) {
        let mut quiet = Quiet::new(Instant::now(), INPUTS.load(Ordering::Relaxed));
        while !quiet.for_longer_than(self.window, Instant::now(), INPUTS.load(Ordering::Relaxed)) {
            tokio::task::yield_now().await;
            std::thread::yield_now();
        }
    }
}

/// Since when the input count has not changed.
struct Quiet {
    since: Instant,
    inputs: u64,
}

impl Quiet {
    fn new(now: Instant, inputs: u64) -> Self {
        Self { since: now, inputs }
    }

    /// Whether no input has arrived for longer than `window`, given the
    /// input count `inputs` at `now`.
    fn for_longer_than(&mut self, window: Duration, now: Instant, inputs: u64) -> bool {
        if inputs != self.inputs {
            self.inputs = inputs;
            self.since = now;
        }
        now.duration_since(self.since) > window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_only_after_a_whole_window_without_input() {
        let window = Duration::from_micros(300);
        let t0 = Instant::now();
        let at = |us| t0 + Duration::from_micros(us);
        let mut quiet = Quiet::new(t0, 7);
        assert!(!quiet.for_longer_than(window, at(200), 7));
        // Input at 250 us restarts the window.
        assert!(!quiet.for_longer_than(window, at(250), 8));
        assert!(!quiet.for_longer_than(window, at(500), 8));
        assert!(quiet.for_longer_than(window, at(551), 8));
        // And again, however late it comes.
        assert!(!quiet.for_longer_than(window, at(10_000), 9));
        assert!(quiet.for_longer_than(window, at(10_301), 9));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn polling_stops_once_no_input_arrives() {
        let poll = BusyPoll { unparked: Arc::new(Notify::new()), window: Duration::from_millis(5) };
        // Spawned, to poll on the worker as in a member.
        let polling = tokio::spawn(async move { poll.poll_until_quiet().await });
        let done = tokio::time::timeout(Duration::from_secs(10), polling).await;
        assert!(matches!(done, Ok(Ok(()))), "polling without input did not stop: {done:?}");
    }

    #[test]
    fn the_window_is_in_microseconds_and_zero_turns_polling_off() {
        assert_eq!(window_from(None), Ok(Some(DEFAULT_WINDOW)));
        assert_eq!(window_from(Some("0")), Ok(None));
        assert_eq!(window_from(Some("250")), Ok(Some(Duration::from_micros(250))));
        assert!(window_from(Some("soon")).is_err());
        assert!(window_from(Some("-1")).is_err());
    }
}
