//! The per-user read rollout: which storage answers a user's reads.
//!
//! Only the pure rules live here so far (bucketing and the decision); the stored,
//! versioned rollout and its control API come with the rest of the rollout issue.

mod bucket;
mod decision;

pub use bucket::{BUCKETS, bucket};
pub use decision::{Decision, Reason, RolloutConfig, decide};
