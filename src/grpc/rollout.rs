//! `stats.v1.RolloutService`: the rollout controller's API.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::auth::audited;
use super::convert::{audit, both_valid};
use super::proto::rollout_service_server::RolloutService;
use super::proto::{
    self, ClearUserOverrideRequest, EvaluateUserRequest, EvaluateUserResponse, GetRolloutRequest,
    GetRolloutResponse, KillSwitchRequest, ListRolloutHistoryRequest, ListRolloutHistoryResponse,
    ListUserOverridesRequest, ListUserOverridesResponse, ResetSaltRequest,
    SetRolloutPercentageRequest, SetUserOverrideRequest, UserOverride, WatchRolloutRequest,
};
use crate::app::RolloutControl;
use crate::domain::{StorageSource, ValidationError, validate_id};
use crate::rollout::{Applied, RolloutChange};
use crate::storage::Store;

/// What a rollout change's reason must say.
const ROLLOUT_REASON: &str = "must say why the rollout changes";

/// The `RolloutService` handlers.
#[derive(Debug)]
pub struct RolloutApi<S> {
    rollout: RolloutControl<S>,
}

impl<S: Store> RolloutApi<S> {
    pub fn new(rollout: RolloutControl<S>) -> Self {
        Self { rollout }
    }
}

/// The stream of `WatchRollout`.
pub type RolloutStream = Pin<Box<dyn Stream<Item = Result<proto::Rollout, Status>> + Send>>;

fn rollout_to_proto(applied: &Applied) -> proto::Rollout {
    let config = &applied.rollout.config;
    proto::Rollout {
        percentage: f64::from(config.basis_points) / 100.0,
        version: config.version,
        kill_switch: config.kill_switch,
        salt: config.salt.clone(),
        updated_at: Some(super::migration::timestamp(applied.rollout.updated_at)),
        applied_version: config.version,
        phase: proto::MigrationPhase::from(applied.phase).into(),
        overrides: u32::try_from(applied.rollout.overrides.len()).unwrap_or(u32::MAX),
        shadow_sample_rate: config.shadow_sample_ppm.map(|ppm| f64::from(ppm) / 1e6),
    }
}

fn response(applied: &Applied) -> Response<GetRolloutResponse> {
    Response::new(GetRolloutResponse {
        rollout: Some(rollout_to_proto(applied)),
    })
}

/// A sample rate, 0 to 1, as millionths.
fn sample_ppm(rate: f64) -> Result<u32, ValidationError> {
    if rate.is_finite() && (0.0..=1.0).contains(&rate) {
        Ok((rate * 1e6).round() as u32)
    } else {
        Err(ValidationError::from_failures([Some(
            crate::domain::FieldViolation::new("rate", "must be from 0 to 1"),
        )]))
    }
}

/// A percentage as hundredths: 0.00 to 100.00 in 0.01 steps.
fn basis_points(percentage: f64) -> Result<u32, ValidationError> {
    let hundredths = percentage * 100.0;
    if !(0.0..=10_000.0).contains(&hundredths) || (hundredths - hundredths.round()).abs() > 1e-6 {
        return Err(ValidationError::single(
            "percentage",
            format!("must be 0.00 to 100.00 in steps of 0.01, got {percentage}"),
        ));
    }
    Ok(hundredths.round() as u32)
}

/// A user id of a rollout request (the all-users pseudo-user `*` included).
fn user(value: String) -> Result<String, ValidationError> {
    validate_id("user_id", &value).map_err(|v| ValidationError::from_failures([Some(v)]))?;
    Ok(value)
}

fn source_to_proto(source: StorageSource) -> i32 {
    proto::StorageSource::from(source).into()
}

impl<S: Store> RolloutApi<S> {
    /// The rollout changes' shared step: validates the audit fields beside the change's own
    /// (every bad field named at once), applies the change, and answers the rollout after it.
    async fn apply(
        &self,
        change: Result<RolloutChange, ValidationError>,
        expected_version: Option<u64>,
        actor: String,
        reason: String,
    ) -> Result<Response<GetRolloutResponse>, Status> {
        let (change, (actor, reason)) = both_valid(change, audit(actor, reason, ROLLOUT_REASON))?;
        let applied = self
            .rollout
            .change(change, expected_version, &actor, &reason)
            .await?;
        Ok(response(&applied))
    }
}

#[tonic::async_trait]
impl<S: Store> RolloutService for RolloutApi<S> {
    type WatchRolloutStream = RolloutStream;

    async fn get_rollout(
        &self,
        _: Request<GetRolloutRequest>,
    ) -> Result<Response<GetRolloutResponse>, Status> {
        Ok(response(&self.rollout.current()))
    }

    async fn set_rollout_percentage(
        &self,
        request: Request<SetRolloutPercentageRequest>,
    ) -> Result<Response<GetRolloutResponse>, Status> {
        let request = audited(request);
        let change =
            basis_points(request.percentage).map(|basis_points| RolloutChange::Percentage {
                basis_points,
                forced: request.force,
            });
        self.apply(
            change,
            Some(request.expected_version),
            request.actor,
            request.reason,
        )
        .await
    }

    async fn set_user_override(
        &self,
        request: Request<SetUserOverrideRequest>,
    ) -> Result<Response<GetRolloutResponse>, Status> {
        let request = audited(request);
        let source = match proto::StorageSource::try_from(request.source) {
            Ok(proto::StorageSource::Legacy) => Ok(StorageSource::Legacy),
            Ok(proto::StorageSource::New) => Ok(StorageSource::New),
            _ => Err(ValidationError::single(
                "source",
                "must be STORAGE_SOURCE_LEGACY or STORAGE_SOURCE_NEW",
            )),
        };
        let change = both_valid(user(request.user_id), source)
            .map(|(user_id, source)| RolloutChange::SetOverride { user_id, source });
        self.apply(change, None, request.actor, request.reason)
            .await
    }

    async fn clear_user_override(
        &self,
        request: Request<ClearUserOverrideRequest>,
    ) -> Result<Response<GetRolloutResponse>, Status> {
        let request = audited(request);
        let change = user(request.user_id).map(|user_id| RolloutChange::ClearOverride { user_id });
        self.apply(change, None, request.actor, request.reason)
            .await
    }

    async fn kill_switch(
        &self,
        request: Request<KillSwitchRequest>,
    ) -> Result<Response<GetRolloutResponse>, Status> {
        let request = audited(request);
        let change = RolloutChange::KillSwitch {
            engaged: request.engaged,
        };
        self.apply(Ok(change), None, request.actor, request.reason)
            .await
    }

    async fn reset_salt(
        &self,
        request: Request<ResetSaltRequest>,
    ) -> Result<Response<GetRolloutResponse>, Status> {
        let request = audited(request);
        let (actor, reason) = audit(request.actor, request.reason, ROLLOUT_REASON)?;
        let applied = self.rollout.reset_salt(&actor, &reason).await?;
        Ok(response(&applied))
    }

    async fn set_shadow_sample_rate(
        &self,
        request: Request<proto::SetShadowSampleRateRequest>,
    ) -> Result<Response<GetRolloutResponse>, Status> {
        let request = audited(request);
        let ppm = if request.server_default {
            Ok(None)
        } else {
            sample_ppm(request.rate).map(Some)
        };
        let change = ppm.map(|ppm| RolloutChange::ShadowSampleRate { ppm });
        self.apply(change, None, request.actor, request.reason)
            .await
    }

    async fn list_shadow_mismatches(
        &self,
        _: Request<proto::ListShadowMismatchesRequest>,
    ) -> Result<Response<proto::ListShadowMismatchesResponse>, Status> {
        let mismatches = self
            .rollout
            .shadow_mismatches()
            .into_iter()
            .map(|m| proto::ShadowMismatch {
                method: m.method.to_owned(),
                user_id: m.user.unwrap_or_default(),
                campaign_id: m.campaign.unwrap_or_default(),
                date: m.day.map(|d| d.to_string()).unwrap_or_default(),
                legacy: Some(m.legacy.into()),
                new: Some(m.new.into()),
                at: Some(super::migration::timestamp(m.at)),
            })
            .collect();
        Ok(Response::new(proto::ListShadowMismatchesResponse {
            mismatches,
        }))
    }

    async fn evaluate_user(
        &self,
        request: Request<EvaluateUserRequest>,
    ) -> Result<Response<EvaluateUserResponse>, Status> {
        let user_id = user(request.into_inner().user_id)?;
        let (decision, version) = self.rollout.evaluate(&user_id);
        Ok(Response::new(EvaluateUserResponse {
            source: source_to_proto(decision.source),
            reason: decision.reason.to_string(),
            bucket: decision.bucket,
            version,
        }))
    }

    async fn list_user_overrides(
        &self,
        request: Request<ListUserOverridesRequest>,
    ) -> Result<Response<ListUserOverridesResponse>, Status> {
        let request = request.into_inner();
        let page = self
            .rollout
            .overrides(&request.page_token, request.page_size)?;
        Ok(Response::new(ListUserOverridesResponse {
            overrides: page
                .items
                .into_iter()
                .map(|(user_id, source)| UserOverride {
                    user_id,
                    source: source_to_proto(source),
                })
                .collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    async fn list_rollout_history(
        &self,
        request: Request<ListRolloutHistoryRequest>,
    ) -> Result<Response<ListRolloutHistoryResponse>, Status> {
        let request = request.into_inner();
        let page = self
            .rollout
            .history(&request.page_token, request.page_size)
            .await?;
        Ok(Response::new(ListRolloutHistoryResponse {
            changes: page
                .items
                .into_iter()
                .map(|c| proto::RolloutChange {
                    version: c.version,
                    actor: c.actor,
                    changed_at: Some(super::migration::timestamp(c.at)),
                    change: c.change,
                    before: c.before,
                    after: c.after,
                    reason: c.reason,
                })
                .collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    async fn watch_rollout(
        &self,
        _: Request<WatchRolloutRequest>,
    ) -> Result<Response<Self::WatchRolloutStream>, Status> {
        let states = self.rollout.watch();
        Ok(Response::new(Box::pin(states.map(|applied| {
            applied
                .map(|applied| rollout_to_proto(&applied))
                .map_err(Status::from)
        }))))
    }
}
