//! The supervisor of every long-lived task of one server, so that shutdown stops each at a
//! known point, in two stages:
//!
//! 1. [`Jobs::drain`], when shutdown begins: tasks that only serve callers end. Health checks
//!    ([`Jobs::spawn_serving`]) stop, and open watch streams ([`Jobs::until_drained`]) end
//!    with [`AppError::ShuttingDown`], so that the server's graceful stop waits only for real
//!    work.
//! 2. [`Jobs::stop`], once no call is in flight: background work ([`Jobs::spawn`]) finishes
//!    its current step (the write queue writes what is queued; a backfill stops after its
//!    batch and resumes on the next start).

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::AppError;

/// The long-lived tasks of one server; clones share them.
#[derive(Debug, Clone, Default)]
pub struct Jobs {
    serving: Stage,
    background: Stage,
}

/// Tasks stopped together, and the signal that stops them.
#[derive(Debug, Clone)]
struct Stage {
    stop: watch::Sender<bool>,
    tasks: Arc<Mutex<JoinSet<()>>>,
}

impl Default for Stage {
    fn default() -> Self {
        Self {
            stop: watch::channel(false).0,
            tasks: Arc::new(Mutex::new(JoinSet::new())),
        }
    }
}

impl Stage {
    fn spawn<F>(&self, job: impl FnOnce(watch::Receiver<bool>) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let future = job(self.stop.subscribe());
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        // Forget finished tasks so the set does not grow.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(future);
    }

    /// Signals the stage's tasks and waits for them, at most `grace`; true if all ended.
    async fn stop(&self, grace: Duration) -> bool {
        self.stop.send_replace(true);
        let mut tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        let all_done = async { while tasks.join_next().await.is_some() {} };
        tokio::time::timeout(grace, all_done).await.is_ok()
    }
}

impl Jobs {
    /// Runs background work; `job` gets a receiver that turns `true` at [`Jobs::stop`].
    pub fn spawn<F>(&self, job: impl FnOnce(watch::Receiver<bool>) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.background.spawn(job);
    }

    /// Runs a task that only serves callers (a health check); `job` gets a receiver that turns
    /// `true` at [`Jobs::drain`].
    pub fn spawn_serving<F>(&self, job: impl FnOnce(watch::Receiver<bool>) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.serving.spawn(job);
    }

    /// `stream`'s items until [`Jobs::drain`]; then one [`AppError::ShuttingDown`], so that a
    /// watcher knows to watch again on another replica.
    pub fn until_drained<T: Send + 'static>(
        &self,
        stream: impl Stream<Item = Result<T, AppError>> + Send + 'static,
    ) -> impl Stream<Item = Result<T, AppError>> + Send + 'static {
        let mut until = self.serving.stop.subscribe();
        let draining = self.serving.stop.subscribe();
        stream
            .take_until(async move {
                let _ = until.wait_for(|stop| *stop).await;
            })
            .chain(
                futures::stream::once(async move { *draining.borrow() }).filter_map(
                    |drained| async move { drained.then_some(Err(AppError::ShuttingDown)) },
                ),
            )
    }

    /// Shutdown begins: stops the serving tasks and ends watch streams, waiting for the tasks
    /// at most `grace`.
    pub async fn drain(&self, grace: Duration) {
        if !self.serving.stop(grace).await {
            tracing::warn!("serving tasks still going after the grace period are aborted");
        }
    }

    /// Asks all background work to stop after its current step and waits for it, at most
    /// `grace`.
    pub async fn stop(&self, grace: Duration) {
        self.drain(grace).await;
        if !self.background.stop(grace).await {
            tracing::warn!("background runs still going after the grace period are aborted");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_watch_ends_with_shutting_down_when_draining_begins() {
        let jobs = Jobs::default();
        let endless = futures::stream::repeat_with(|| Ok::<u32, AppError>(1)).then(|item| async {
            tokio::task::yield_now().await;
            item
        });
        let mut watch = Box::pin(jobs.until_drained(endless));
        assert!(matches!(watch.next().await, Some(Ok(1))));
        jobs.drain(Duration::from_secs(1)).await;
        let rest: Vec<_> = watch.collect().await;
        assert!(
            matches!(rest.last(), Some(Err(AppError::ShuttingDown))),
            "{rest:?}"
        );
    }

    #[tokio::test]
    async fn a_stream_that_ends_by_itself_ends_without_an_error() {
        let jobs = Jobs::default();
        let items: Vec<_> = jobs
            .until_drained(futures::stream::iter([Ok::<u32, AppError>(1), Ok(2)]))
            .collect()
            .await;
        assert_eq!(items.len(), 2);
        assert!(items.iter().all(Result::is_ok));
    }

    #[tokio::test]
    async fn background_work_outlives_draining_and_stops_at_stop() {
        let jobs = Jobs::default();
        let (ended, mut ended_rx) = watch::channel(false);
        jobs.spawn(move |mut stop| async move {
            let _ = stop.wait_for(|stop| *stop).await;
            ended.send_replace(true);
        });
        jobs.drain(Duration::from_secs(1)).await;
        assert!(!*ended_rx.borrow());
        jobs.stop(Duration::from_secs(1)).await;
        assert!(*ended_rx.borrow_and_update());
    }
}
