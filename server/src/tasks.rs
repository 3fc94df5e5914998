//! The tasks of one member, so that shutdown knows them all: it stops
//! them with one signal and waits for every one of them to end (with a
//! bound), instead of sleeping a fixed time and aborting.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;

#[derive(Clone, Default)]
pub struct MemberTasks {
    stop: CancellationToken,
    tracker: TaskTracker,
}

impl MemberTasks {
    pub fn new() -> Self {
        Self::default()
    }

    /// Spawns a task that ends by itself once [`MemberTasks::stopped`]
    /// fires (a listener, a connection closing gracefully).
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(task);
    }

    /// Spawns a loop that runs until the member stops, and is dropped at
    /// its next await point then (the duties, the metrics refresher).
    pub fn spawn_until_stopped<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let stop = self.stop.clone();
        self.tracker.spawn(async move {
            stop.run_until_cancelled(task).await;
        });
    }

    /// Resolves once the member is stopping.
    pub fn stopped(&self) -> WaitForCancellationFuture<'_> {
        self.stop.cancelled()
    }

    /// The stop signal, for a task that outlives this borrow.
    pub fn stop_signal(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Signals every task to stop and waits up to `grace` for all of them
    /// to end; returns how many were still running then.
    pub async fn stop(&self, grace: Duration) -> usize {
        self.stop.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait()).await.is_err() {
            return self.tracker.len();
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn stop_waits_for_tasks_to_finish_their_cleanup() {
        let tasks = MemberTasks::new();
        let cleaned_up = Arc::new(AtomicBool::new(false));
        let flag = cleaned_up.clone();
        let stop = tasks.stop_signal();
        tasks.spawn(async move {
            stop.cancelled().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            flag.store(true, Ordering::SeqCst);
        });
        tasks.spawn_until_stopped(std::future::pending());
        assert_eq!(tasks.stop(Duration::from_secs(10)).await, 0);
        assert!(cleaned_up.load(Ordering::SeqCst), "stop returned before the task cleaned up");
    }

    #[tokio::test]
    async fn stop_gives_up_after_the_grace_period() {
        let tasks = MemberTasks::new();
        tasks.spawn(std::future::pending());
        assert_eq!(tasks.stop(Duration::from_millis(20)).await, 1);
    }
}
