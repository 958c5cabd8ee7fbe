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

    /// Every rollout change answers the rollout after it, each RPC in a message of its own
    /// that holds just `rollout` (so each can grow apart later; on the wire and in JSON the
    /// same as GetRolloutResponse). Handlers build them from a [`Rollout`]; clients take it out.
    macro_rules! answers_rollout {
        ($($message:ident),+ $(,)?) => {$(
            impl From<Rollout> for $message {
                fn from(rollout: Rollout) -> Self {
                    Self { rollout: Some(rollout) }
                }
            }

            impl From<$message> for Option<Rollout> {
                fn from(answer: $message) -> Self {
                    answer.rollout
                }
            }
        )+};
    }

    answers_rollout!(
        GetRolloutResponse,
        SetRolloutPercentageResponse,
        SetUserOverrideResponse,
        ClearUserOverrideResponse,
        KillSwitchResponse,
        ResetSaltResponse,
        SetShadowSampleRateResponse,
        SetGuardSettingsResponse,
        StartScheduleResponse,
        PauseScheduleResponse,
        ResumeScheduleResponse,
        AbortScheduleResponse,
    );

    /// The encoded descriptor set of the protos, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/stats_descriptor.bin"));
}

/// Largest request message any service accepts, in bytes: a full `RecordEvents` batch of
/// 10,000 events with long ids fits with room to spare.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
