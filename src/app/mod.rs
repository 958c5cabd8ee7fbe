//! The use cases behind the RPCs, one file each: record events and read statistics
//! (`stats.rs`), the storage migration (`migration.rs`), the read rollout (`rollout.rs`);
//! and the drivers that run the rules against storage: the write queue (`group_commit.rs`),
//! each replica's rollout (`rollout_view.rs`), background runs (`runner.rs`), retention (`retention.rs`).
//! Transport-free, so that every entry point (gRPC today, admin tools later) shares one
//! behaviour.

mod error;
mod group_commit;
mod guard;
mod jobs;
mod migration;
mod retention;
mod rollout;
mod rollout_view;
mod runner;
mod schedule;
mod shadow;
mod stats;

pub use error::AppError;
pub use group_commit::{GroupCommit, GroupCommitSettings, IngestError};
pub use guard::{GUARD_TICK, Guard, GuardStatus};
pub use jobs::Jobs;
pub use migration::{
    BackfillRequest, DEFAULT_BATCH_SIZE, LEGACY_TABLES, MAX_BATCH_SIZE, MAX_TRANSITIONS_LISTED,
    Migration, MigrationState, NEW_TABLES, STALE_RUN_AFTER, StartRefused, StorageReport,
    VERIFY_SAMPLE,
};
pub use retention::{RetentionSettings, keep_raw_events_trimmed, retention_pass};
pub use rollout::{DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, Page, RolloutControl, page_size};
pub use rollout_view::RolloutView;
pub use runner::run_backfill;
pub use schedule::{SCHEDULE_LEASE, ScheduleDriver, ScheduleSettings};
pub use shadow::{MISMATCHES_KEPT, Mismatch, Shadow, ShadowRead, ShadowSettings};
pub use stats::{STREAM_CHUNK_EVENTS, Stats, StreamFailure, StreamRecorded};
