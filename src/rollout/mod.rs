//! The per-user read rollout: which storage answers a user's reads.
//!
//! The rules (bucketing, the decision, what a change does) live here; the stored,
//! versioned rollout is in the storage contract, its control API in the gRPC layer.

mod automation;
mod bucket;
mod decision;
mod guard;
mod state;

pub use automation::{Automation, GuardTrip, Schedule, ScheduleStatus, check_steps};
pub use bucket::{BUCKETS, bucket};
pub use decision::{Decision, Reason, RolloutConfig, baseline, decide};
pub use guard::{Figures, GuardAction, GuardSettings, Signal, Window, fraction, ppm};
pub use state::{
    ALL_USERS, Applied, AuditEntry, RolloutChange, RolloutRefused, RolloutSnapshot, apply,
    change_user, check_change, rearms_guard,
};

/// The actor the guard's changes are audited with.
pub const GUARD_ACTOR: &str = "guard";
/// The actor the schedule's advances are audited with.
pub const SCHEDULE_ACTOR: &str = "schedule";
