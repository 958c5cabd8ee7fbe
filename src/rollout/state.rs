use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::{BUCKETS, RolloutConfig};
use crate::domain::StorageSource;

/// The whole rollout as stored: the versioned settings and every per-user override.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutSnapshot {
    pub config: RolloutConfig,
    pub updated_at: DateTime<Utc>,
    pub overrides: HashMap<String, StorageSource>,
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

/// What applying `change` to `config` (with the override currently stored for the user the
/// change names) gives: the new settings, and the change, before and after as the audit
/// shows them. The version is bumped by one.
pub fn apply(
    change: &RolloutChange,
    config: &RolloutConfig,
    current_override: Option<StorageSource>,
) -> (RolloutConfig, String, String, String) {
    let mut next = RolloutConfig {
        version: config.version + 1,
        ..config.clone()
    };
    let (what, before, after) = match change {
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
    };
    (next, what, before, after)
}

/// Refuses changes the migration phase does not allow.
pub fn check_change(
    change: &RolloutChange,
    phase: crate::migration::Phase,
) -> Result<(), RolloutRefused> {
    use crate::migration::Phase;
    match change {
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
        RolloutChange::SetOverride { user_id, .. } | RolloutChange::ClearOverride { user_id } => {
            Some(user_id)
        }
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
