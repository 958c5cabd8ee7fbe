//! The progressive schedule's driver. Every replica runs one; only the one holding the
//! database lease [`SCHEDULE_LEASE`] acts, so exactly one replica advances the schedule at a
//! time, and when it dies its lease runs out and another takes over. A step advances only
//! once it has dwelt long enough, the driver has counted enough shadow comparisons during
//! it, and the guard is green; each advance is a rollout change audited as actor `schedule`.
//! A schedule started with a cool-down resumes by itself once after a guard trip halts it:
//! when the cool-down is over and the guard is green again.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;

use crate::rollout::{RolloutChange, RolloutRefused, SCHEDULE_ACTOR, Schedule, ScheduleStatus};
use crate::storage::{PhaseStore, RolloutStore};
use crate::telemetry::ServerMetrics;

use super::{AppError, Guard, Jobs, RolloutView, rollout::change_rollout};

/// The lease the schedule's driver holds.
pub const SCHEDULE_LEASE: &str = "schedule";

/// How the schedule is driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduleSettings {
    /// How long a driver's lease lasts without renewal: how soon another replica takes over
    /// from one that died.
    pub lease: Duration,
    /// How often the driver looks (and renews its lease).
    pub tick: Duration,
}

impl ScheduleSettings {
    pub const DEFAULT: Self = Self {
        lease: Duration::from_secs(5),
        tick: Duration::from_millis(500),
    };
}

impl Default for ScheduleSettings {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A step of one run of a schedule: its index and when it began.
type StepKey = (usize, DateTime<Utc>);

/// One replica's schedule driver.
#[derive(Debug)]
pub struct ScheduleDriver<S> {
    store: Arc<S>,
    view: RolloutView,
    guard: Guard,
    metrics: Arc<ServerMetrics>,
    settings: ScheduleSettings,
    /// This replica, as the lease names its holder.
    holder: String,
    /// The step seen, and the guard's comparison count when first seen.
    step_seen: Mutex<Option<(StepKey, u64)>>,
}

impl<S: RolloutStore + PhaseStore + 'static> ScheduleDriver<S> {
    /// Starts this replica's driver (stopped with `jobs`; it gives its lease up on stop).
    pub fn start(
        store: Arc<S>,
        view: RolloutView,
        guard: Guard,
        settings: ScheduleSettings,
        jobs: &Jobs,
        metrics: Arc<ServerMetrics>,
    ) {
        let driver = Self::new(store, view, guard, settings, metrics);
        jobs.spawn(move |stop| driver.drive(stop));
    }

    /// A driver that acts only when [`ScheduleDriver::step`] is called.
    pub fn new(
        store: Arc<S>,
        view: RolloutView,
        guard: Guard,
        settings: ScheduleSettings,
        metrics: Arc<ServerMetrics>,
    ) -> Self {
        Self {
            store,
            view,
            guard,
            metrics,
            settings,
            holder: uuid::Uuid::now_v7().to_string(),
            step_seen: Mutex::new(None),
        }
    }

    async fn drive(self, mut stop: watch::Receiver<bool>) {
        let mut ticker = tokio::time::interval(self.settings.tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.wait_for(|stop| *stop) => break,
            }
            if let Err(error) = self.step().await {
                tracing::warn!(%error, "the schedule could not move on; it tries again");
            }
        }
        // Hand over at once rather than when the lease runs out.
        if let Err(error) = self.store.release_lease(SCHEDULE_LEASE, &self.holder).await {
            tracing::debug!(%error, "could not give the schedule's lease up");
        }
    }

    /// One look: when a schedule runs and this replica holds (or takes) the lease, advances
    /// it if the step is due; when a trip halted it and its cool-down is over, resumes it if
    /// the guard is green again. Answers the step it moved to, if it did.
    pub async fn step(&self) -> Result<Option<usize>, AppError> {
        let applied = self.view.current();
        let automation = &applied.rollout.config.automation;
        let Some(schedule) = automation.schedule.as_ref() else {
            return Ok(None);
        };
        let cooled_down = schedule.cooled_down(automation.tripped.as_ref(), Utc::now());
        if schedule.status != ScheduleStatus::Running && !cooled_down {
            return Ok(None);
        }
        if !self
            .store
            .hold_lease(SCHEDULE_LEASE, &self.holder, self.settings.lease)
            .await?
        {
            return Ok(None);
        }
        if cooled_down {
            return self.recover(schedule).await;
        }
        if automation.tripped.is_some() {
            return Ok(None);
        }
        let key = (schedule.step, schedule.step_started_at);
        let since = {
            let mut seen = self.step_seen.lock().unwrap_or_else(|e| e.into_inner());
            match *seen {
                Some((seen_key, count)) if seen_key == key => count,
                _ => {
                    let count = self.guard.compared_total();
                    *seen = Some((key, count));
                    count
                }
            }
        };
        let compared = self.guard.compared_total() - since;
        if !schedule.dwelt(Utc::now()) || compared < u64::from(schedule.min_comparisons) {
            return Ok(None);
        }
        let figures = self.guard.figures();
        if figures.crossed(&self.guard.settings()).is_some() {
            return Ok(None); // the guard trips on it
        }
        let reason = format!(
            "step {} of {} dwelt {} s with {compared} comparisons here; guard green: {figures}",
            schedule.step + 1,
            schedule.steps.len(),
            schedule.dwell_secs
        );
        let change = RolloutChange::ScheduleAdvance {
            from_step: schedule.step,
        };
        let step = self.change(&change, &reason).await?;
        if step.is_some() {
            self.metrics.schedule_advanced();
        }
        Ok(step)
    }

    /// Resumes a schedule a trip halted, its cool-down over, once the guard's window holds
    /// its minimum of comparisons again and they are green (a window still holding the
    /// disagreements that tripped it is not).
    async fn recover(&self, schedule: &Schedule) -> Result<Option<usize>, AppError> {
        let settings = self.guard.settings();
        let figures = self.guard.figures();
        if figures.comparisons < u64::from(settings.min_samples)
            || figures.crossed(&settings).is_some()
        {
            return Ok(None);
        }
        let reason = format!(
            "cooled down {} s after the guard's trip; guard green again: {figures}",
            schedule.cool_down_secs.unwrap_or(0)
        );
        let step = self
            .change(&RolloutChange::ScheduleRecover, &reason)
            .await?;
        if let Some(step) = step {
            tracing::info!(
                step = step + 1,
                "the schedule resumed by itself after a trip"
            );
        }
        Ok(step)
    }

    /// Makes `change` as actor `schedule`; answers the schedule's step after it, or `None`
    /// when the schedule was paused, aborted, tripped or moved on meanwhile.
    async fn change(
        &self,
        change: &RolloutChange,
        reason: &str,
    ) -> Result<Option<usize>, AppError> {
        match change_rollout(
            self.store.as_ref(),
            &self.view,
            change,
            None,
            SCHEDULE_ACTOR,
            reason,
        )
        .await
        {
            Ok(applied) => Ok(applied
                .rollout
                .config
                .automation
                .schedule
                .as_ref()
                .map(|s| s.step)),
            Err(AppError::RolloutRefused(RolloutRefused::Schedule(_))) => Ok(None),
            Err(error) => Err(error),
        }
    }
}
