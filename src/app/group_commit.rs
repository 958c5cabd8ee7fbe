//! Group commit: concurrent single-event writes share one transaction.
//!
//! Many producers call `RecordEvent` one event at a time. A transaction per event pays a
//! commit (a WAL flush) and half a dozen statements each; here callers queue their event, and
//! one flusher writes what has queued as one batch: when `max_events` are waiting, or
//! `window` after the first of them arrived. Each caller is answered only once the
//! transaction holding its event has committed.
//!
//! * A caller's own bad event fails only that caller: a batch refused for events of another
//!   owner's campaign or a legacy count past its column is split, the callers of the
//!   refused events get their error, and the rest are written again without them. Any other
//!   refusal of a batch of several is retried one event at a time, so that each caller gets
//!   its own answer.
//! * A batch that fails because the database is unreachable or slow fails every caller in
//!   it with a retryable error: nothing of it was committed, and a retry counts once (the
//!   idempotency key, if any, says so).
//! * The queue is bounded (in events): past the bound, callers are refused at once.
//! * At shutdown the flusher writes everything queued before it stops.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};

use super::Jobs;
use crate::domain::Event;
use crate::storage::{EventStore, StorageError};
use crate::telemetry::ServerMetrics;

/// How the queue of single-event writes is drained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupCommitSettings {
    /// Most events one transaction takes.
    pub max_events: usize,
    /// How long the first queued event waits for others before its batch is written.
    pub window: Duration,
    /// Most events queued (waiting or being written) at once; past it, callers are refused.
    pub queue_events: usize,
    /// Groups written at once (each in its own transaction): while one commits, the next
    /// gathers and writes.
    pub flushers: usize,
}

impl Default for GroupCommitSettings {
    fn default() -> Self {
        Self {
            max_events: 256,
            window: Duration::ZERO,
            queue_events: 16_384,
            flushers: 2,
        }
    }
}

/// Why a queued write was not acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The caller's own event was refused (another user's campaign, a legacy count past its
    /// column, a total out of range, …), or a batch of this one event failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The batch holding the event failed for a reason that may pass (the database was
    /// unreachable or slow); nothing of it was stored.
    #[error("the write failed and may be retried: {0}")]
    Retry(String),
    /// Too many events are queued already.
    #[error("too many writes are queued ({0} events); retry later")]
    QueueFull(usize),
    /// The server is shutting down.
    #[error("the server is shutting down; retry on another replica")]
    ShuttingDown,
}

/// One caller's queued event and where its answer goes.
struct Pending {
    event: Event,
    answer: oneshot::Sender<Result<bool, IngestError>>,
    /// The event's place in the queue, given back once it is answered (or dropped).
    _place: Place,
}

/// A place in the queue: counted in the queue's gauge while held.
struct Place {
    _room: OwnedSemaphorePermit,
    queued: Gauge,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.queued.dec();
    }
}

/// The queue of single-event writes of one server; cheap to clone.
#[derive(Debug, Clone)]
pub struct GroupCommit {
    queue: mpsc::UnboundedSender<Pending>,
    /// Turns `true` when the server begins to shut down: from then on, nothing waits for a
    /// window, so that calls in flight are answered at once.
    hurry: Arc<watch::Sender<bool>>,
    room: Arc<Semaphore>,
    queued: Gauge,
    settings: GroupCommitSettings,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("event", &self.event)
            .finish()
    }
}

impl GroupCommit {
    /// Starts the flusher as a job of `jobs` (stopped, after writing what is queued, when the
    /// jobs are).
    pub fn start<S: EventStore>(
        store: Arc<S>,
        settings: GroupCommitSettings,
        jobs: &Jobs,
        metrics: Arc<ServerMetrics>,
    ) -> Self {
        let (queue, waiting) = mpsc::unbounded_channel();
        let waiting = Arc::new(tokio::sync::Mutex::new(waiting));
        let queued = metrics.group_commit_queued();
        let (hurry, hurried) = watch::channel(false);
        for _ in 0..settings.flushers.max(1) {
            let (store, waiting) = (Arc::clone(&store), Arc::clone(&waiting));
            let (metrics, hurried) = (Arc::clone(&metrics), hurried.clone());
            jobs.spawn(move |stop| flush(store, waiting, settings, metrics, hurried, stop));
        }
        Self {
            queue,
            hurry: Arc::new(hurry),
            room: Arc::new(Semaphore::new(settings.queue_events)),
            queued,
            settings,
        }
    }

    /// Writes what is queued without waiting for windows any more: the server is shutting
    /// down, and its calls in flight should end soon.
    pub fn hurry(&self) {
        self.hurry.send_replace(true);
    }

    /// Queues `event` and waits until the transaction holding it has committed. Answers
    /// whether the event was a duplicate (its idempotency key seen before).
    pub async fn record(&self, event: Event) -> Result<bool, IngestError> {
        let room = Arc::clone(&self.room)
            .try_acquire_owned()
            .map_err(|_| IngestError::QueueFull(self.settings.queue_events))?;
        self.queued.inc();
        let place = Place {
            _room: room,
            queued: self.queued.clone(),
        };
        let (answer, answered) = oneshot::channel();
        self.queue
            .send(Pending {
                event,
                answer,
                _place: place,
            })
            .map_err(|_| IngestError::ShuttingDown)?;
        // A flusher that stopped without answering dropped the event unwritten.
        answered.await.unwrap_or(Err(IngestError::ShuttingDown))
    }
}

/// One flusher: takes what has queued (one flusher at a time), writes it, answers; at `stop`,
/// writes what is still queued and ends.
async fn flush<S: EventStore>(
    store: Arc<S>,
    waiting: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Pending>>>,
    settings: GroupCommitSettings,
    metrics: Arc<ServerMetrics>,
    mut hurried: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    // Writes a batch (if any), counted in the batch-size metric.
    let commit = |batch: Vec<Pending>| {
        let (store, metrics) = (Arc::clone(&store), Arc::clone(&metrics));
        async move {
            if !batch.is_empty() {
                metrics.observe_batch(batch.len());
                write(store.as_ref(), batch).await;
            }
        }
    };
    loop {
        let batch = {
            let mut waiting = waiting.lock().await;
            let first = tokio::select! {
                biased;
                next = waiting.recv() => match next {
                    Some(first) => first,
                    None => return,
                },
                _ = stop.wait_for(|stopped| *stopped) => break,
            };
            gather(first, &mut waiting, &settings, &mut hurried).await
        };
        commit(batch).await;
    }
    // Shutdown: no new call is taken any more (the server has stopped serving); write what
    // is left, then refuse the stragglers by closing the queue.
    let mut waiting = waiting.lock().await;
    waiting.close();
    let mut left = Vec::new();
    while let Some(pending) = waiting.recv().await {
        left.push(pending);
        if left.len() == settings.max_events {
            commit(std::mem::take(&mut left)).await;
        }
    }
    commit(left).await;
}

/// A batch: `first`, and what else queues within the window (cut short by `hurried`), up to
/// `max_events`.
async fn gather(
    first: Pending,
    waiting: &mut mpsc::UnboundedReceiver<Pending>,
    settings: &GroupCommitSettings,
    hurried: &mut watch::Receiver<bool>,
) -> Vec<Pending> {
    let mut batch = Vec::with_capacity(settings.max_events.min(64));
    batch.push(first);
    let deadline = tokio::time::Instant::now() + settings.window;
    while batch.len() < settings.max_events {
        if let Ok(next) = waiting.try_recv() {
            batch.push(next);
            continue;
        }
        let next = tokio::select! {
            next = tokio::time::timeout_at(deadline, waiting.recv()) => next,
            _ = hurried.wait_for(|hurry| *hurry) => break,
        };
        match next {
            Ok(Some(next)) => batch.push(next),
            Ok(None) | Err(_) => break,
        }
    }
    batch
}

/// Writes `batch` in one transaction and answers each caller; see the module docs for how a
/// refused batch is split.
async fn write<S: EventStore>(store: &S, mut batch: Vec<Pending>) {
    while !batch.is_empty() {
        let events: Vec<Event> = batch.iter().map(|p| p.event.clone()).collect();
        let error = match store.record_events_each(&events).await {
            Ok(duplicates) => {
                for (pending, duplicate) in batch.into_iter().zip(duplicates) {
                    let _ = pending.answer.send(Ok(duplicate));
                }
                return;
            }
            Err(error) => error,
        };
        if let [_] = batch.as_slice() {
            if let Some(pending) = batch.pop() {
                let _ = pending.answer.send(Err(IngestError::Storage(error)));
            }
            return;
        }
        match error {
            // Ownership is the event's own: refuse those callers, write the others.
            StorageError::CampaignOwnedByAnotherUser(foreign) => {
                let (refused, rest) = take_positions(batch, foreign.iter().map(|(i, _)| *i));
                for (position, pending) in refused {
                    let own = foreign
                        .iter()
                        .filter(|(i, _)| *i == position)
                        .map(|(_, campaign)| (0, campaign.clone()))
                        .collect();
                    let _ = pending.answer.send(Err(IngestError::Storage(
                        StorageError::CampaignOwnedByAnotherUser(own),
                    )));
                }
                batch = rest;
            }
            // A legacy count may pass its column only because neighbours add to it too:
            // the events named are written one at a time, the others together.
            StorageError::LegacyOverflow(overflows) => {
                let named = overflows.iter().flat_map(|o| o.events.iter().copied());
                let (alone, rest) = take_positions(batch, named);
                Box::pin(write(store, rest)).await;
                for (_, pending) in alone {
                    Box::pin(write(store, vec![pending])).await;
                }
                return;
            }
            error if error.is_retryable() => {
                tracing::warn!(%error, events = batch.len(), "a group commit failed; its callers may retry");
                let why = error.to_string();
                answer(batch, || IngestError::Retry(why.clone()));
                return;
            }
            // No event the refusal names: each event on its own, so that each caller gets
            // its own answer.
            _ => {
                for pending in batch {
                    Box::pin(write(store, vec![pending])).await;
                }
                return;
            }
        }
    }
}

/// Splits `batch` into the callers at `positions` (with their position) and the rest, in
/// order.
fn take_positions(
    batch: Vec<Pending>,
    positions: impl IntoIterator<Item = usize>,
) -> (Vec<(usize, Pending)>, Vec<Pending>) {
    let positions: std::collections::BTreeSet<usize> = positions.into_iter().collect();
    let (taken, rest): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .enumerate()
        .partition(|(i, _)| positions.contains(i));
    (
        taken,
        rest.into_iter().map(|(_, pending)| pending).collect(),
    )
}

/// Answers every caller in `batch` with an error made by `error`.
fn answer(batch: Vec<Pending>, mut error: impl FnMut() -> IngestError) {
    for pending in batch {
        let _ = pending.answer.send(Err(error()));
    }
}
