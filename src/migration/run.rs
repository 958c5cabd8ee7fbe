use std::fmt;

use chrono::{DateTime, NaiveDate, Utc};

use super::ambiguous::{Ambiguity, AmbiguityKind, Resolution};
use super::backfill::LegacyRow;

/// What a run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    Backfill,
    Verify,
}

impl RunKind {
    pub const fn name(self) -> &'static str {
        match self {
            RunKind::Backfill => "backfill",
            RunKind::Verify => "verify",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [RunKind::Backfill, RunKind::Verify]
            .into_iter()
            .find(|k| k.name() == name)
    }
}

/// Where a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Completed,
    Failed,
    /// Stopped before the end (the server shut down); a backfill resumes from its checkpoint.
    Cancelled,
}

impl RunState {
    pub const fn name(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Completed => "completed",
            RunState::Failed => "failed",
            RunState::Cancelled => "cancelled",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [
            RunState::Running,
            RunState::Completed,
            RunState::Failed,
            RunState::Cancelled,
        ]
        .into_iter()
        .find(|s| s.name() == name)
    }

    /// Whether the run has ended.
    pub fn is_final(self) -> bool {
        self != RunState::Running
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A backfill or verify run as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub run_id: String,
    pub kind: RunKind,
    pub actor: String,
    pub dry_run: bool,
    pub state: RunState,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub batch_size: u32,
    pub processed: u64,
    pub copied: u64,
    pub skipped: u64,
    pub ambiguous: u64,
    pub failed: u64,
    pub compared: u64,
    pub mismatches: u64,
    /// The last legacy key done: a resumed backfill starts after it.
    pub checkpoint: Option<(String, NaiveDate)>,
    pub last_error: Option<String>,
    /// Times the run was resumed from its checkpoint (after a cancel, a shutdown or a crash).
    pub resumes: u32,
}

/// A legacy row a run reported instead of copying (backfill), or found different (verify).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunIssue {
    pub campaign_id: String,
    pub user_id: String,
    pub stat_date: NaiveDate,
    pub reason: String,
    /// Why a backfill reported the row (`None` for verify's differences, and for rows
    /// reported before kinds were kept).
    pub kind: Option<AmbiguityKind>,
    /// What the operator decided for the row's `(campaign, day)`, if anything yet.
    pub resolution: Option<Resolution>,
}

impl RunIssue {
    /// A legacy row a backfill reported for `ambiguity`.
    pub fn reported(row: &LegacyRow, ambiguity: Ambiguity) -> Self {
        Self {
            campaign_id: row.campaign_id.clone(),
            user_id: row.user_id.clone(),
            stat_date: row.stat_date,
            reason: ambiguity.detail,
            kind: Some(ambiguity.kind),
            resolution: None,
        }
    }
}
