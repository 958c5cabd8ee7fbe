//! Retention: raw events are kept for `--raw-retention-days` (rollups forever), and their
//! partitions are made ahead of need. A supervised loop around one testable pass.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;

use crate::storage::{Pruned, RetentionStore, StorageError};

/// How raw events are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionSettings {
    /// Raw events that occurred longer ago than this, and idempotency keys recorded longer ago,
    /// are removed; `None`: kept forever.
    pub raw_retention: Option<Duration>,
    /// Months after the current one whose raw-event partitions are made ahead (PostgreSQL).
    pub partitions_ahead_months: u32,
    /// How often a pass runs (the first right after start).
    pub every: Duration,
    /// Rows one step deletes at most, so that no step holds locks for long.
    pub batch_rows: u32,
}

impl RetentionSettings {
    pub const DEFAULT: Self = Self {
        raw_retention: None,
        partitions_ahead_months: 3,
        every: Duration::from_secs(3600),
        batch_rows: 5_000,
    };

    /// Raw events before this are removed by a pass at `now`; `None` when all are kept.
    pub fn cutoff(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let kept = chrono::Duration::from_std(self.raw_retention?).ok()?;
        now.checked_sub_signed(kept)
    }
}

impl Default for RetentionSettings {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// One pass at `now`: partitions made ahead, then raw events and keys past the retention
/// removed step by step, until none is left, another replica is at it, or `stop` turns true
/// (between steps: each step commits on its own).
pub async fn retention_pass<S: RetentionStore>(
    store: &S,
    settings: &RetentionSettings,
    now: DateTime<Utc>,
    stop: &watch::Receiver<bool>,
) -> Result<Pruned, StorageError> {
    store
        .prepare_partitions(now.date_naive(), settings.partitions_ahead_months)
        .await?;
    let mut total = Pruned::default();
    let Some(cutoff) = settings.cutoff(now) else {
        return Ok(total);
    };
    while !*stop.borrow() {
        let Some(step) = store.prune_raw(cutoff, settings.batch_rows).await? else {
            break; // another replica is pruning
        };
        let more = step.events + step.keys > 0;
        total.partitions.extend(step.partitions);
        total.events += step.events;
        total.keys += step.keys;
        if !more {
            break;
        }
    }
    Ok(total)
}

/// Runs [`retention_pass`] every [`RetentionSettings::every`] until `stop` turns true; a
/// failed pass is logged and tried again at the next turn.
pub async fn keep_raw_events_trimmed<S: RetentionStore>(
    store: Arc<S>,
    settings: RetentionSettings,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(settings.every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        match retention_pass(store.as_ref(), &settings, Utc::now(), &stop).await {
            Ok(pruned) if pruned != Pruned::default() => tracing::info!(
                partitions = ?pruned.partitions,
                events = pruned.events,
                keys = pruned.keys,
                "raw events past the retention removed"
            ),
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "retention pass failed; retried next time"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cutoff_is_the_retention_before_now() {
        let now = DateTime::parse_from_rfc3339("2026-12-03T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(RetentionSettings::DEFAULT.cutoff(now), None);
        let thirty_days = RetentionSettings {
            raw_retention: Some(Duration::from_secs(30 * 86_400)),
            ..RetentionSettings::DEFAULT
        };
        assert_eq!(
            thirty_days.cutoff(now).unwrap().to_rfc3339(),
            "2026-11-03T10:00:00+00:00"
        );
    }
}
