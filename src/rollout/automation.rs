//! What runs the rollout besides people: the guard's run-time settings and state, and the
//! progressive schedule. Stored with the rollout (one versioned document), so every change
//! to them is audited and reaches every replica like any rollout change.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::GuardSettings;

/// The automation part of the rollout.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Automation {
    /// Thresholds set at run time for every replica; `None`: each replica's `--guard-*`
    /// flags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guard: Option<GuardSettings>,
    /// Set when the guard tripped; it acts again only once a person re-arms it (by
    /// releasing the kill switch, setting a percentage, or starting or resuming a schedule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tripped: Option<GuardTrip>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
}

/// Why and when the guard tripped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuardTrip {
    pub at: DateTime<Utc>,
    /// The signal's name ([`super::Signal::name`]).
    pub signal: String,
    /// The window's figures when it tripped.
    pub figures: String,
}

/// Where a schedule stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleStatus {
    /// Advancing while the guard is green.
    Running,
    /// Paused by a person.
    Paused,
    /// Stopped by the guard's trip; a person resumes it.
    Halted,
    /// Abandoned by a person.
    Aborted,
    /// Reached its last step.
    Done,
}

impl ScheduleStatus {
    pub const ALL: [ScheduleStatus; 5] = [
        ScheduleStatus::Running,
        ScheduleStatus::Paused,
        ScheduleStatus::Halted,
        ScheduleStatus::Aborted,
        ScheduleStatus::Done,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ScheduleStatus::Running => "running",
            ScheduleStatus::Paused => "paused",
            ScheduleStatus::Halted => "halted",
            ScheduleStatus::Aborted => "aborted",
            ScheduleStatus::Done => "done",
        }
    }
}

/// A progressive schedule: the percentage walks through `steps`, advancing from one to the
/// next once it has dwelt `dwell_secs` there, seen `min_comparisons` shadow comparisons,
/// and the guard is green.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    /// Percentages in basis points, rising.
    pub steps: Vec<u32>,
    pub dwell_secs: u32,
    pub min_comparisons: u32,
    /// Index into `steps` of the step in effect.
    pub step: usize,
    pub status: ScheduleStatus,
    /// When the step in effect began (or the schedule was last resumed).
    pub step_started_at: DateTime<Utc>,
    /// After a guard trip halts the schedule, how long it waits before resuming by itself
    /// (at the last green step, once the guard is green again). `None`: only a person
    /// resumes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cool_down_secs: Option<u32>,
    /// Whether the schedule may still resume by itself after a trip. Set at the start when
    /// a cool-down is given; spent by that one resumption (a second trip waits for a
    /// person, so the rollout never flaps) or by a person taking over (setting a percentage
    /// or engaging the kill switch).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resumes_itself: bool,
}

impl Schedule {
    /// The percentage of the step in effect.
    pub fn basis_points(&self) -> u32 {
        self.steps.get(self.step).copied().unwrap_or(0)
    }

    /// `step N of M (P%)`, as the audit and the CLI show it.
    pub fn describe(&self) -> String {
        format!(
            "{} at step {} of {} ({:.2}%)",
            self.status.name(),
            self.step + 1,
            self.steps.len(),
            f64::from(self.basis_points()) / 100.0
        )
    }

    /// When the schedule, halted by `trip`, may resume by itself (the guard's figures are
    /// the driver's to check); `None` when it waits for a person.
    pub fn resumes_at(&self, trip: Option<&GuardTrip>) -> Option<DateTime<Utc>> {
        let (Some(secs), Some(trip)) = (self.cool_down_secs, trip) else {
            return None;
        };
        (self.status == ScheduleStatus::Halted && self.resumes_itself)
            .then(|| trip.at + chrono::Duration::seconds(i64::from(secs)))
    }

    /// Whether, at `now`, the schedule is halted by `trip` and has cooled down long enough
    /// to resume by itself (see [`Schedule::resumes_at`]).
    pub fn cooled_down(&self, trip: Option<&GuardTrip>, now: DateTime<Utc>) -> bool {
        self.resumes_at(trip).is_some_and(|at| now >= at)
    }

    /// Whether the step in effect has dwelt long enough at `now`.
    pub fn dwelt(&self, now: DateTime<Utc>) -> bool {
        now - self.step_started_at >= chrono::Duration::seconds(i64::from(self.dwell_secs))
    }
}

/// Why a schedule's steps are not acceptable, if they are not: at least one, each above 0 and
/// at most 10,000 basis points, strictly rising.
pub fn check_steps(steps: &[u32]) -> Result<(), String> {
    if steps.is_empty() {
        return Err("must list at least one step".to_owned());
    }
    if steps.iter().any(|s| *s == 0 || *s > super::BUCKETS) {
        return Err("each step must be above 0 and at most 100%".to_owned());
    }
    if steps.windows(2).any(|w| w[0] >= w[1]) {
        return Err("steps must rise".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_must_rise_within_bounds() {
        assert!(check_steps(&[100, 500, 10_000]).is_ok());
        assert!(check_steps(&[]).is_err());
        assert!(check_steps(&[0, 100]).is_err());
        assert!(check_steps(&[500, 100]).is_err());
        assert!(check_steps(&[100, 10_001]).is_err());
    }

    #[test]
    fn automation_reads_back_what_it_stored() {
        let automation = Automation {
            guard: Some(GuardSettings::DEFAULT),
            tripped: None,
            schedule: Some(Schedule {
                steps: vec![100, 500],
                dwell_secs: 30,
                min_comparisons: 10,
                step: 1,
                status: ScheduleStatus::Running,
                step_started_at: Utc::now(),
                cool_down_secs: Some(600),
                resumes_itself: true,
            }),
        };
        let text = serde_json::to_string(&automation).expect("serialises");
        let back: Automation = serde_json::from_str(&text).expect("parses");
        assert_eq!(back, automation);
        let empty: Automation = serde_json::from_str("{}").expect("parses");
        assert_eq!(empty, Automation::default());
    }

    #[test]
    fn a_halted_schedule_cools_down_once_armed_and_only_after_its_time() {
        let tripped_at = Utc::now();
        let trip = GuardTrip {
            at: tripped_at,
            signal: "mismatch_rate".into(),
            figures: String::new(),
        };
        let schedule = Schedule {
            steps: vec![100, 500],
            dwell_secs: 0,
            min_comparisons: 0,
            step: 1,
            status: ScheduleStatus::Halted,
            step_started_at: tripped_at,
            cool_down_secs: Some(60),
            resumes_itself: true,
        };
        let later = |secs| tripped_at + chrono::Duration::seconds(secs);
        assert!(!schedule.cooled_down(Some(&trip), later(59)));
        assert!(schedule.cooled_down(Some(&trip), later(60)));
        assert!(
            !schedule.cooled_down(None, later(60)),
            "no trip, nothing to resume from"
        );
        let spent = Schedule {
            resumes_itself: false,
            ..schedule.clone()
        };
        assert!(!spent.cooled_down(Some(&trip), later(600)));
        let paused = Schedule {
            status: ScheduleStatus::Paused,
            ..schedule.clone()
        };
        assert!(!paused.cooled_down(Some(&trip), later(600)));
        let without = Schedule {
            cool_down_secs: None,
            ..schedule
        };
        assert!(!without.cooled_down(Some(&trip), later(600)));
    }
}
