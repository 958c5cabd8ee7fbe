//! The read rollout: read it, change it, evaluate a user, read its audit.

use crate::rollout::{Applied, AuditEntry, Decision, RolloutChange};
use crate::storage::Store;
use std::sync::Arc;

use super::{AppError, Jobs, RolloutView};
use futures::Stream;
use tokio::sync::broadcast::error::RecvError;

/// The rollout use cases: read, change, evaluate, audit.
#[derive(Debug)]
pub struct Rollout<S> {
    store: Arc<S>,
    view: RolloutView,
    jobs: Jobs,
}

impl<S> Clone for Rollout<S> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            view: self.view.clone(),
            jobs: self.jobs.clone(),
        }
    }
}

impl<S: Store> Rollout<S> {
    /// The use cases over `store`, applying `view`; watches end when `jobs` drain.
    pub fn new(store: Arc<S>, view: RolloutView, jobs: Jobs) -> Self {
        Self { store, view, jobs }
    }

    /// The rollout this replica applies.
    pub fn current(&self) -> Arc<Applied> {
        self.view.current()
    }

    /// Applies `change` (see [`crate::storage::RolloutStore::change_rollout`]); this replica applies the result
    /// at once, the others within their refresh interval.
    pub async fn change(
        &self,
        change: RolloutChange,
        expected_version: Option<u64>,
        actor: &str,
        reason: &str,
    ) -> Result<Arc<Applied>, AppError> {
        self.store
            .change_rollout(&change, expected_version, actor, reason)
            .await?;
        self.view.refresh(self.store.as_ref()).await?;
        let applied = self.view.current();
        tracing::info!(
            version = applied.rollout.config.version,
            ?change,
            actor,
            reason,
            "rollout changed"
        );
        Ok(applied)
    }

    /// A fresh random salt, for [`RolloutChange::Salt`]: every user's bucket moves with it.
    pub fn new_salt() -> String {
        uuid::Uuid::now_v7().simple().to_string()
    }

    /// Where `user_id`'s reads go now, and the version that decided it.
    pub fn evaluate(&self, user_id: &str) -> (Decision, u64) {
        let (decision, applied) = self.view.decide(user_id);
        (decision, applied.rollout.config.version)
    }

    /// Audited changes, newest first, older than `before_version` when given.
    pub async fn history(
        &self,
        before_version: Option<u64>,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, AppError> {
        self.store
            .rollout_history(before_version, limit)
            .await
            .map_err(AppError::from)
    }

    /// The state this replica applies now, then each different state it applies, until the
    /// server drains. A watcher too slow to see every change gets where things stand.
    pub fn watch(&self) -> impl Stream<Item = Result<Arc<Applied>, AppError>> + Send + 'static {
        // Subscribe before reading the current state, so that no change falls in between.
        let changes = self.view.subscribe();
        let first = self.view.current();
        let view = self.view.clone();
        let states = futures::stream::unfold(
            (changes, None::<Arc<Applied>>, Some(first)),
            move |(mut changes, last, first)| {
                let view = view.clone();
                async move {
                    if let Some(first) = first {
                        return Some((Ok(Arc::clone(&first)), (changes, Some(first), None)));
                    }
                    loop {
                        let next = match changes.recv().await {
                            Ok(next) => next,
                            Err(RecvError::Lagged(_)) => view.current(),
                            Err(RecvError::Closed) => return None,
                        };
                        if last.as_deref() != Some(&*next) {
                            return Some((Ok(Arc::clone(&next)), (changes, Some(next), None)));
                        }
                    }
                }
            },
        );
        self.jobs.until_drained(states)
    }
}
