//! The guard: watches this replica's shadow comparisons and new-storage reads over a sliding
//! window ([`Window`]) and, when a threshold is crossed, rolls reads back by itself with a
//! rollout change audited as actor `guard`. The change reaches every other replica through
//! the normal propagation, so one trip anywhere is enough. Before the global trip, a user
//! whose own reads keep disagreeing is quarantined: pinned to LEGACY by an override.
//!
//! It never flaps: once tripped, it does nothing until a person re-arms it (see
//! [`crate::rollout::rearms_guard`]), and the schedule cannot advance meanwhile.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

use crate::domain::StorageSource;
use crate::migration::Phase;
use crate::rollout::{
    Applied, Figures, GUARD_ACTOR, GuardAction, GuardSettings, RolloutChange, RolloutRefused,
    Signal, Window,
};
use crate::storage::{PhaseStore, RolloutStore};
use crate::telemetry::ServerMetrics;

use super::{AppError, Jobs, RolloutView, rollout::change_rollout};

/// How often the guard looks at its window when nothing wakes it sooner.
pub const GUARD_TICK: Duration = Duration::from_millis(100);

/// One replica's guard; cheap to clone.
#[derive(Debug, Clone)]
pub struct Guard {
    window: Arc<Mutex<Window>>,
    wake: Arc<Notify>,
    /// The replica's `--guard-*` flags, unless the rollout sets thresholds for all.
    flags: GuardSettings,
    view: RolloutView,
    metrics: Arc<ServerMetrics>,
    /// Whether the state last looked at was tripped (a re-arm clears the window).
    was_tripped: Arc<Mutex<bool>>,
}

/// What the guard sees now, for people.
#[derive(Debug, Clone)]
pub struct GuardStatus {
    /// The thresholds in effect, and whether they were set at run time for every replica.
    pub settings: GuardSettings,
    pub settings_from_rollout: bool,
    /// Whether the guard acts now (reads may go to NEW and it has not tripped).
    pub active: bool,
    pub trip: Option<crate::rollout::GuardTrip>,
    /// This replica's window.
    pub figures: Figures,
    pub quarantined: Vec<String>,
}

/// Whether any read can go to NEW in `applied`, so that the guard has something to protect.
fn guarding(applied: &Applied) -> bool {
    let config = &applied.rollout.config;
    match applied.phase {
        Phase::NewPrimary => !config.kill_switch,
        Phase::Verified => {
            !config.kill_switch
                && (config.basis_points > 0
                    || applied
                        .rollout
                        .overrides
                        .values()
                        .any(|s| *s == StorageSource::New))
        }
        _ => false,
    }
}

impl Guard {
    /// Starts the guard of this replica (stopped with `jobs`), with `flags` as thresholds
    /// until the rollout sets others.
    pub fn start<S: RolloutStore + PhaseStore + 'static>(
        store: Arc<S>,
        view: RolloutView,
        flags: GuardSettings,
        jobs: &Jobs,
        metrics: Arc<ServerMetrics>,
    ) -> Self {
        let guard = Self {
            window: Arc::default(),
            wake: Arc::default(),
            flags,
            view,
            metrics,
            was_tripped: Arc::default(),
        };
        let watcher = guard.clone();
        jobs.spawn(move |stop| watcher.watch(store, stop));
        guard
    }

    /// The thresholds in effect.
    pub fn settings(&self) -> GuardSettings {
        self.view
            .current()
            .rollout
            .config
            .automation
            .guard
            .unwrap_or(self.flags)
    }

    /// Counts one shadow comparison of `user`'s read (`*`: the all-users view).
    pub fn compared(&self, user: &str, mismatch: bool) {
        self.lock().compared(Instant::now(), user, mismatch);
        if mismatch {
            self.wake.notify_one();
        }
    }

    /// Counts one read of `source` that took `latency` (`failed`: it returned an error).
    pub fn read(&self, source: StorageSource, latency: Duration, failed: bool) {
        self.lock().read(Instant::now(), source, latency, failed);
        if failed && source == StorageSource::New {
            self.wake.notify_one();
        }
    }

    /// Comparisons this replica has counted since it started.
    pub fn compared_total(&self) -> u64 {
        self.lock().compared_total()
    }

    /// The window's figures now, leaving out quarantined users.
    pub fn figures(&self) -> Figures {
        let applied = self.view.current();
        let quarantined = &applied.rollout.quarantined;
        self.lock()
            .figures(Instant::now(), self.settings().window(), |u| {
                quarantined.contains(u)
            })
    }

    /// What the guard sees now.
    pub fn status(&self) -> GuardStatus {
        let applied = self.view.current();
        let automation = &applied.rollout.config.automation;
        let mut quarantined: Vec<String> = applied.rollout.quarantined.iter().cloned().collect();
        quarantined.sort_unstable();
        GuardStatus {
            settings: self.settings(),
            settings_from_rollout: automation.guard.is_some(),
            active: automation.tripped.is_none() && guarding(&applied),
            trip: automation.tripped.clone(),
            figures: self.figures(),
            quarantined,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn watch<S: RolloutStore + PhaseStore>(
        self,
        store: Arc<S>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut ticker = tokio::time::interval(GUARD_TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Each applied change is looked at at once: a re-arm must clear the window before
        // the reads that follow it are counted.
        let mut changes = self.view.subscribe();
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = self.wake.notified() => {}
                _ = changes.recv() => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
            if let Err(error) = self.step(store.as_ref()).await {
                tracing::warn!(%error, "the guard could not act; it tries again");
            }
        }
    }

    /// One look at the window: quarantines users whose reads keep disagreeing, and trips
    /// when a signal crosses its threshold. Answers the signal if this replica tripped.
    pub async fn step<S: RolloutStore + PhaseStore>(
        &self,
        store: &S,
    ) -> Result<Option<Signal>, AppError> {
        let applied = self.view.current();
        let automation = &applied.rollout.config.automation;
        let settings = automation.guard.unwrap_or(self.flags);
        {
            let mut was_tripped = self.was_tripped.lock().unwrap_or_else(|e| e.into_inner());
            if *was_tripped && automation.tripped.is_none() {
                // Re-armed: what it saw before speaks for a rollout that no longer is.
                self.lock().clear();
            }
            *was_tripped = automation.tripped.is_some();
        }
        let now = Instant::now();
        let mut excluded: HashSet<String> = applied.rollout.quarantined.clone();
        if automation.tripped.is_some() || !guarding(&applied) {
            let figures = self
                .lock()
                .figures(now, settings.window(), |u| excluded.contains(u));
            self.export(&figures);
            return Ok(None);
        }
        // Overrides decide only in VERIFIED: there a quarantine helps.
        if settings.quarantine_after > 0 && applied.phase == Phase::Verified {
            let offenders = self
                .lock()
                .repeat_offenders(settings.quarantine_after, |u| {
                    applied.rollout.overrides.contains_key(u)
                });
            for user in offenders {
                if excluded.len() >= settings.max_quarantined as usize {
                    let figures = self.lock().figures(now, settings.window(), |_| false);
                    return self
                        .trip(store, &applied, Signal::Quarantines, figures, settings)
                        .await;
                }
                self.quarantine(store, &user, settings).await?;
                excluded.insert(user);
            }
        }
        let figures = self
            .lock()
            .figures(now, settings.window(), |u| excluded.contains(u));
        self.export(&figures);
        match figures.crossed(&settings) {
            Some(signal) => self.trip(store, &applied, signal, figures, settings).await,
            None => Ok(None),
        }
    }

    fn export(&self, figures: &Figures) {
        self.metrics.guard_window(
            figures.comparisons,
            figures.mismatch_rate(),
            figures.error_rate(),
        );
    }

    async fn quarantine<S: RolloutStore + PhaseStore>(
        &self,
        store: &S,
        user: &str,
        settings: GuardSettings,
    ) -> Result<(), AppError> {
        let reason = format!(
            "{} or more of this user's shadow comparisons disagreed within {} s",
            settings.quarantine_after, settings.window_secs
        );
        let change = RolloutChange::Quarantine {
            user_id: user.to_owned(),
        };
        match change_rollout(store, &self.view, &change, None, GUARD_ACTOR, &reason).await {
            Ok(_) => {
                tracing::warn!(user, %reason, "guard quarantined a user: their reads go to legacy");
                self.metrics.guard_quarantined();
            }
            // A person pinned the user meanwhile, or another replica quarantined them.
            Err(AppError::RolloutRefused(RolloutRefused::AlreadyOverridden(_))) => {}
            Err(error) => return Err(error),
        }
        self.lock().forget_user(user);
        Ok(())
    }

    async fn trip<S: RolloutStore + PhaseStore>(
        &self,
        store: &S,
        applied: &Applied,
        signal: Signal,
        figures: Figures,
        settings: GuardSettings,
    ) -> Result<Option<Signal>, AppError> {
        // In NEW_PRIMARY the percentage does not route reads: only the kill switch does.
        let action = match applied.phase {
            Phase::NewPrimary => GuardAction::KillSwitch,
            _ => settings.action,
        };
        let reason = format!(
            "{} crossed over the last {} s: {figures}",
            signal.name(),
            settings.window_secs
        );
        let change = RolloutChange::GuardTrip {
            signal: signal.name().to_owned(),
            figures: figures.to_string(),
            action,
        };
        let tripped = match change_rollout(store, &self.view, &change, None, GUARD_ACTOR, &reason)
            .await
        {
            Ok(_) => {
                tracing::error!(signal = signal.name(), action = action.name(), %figures, "guard tripped: reads rolled back");
                self.metrics.guard_tripped(signal.name());
                Some(signal)
            }
            // Another replica tripped first; its rollback is already the one in effect.
            Err(AppError::RolloutRefused(RolloutRefused::GuardTripped(_))) => None,
            Err(error) => return Err(error),
        };
        self.lock().clear();
        *self.was_tripped.lock().unwrap_or_else(|e| e.into_inner()) = true;
        Ok(tripped)
    }
}
