//! The gRPC layer: generated types, request conversions, handlers and the one mapping from
//! errors to `tonic::Status`.

mod auth;
mod convert;
mod error;
mod limits;
mod migration;
mod rollout;
mod stats;

pub use auth::{Access, AuthLayer, Authenticator, access_for};
pub use error::{MAX_STATUS_BYTES, status_header_bytes, status_of, write_status};
pub use limits::{CallLimitsLayer, CountedConnection, Limits, limit_connections};
pub use migration::MigrationApi;
pub use rollout::RolloutApi;
pub use stats::StatsApi;

/// Types and services generated from `proto/stats/v1/*.proto`.
pub mod proto {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("stats.v1");

    /// The encoded descriptor set of the protos, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/stats_descriptor.bin"));
}

/// Largest request message any service accepts, in bytes: a full `RecordEvents` batch of
/// 10,000 events with long ids fits with room to spare.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
