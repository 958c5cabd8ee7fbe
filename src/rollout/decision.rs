use std::fmt;

use super::{BUCKETS, bucket};
use crate::domain::StorageSource;
use crate::migration::Phase;

/// The rollout as every replica applies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutConfig {
    /// Share of users reading NEW, in hundredths of a percent (0 to 10,000).
    pub basis_points: u32,
    /// Engaged: every read goes to LEGACY (while legacy is written).
    pub kill_switch: bool,
    /// Salt of the bucketing hash; a new salt reshuffles users.
    pub salt: String,
    /// Bumped by every change.
    pub version: u64,
    /// The share of reads shadowed, in millionths, when set at run time; `None`: each
    /// replica's `--shadow-sample-rate`.
    pub shadow_sample_ppm: Option<u32>,
    /// The guard's run-time settings and state, and the progressive schedule.
    pub automation: super::Automation,
}

/// Why a read goes where it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The phase reads legacy for everyone; the rollout applies from VERIFIED.
    PhaseBeforeVerified(Phase),
    /// NEW_PRIMARY reads NEW for everyone.
    NewPrimary,
    /// LEGACY_RETIRED: legacy is no longer written, so it cannot answer.
    LegacyRetired,
    /// The kill switch sends every read to LEGACY.
    KillSwitch,
    /// A per-user override.
    Override,
    /// The user's bucket against the percentage.
    Percentage { bucket: u32, basis_points: u32 },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::PhaseBeforeVerified(phase) => write!(
                f,
                "phase {phase} reads legacy for everyone; the rollout applies from VERIFIED"
            ),
            Reason::NewPrimary => f.write_str("phase NEW_PRIMARY reads new for everyone"),
            Reason::LegacyRetired => f.write_str(
                "phase LEGACY_RETIRED: legacy is no longer written, so new answers every read",
            ),
            Reason::KillSwitch => {
                f.write_str("the kill switch is engaged: every read goes to legacy")
            }
            Reason::Override => f.write_str("a per-user override"),
            Reason::Percentage {
                bucket,
                basis_points,
            } => write!(
                f,
                "bucket {bucket} {} {:.2}% × 100 = {basis_points}",
                if bucket < basis_points { "<" } else { ">=" },
                f64::from(*basis_points) / 100.0
            ),
        }
    }
}

/// Where one user's reads go, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub source: StorageSource,
    pub reason: Reason,
    /// The user's bucket under the current salt.
    pub bucket: u32,
}

/// Decides where `user_id`'s reads go: the phase bounds everything; from VERIFIED, the kill
/// switch, then a per-user `user_override`, then the percentage. Allocates nothing.
pub fn decide(
    phase: Phase,
    config: &RolloutConfig,
    user_override: Option<StorageSource>,
    user_id: &str,
) -> Decision {
    decide_in_bucket(phase, config, user_override, bucket(&config.salt, user_id))
}

/// Where reads go for every user that neither an override nor the percentage singles out:
/// what the phase and the kill switch alone decide. `GetMigrationState` reports it as the
/// phase's `read_source`; the percentage moves users away from it from VERIFIED on.
pub fn baseline(phase: Phase, config: &RolloutConfig) -> StorageSource {
    // No bucket lies below any percentage.
    decide_in_bucket(phase, config, None, BUCKETS).source
}

/// [`decide`] for a user in `bucket`.
fn decide_in_bucket(
    phase: Phase,
    config: &RolloutConfig,
    user_override: Option<StorageSource>,
    bucket: u32,
) -> Decision {
    let (source, reason) = match phase {
        Phase::LegacyOnly | Phase::DualWrite | Phase::Backfilled => {
            (StorageSource::Legacy, Reason::PhaseBeforeVerified(phase))
        }
        Phase::LegacyRetired => (StorageSource::New, Reason::LegacyRetired),
        _ if config.kill_switch => (StorageSource::Legacy, Reason::KillSwitch),
        Phase::NewPrimary => (StorageSource::New, Reason::NewPrimary),
        Phase::Verified => match user_override {
            Some(source) => (source, Reason::Override),
            None if bucket < config.basis_points => (
                StorageSource::New,
                Reason::Percentage {
                    bucket,
                    basis_points: config.basis_points,
                },
            ),
            None => (
                StorageSource::Legacy,
                Reason::Percentage {
                    bucket,
                    basis_points: config.basis_points,
                },
            ),
        },
    };
    Decision {
        source,
        reason,
        bucket,
    }
}

#[cfg(test)]
mod tests {
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    fn config(basis_points: u32) -> RolloutConfig {
        RolloutConfig {
            basis_points,
            kill_switch: false,
            salt: "s1".into(),
            version: 1,
            shadow_sample_ppm: None,
            automation: Default::default(),
        }
    }

    fn users(n: usize) -> Vec<String> {
        let mut rng = ChaCha8Rng::seed_from_u64(42);
        (0..n)
            .map(|_| format!("user-{:016x}", rng.random_range(0..u64::MAX)))
            .collect()
    }

    #[test]
    fn raising_the_percentage_only_adds_users() {
        let users = users(20_000);
        let steps = [0, 1, 100, 1_000, 2_500, 5_000, 9_999, 10_000];
        for pair in steps.windows(2) {
            for user in &users {
                let before = decide(Phase::Verified, &config(pair[0]), None, user).source;
                let after = decide(Phase::Verified, &config(pair[1]), None, user).source;
                assert!(
                    !(before == StorageSource::New && after == StorageSource::Legacy),
                    "{user} left NEW"
                );
            }
        }
        assert!(users.iter().all(
            |u| decide(Phase::Verified, &config(10_000), None, u).source == StorageSource::New
        ));
        assert!(
            users
                .iter()
                .all(|u| decide(Phase::Verified, &config(0), None, u).source
                    == StorageSource::Legacy)
        );
    }

    #[test]
    fn shares_are_uniform() {
        let users = users(100_000);
        for percent in [1.0, 10.0, 50.0] {
            let config = config((percent * 100.0) as u32);
            let new = users
                .iter()
                .filter(|u| decide(Phase::Verified, &config, None, u).source == StorageSource::New)
                .count();
            let share = new as f64 * 100.0 / users.len() as f64;
            assert!(
                (share - percent).abs() <= 0.5,
                "{percent}%: {share:.2}% read NEW"
            );
        }
    }

    #[test]
    fn a_new_salt_reshuffles() {
        let users = users(10_000);
        let moved = users
            .iter()
            .filter(|u| bucket("s1", u) != bucket("s2", u))
            .count();
        assert!(moved > 9_900, "only {moved} of 10,000 users changed bucket");
    }

    #[test]
    fn order_kill_switch_then_override_then_percentage_within_phase_bounds() {
        let all_new = config(10_000);
        let killed = RolloutConfig {
            kill_switch: true,
            ..all_new.clone()
        };
        let legacy = Some(StorageSource::Legacy);
        let new = Some(StorageSource::New);
        let d = |phase, config: &RolloutConfig, over| decide(phase, config, over, "u");
        assert_eq!(
            d(Phase::Verified, &all_new, None).source,
            StorageSource::New
        );
        assert_eq!(
            d(Phase::Verified, &all_new, legacy).reason,
            Reason::Override
        );
        assert_eq!(
            d(Phase::Verified, &all_new, legacy).source,
            StorageSource::Legacy
        );
        assert_eq!(
            d(Phase::Verified, &config(0), new).source,
            StorageSource::New
        );
        assert_eq!(d(Phase::Verified, &killed, new).reason, Reason::KillSwitch);
        assert_eq!(
            d(Phase::NewPrimary, &config(0), legacy).source,
            StorageSource::New
        );
        assert_eq!(
            d(Phase::NewPrimary, &killed, None).source,
            StorageSource::Legacy
        );
        for phase in [Phase::LegacyOnly, Phase::DualWrite, Phase::Backfilled] {
            let decision = d(phase, &all_new, new);
            assert_eq!(decision.source, StorageSource::Legacy);
            assert!(
                decision
                    .reason
                    .to_string()
                    .contains("applies from VERIFIED")
            );
        }
        let retired = d(Phase::LegacyRetired, &killed, legacy);
        assert_eq!(
            (retired.source, retired.reason),
            (StorageSource::New, Reason::LegacyRetired)
        );
    }
}
