//! Poll before parking: once the runtime's worker has woken for data, it
//! keeps looking for more for a short while before it sleeps again.
//!
//! Why: a write crosses processes four times (client -> leader ->
//! follower -> leader -> client) and each crossing wakes a sleeping
//! thread. When that thread's CPU is idle, a virtual machine has halted
//! it, and the wake costs an exit to the hypervisor and back, more than
//! the work done at most hops (measured in docs/BENCHMARKS.md, "Figures
//! behind design choices"). Go's scheduler, and so etcd, spins
//! briefly before parking for the same reason.
//!
//! How: after a wake of the worker that brought data, a task yields in a
//! loop until no read on any of the process's connections has brought
//! data for `window`. With one worker, tokio runs a yielded task again
//! only after polling the I/O driver without blocking, so a message that
//! arrives meanwhile is handled at once, on a CPU that never halted. Each
//! round, once the tasks that were ready have run, the task also yields
//! the CPU to the kernel (`sched_yield`), so any other runnable thread on
//! it, a peer on the same machine included, goes next: without that, the
//! polling starved the other members on 2 cores and writes got slower;
//! with it, single-client writes on a 3-member cluster got faster
//! (docs/BENCHMARKS.md).
//!
//! Only with one worker, by default: with several, a worker that is
//! polling rarely gets the I/O driver (a parked worker holds it), so the
//! wake it is meant to save still happens. `KEEL_BUSY_POLL_US` sets the
//! window whatever the worker count (0 turns polling off).
//!
//! Cost: the worker's CPU for `window` after the last data, following
//! every wake that brought some (each heartbeat, on an idle cluster).
//! `transport::Stream` counts the reads ([`note_read_with_data`]).

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// How long a worker keeps polling after the last data. Long enough to
/// span a follower's flush (the leader waits that long for the
/// acknowledgement) and a client's turnaround between two requests.
const DEFAULT_WINDOW: Duration = Duration::from_micros(300);

/// Reads that brought data, on any connection of the process, counted
/// once polling is installed.
static READS_WITH_DATA: AtomicU64 = AtomicU64::new(0);

/// Whether [`BusyPoll::install`] ran: without polling nobody reads the
/// count, and every socket read of every thread would otherwise write the
/// same cache line.
static COUNTING: AtomicBool = AtomicBool::new(false);

/// Counts a read that brought data.
pub fn note_read_with_data() {
    if COUNTING.load(Ordering::Relaxed) {
        READS_WITH_DATA.fetch_add(1, Ordering::Relaxed);
    }
}

/// The polling window for a runtime of `workers` worker threads:
/// `KEEL_BUSY_POLL_US` if set (0: off), else [`DEFAULT_WINDOW`] with one
/// worker and off with more. An unusable value is an error, like an
/// invalid flag.
pub fn window_from_env(workers: usize) -> Result<Option<Duration>, String> {
    let value = match std::env::var_os("KEEL_BUSY_POLL_US") {
        None => None,
        Some(v) => Some(v.into_string().map_err(|v| format!("invalid KEEL_BUSY_POLL_US {v:?}: not UTF-8"))?),
    };
    window_from(value.as_deref(), workers)
}

fn window_from(microseconds: Option<&str>, workers: usize) -> Result<Option<Duration>, String> {
    let Some(v) = microseconds.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok((workers == 1).then_some(DEFAULT_WINDOW));
    };
    match v.parse::<u64>() {
        Ok(0) => Ok(None),
        Ok(us) => Ok(Some(Duration::from_micros(us))),
        Err(_) => Err(format!("invalid KEEL_BUSY_POLL_US {v:?}: want microseconds")),
    }
}

/// The polling task of one runtime; [`BusyPoll::install`] hooks it to the
/// workers' wakes, [`BusyPoll::run`] is spawned on the runtime.
pub struct BusyPoll {
    woken: Arc<Notify>,
    window: Duration,
    reads: &'static AtomicU64,
    /// Polling rounds so far, for tests to see polling start and stop.
    rounds: Arc<AtomicU64>,
}

impl BusyPoll {
    /// Hooks polling to `runtime`'s worker wakes. It takes the runtime's
    /// one `on_thread_unpark` callback, replacing any set before.
    pub fn install(runtime: &mut tokio::runtime::Builder, window: Duration) -> Self {
        COUNTING.store(true, Ordering::Relaxed);
        Self::install_counting(runtime, window, &READS_WITH_DATA)
    }

    fn install_counting(runtime: &mut tokio::runtime::Builder, window: Duration, reads: &'static AtomicU64) -> Self {
        let poll = Self::new(window, reads);
        let woken = poll.woken.clone();
        runtime.on_thread_unpark(move || woken.notify_one());
        poll
    }

    fn new(window: Duration, reads: &'static AtomicU64) -> Self {
        Self { woken: Arc::new(Notify::new()), window, reads, rounds: Arc::new(AtomicU64::new(0)) }
    }

    /// Runs for the runtime's lifetime.
    pub async fn run(self) {
        let mut seen = self.reads.load(Ordering::Relaxed);
        loop {
            self.woken.notified().await;
            // The tasks this wake made ready read their data first.
            yield_behind_ready_tasks().await;
            if self.reads.load(Ordering::Relaxed) == seen {
                // A timer or a thread of this process woke the worker:
                // nothing suggests more messages are on their way.
                continue;
            }
            self.poll_until_quiet().await;
            seen = self.reads.load(Ordering::Relaxed);
        }
    }

    async fn poll_until_quiet(&self) {
        let mut quiet = Quiet::new(Instant::now(), self.reads.load(Ordering::Relaxed));
        loop {
            quiet.observe(Instant::now(), self.reads.load(Ordering::Relaxed));
            if quiet.longer_than(self.window, Instant::now()) {
                return;
            }
            self.rounds.fetch_add(1, Ordering::Relaxed);
            // Polls the I/O driver without blocking, then resumes this
            // task ahead of the ones the poll made ready...
            tokio::task::yield_now().await;
            // ...so step behind them before giving the CPU away.
            yield_behind_ready_tasks().await;
            std::thread::yield_now();
        }
    }
}

/// Lets every task that is ready run before this one continues. A task
/// that wakes itself while it runs goes to the back of tokio's run queue
/// (`tokio::task::yield_now` instead comes back first, after polling the
/// driver).
async fn yield_behind_ready_tasks() {
    let mut yielded = false;
    poll_fn(|cx| {
        if yielded {
            return Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await;
}

/// Since when the read count has not changed.
struct Quiet {
    since: Instant,
    reads: u64,
}

impl Quiet {
    fn new(now: Instant, reads: u64) -> Self {
        Self { since: now, reads }
    }

    /// Records the read count seen at `now`.
    fn observe(&mut self, now: Instant, reads: u64) {
        if reads != self.reads {
            self.reads = reads;
            self.since = now;
        }
    }

    /// Whether, at `now`, no data has been read for longer than `window`.
    fn longer_than(&self, window: Duration, now: Instant) -> bool {
        now.duration_since(self.since) > window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_only_after_a_whole_window_without_data() {
        let window = Duration::from_micros(300);
        let t0 = Instant::now();
        let at = |us| t0 + Duration::from_micros(us);
        let mut quiet = Quiet::new(t0, 7);
        quiet.observe(at(200), 7);
        assert!(!quiet.longer_than(window, at(200)));
        // Data at 250 us restarts the window.
        quiet.observe(at(250), 8);
        assert!(!quiet.longer_than(window, at(500)));
        assert!(quiet.longer_than(window, at(551)));
        // And again, however late it comes.
        quiet.observe(at(10_000), 9);
        assert!(!quiet.longer_than(window, at(10_000)));
        assert!(quiet.longer_than(window, at(10_301)));
    }

    #[test]
    fn one_worker_polls_by_default_and_the_variable_decides_otherwise() {
        assert_eq!(window_from(None, 1), Ok(Some(DEFAULT_WINDOW)));
        assert_eq!(window_from(None, 3), Ok(None));
        assert_eq!(window_from(Some(""), 1), Ok(Some(DEFAULT_WINDOW)));
        assert_eq!(window_from(Some("0"), 1), Ok(None));
        assert_eq!(window_from(Some("250"), 3), Ok(Some(Duration::from_micros(250))));
        assert!(window_from(Some("soon"), 1).is_err());
        assert!(window_from(Some("-1"), 1).is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn data_keeps_the_worker_polling_until_a_window_passes_without_any() {
        static READS: AtomicU64 = AtomicU64::new(0);
        let window = Duration::from_millis(50);
        let poll = BusyPoll::new(window, &READS);
        let polling = tokio::spawn(async move { poll.poll_until_quiet().await });
        // Data every 5 ms for 200 ms, four windows. The sleeps are
        // timers, so this also shows timers fire while the worker polls.
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(5)).await;
            assert!(!polling.is_finished(), "polling stopped while data kept arriving");
            READS.fetch_add(1, Ordering::Relaxed);
        }
        let last_data = Instant::now();
        let done = tokio::time::timeout(Duration::from_secs(10), polling).await;
        assert!(matches!(done, Ok(Ok(()))), "polling did not stop once the data did: {done:?}");
        assert!(last_data.elapsed() >= window, "polling stopped {:?} after the last data", last_data.elapsed());
    }

    #[test]
    fn a_wake_with_data_starts_polling_and_a_quiet_runtime_stops_it() {
        static READS: AtomicU64 = AtomicU64::new(0);
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(1).enable_all();
        let poll = BusyPoll::install_counting(&mut builder, Duration::from_millis(1), &READS);
        let rounds = poll.rounds.clone();
        let runtime = builder.build().expect("a runtime");
        runtime.spawn(poll.run());
        // Let the worker park, so the spawn below wakes it.
        std::thread::sleep(Duration::from_millis(100));
        // A wake without data (a task spawned from outside): no polling.
        runtime.block_on(async { tokio::spawn(async {}).await.expect("the task runs") });
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(rounds.load(Ordering::Relaxed), 0, "a wake without data started polling");
        // A wake with data: a task "reads" it, as a connection would.
        runtime.block_on(async {
            tokio::spawn(async {
                READS.fetch_add(1, Ordering::Relaxed);
            })
            .await
            .expect("the task runs")
        });
        std::thread::sleep(Duration::from_millis(100));
        let after_data = rounds.load(Ordering::Relaxed);
        assert!(after_data > 0, "a wake with data did not start polling");
        // Nothing more arrives: polling stopped well within 100 ms.
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(rounds.load(Ordering::Relaxed), after_data, "polling went on without data");
    }
}
