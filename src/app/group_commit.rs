//! Group commit: concurrent writes share one transaction.
//!
//! Many producers call `RecordEvent` one event at a time. A transaction per event pays a
//! commit (a WAL flush) and several statements each; here callers queue their events, and a
//! flusher writes what has queued as one batch: when `max_events` are waiting, or `window`
//! after the first of them arrived. `RecordEvents` batches and `StreamEvents` chunks take the
//! same queue, as one caller each whose events are written all or none. Each caller is
//! answered only once the transaction holding its events has committed.
//!
//! * A caller's own bad event fails only that caller: a batch refused for events of another
//!   owner's campaign or a legacy count past its column is split, the callers of the
//!   refused events get their error, and the rest are written again without them. Any other
//!   refusal of a batch of several callers is retried one caller at a time, so that each
//!   gets its own answer.
//! * A batch that fails because the database is unreachable or slow fails every caller in
//!   it with a retryable error: nothing of it was committed, and a retry counts once (the
//!   idempotency key, if any, says so).
//! * The queue is bounded (in events): past the bound, callers are refused at once.
//! * At shutdown the flushers write everything queued before they stop.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};

use super::{AppError, Jobs};
use crate::domain::{CampaignId, Event};
use crate::storage::{Backend, EventStore, Refusal, StorageError};
use crate::telemetry::ServerMetrics;

/// How the queue of single-event writes is drained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupCommitSettings {
    /// Most events one transaction takes.
    pub max_events: usize,
    /// How long the first queued event waits for others before its batch is written.
    pub window: Duration,
    /// Most events queued (waiting or being written) at once; past it, callers are refused.
    /// A caller with more events than this takes the whole queue.
    pub queue_events: usize,
    /// Groups written at once (each in its own transaction): while one commits, the next
    /// gathers and writes.
    pub flushers: usize,
}

impl GroupCommitSettings {
    /// The defaults (measured: README, "Ingest"), in one place.
    pub const DEFAULT: Self = Self {
        max_events: 256,
        window: Duration::ZERO,
        queue_events: 65_536,
        flushers: 2,
    };

    /// Flushers that suit `backend`: PostgreSQL commits several transactions side by side;
    /// SQLite's one writer takes them in turn.
    pub fn flushers_for(backend: Backend) -> usize {
        match backend {
            Backend::Postgres => 4,
            Backend::Sqlite => Self::DEFAULT.flushers,
        }
    }
}

impl Default for GroupCommitSettings {
    fn default() -> Self {
        Self::DEFAULT
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

impl From<IngestError> for AppError {
    fn from(error: IngestError) -> Self {
        match error {
            IngestError::Storage(error) => error.into(),
            IngestError::Retry(why) => AppError::Unavailable(why),
            IngestError::QueueFull(events) => AppError::QueueFull(events),
            IngestError::ShuttingDown => AppError::ShuttingDown,
        }
    }
}

/// One caller's queued events (one for `RecordEvent`, a batch or a stream's chunk for the
/// others) and where its answer goes. A caller's events are written together or not at all.
struct Pending {
    events: Vec<Event>,
    answer: oneshot::Sender<Result<Vec<bool>, IngestError>>,
    /// The events' places in the queue, given back once they are answered (or dropped).
    _place: Place,
}

/// Places in the queue: counted in the queue's gauge while held.
struct Place {
    room: OwnedSemaphorePermit,
    queued: Gauge,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.queued
            .dec_by(i64::try_from(self.room.num_permits()).unwrap_or(i64::MAX));
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
            .field("events", &self.events)
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
        let duplicates = self.record_all(vec![event]).await?;
        Ok(duplicates.first().copied().unwrap_or(false))
    }

    /// Queues `events`, to be written together (all or none, perhaps in one transaction with
    /// other callers' events), and waits until they have committed. Answers, per event,
    /// whether it was a duplicate.
    pub async fn record_all(&self, events: Vec<Event>) -> Result<Vec<bool>, IngestError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        // A caller larger than the whole queue takes all of it, rather than never fitting.
        let places = events.len().min(self.settings.queue_events);
        let room = u32::try_from(places)
            .ok()
            .and_then(|places| Arc::clone(&self.room).try_acquire_many_owned(places).ok())
            .ok_or(IngestError::QueueFull(self.settings.queue_events))?;
        self.queued.inc_by(places as i64);
        let place = Place {
            room,
            queued: self.queued.clone(),
        };
        let (answer, answered) = oneshot::channel();
        self.queue
            .send(Pending {
                events,
                answer,
                _place: place,
            })
            .map_err(|_| IngestError::ShuttingDown)?;
        // A flusher that stopped without answering dropped the events unwritten.
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
                let group = Group::new(batch);
                metrics.observe_batch(group.events.len());
                write(store.as_ref(), group).await;
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
    let mut left_events = 0;
    while let Some(pending) = waiting.recv().await {
        left_events += pending.events.len();
        left.push(pending);
        if left_events >= settings.max_events {
            commit(std::mem::take(&mut left)).await;
            left_events = 0;
        }
    }
    commit(left).await;
}

/// A batch: `first`, and what else queues within the window (cut short by `hurried`), until
/// it holds `max_events` (the last caller taken may pass the mark: a caller's events are
/// never split).
async fn gather(
    first: Pending,
    waiting: &mut mpsc::UnboundedReceiver<Pending>,
    settings: &GroupCommitSettings,
    hurried: &mut watch::Receiver<bool>,
) -> Vec<Pending> {
    let mut events = first.events.len();
    let mut batch = Vec::with_capacity(settings.max_events.min(64));
    batch.push(first);
    let deadline = tokio::time::Instant::now() + settings.window;
    while events < settings.max_events {
        let next = match waiting.try_recv() {
            Ok(next) => next,
            Err(_) => {
                let next = tokio::select! {
                    next = tokio::time::timeout_at(deadline, waiting.recv()) => next,
                    _ = hurried.wait_for(|hurry| *hurry) => break,
                };
                match next {
                    Ok(Some(next)) => next,
                    Ok(None) | Err(_) => break,
                }
            }
        };
        events += next.events.len();
        batch.push(next);
    }
    batch
}

/// Callers gathered into one write: their events in one run, and each caller's share of it.
struct Group {
    events: Vec<Event>,
    callers: Vec<Caller>,
}

/// One caller of a [`Group`]: how many of its events are theirs, and where the answer goes.
struct Caller {
    len: usize,
    answer: oneshot::Sender<Result<Vec<bool>, IngestError>>,
    _place: Place,
}

impl Group {
    fn new(batch: Vec<Pending>) -> Self {
        let mut events = Vec::with_capacity(batch.iter().map(|p| p.events.len()).sum());
        let callers = batch
            .into_iter()
            .map(|pending| {
                let len = pending.events.len();
                events.extend(pending.events);
                Caller {
                    len,
                    answer: pending.answer,
                    _place: pending._place,
                }
            })
            .collect();
        Self { events, callers }
    }

    /// The caller whose events hold `position`, and the event's position among them.
    fn caller_of(&self, mut position: usize) -> (usize, usize) {
        for (index, caller) in self.callers.iter().enumerate() {
            if position < caller.len {
                return (index, position);
            }
            position -= caller.len;
        }
        (self.callers.len(), position)
    }

    /// Splits off the callers at `indexes` (each alone, with its index), leaving the rest.
    fn take(self, indexes: &BTreeSet<usize>) -> (Vec<(usize, Group)>, Group) {
        let mut taken = Vec::new();
        let mut rest = Group {
            events: Vec::new(),
            callers: Vec::new(),
        };
        let mut events = self.events.into_iter();
        for (index, caller) in self.callers.into_iter().enumerate() {
            let own: Vec<Event> = events.by_ref().take(caller.len).collect();
            if indexes.contains(&index) {
                taken.push((
                    index,
                    Group {
                        events: own,
                        callers: vec![caller],
                    },
                ));
            } else {
                rest.events.extend(own);
                rest.callers.push(caller);
            }
        }
        (taken, rest)
    }

    /// Answers each caller with its share of `duplicates`.
    fn acknowledge(self, duplicates: Vec<bool>) {
        let mut duplicates = duplicates.into_iter();
        for caller in self.callers {
            let own = duplicates.by_ref().take(caller.len).collect();
            let _ = caller.answer.send(Ok(own));
        }
    }

    /// Answers every caller with an error made by `error`.
    fn fail(self, mut error: impl FnMut() -> IngestError) {
        for caller in self.callers {
            let _ = caller.answer.send(Err(error()));
        }
    }
}

/// Writes `group` in one transaction and answers each caller; see the module docs for how a
/// refused group is split.
async fn write<S: EventStore>(store: &S, mut group: Group) {
    while !group.callers.is_empty() {
        let error = match store.record_events_each(&group.events).await {
            Ok(duplicates) => return group.acknowledge(duplicates),
            Err(error) => error,
        };
        if group.callers.len() == 1 {
            // The caller's own events: positions in the error are theirs already.
            let mut error = Some(error);
            return group.fail(|| match error.take() {
                Some(error) => IngestError::Storage(error),
                None => IngestError::ShuttingDown, // one caller: answered once
            });
        }
        match error {
            // Ownership is the events' own: refuse those callers, write the others.
            StorageError::Refused(Refusal::NotOwner(foreign)) => {
                let mut own: BTreeMap<usize, Vec<(usize, CampaignId)>> = BTreeMap::new();
                for (position, campaign) in foreign {
                    let (caller, at) = group.caller_of(position);
                    own.entry(caller).or_default().push((at, campaign));
                }
                let (refused, rest) = group.take(&own.keys().copied().collect());
                for (index, refused) in refused {
                    let mut foreign = own.remove(&index);
                    refused.fail(|| {
                        IngestError::Storage(
                            Refusal::NotOwner(foreign.take().unwrap_or_default()).into(),
                        )
                    });
                }
                group = rest;
            }
            // A legacy count may pass its column only because neighbours add to it too:
            // the callers named are written one at a time, the others together.
            StorageError::Refused(Refusal::LegacyOverflow(overflows)) => {
                let mut named: BTreeSet<usize> = overflows
                    .iter()
                    .flat_map(|o| o.events.iter().map(|&p| group.caller_of(p).0))
                    .collect();
                if named.is_empty() {
                    // Nobody named: everyone alone, so that the rest never meets it again.
                    named = (0..group.callers.len()).collect();
                }
                let (alone, rest) = group.take(&named);
                Box::pin(write(store, rest)).await;
                for (_, caller) in alone {
                    Box::pin(write(store, caller)).await;
                }
                return;
            }
            error if error.is_retryable() => {
                tracing::warn!(%error, events = group.events.len(), "a group commit failed; its callers may retry");
                let why = error.to_string();
                return group.fail(|| IngestError::Retry(why.clone()));
            }
            // No event the refusal names: each caller on its own, so that each gets its own
            // answer.
            _ => {
                let everyone = (0..group.callers.len()).collect();
                let (alone, _) = group.take(&everyone);
                for (_, caller) in alone {
                    Box::pin(write(store, caller)).await;
                }
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;
    use crate::domain::{EventType, UserId};

    fn event(user: &str) -> Event {
        Event {
            user_id: UserId::parse("user_id", user).expect("id"),
            campaign_id: CampaignId::parse("campaign_id", "c").expect("id"),
            event_type: EventType::Sent,
            count: 1,
            occurred_at: Utc::now(),
            email_account_id: None,
            idempotency_key: None,
        }
    }

    /// Where a caller's answer arrives.
    type Answered = oneshot::Receiver<Result<Vec<bool>, IngestError>>;

    /// Callers of 1, 3 and 2 events, and where each one's answer arrives.
    fn three_callers() -> (Group, Vec<Answered>) {
        let room = Arc::new(Semaphore::new(100));
        let mut answers = Vec::new();
        let batch = [1usize, 3, 2]
            .iter()
            .enumerate()
            .map(|(caller, &len)| {
                let (answer, answered) = oneshot::channel();
                answers.push(answered);
                Pending {
                    events: (0..len).map(|i| event(&format!("u{caller}-{i}"))).collect(),
                    answer,
                    _place: Place {
                        room: Arc::clone(&room)
                            .try_acquire_many_owned(len as u32)
                            .expect("room"),
                        queued: Gauge::default(),
                    },
                }
            })
            .collect();
        (Group::new(batch), answers)
    }

    #[test]
    fn positions_map_to_their_callers() {
        let (group, _) = three_callers();
        assert_eq!(group.events.len(), 6);
        assert_eq!(group.caller_of(0), (0, 0));
        assert_eq!(group.caller_of(1), (1, 0));
        assert_eq!(group.caller_of(3), (1, 2));
        assert_eq!(group.caller_of(5), (2, 1));
    }

    #[test]
    fn taking_callers_keeps_each_ones_events_together() {
        let (group, _) = three_callers();
        let (taken, rest) = group.take(&BTreeSet::from([1]));
        assert_eq!(taken.len(), 1);
        let (index, alone) = &taken[0];
        assert_eq!(*index, 1);
        let users: Vec<&str> = alone.events.iter().map(|e| e.user_id.as_str()).collect();
        assert_eq!(users, ["u1-0", "u1-1", "u1-2"]);
        let users: Vec<&str> = rest.events.iter().map(|e| e.user_id.as_str()).collect();
        assert_eq!(users, ["u0-0", "u2-0", "u2-1"]);
        assert_eq!(
            rest.callers.iter().map(|c| c.len).collect::<Vec<_>>(),
            [1, 2]
        );
    }

    #[test]
    fn each_caller_gets_its_share_of_the_answer() {
        let (group, mut answers) = three_callers();
        group.acknowledge(vec![true, false, true, false, false, true]);
        let shares: Vec<Vec<bool>> = answers
            .iter_mut()
            .map(|a| a.try_recv().expect("answered").expect("acknowledged"))
            .collect();
        assert_eq!(
            shares,
            [vec![true], vec![false, true, false], vec![false, true]]
        );
    }
}
