//! The progressive schedule's driver. Every replica runs one; only the one holding the
//! database lease [`SCHEDULE_LEASE`] acts, so exactly one replica advances the schedule at a
//! time, and when it dies its lease runs out and another takes over. A step advances only
//! once it has dwelt long enough, the driver has counted enough shadow comparisons during
//! it, and the guard is green; each advance is a rollout change audited as actor `schedule`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;

use crate::rollout::{RolloutChange, RolloutRefused, SCHEDULE_ACTOR, ScheduleStatus};
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
    /// it if the step is due. Answers the step it advanced to, if it did.
    pub async fn step(&self) -> Result<Option<usize>, AppError> {
        let applied = self.view.current();
        let automation = &applied.rollout.config.automation;
        let Some(schedule) = automation
            .schedule
            .as_ref()
            .filter(|s| s.status == ScheduleStatus::Running)
        else {
            return Ok(None);
        };
        if !self
            .store
            .hold_lease(SCHEDULE_LEASE, &self.holder, self.settings.lease)
            .await?
        {
            return Ok(None);
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
        match change_rollout(
            self.store.as_ref(),
            &self.view,
            &change,
            None,
            SCHEDULE_ACTOR,
            &reason,
        )
        .await
        {
            Ok(applied) => {
                self.metrics.schedule_advanced();
                Ok(applied
                    .rollout
                    .config
                    .automation
                    .schedule
                    .as_ref()
                    .map(|s| s.step))
            }
            // Paused, aborted or tripped meanwhile.
            Err(AppError::RolloutRefused(RolloutRefused::Schedule(_))) => Ok(None),
            Err(error) => Err(error),
        }
    }
}
