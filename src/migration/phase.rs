use std::fmt;

use chrono::{DateTime, Utc};

/// The phases of the migration, in order. Forward moves go one step at a time; any move
/// back is allowed at any time (that is the rollback).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    /// Only the legacy table is written and read.
    LegacyOnly,
    /// Both storages are written; reads stay on legacy.
    DualWrite,
    /// A backfill copied legacy history into the new storage.
    Backfilled,
    /// A verify found both storages equal.
    Verified,
    /// Reads come from the new storage; legacy is still written (for a rollback).
    NewPrimary,
    /// Only the new storage is written and read.
    LegacyRetired,
}

/// Which storages a write goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteTargets {
    pub legacy: bool,
    pub new: bool,
}

impl Phase {
    pub const ALL: [Phase; 6] = [
        Phase::LegacyOnly,
        Phase::DualWrite,
        Phase::Backfilled,
        Phase::Verified,
        Phase::NewPrimary,
        Phase::LegacyRetired,
    ];

    /// The name stored in the database and shown to people.
    pub fn name(self) -> &'static str {
        match self {
            Phase::LegacyOnly => "LEGACY_ONLY",
            Phase::DualWrite => "DUAL_WRITE",
            Phase::Backfilled => "BACKFILLED",
            Phase::Verified => "VERIFIED",
            Phase::NewPrimary => "NEW_PRIMARY",
            Phase::LegacyRetired => "LEGACY_RETIRED",
        }
    }

    /// The phase named `name` (as [`Phase::name`] spells it).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    fn next(self) -> Option<Self> {
        Self::ALL.into_iter().find(|p| *p > self)
    }

    /// The phases this one may move to: the next one, and every earlier one.
    pub fn allowed_transitions(self) -> Vec<Phase> {
        let mut allowed: Vec<Phase> = Self::ALL.into_iter().filter(|p| *p < self).collect();
        allowed.extend(self.next());
        allowed
    }

    /// The storages written in this phase. Events the legacy table has no column for
    /// (`clicked`) go to the new storage in every phase.
    pub fn write_targets(self) -> WriteTargets {
        WriteTargets {
            legacy: self != Phase::LegacyRetired,
            new: self != Phase::LegacyOnly,
        }
    }

    /// Checks a move from `self` to `target`: backward moves always pass; a forward move
    /// must be one step, and into BACKFILLED or VERIFIED it needs the runs `facts` report.
    /// VERIFIED also needs every ambiguous row of the last backfill resolved, unless `force`
    /// is set. Answers whether the move is forced: `force` was set and was needed.
    pub fn check_transition(
        self,
        target: Phase,
        facts: &PreconditionFacts,
        force: bool,
    ) -> Result<bool, TransitionRefused> {
        if target <= self {
            return Ok(false);
        }
        if Some(target) != self.next() {
            return Err(TransitionRefused::NotAllowed {
                from: self,
                to: target,
            });
        }
        match target {
            Phase::Backfilled => {
                let since = facts.dual_write_started_at;
                match facts.last_backfill_at {
                    Some(done) if since.is_none_or(|since| done >= since) => Ok(false),
                    _ => Err(TransitionRefused::NoBackfill),
                }
            }
            Phase::Verified => match (facts.last_clean_verify_at, facts.last_backfill_at) {
                (Some(verified), Some(backfilled)) if verified >= backfilled => {
                    match facts.unresolved_ambiguous {
                        0 => Ok(false),
                        _ if force => Ok(true),
                        rows => Err(TransitionRefused::UnresolvedAmbiguous { rows }),
                    }
                }
                _ => Err(TransitionRefused::NoCleanVerify),
            },
            _ => Ok(false),
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a phase transition was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionRefused {
    #[error("cannot move from {from} to {to}: forward moves go one phase at a time")]
    NotAllowed { from: Phase, to: Phase },
    #[error("cannot enter BACKFILLED: no completed (non-dry-run) backfill since dual-write began")]
    NoBackfill,
    #[error(
        "cannot enter VERIFIED: the latest verify since the last backfill must find zero mismatches"
    )]
    NoCleanVerify,
    #[error(
        "cannot enter VERIFIED: unresolved ambiguous rows of the last backfill: {rows} \
         (resolve them with ResolveAmbiguousRows, or force the transition)"
    )]
    UnresolvedAmbiguous { rows: u64 },
}

/// What the database knows that phase preconditions depend on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PreconditionFacts {
    /// When DUAL_WRITE was last entered from LEGACY_ONLY.
    pub dual_write_started_at: Option<DateTime<Utc>>,
    /// When the last completed, non-dry-run backfill finished.
    pub last_backfill_at: Option<DateTime<Utc>>,
    /// When the latest completed verify finished, if it found zero mismatches (`None` when
    /// it found some, or none ran).
    pub last_clean_verify_at: Option<DateTime<Utc>>,
    /// Rows the last completed backfill reported as ambiguous that have no resolution yet.
    pub unresolved_ambiguous: u64,
}

/// The current phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhaseState {
    pub phase: Phase,
    pub changed_at: DateTime<Utc>,
}

/// One recorded phase change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub from: Phase,
    pub to: Phase,
    pub actor: String,
    pub reason: String,
    pub at: DateTime<Utc>,
    /// The move passed unresolved ambiguous rows because it was forced.
    pub forced: bool,
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    #[test]
    fn forward_one_step_back_any() {
        use Phase::*;
        assert_eq!(LegacyOnly.allowed_transitions(), [DualWrite]);
        assert_eq!(
            Verified.allowed_transitions(),
            [LegacyOnly, DualWrite, Backfilled, NewPrimary]
        );
        assert_eq!(
            LegacyRetired.allowed_transitions(),
            [LegacyOnly, DualWrite, Backfilled, Verified, NewPrimary]
        );
        let t = |h: u32| Some(Utc.with_ymd_and_hms(2026, 1, 1, h, 0, 0).unwrap());
        // With every precondition met, the order alone decides.
        let met = PreconditionFacts {
            dual_write_started_at: t(1),
            last_backfill_at: t(2),
            last_clean_verify_at: t(3),
            unresolved_ambiguous: 0,
        };
        for from in Phase::ALL {
            for to in Phase::ALL {
                let allowed = from.allowed_transitions().contains(&to) || from == to;
                assert_eq!(
                    from.check_transition(to, &met, false).is_ok(),
                    allowed,
                    "{from} -> {to}"
                );
            }
        }
    }

    #[test]
    fn backfilled_and_verified_need_fresh_runs() {
        use Phase::*;
        let t = |h: u32| Some(Utc.with_ymd_and_hms(2026, 1, 1, h, 0, 0).unwrap());
        let none = PreconditionFacts::default();
        assert_eq!(
            DualWrite.check_transition(Backfilled, &none, false),
            Err(TransitionRefused::NoBackfill)
        );
        let stale = PreconditionFacts {
            dual_write_started_at: t(5),
            last_backfill_at: t(4),
            ..none.clone()
        };
        assert_eq!(
            DualWrite.check_transition(Backfilled, &stale, false),
            Err(TransitionRefused::NoBackfill)
        );
        let fresh = PreconditionFacts {
            dual_write_started_at: t(5),
            last_backfill_at: t(6),
            ..none.clone()
        };
        assert_eq!(
            DualWrite.check_transition(Backfilled, &fresh, false),
            Ok(false)
        );
        assert_eq!(
            Backfilled.check_transition(Verified, &fresh, false),
            Err(TransitionRefused::NoCleanVerify)
        );
        let old_verify = PreconditionFacts {
            last_clean_verify_at: t(5),
            ..fresh.clone()
        };
        assert_eq!(
            Backfilled.check_transition(Verified, &old_verify, false),
            Err(TransitionRefused::NoCleanVerify)
        );
        let verified = PreconditionFacts {
            last_clean_verify_at: t(7),
            ..fresh
        };
        assert_eq!(
            Backfilled.check_transition(Verified, &verified, false),
            Ok(false)
        );
        // Unresolved ambiguous rows hold VERIFIED back, unless forced.
        let unresolved = PreconditionFacts {
            unresolved_ambiguous: 3,
            ..verified
        };
        assert_eq!(
            Backfilled.check_transition(Verified, &unresolved, false),
            Err(TransitionRefused::UnresolvedAmbiguous { rows: 3 })
        );
        assert_eq!(
            Backfilled.check_transition(Verified, &unresolved, true),
            Ok(true)
        );
        // Backward moves need nothing.
        assert_eq!(
            LegacyRetired.check_transition(LegacyOnly, &none, false),
            Ok(false)
        );
    }

    #[test]
    fn writes_follow_the_phase() {
        use Phase::*;
        for (phase, legacy, new) in [
            (LegacyOnly, true, false),
            (DualWrite, true, true),
            (Backfilled, true, true),
            (Verified, true, true),
            (NewPrimary, true, true),
            (LegacyRetired, false, true),
        ] {
            assert_eq!(
                phase.write_targets(),
                WriteTargets { legacy, new },
                "{phase}"
            );
        }
    }

    #[test]
    fn names_round_trip() {
        for phase in Phase::ALL {
            assert_eq!(Phase::from_name(phase.name()), Some(phase));
        }
        assert_eq!(Phase::from_name("nope"), None);
    }
}
