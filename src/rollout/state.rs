use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};

use super::{
    BUCKETS, GuardAction, GuardSettings, GuardTrip, RolloutConfig, Schedule, ScheduleStatus,
};
use crate::domain::StorageSource;

/// The whole rollout as stored: the versioned settings and every per-user override.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutSnapshot {
    pub config: RolloutConfig,
    pub updated_at: DateTime<Utc>,
    pub overrides: HashMap<String, StorageSource>,
    /// The users among `overrides` the guard pinned to LEGACY (quarantined).
    pub quarantined: HashSet<String>,
}

/// One change to the rollout; each bumps the version and is audited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RolloutChange {
    /// Set the share of users reading NEW (hundredths of a percent). `forced`: staged before
    /// VERIFIED (it takes effect only from VERIFIED).
    Percentage {
        basis_points: u32,
        forced: bool,
    },
    KillSwitch {
        engaged: bool,
    },
    /// A new salt: every user gets a new bucket.
    Salt {
        salt: String,
    },
    SetOverride {
        user_id: String,
        source: StorageSource,
    },
    ClearOverride {
        user_id: String,
    },
    /// Shadow this share of reads (millionths) on every replica; `None`: each replica's own
    /// `--shadow-sample-rate` again.
    ShadowSampleRate {
        ppm: Option<u32>,
    },
    /// Guard thresholds for every replica; `None`: each replica's `--guard-*` flags again.
    GuardSettings {
        settings: Option<GuardSettings>,
    },
    /// The guard rolls reads back (made by the service, actor `guard`).
    GuardTrip {
        signal: String,
        figures: String,
        action: GuardAction,
    },
    /// The guard pins one user whose reads disagree to LEGACY (actor `guard`).
    Quarantine {
        user_id: String,
    },
    /// Starts a progressive schedule at its first step; with `cool_down_secs`, it resumes by
    /// itself once after a guard trip (see [`RolloutChange::ScheduleRecover`]).
    ScheduleStart {
        steps: Vec<u32>,
        dwell_secs: u32,
        min_comparisons: u32,
        cool_down_secs: Option<u32>,
    },
    /// The schedule moves on from step `from_step` (made by the service, actor `schedule`).
    ScheduleAdvance {
        from_step: usize,
    },
    SchedulePause,
    /// Resumes a paused or halted schedule at its step, whose dwell starts again.
    ScheduleResume,
    ScheduleAbort,
    /// A schedule halted by a guard trip resumes by itself, its cool-down over and the guard
    /// green again (made by the service, actor `schedule`): at the last green step (one
    /// back from where the kill switch stopped it; where a step-back left it), with the kill
    /// switch released and the guard re-armed. Once per schedule.
    ScheduleRecover,
}

/// Why a rollout change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RolloutRefused {
    #[error("version conflict: expected version {expected}, the current version is {current}")]
    VersionConflict { expected: u64, current: u64 },
    #[error("the read percentage cannot leave 0 before VERIFIED (the phase is {0}) unless forced")]
    NotVerified(crate::migration::Phase),
    #[error("the kill switch cannot be engaged in LEGACY_RETIRED: legacy is no longer written")]
    LegacyRetired,
    #[error("the guard has already tripped ({0}); a person re-arms it")]
    GuardTripped(String),
    #[error("user {0} already has an override")]
    AlreadyOverridden(String),
    #[error("user {0} has no override")]
    NoOverride(String),
    #[error("{0}")]
    Schedule(String),
}

/// One audited change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub version: u64,
    pub actor: String,
    pub at: DateTime<Utc>,
    pub change: String,
    pub before: String,
    pub after: String,
    pub reason: String,
}

fn percent(basis_points: u32) -> String {
    format!("{}.{:02}%", basis_points / 100, basis_points % 100)
}

fn source_name(source: Option<StorageSource>) -> &'static str {
    source.map_or("none", StorageSource::name)
}

/// What applying `change` to `config` at `now` (with the override currently stored for the
/// user the change names) gives: the new settings, and the change, before and after as the
/// audit shows them. The version is bumped by one. A person's change that takes the
/// percentage back into their hands (see [`rearms_guard`]) re-arms a tripped guard.
pub fn apply(
    change: &RolloutChange,
    config: &RolloutConfig,
    current_override: Option<StorageSource>,
    now: DateTime<Utc>,
) -> (RolloutConfig, String, String, String) {
    let mut next = RolloutConfig {
        version: config.version + 1,
        ..config.clone()
    };
    let (what, before, mut after) = apply_change(change, config, &mut next, current_override, now);
    if rearms_guard(change) && next.automation.tripped.take().is_some() {
        after.push_str("; guard re-armed");
    }
    // A person moving the percentage or engaging the kill switch takes over from a running
    // schedule, which would otherwise move the percentage under them.
    let takes_over = matches!(
        change,
        RolloutChange::Percentage { .. } | RolloutChange::KillSwitch { engaged: true }
    );
    if let Some(schedule) = next.automation.schedule.as_mut()
        && takes_over
    {
        if schedule.status == ScheduleStatus::Running {
            schedule.status = ScheduleStatus::Paused;
            after.push_str("; schedule paused");
        }
        // A person who took over decides what comes next: their kill switch or percentage is
        // never undone by the schedule resuming itself.
        if schedule.resumes_itself {
            schedule.resumes_itself = false;
            after.push_str("; schedule no longer resumes itself");
        }
    }
    (next, what, before, after)
}

/// Whether `change` re-arms a tripped guard: a person releasing the kill switch, setting a
/// percentage, or starting or resuming a schedule takes the rollout back into their hands.
pub fn rearms_guard(change: &RolloutChange) -> bool {
    matches!(
        change,
        RolloutChange::KillSwitch { engaged: false }
            | RolloutChange::Percentage { .. }
            | RolloutChange::ScheduleStart { .. }
            | RolloutChange::ScheduleResume
    )
}

fn schedule_text(schedule: Option<&Schedule>) -> String {
    schedule.map_or("none".to_owned(), Schedule::describe)
}

fn rollout_text(config: &RolloutConfig) -> String {
    format!(
        "percentage {}, kill switch {}",
        percent(config.basis_points),
        if config.kill_switch {
            "engaged"
        } else {
            "released"
        }
    )
}

/// [`apply`]'s change itself: writes `next`, answers what, before and after.
fn apply_change(
    change: &RolloutChange,
    config: &RolloutConfig,
    next: &mut RolloutConfig,
    current_override: Option<StorageSource>,
    now: DateTime<Utc>,
) -> (String, String, String) {
    match change {
        RolloutChange::Percentage {
            basis_points,
            forced,
        } => {
            next.basis_points = (*basis_points).min(BUCKETS);
            (
                if *forced {
                    "percentage (forced)"
                } else {
                    "percentage"
                }
                .to_owned(),
                percent(config.basis_points),
                percent(next.basis_points),
            )
        }
        RolloutChange::KillSwitch { engaged } => {
            next.kill_switch = *engaged;
            let state = |on: bool| if on { "engaged" } else { "released" }.to_owned();
            (
                "kill switch".to_owned(),
                state(config.kill_switch),
                state(*engaged),
            )
        }
        RolloutChange::Salt { salt } => {
            next.salt = salt.clone();
            ("salt".to_owned(), config.salt.clone(), salt.clone())
        }
        RolloutChange::SetOverride { user_id, source } => (
            format!("override {user_id}"),
            source_name(current_override).to_owned(),
            source_name(Some(*source)).to_owned(),
        ),
        RolloutChange::ClearOverride { user_id } => (
            format!("override {user_id}"),
            source_name(current_override).to_owned(),
            "none".to_owned(),
        ),
        RolloutChange::ShadowSampleRate { ppm } => {
            next.shadow_sample_ppm = ppm.map(|p| p.min(1_000_000));
            let rate = |ppm: Option<u32>| {
                ppm.map_or("server default".to_owned(), |p| {
                    format!("{:.4}%", f64::from(p) / 10_000.0)
                })
            };
            (
                "shadow sample rate".to_owned(),
                rate(config.shadow_sample_ppm),
                rate(next.shadow_sample_ppm),
            )
        }
        RolloutChange::GuardSettings { settings } => {
            next.automation.guard = *settings;
            let text =
                |s: Option<GuardSettings>| s.map_or("server flags".to_owned(), |s| s.to_string());
            (
                "guard settings".to_owned(),
                text(config.automation.guard),
                text(next.automation.guard),
            )
        }
        RolloutChange::GuardTrip {
            signal,
            figures,
            action,
        } => {
            let before = rollout_text(config);
            match action {
                GuardAction::KillSwitch => next.kill_switch = true,
                GuardAction::StepBack => {
                    // Back to the last step the guard was green on: the one before the
                    // schedule's current step, or 0 % without one.
                    let schedule = next.automation.schedule.as_mut();
                    next.basis_points = match schedule {
                        Some(s) if s.status == ScheduleStatus::Running && s.step > 0 => {
                            s.step -= 1;
                            s.basis_points()
                        }
                        _ => 0,
                    };
                }
            }
            if let Some(schedule) = next.automation.schedule.as_mut()
                && matches!(
                    schedule.status,
                    ScheduleStatus::Running | ScheduleStatus::Paused
                )
            {
                schedule.status = ScheduleStatus::Halted;
            }
            next.automation.tripped = Some(GuardTrip {
                at: now,
                signal: signal.clone(),
                figures: figures.clone(),
            });
            (
                format!("guard trip ({signal}, {})", action.name()),
                before,
                rollout_text(next),
            )
        }
        RolloutChange::Quarantine { user_id } => (
            format!("quarantine {user_id}"),
            source_name(current_override).to_owned(),
            "legacy".to_owned(),
        ),
        RolloutChange::ScheduleStart {
            steps,
            dwell_secs,
            min_comparisons,
            cool_down_secs,
        } => {
            let schedule = Schedule {
                steps: steps.clone(),
                dwell_secs: *dwell_secs,
                min_comparisons: *min_comparisons,
                step: 0,
                status: ScheduleStatus::Running,
                step_started_at: now,
                cool_down_secs: *cool_down_secs,
                resumes_itself: cool_down_secs.is_some(),
            };
            next.basis_points = schedule.basis_points();
            let steps: Vec<String> = steps.iter().map(|s| percent(*s)).collect();
            next.automation.schedule = Some(schedule);
            (
                "schedule start".to_owned(),
                format!(
                    "{}; {}",
                    schedule_text(config.automation.schedule.as_ref()),
                    rollout_text(config)
                ),
                format!(
                    "steps {} (dwell {} s, {} comparisons each; {}); {}",
                    steps.join(" → "),
                    dwell_secs,
                    min_comparisons,
                    cool_down_secs.map_or("a person resumes it after a trip".to_owned(), |s| {
                        format!("resumes itself once, {s} s after a trip")
                    }),
                    rollout_text(next)
                ),
            )
        }
        RolloutChange::ScheduleAdvance { .. } => {
            if let Some(schedule) = next.automation.schedule.as_mut() {
                schedule.step = (schedule.step + 1).min(schedule.steps.len() - 1);
                schedule.step_started_at = now;
                if schedule.step + 1 == schedule.steps.len() {
                    schedule.status = ScheduleStatus::Done;
                }
                next.basis_points = schedule.basis_points();
            }
            schedule_change("schedule advance", config, next)
        }
        RolloutChange::SchedulePause => {
            set_status(next, ScheduleStatus::Paused);
            schedule_change("schedule pause", config, next)
        }
        RolloutChange::ScheduleResume => {
            if let Some(schedule) = next.automation.schedule.as_mut() {
                schedule.status = ScheduleStatus::Running;
                schedule.step_started_at = now;
                next.basis_points = schedule.basis_points();
            }
            schedule_change("schedule resume", config, next)
        }
        RolloutChange::ScheduleAbort => {
            set_status(next, ScheduleStatus::Aborted);
            schedule_change("schedule abort", config, next)
        }
        RolloutChange::ScheduleRecover => {
            // The kill switch left the schedule on the step that tripped; a step-back
            // already moved it to the last green one.
            let stopped_by_kill_switch = config.kill_switch;
            next.kill_switch = false;
            next.automation.tripped = None;
            if let Some(schedule) = next.automation.schedule.as_mut() {
                if stopped_by_kill_switch {
                    schedule.step = schedule.step.saturating_sub(1);
                }
                schedule.status = ScheduleStatus::Running;
                schedule.step_started_at = now;
                schedule.resumes_itself = false;
                next.basis_points = schedule.basis_points();
            }
            let (what, before, after) = schedule_change("schedule recover", config, next);
            (what, before, format!("{after}; guard re-armed"))
        }
    }
}

fn set_status(next: &mut RolloutConfig, status: ScheduleStatus) {
    if let Some(schedule) = next.automation.schedule.as_mut() {
        schedule.status = status;
    }
}

fn schedule_change(
    what: &str,
    config: &RolloutConfig,
    next: &RolloutConfig,
) -> (String, String, String) {
    let text = |c: &RolloutConfig| {
        format!(
            "{}; {}",
            schedule_text(c.automation.schedule.as_ref()),
            rollout_text(c)
        )
    };
    (what.to_owned(), text(config), text(next))
}

/// Refuses changes the migration phase, or the state of the guard and the schedule in
/// `config`, does not allow.
pub fn check_change(
    change: &RolloutChange,
    phase: crate::migration::Phase,
    config: &RolloutConfig,
    current_override: Option<StorageSource>,
) -> Result<(), RolloutRefused> {
    use crate::migration::Phase;
    let schedule = config.automation.schedule.as_ref();
    let status = schedule.map(|s| s.status);
    let refuse = |why: &str| Err(RolloutRefused::Schedule(why.to_owned()));
    match change {
        RolloutChange::GuardTrip { action, .. } => {
            if let Some(trip) = &config.automation.tripped {
                return Err(RolloutRefused::GuardTripped(trip.signal.clone()));
            }
            if *action == GuardAction::KillSwitch && phase == Phase::LegacyRetired {
                return Err(RolloutRefused::LegacyRetired);
            }
            Ok(())
        }
        RolloutChange::Quarantine { user_id } if current_override.is_some() => {
            Err(RolloutRefused::AlreadyOverridden(user_id.clone()))
        }
        // Nothing to clear: no change, so no new version and no audit entry.
        RolloutChange::ClearOverride { user_id } if current_override.is_none() => {
            Err(RolloutRefused::NoOverride(user_id.clone()))
        }
        RolloutChange::ScheduleStart { .. } if phase < Phase::Verified => {
            Err(RolloutRefused::NotVerified(phase))
        }
        RolloutChange::ScheduleStart { .. } if status == Some(ScheduleStatus::Running) => {
            refuse("a schedule is running; pause or abort it first")
        }
        RolloutChange::ScheduleAdvance { from_step } => match schedule {
            Some(s) if s.status == ScheduleStatus::Running && s.step == *from_step => Ok(()),
            _ => refuse("the schedule moved on meanwhile"),
        },
        RolloutChange::SchedulePause if status != Some(ScheduleStatus::Running) => {
            refuse("no schedule is running")
        }
        RolloutChange::ScheduleResume => match status {
            Some(ScheduleStatus::Paused | ScheduleStatus::Halted) if config.kill_switch => {
                refuse("the kill switch is engaged; release it before resuming the schedule")
            }
            Some(ScheduleStatus::Paused | ScheduleStatus::Halted) => Ok(()),
            _ => refuse("no schedule is paused or halted"),
        },
        RolloutChange::ScheduleRecover
            if schedule
                .and_then(|s| s.resumes_at(config.automation.tripped.as_ref()))
                .is_none() =>
        {
            refuse("the schedule is not halted by a trip it may resume itself from")
        }
        RolloutChange::ScheduleAbort
            if !matches!(
                status,
                Some(ScheduleStatus::Running | ScheduleStatus::Paused | ScheduleStatus::Halted)
            ) =>
        {
            refuse("no schedule is under way")
        }
        RolloutChange::Percentage {
            basis_points,
            forced: false,
        } if *basis_points > 0 && phase < Phase::Verified => {
            Err(RolloutRefused::NotVerified(phase))
        }
        RolloutChange::KillSwitch { engaged: true } if phase == Phase::LegacyRetired => {
            Err(RolloutRefused::LegacyRetired)
        }
        _ => Ok(()),
    }
}

/// The user a change is about, if any.
pub fn change_user(change: &RolloutChange) -> Option<&str> {
    match change {
        RolloutChange::SetOverride { user_id, .. }
        | RolloutChange::ClearOverride { user_id }
        | RolloutChange::Quarantine { user_id } => Some(user_id),
        _ => None,
    }
}

/// The state a replica applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub phase: crate::migration::Phase,
    pub rollout: RolloutSnapshot,
}

/// The pseudo-user the all-users view is routed as (so it can be overridden on its own).
pub const ALL_USERS: &str = "*";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::Phase;

    fn config() -> RolloutConfig {
        RolloutConfig {
            basis_points: 0,
            kill_switch: false,
            salt: "s".into(),
            version: 1,
            shadow_sample_ppm: None,
            automation: Default::default(),
        }
    }

    fn applied(change: &RolloutChange, config: &RolloutConfig) -> RolloutConfig {
        check_change(change, Phase::Verified, config, None).expect("allowed");
        apply(change, config, None, Utc::now()).0
    }

    fn started() -> RolloutConfig {
        started_cooling_down(None)
    }

    fn started_cooling_down(cool_down_secs: Option<u32>) -> RolloutConfig {
        let start = RolloutChange::ScheduleStart {
            steps: vec![100, 500, 2_500],
            dwell_secs: 0,
            min_comparisons: 0,
            cool_down_secs,
        };
        applied(&start, &config())
    }

    fn trip(action: GuardAction) -> RolloutChange {
        RolloutChange::GuardTrip {
            signal: "mismatch_rate".into(),
            figures: "1 of 21".into(),
            action,
        }
    }

    #[test]
    fn a_schedule_walks_its_steps_and_finishes() {
        let running = started();
        assert_eq!(running.basis_points, 100);
        let second = applied(&RolloutChange::ScheduleAdvance { from_step: 0 }, &running);
        assert_eq!(second.basis_points, 500);
        let stale = check_change(
            &RolloutChange::ScheduleAdvance { from_step: 0 },
            Phase::Verified,
            &second,
            None,
        );
        assert!(
            matches!(stale, Err(RolloutRefused::Schedule(_))),
            "no double advance"
        );
        let last = applied(&RolloutChange::ScheduleAdvance { from_step: 1 }, &second);
        let schedule = last.automation.schedule.as_ref().expect("schedule");
        assert_eq!(
            (last.basis_points, schedule.status),
            (2_500, ScheduleStatus::Done)
        );
    }

    #[test]
    fn a_trip_steps_back_and_halts_and_only_a_person_re_arms() {
        let second = applied(&RolloutChange::ScheduleAdvance { from_step: 0 }, &started());
        let tripped = applied(&trip(GuardAction::StepBack), &second);
        let schedule = tripped.automation.schedule.as_ref().expect("schedule");
        assert_eq!(tripped.basis_points, 100, "back to the last green step");
        assert_eq!(
            (schedule.step, schedule.status),
            (0, ScheduleStatus::Halted)
        );
        assert!(tripped.automation.tripped.is_some());
        // A second trip (another replica) is refused; the schedule cannot advance.
        assert!(matches!(
            check_change(
                &trip(GuardAction::KillSwitch),
                Phase::Verified,
                &tripped,
                None
            ),
            Err(RolloutRefused::GuardTripped(_))
        ));
        assert!(
            check_change(
                &RolloutChange::ScheduleAdvance { from_step: 0 },
                Phase::Verified,
                &tripped,
                None
            )
            .is_err()
        );
        // Resuming re-arms it and restores the step's percentage.
        let (resumed, _, _, after) =
            apply(&RolloutChange::ScheduleResume, &tripped, None, Utc::now());
        assert!(resumed.automation.tripped.is_none());
        assert!(after.ends_with("guard re-armed"), "{after}");
        assert_eq!(resumed.basis_points, 100);
    }

    #[test]
    fn a_kill_switch_trip_waits_for_a_person_to_release_it() {
        let tripped = applied(&trip(GuardAction::KillSwitch), &started());
        assert!(tripped.kill_switch);
        assert!(matches!(
            check_change(
                &RolloutChange::ScheduleResume,
                Phase::Verified,
                &tripped,
                None
            ),
            Err(RolloutRefused::Schedule(_))
        ));
        let released = applied(&RolloutChange::KillSwitch { engaged: false }, &tripped);
        assert!(released.automation.tripped.is_none() && !released.kill_switch);
        // Salt or shadow changes do not re-arm it.
        let salted = applied(&RolloutChange::Salt { salt: "t".into() }, &tripped);
        assert!(salted.automation.tripped.is_some());
    }

    #[test]
    fn a_schedule_with_a_cool_down_resumes_itself_once_at_the_last_green_step() {
        let second = applied(
            &RolloutChange::ScheduleAdvance { from_step: 0 },
            &started_cooling_down(Some(60)),
        );
        let recover = RolloutChange::ScheduleRecover;
        assert!(
            check_change(&recover, Phase::Verified, &second, None).is_err(),
            "nothing to recover from while running"
        );
        // Stopped by the kill switch on step 2: back on step 1, the switch released.
        let tripped = applied(&trip(GuardAction::KillSwitch), &second);
        let (resumed, what, _, after) = apply(&recover, &tripped, None, Utc::now());
        check_change(&recover, Phase::Verified, &tripped, None).expect("allowed");
        let schedule = resumed.automation.schedule.as_ref().expect("schedule");
        assert_eq!(
            (
                schedule.step,
                schedule.status,
                resumed.basis_points,
                resumed.kill_switch
            ),
            (0, ScheduleStatus::Running, 100, false)
        );
        assert!(resumed.automation.tripped.is_none());
        assert_eq!(what, "schedule recover");
        assert!(after.ends_with("guard re-armed"), "{after}");
        // A second trip waits for a person.
        let again = applied(&trip(GuardAction::StepBack), &resumed);
        assert!(check_change(&recover, Phase::Verified, &again, None).is_err());

        // Stopped by a step back: it resumes where the step back left it.
        let stepped = applied(&trip(GuardAction::StepBack), &second);
        let resumed = applied(&recover, &stepped);
        let schedule = resumed.automation.schedule.as_ref().expect("schedule");
        assert_eq!((schedule.step, resumed.basis_points), (0, 100));

        // Without a cool-down, or once a person took over, never by itself.
        let plain = applied(&trip(GuardAction::KillSwitch), &started());
        assert!(check_change(&recover, Phase::Verified, &plain, None).is_err());
        let held = applied(&RolloutChange::KillSwitch { engaged: true }, &tripped);
        assert!(check_change(&recover, Phase::Verified, &held, None).is_err());
        let stepped_back = applied(&trip(GuardAction::StepBack), &second);
        let set = RolloutChange::Percentage {
            basis_points: 50,
            forced: false,
        };
        let (by_hand, _, _, after) = apply(&set, &stepped_back, None, Utc::now());
        let schedule = by_hand.automation.schedule.as_ref().expect("schedule");
        assert!(!schedule.resumes_itself, "{after}");
        assert!(after.contains("no longer resumes itself"), "{after}");
    }

    #[test]
    fn a_person_moving_the_percentage_pauses_the_schedule() {
        let set = RolloutChange::Percentage {
            basis_points: 300,
            forced: false,
        };
        let (moved, _, _, after) = apply(&set, &started(), None, Utc::now());
        let schedule = moved.automation.schedule.as_ref().expect("schedule");
        assert_eq!(schedule.status, ScheduleStatus::Paused);
        assert!(after.ends_with("schedule paused"), "{after}");
        assert!(matches!(
            check_change(
                &RolloutChange::ScheduleStart {
                    steps: vec![100],
                    dwell_secs: 0,
                    min_comparisons: 0,
                    cool_down_secs: None,
                },
                Phase::Backfilled,
                &config(),
                None
            ),
            Err(RolloutRefused::NotVerified(_))
        ));
    }

    #[test]
    fn a_quarantine_never_replaces_an_override() {
        let quarantine = RolloutChange::Quarantine {
            user_id: "u".into(),
        };
        assert!(matches!(
            check_change(
                &quarantine,
                Phase::Verified,
                &config(),
                Some(StorageSource::New)
            ),
            Err(RolloutRefused::AlreadyOverridden(_))
        ));
        assert_eq!(change_user(&quarantine), Some("u"));
    }
}
