//! Every replica's in-memory copy of the rollout (and the migration phase), which every read
//! is routed by: refreshed from the database in the background, and at once after a change
//! made through this replica.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{broadcast, watch};

use crate::domain::StorageSource;
use crate::rollout::{Applied, Decision, decide};
use crate::storage::{PhaseStore, RolloutStore, StorageError};

/// A replica's applied rollout; cheap to clone.
#[derive(Debug, Clone)]
pub struct RolloutView {
    current: Arc<RwLock<Arc<Applied>>>,
    changes: broadcast::Sender<Arc<Applied>>,
    /// Held from a refresh's read until its apply: refreshes run one after another, so an
    /// older read (a phase change does not bump the rollout version) never lands after a
    /// newer one.
    refreshing: Arc<tokio::sync::Mutex<()>>,
}

impl RolloutView {
    /// Loads the state from the database.
    pub async fn load<S: PhaseStore + RolloutStore>(store: &S) -> Result<Self, StorageError> {
        let applied = Arc::new(Self::read(store).await?);
        Ok(Self {
            current: Arc::new(RwLock::new(applied)),
            changes: broadcast::channel(256).0,
            refreshing: Arc::default(),
        })
    }

    async fn read<S: PhaseStore + RolloutStore>(store: &S) -> Result<Applied, StorageError> {
        Ok(Applied {
            phase: store.phase().await?.phase,
            rollout: store.rollout().await?,
        })
    }

    /// The state applied now.
    pub fn current(&self) -> Arc<Applied> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Where `user_id`'s reads go now, and the state that decided it. Allocates nothing.
    pub fn decide(&self, user_id: &str) -> (Decision, Arc<Applied>) {
        let applied = self.current();
        let user_override = applied.rollout.overrides.get(user_id).copied();
        let decision = decide(
            applied.phase,
            &applied.rollout.config,
            user_override,
            user_id,
        );
        (decision, applied)
    }

    /// The storage `user_id`'s reads go to now.
    pub fn read_source(&self, user_id: &str) -> StorageSource {
        self.decide(user_id).0.source
    }

    /// Every state applied from now on, in order.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Applied>> {
        self.changes.subscribe()
    }

    /// Applies `applied` if it differs from the current state (and tells subscribers).
    fn apply(&self, applied: Applied) {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if **current == applied {
            return;
        }
        // A read that started before a newer change landed must not undo it.
        if applied.rollout.config.version < current.rollout.config.version {
            return;
        }
        let applied = Arc::new(applied);
        *current = Arc::clone(&applied);
        drop(current);
        tracing::debug!(version = applied.rollout.config.version, phase = %applied.phase, "rollout applied");
        let _ = self.changes.send(applied);
    }

    /// Re-reads the database now: the one step of the refresh loop, and what a replica does
    /// right after a change made through it.
    pub async fn refresh<S: PhaseStore + RolloutStore>(
        &self,
        store: &S,
    ) -> Result<(), StorageError> {
        let _one_at_a_time = self.refreshing.lock().await;
        self.apply(Self::read(store).await?);
        Ok(())
    }

    /// Refreshes on every pushed change and every `interval`, until `stop` turns true.
    pub async fn keep_fresh<S: PhaseStore + RolloutStore>(
        self,
        store: Arc<S>,
        interval: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Pushed changes (where the backend has them) arrive at once; polling heals the rest.
        // The feed runs inside this loop, so that it stops where the loop does.
        let (mut pushed, mut listen) = match store.change_feed() {
            Some(feed) => (Some(feed.changes), Some(feed.listen)),
            None => (None, None),
        };
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                changed = async {
                    match pushed.as_mut() {
                        Some(signal) => signal.changed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if changed.is_err() {
                        pushed = None;
                    }
                }
                () = async {
                    match listen.as_mut() {
                        Some(listen) => listen.await,
                        None => std::future::pending().await,
                    }
                } => listen = None,
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
            if let Err(error) = self.refresh(store.as_ref()).await {
                tracing::warn!(%error, "could not refresh the rollout; keeping the last one");
            }
        }
    }
}
