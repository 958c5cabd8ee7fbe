//! The per-user read rollout: which storage answers a user's reads.
//!
//! The rules (bucketing, the decision, what a change does) live here; the stored,
//! versioned rollout is in the storage contract, its control API in the gRPC layer.

mod bucket;
mod decision;
mod state;

pub use bucket::{BUCKETS, bucket};
pub use decision::{Decision, Reason, RolloutConfig, baseline, decide};
pub use state::{
    ALL_USERS, Applied, AuditEntry, RolloutChange, RolloutRefused, RolloutSnapshot, apply,
    change_user, check_change,
};
