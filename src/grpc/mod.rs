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

#[cfg(test)]
mod tests {
    use prost::Message;
    use prost_types::FileDescriptorSet;

    use super::proto::FILE_DESCRIPTOR_SET;

    /// Field numbers of `FileDescriptorProto` and `ServiceDescriptorProto` that a
    /// `SourceCodeInfo` path goes through.
    const MESSAGES: i32 = 4;
    const SERVICES: i32 = 6;
    const METHODS: i32 = 2;

    /// The descriptors reflection serves carry the protos' comments (what `grpcurl describe`
    /// shows): every service, RPC and top-level message has one.
    #[test]
    fn the_served_descriptors_document_every_service_rpc_and_message() {
        let set = FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).expect("descriptor set");
        let mut checked = 0;
        // Ours, not the well-known types they import.
        for file in set.file.iter().filter(|f| f.package() == "stats.v1") {
            let info = file.source_code_info.as_ref().expect("source info kept");
            let documented = |path: &[i32]| {
                info.location.iter().any(|l| {
                    l.path == path
                        && l.leading_comments
                            .as_deref()
                            .is_some_and(|c| !c.trim().is_empty())
                })
            };
            for (s, service) in (0..).zip(&file.service) {
                assert!(
                    documented(&[SERVICES, s]),
                    "{} has no comment",
                    service.name()
                );
                for (m, method) in (0..).zip(&service.method) {
                    let path = [SERVICES, s, METHODS, m];
                    assert!(documented(&path), "{}.{}", service.name(), method.name());
                    checked += 1;
                }
            }
            for (m, message) in (0..).zip(&file.message_type) {
                assert!(
                    documented(&[MESSAGES, m]),
                    "{} has no comment",
                    message.name()
                );
                checked += 1;
            }
        }
        assert!(checked > 100, "only {checked} RPCs and messages found");
    }
}
