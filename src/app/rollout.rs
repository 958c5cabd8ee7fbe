//! The read rollout: read it, change it, evaluate a user, read its audit.

use crate::domain::{StorageSource, ValidationError, validate_id};
use crate::rollout::{Applied, AuditEntry, Decision, GUARD_ACTOR, RolloutChange, SCHEDULE_ACTOR};
use crate::storage::{PhaseStore, RolloutStore, Store};
use std::sync::Arc;

use super::{AppError, Guard, GuardStatus, Jobs, Mismatch, RolloutView, Shadow};
use futures::Stream;
use tokio::sync::broadcast::error::RecvError;

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Where the next page starts; `None` on the last page.
    pub next_page_token: Option<String>,
}

/// Items of a page when the request leaves the size 0.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Most items of a page.
pub const MAX_PAGE_SIZE: usize = 1_000;

/// The page size a request asks for: 0 means [`DEFAULT_PAGE_SIZE`]; at most
/// [`MAX_PAGE_SIZE`].
pub fn page_size(requested: u32) -> usize {
    match requested {
        0 => DEFAULT_PAGE_SIZE,
        n => (n as usize).min(MAX_PAGE_SIZE),
    }
}

fn bad_token() -> AppError {
    ValidationError::single("page_token", "is not a token this service gave").into()
}

/// Applies `change` to the stored rollout (see [`crate::storage::RolloutStore::change_rollout`])
/// and at once to `view`; the other replicas apply it within their refresh interval. The one
/// way every rollout change is made: by people, the guard and the schedule.
pub(super) async fn change_rollout<S: RolloutStore + PhaseStore>(
    store: &S,
    view: &RolloutView,
    change: &RolloutChange,
    expected_version: Option<u64>,
    actor: &str,
    reason: &str,
) -> Result<Arc<Applied>, AppError> {
    store
        .change_rollout(change, expected_version, actor, reason)
        .await?;
    view.refresh(store).await?;
    let applied = view.current();
    tracing::info!(
        version = applied.rollout.config.version,
        ?change,
        actor,
        reason,
        "rollout changed"
    );
    Ok(applied)
}

/// The rollout use cases: read, change, evaluate, audit.
#[derive(Debug)]
pub struct RolloutControl<S> {
    store: Arc<S>,
    view: RolloutView,
    jobs: Jobs,
    shadow: Option<Shadow>,
    guard: Option<Guard>,
}

impl<S> Clone for RolloutControl<S> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            view: self.view.clone(),
            jobs: self.jobs.clone(),
            shadow: self.shadow.clone(),
            guard: self.guard.clone(),
        }
    }
}

impl<S: Store> RolloutControl<S> {
    /// The use cases over `store`, applying `view`; watches end when `jobs` drain.
    pub fn new(store: Arc<S>, view: RolloutView, jobs: Jobs) -> Self {
        Self {
            store,
            view,
            jobs,
            shadow: None,
            guard: None,
        }
    }

    /// The same, able to say what this replica's guard sees.
    pub fn with_guard(mut self, guard: Guard) -> Self {
        self.guard = Some(guard);
        self
    }

    /// What this replica's guard sees now (`None`: this server runs no guard).
    pub fn guard_status(&self) -> Option<GuardStatus> {
        self.guard.as_ref().map(Guard::status)
    }

    /// The same, able to list what this replica's shadow reads found.
    pub fn with_shadow(mut self, shadow: Shadow) -> Self {
        self.shadow = Some(shadow);
        self
    }

    /// The recent mismatches this replica's shadow reads found, newest first (at most
    /// [`super::MISMATCHES_KEPT`]).
    pub fn shadow_mismatches(&self) -> Vec<Mismatch> {
        self.shadow
            .as_ref()
            .map_or_else(Vec::new, Shadow::mismatches)
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
        if [GUARD_ACTOR, SCHEDULE_ACTOR].contains(&actor) {
            return Err(ValidationError::single(
                "actor",
                format!("{actor:?} is kept for the service's own changes"),
            )
            .into());
        }
        change_rollout(
            self.store.as_ref(),
            &self.view,
            &change,
            expected_version,
            actor,
            reason,
        )
        .await
    }

    /// Replaces the salt with a fresh random one, so every user's bucket moves (the
    /// controller's way to reshuffle who is in the rollout).
    pub async fn reset_salt(&self, actor: &str, reason: &str) -> Result<Arc<Applied>, AppError> {
        let salt = uuid::Uuid::now_v7().simple().to_string();
        self.change(RolloutChange::Salt { salt }, None, actor, reason)
            .await
    }

    /// Where `user_id`'s reads go now, and the version that decided it.
    pub fn evaluate(&self, user_id: &str) -> (Decision, u64) {
        let (decision, applied) = self.view.decide(user_id);
        (decision, applied.rollout.config.version)
    }

    /// One page of the audited changes, newest first, after the page `page_token` (empty: the
    /// first) ended; `page_size` as [`page_size`] reads it.
    pub async fn history(
        &self,
        page_token: &str,
        page_size: u32,
    ) -> Result<Page<AuditEntry>, AppError> {
        // A token is the version the previous page ended at.
        let before = match page_token {
            "" => None,
            token => Some(token.parse::<u64>().map_err(|_| bad_token())?),
        };
        let size = self::page_size(page_size);
        let changes = self.store.rollout_history(before, size as u32).await?;
        let next_page_token = match changes.last() {
            Some(last) if changes.len() == size && last.version > 1 => {
                Some(last.version.to_string())
            }
            _ => None,
        };
        Ok(Page {
            items: changes,
            next_page_token,
        })
    }

    /// One page of the users whose reads are pinned, by user id, after the page `page_token`
    /// (empty: the first) ended; `page_size` as [`page_size`] reads it.
    pub fn overrides(
        &self,
        page_token: &str,
        page_size: u32,
    ) -> Result<Page<(String, StorageSource)>, AppError> {
        // A token is the user id the previous page ended at.
        if !page_token.is_empty() && validate_id("page_token", page_token).is_err() {
            return Err(bad_token());
        }
        let size = self::page_size(page_size);
        let applied = self.view.current();
        let mut users: Vec<(&String, &StorageSource)> = applied
            .rollout
            .overrides
            .iter()
            .filter(|(user, _)| page_token.is_empty() || user.as_str() > page_token)
            .collect();
        users.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let next_page_token = (users.len() > size).then(|| users[size - 1].0.clone());
        Ok(Page {
            items: users
                .into_iter()
                .take(size)
                .map(|(user, source)| (user.clone(), *source))
                .collect(),
            next_page_token,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_sizes_default_and_cap() {
        assert_eq!(page_size(0), DEFAULT_PAGE_SIZE);
        assert_eq!(page_size(7), 7);
        assert_eq!(page_size(u32::MAX), MAX_PAGE_SIZE);
    }
}
