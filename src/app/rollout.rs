//! The read rollout: read it, change it, evaluate a user, read its audit.

use crate::rollout::{Applied, AuditEntry, Decision, RolloutChange};
use crate::storage::Store;
use std::sync::Arc;

use super::{AppError, RolloutView};

/// The rollout use cases: read, change, evaluate, audit.
#[derive(Debug)]
pub struct Rollout<S> {
    store: Arc<S>,
    view: RolloutView,
}

impl<S> Clone for Rollout<S> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            view: self.view.clone(),
        }
    }
}

impl<S: Store> Rollout<S> {
    pub fn new(store: Arc<S>, view: RolloutView) -> Self {
        Self { store, view }
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

    /// Every state this replica applies from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Arc<Applied>> {
        self.view.subscribe()
    }
}
