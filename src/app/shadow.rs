//! Shadow reads: a sampled share of reads is run again on the other storage, after the caller
//! has its answer, and the two answers are compared (a disagreement is confirmed in one
//! snapshot of both storages before it counts). The work waits in a bounded queue served
//! by workers registered with [`Jobs`]: when the queue is full the shadow read is dropped and
//! counted, so shadow work never slows a primary read.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use tokio::sync::{mpsc, watch};

use crate::domain::{CampaignId, DateRange, EventTotals, Scope, StorageSource, UserId};
use crate::migration::Phase;
use crate::storage::{OnBoth, StorageError, Store};
use crate::telemetry::{CAMPAIGN_TOTALS, DAILY_TOTALS, ServerMetrics};

use super::{Guard, Jobs, RolloutView};
use crate::rollout::ALL_USERS;

/// How reads are shadowed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShadowSettings {
    /// The share of reads shadowed, 0 to 1.
    pub sample_rate: f64,
    /// Shadow reads that may wait; past it they are dropped.
    pub queue: usize,
    /// Workers running shadow reads at once.
    pub workers: usize,
    /// The longest a shadow read may take before it counts as `timeout`.
    pub timeout: Duration,
}

impl ShadowSettings {
    pub const DEFAULT: Self = Self {
        sample_rate: 0.01,
        queue: 256,
        workers: 2,
        timeout: Duration::from_secs(2),
    };
}

impl Default for ShadowSettings {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Most mismatches kept for people to read (the most recent).
pub const MISMATCHES_KEPT: usize = 100;

/// One place where the two storages disagreed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// `campaign_totals` or `daily_totals`.
    pub method: &'static str,
    /// The user read (`None`: the all-users view).
    pub user: Option<String>,
    /// The campaign whose totals differ (`campaign_totals`), or the day (`daily_totals`).
    pub campaign: Option<String>,
    pub day: Option<NaiveDate>,
    pub legacy: EventTotals,
    pub new: EventTotals,
    pub at: DateTime<Utc>,
}

/// A read to run again and compare, with what the primary storage answered.
#[derive(Debug)]
pub enum ShadowRead {
    Campaigns {
        user: UserId,
        campaigns: Vec<CampaignId>,
        range: DateRange,
        primary: HashMap<CampaignId, EventTotals>,
    },
    Daily {
        scope: Scope,
        range: DateRange,
        primary: Vec<(NaiveDate, EventTotals)>,
    },
}

impl ShadowRead {
    /// The user whose read it is (`*`: the all-users view).
    fn user(&self) -> &str {
        match self {
            ShadowRead::Campaigns { user, .. } => user.as_str(),
            ShadowRead::Daily { scope, .. } => {
                scope.user.as_ref().map_or(ALL_USERS, UserId::as_str)
            }
        }
    }

    fn method(&self) -> &'static str {
        match self {
            ShadowRead::Campaigns { .. } => CAMPAIGN_TOTALS,
            ShadowRead::Daily { .. } => DAILY_TOTALS,
        }
    }
}

#[derive(Debug)]
struct Task {
    primary: StorageSource,
    read: ShadowRead,
}

/// The replica's shadow reads: the queue, the sample rate and the recent mismatches.
#[derive(Debug, Clone)]
pub struct Shadow {
    queue: mpsc::Sender<Task>,
    /// The replica's `--shadow-sample-rate`, unless the rollout sets one for all.
    sample_rate: f64,
    view: RolloutView,
    metrics: Arc<ServerMetrics>,
    mismatches: Arc<Mutex<VecDeque<Mismatch>>>,
    /// Told every comparison and every shadow read's time.
    guard: Guard,
}

/// The storage a shadow read asks, when the phase lets it answer as the primary would:
/// the new storage holds all history from BACKFILLED on, the legacy table until it retires.
fn other_storage(phase: Phase, primary: StorageSource) -> Option<StorageSource> {
    let both = matches!(
        phase,
        Phase::Backfilled | Phase::Verified | Phase::NewPrimary
    );
    both.then_some(match primary {
        StorageSource::Legacy => StorageSource::New,
        StorageSource::New => StorageSource::Legacy,
    })
}

impl Shadow {
    /// Starts `settings.workers` workers reading `store` (stopped with `jobs`), telling
    /// `guard` what they find.
    pub fn start<S: Store>(
        store: Arc<S>,
        view: RolloutView,
        settings: ShadowSettings,
        jobs: &Jobs,
        metrics: Arc<ServerMetrics>,
        guard: Guard,
    ) -> Self {
        let (queue, tasks) = mpsc::channel::<Task>(settings.queue.max(1));
        let tasks = Arc::new(tokio::sync::Mutex::new(tasks));
        let shadow = Self {
            queue,
            sample_rate: settings.sample_rate,
            view: view.clone(),
            metrics,
            mismatches: Arc::default(),
            guard,
        };
        for _ in 0..settings.workers.max(1) {
            let (store, view, tasks, shadow) = (
                Arc::clone(&store),
                view.clone(),
                Arc::clone(&tasks),
                shadow.clone(),
            );
            jobs.spawn(move |stop| async move {
                shadow
                    .work(store, view, tasks, settings.timeout, stop)
                    .await;
            });
        }
        shadow
    }

    /// Queues `read` (answered by `primary`) for a shadow read if this read is sampled and
    /// there is room; never waits.
    pub fn offer(&self, primary: StorageSource, read: impl FnOnce() -> ShadowRead) {
        let rate = self
            .view
            .current()
            .rollout
            .config
            .shadow_sample_ppm
            .map_or(self.sample_rate, |ppm| f64::from(ppm) / 1e6);
        if rate <= 0.0 || rand::random::<f64>() >= rate {
            return;
        }
        // Counted before it is sent, so that a worker never takes away what is not added.
        let queued = self.metrics.shadow_queued();
        queued.inc();
        let sent = self.queue.try_send(Task {
            primary,
            read: read(),
        });
        if let Err(refused) = sent {
            queued.dec();
            if matches!(refused, mpsc::error::TrySendError::Full(_)) {
                self.metrics.shadow_dropped();
            }
        }
    }

    /// The recent mismatches, newest first.
    pub fn mismatches(&self) -> Vec<Mismatch> {
        let kept = self.mismatches.lock().unwrap_or_else(|e| e.into_inner());
        kept.iter().rev().cloned().collect()
    }

    async fn work<S: Store>(
        &self,
        store: Arc<S>,
        view: RolloutView,
        tasks: Arc<tokio::sync::Mutex<mpsc::Receiver<Task>>>,
        timeout: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            let task = tokio::select! {
                task = async { tasks.lock().await.recv().await } => task,
                _ = stop.wait_for(|stop| *stop) => return,
            };
            let Some(task) = task else { return };
            self.metrics.shadow_queued().dec();
            let method = task.read.method();
            let user = task.read.user().to_owned();
            let outcome = match other_storage(view.current().phase, task.primary) {
                None => "skipped",
                Some(other) => {
                    let started = std::time::Instant::now();
                    let compared =
                        tokio::time::timeout(timeout, self.compare(store.as_ref(), task, other))
                            .await;
                    // The other storage's read alone: a disagreement's confirmation is not
                    // its latency.
                    let took = match &compared {
                        Ok(Ok((_, read))) => *read,
                        _ => started.elapsed(),
                    };
                    let outcome = match compared {
                        Ok(Ok((true, _))) => "match",
                        Ok(Ok((false, _))) => "mismatch",
                        Ok(Err(error)) => {
                            tracing::debug!(%error, method, "shadow read failed");
                            "error"
                        }
                        Err(_) => "timeout",
                    };
                    let failed = matches!(outcome, "error" | "timeout");
                    self.guard.read(other, took, failed);
                    if !failed {
                        self.guard.compared(&user, outcome == "mismatch");
                    }
                    outcome
                }
            };
            self.metrics.observe_shadow(method, outcome);
        }
    }

    /// Runs `task` on `other` and compares; keeps each difference. Answers whether all
    /// agree, and how long the read of `other` took.
    ///
    /// The primary answer and the shadow read come from two moments: a write between them
    /// would show as a difference. So a disagreement is read again on both storages in one
    /// snapshot (a write lands in both or neither), and only what still differs there counts.
    async fn compare<S: Store>(
        &self,
        store: &S,
        task: Task,
        other: StorageSource,
    ) -> Result<(bool, Duration), StorageError> {
        let now = Utc::now();
        let started = std::time::Instant::now();
        let (found, read) = match task.read {
            ShadowRead::Campaigns {
                user,
                campaigns,
                range,
                primary,
            } => {
                let shadow = store
                    .campaign_totals(other, &user, &campaigns, range)
                    .await?;
                let read = started.elapsed();
                let answers = in_order(task.primary, primary, shadow);
                let mut found = campaign_differences(&user, &campaigns, &answers, now);
                if !found.is_empty() {
                    let answers = store
                        .campaign_totals_on_both(&user, &campaigns, range)
                        .await?;
                    found = campaign_differences(&user, &campaigns, &answers, now);
                }
                (found, read)
            }
            ShadowRead::Daily {
                scope,
                range,
                primary,
            } => {
                let shadow = store.daily_totals(other, &scope, range).await?;
                let read = started.elapsed();
                let answers = in_order(task.primary, primary, shadow);
                let mut found = daily_differences(&scope, answers, now);
                if !found.is_empty() {
                    let answers = store.daily_totals_on_both(&scope, range).await?;
                    found = daily_differences(&scope, answers, now);
                }
                (found, read)
            }
        };
        let agreed = found.is_empty();
        let mut kept = self.mismatches.lock().unwrap_or_else(|e| e.into_inner());
        for mismatch in found {
            if kept.len() == MISMATCHES_KEPT {
                kept.pop_front();
            }
            kept.push_back(mismatch);
        }
        Ok((agreed, read))
    }
}

/// The primary's and the shadow's answers, each on its storage's side.
fn in_order<T>(primary_source: StorageSource, primary: T, shadow: T) -> OnBoth<T> {
    match primary_source {
        StorageSource::Legacy => OnBoth {
            legacy: primary,
            new: shadow,
        },
        StorageSource::New => OnBoth {
            legacy: shadow,
            new: primary,
        },
    }
}

/// Each of `campaigns` whose totals differ between the storages.
fn campaign_differences(
    user: &UserId,
    campaigns: &[CampaignId],
    answers: &OnBoth<HashMap<CampaignId, EventTotals>>,
    at: DateTime<Utc>,
) -> Vec<Mismatch> {
    campaigns
        .iter()
        .filter_map(|campaign| {
            let legacy = answers.legacy.get(campaign).copied().unwrap_or_default();
            let new = answers.new.get(campaign).copied().unwrap_or_default();
            (legacy != new).then(|| Mismatch {
                method: CAMPAIGN_TOTALS,
                user: Some(user.as_str().to_owned()),
                campaign: Some(campaign.as_str().to_owned()),
                day: None,
                legacy,
                new,
                at,
            })
        })
        .collect()
}

/// Each day whose totals differ between the storages, in date order.
fn daily_differences(
    scope: &Scope,
    answers: OnBoth<Vec<(NaiveDate, EventTotals)>>,
    at: DateTime<Utc>,
) -> Vec<Mismatch> {
    let legacy: HashMap<NaiveDate, EventTotals> = answers.legacy.into_iter().collect();
    let new: HashMap<NaiveDate, EventTotals> = answers.new.into_iter().collect();
    let mut days: Vec<NaiveDate> = legacy.keys().chain(new.keys()).copied().collect();
    days.sort_unstable();
    days.dedup();
    days.into_iter()
        .filter_map(|day| {
            let legacy = legacy.get(&day).copied().unwrap_or_default();
            let new = new.get(&day).copied().unwrap_or_default();
            (legacy != new).then(|| Mismatch {
                method: DAILY_TOTALS,
                user: scope.user.as_ref().map(|u| u.as_str().to_owned()),
                campaign: None,
                day: Some(day),
                legacy,
                new,
                at,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_phases_where_both_storages_hold_all_history_are_compared() {
        assert_eq!(other_storage(Phase::DualWrite, StorageSource::Legacy), None);
        assert_eq!(
            other_storage(Phase::Verified, StorageSource::Legacy),
            Some(StorageSource::New)
        );
        assert_eq!(
            other_storage(Phase::NewPrimary, StorageSource::New),
            Some(StorageSource::Legacy)
        );
        assert_eq!(
            other_storage(Phase::LegacyRetired, StorageSource::New),
            None
        );
    }
}
