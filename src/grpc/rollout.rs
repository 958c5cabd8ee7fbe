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
use crate::domain::{FieldViolation, StorageSource, ValidationError, validate_id};
use crate::rollout::{
    Applied, GuardAction, GuardSettings, RolloutChange, Schedule, ScheduleStatus, check_steps,
    fraction, ppm,
};
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

fn schedule_status_to_proto(status: ScheduleStatus) -> proto::ScheduleStatus {
    match status {
        ScheduleStatus::Running => proto::ScheduleStatus::Running,
        ScheduleStatus::Paused => proto::ScheduleStatus::Paused,
        ScheduleStatus::Halted => proto::ScheduleStatus::Halted,
        ScheduleStatus::Aborted => proto::ScheduleStatus::Aborted,
        ScheduleStatus::Done => proto::ScheduleStatus::Done,
    }
}

fn schedule_to_proto(schedule: &Schedule) -> proto::Schedule {
    proto::Schedule {
        percentages: schedule
            .steps
            .iter()
            .map(|bp| f64::from(*bp) / 100.0)
            .collect(),
        step: u32::try_from(schedule.step + 1).unwrap_or(u32::MAX),
        status: schedule_status_to_proto(schedule.status).into(),
        dwell_seconds: schedule.dwell_secs,
        min_comparisons: schedule.min_comparisons,
        step_started_at: Some(super::migration::timestamp(schedule.step_started_at)),
        cool_down_seconds: schedule.cool_down_secs.unwrap_or(0),
        resumes_itself: schedule.resumes_itself,
    }
}

fn guard_settings_to_proto(settings: &GuardSettings) -> proto::GuardSettings {
    proto::GuardSettings {
        max_mismatch_rate: fraction(settings.max_mismatch_ppm),
        max_error_rate: fraction(settings.max_error_ppm),
        max_p99_ratio: f64::from(settings.max_p99_ratio_percent) / 100.0,
        min_samples: settings.min_samples,
        window_seconds: settings.window_secs,
        action: match settings.action {
            GuardAction::KillSwitch => proto::GuardAction::KillSwitch,
            GuardAction::StepBack => proto::GuardAction::StepBack,
        }
        .into(),
        quarantine_after: settings.quarantine_after,
        max_quarantined: settings.max_quarantined,
    }
}

impl TryFrom<proto::GuardSettings> for GuardSettings {
    type Error = ValidationError;

    /// Every bad field named at once.
    fn try_from(settings: proto::GuardSettings) -> Result<Self, Self::Error> {
        let mismatch = fraction_ppm("settings.max_mismatch_rate", settings.max_mismatch_rate);
        let errors = fraction_ppm("settings.max_error_rate", settings.max_error_rate);
        let p99 = settings.max_p99_ratio;
        let action = match proto::GuardAction::try_from(settings.action) {
            Ok(proto::GuardAction::KillSwitch) => Ok(GuardAction::KillSwitch),
            Ok(proto::GuardAction::StepBack) => Ok(GuardAction::StepBack),
            _ => Err(FieldViolation::new(
                "settings.action",
                "must be GUARD_ACTION_KILL_SWITCH or GUARD_ACTION_STEP_BACK",
            )),
        };
        let checks = [
            mismatch.as_ref().err().cloned(),
            errors.as_ref().err().cloned(),
            (!(p99 == 0.0 || (1.0..=1_000.0).contains(&p99))).then(|| {
                FieldViolation::new("settings.max_p99_ratio", "must be 0 (off) or 1 to 1000")
            }),
            (settings.min_samples == 0)
                .then(|| FieldViolation::new("settings.min_samples", "must be at least 1")),
            (!(1..=86_400).contains(&settings.window_seconds))
                .then(|| FieldViolation::new("settings.window_seconds", "must be 1 to 86400")),
            action.as_ref().err().cloned(),
        ];
        if checks.iter().any(Option::is_some) {
            return Err(ValidationError::from_failures(checks));
        }
        // Every check passed: the results are the values.
        Ok(GuardSettings {
            max_mismatch_ppm: mismatch.unwrap_or_default(),
            max_error_ppm: errors.unwrap_or_default(),
            max_p99_ratio_percent: (p99 * 100.0).round() as u32,
            min_samples: settings.min_samples,
            window_secs: settings.window_seconds,
            action: action.unwrap_or_default(),
            quarantine_after: settings.quarantine_after,
            max_quarantined: settings.max_quarantined,
        })
    }
}

/// A schedule's steps as basis points, each a valid percentage, rising.
fn schedule_steps(percentages: &[f64]) -> Result<Vec<u32>, ValidationError> {
    let steps = percentages
        .iter()
        .map(|p| basis_points(*p))
        .collect::<Result<Vec<u32>, _>>()
        .map_err(|_| {
            ValidationError::single(
                "percentages",
                "each must be 0.01 to 100.00 in steps of 0.01",
            )
        })?;
    check_steps(&steps).map_err(|why| ValidationError::single("percentages", why))?;
    Ok(steps)
}

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
        shadow_sample_rate: config.shadow_sample_ppm.map(fraction),
        guard_tripped: config.automation.tripped.is_some(),
        schedule: config.automation.schedule.as_ref().map(schedule_to_proto),
        quarantined: u32::try_from(applied.rollout.quarantined.len()).unwrap_or(u32::MAX),
    }
}

fn response<R: From<proto::Rollout>>(applied: &Applied) -> Response<R> {
    Response::new(rollout_to_proto(applied).into())
}

/// `value` of `field`, a fraction from 0 to 1, as millionths.
fn fraction_ppm(field: &str, value: f64) -> Result<u32, FieldViolation> {
    (value.is_finite() && (0.0..=1.0).contains(&value))
        .then(|| ppm(value))
        .ok_or_else(|| FieldViolation::new(field, "must be from 0 to 1"))
}

/// A sample rate, 0 to 1, as millionths.
fn sample_ppm(rate: f64) -> Result<u32, ValidationError> {
    fraction_ppm("rate", rate).map_err(|v| ValidationError::from_failures([Some(v)]))
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
    async fn apply<R: From<proto::Rollout>>(
        &self,
        change: Result<RolloutChange, ValidationError>,
        expected_version: Option<u64>,
        actor: String,
        reason: String,
    ) -> Result<Response<R>, Status> {
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
    ) -> Result<Response<proto::SetRolloutPercentageResponse>, Status> {
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
    ) -> Result<Response<proto::SetUserOverrideResponse>, Status> {
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
    ) -> Result<Response<proto::ClearUserOverrideResponse>, Status> {
        let request = audited(request);
        let change = user(request.user_id).map(|user_id| RolloutChange::ClearOverride { user_id });
        self.apply(change, None, request.actor, request.reason)
            .await
    }

    async fn kill_switch(
        &self,
        request: Request<KillSwitchRequest>,
    ) -> Result<Response<proto::KillSwitchResponse>, Status> {
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
    ) -> Result<Response<proto::ResetSaltResponse>, Status> {
        let request = audited(request);
        let (actor, reason) = audit(request.actor, request.reason, ROLLOUT_REASON)?;
        let applied = self.rollout.reset_salt(&actor, &reason).await?;
        Ok(response(&applied))
    }

    async fn set_shadow_sample_rate(
        &self,
        request: Request<proto::SetShadowSampleRateRequest>,
    ) -> Result<Response<proto::SetShadowSampleRateResponse>, Status> {
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

    async fn get_guard(
        &self,
        _: Request<proto::GetGuardRequest>,
    ) -> Result<Response<proto::GetGuardResponse>, Status> {
        let status = self
            .rollout
            .guard_status()
            .ok_or_else(|| Status::unimplemented("this server runs no guard"))?;
        let figures = status.figures;
        let ms = |d: Option<std::time::Duration>| d.map(|d| d.as_secs_f64() * 1e3);
        Ok(Response::new(proto::GetGuardResponse {
            settings: Some(guard_settings_to_proto(&status.settings)),
            settings_from_rollout: status.settings_from_rollout,
            active: status.active,
            tripped: status.trip.is_some(),
            tripped_at: status
                .trip
                .as_ref()
                .map(|t| super::migration::timestamp(t.at)),
            trip_signal: status
                .trip
                .as_ref()
                .map(|t| t.signal.clone())
                .unwrap_or_default(),
            trip_figures: status.trip.map(|t| t.figures).unwrap_or_default(),
            window: Some(proto::GuardWindow {
                comparisons: figures.comparisons,
                mismatches: figures.mismatches,
                new_reads: figures.new_reads,
                new_errors: figures.new_errors,
                legacy_reads: figures.legacy_reads,
                new_p99_ms: ms(figures.new_p99),
                legacy_p99_ms: ms(figures.legacy_p99),
            }),
            quarantined_user_ids: status.quarantined,
        }))
    }

    async fn set_guard_settings(
        &self,
        request: Request<proto::SetGuardSettingsRequest>,
    ) -> Result<Response<proto::SetGuardSettingsResponse>, Status> {
        let request = audited(request);
        let settings = if request.server_default {
            Ok(None)
        } else {
            GuardSettings::try_from(request.settings.unwrap_or_default()).map(Some)
        };
        let change = settings.map(|settings| RolloutChange::GuardSettings { settings });
        self.apply(change, None, request.actor, request.reason)
            .await
    }

    async fn start_schedule(
        &self,
        request: Request<proto::StartScheduleRequest>,
    ) -> Result<Response<proto::StartScheduleResponse>, Status> {
        let request = audited(request);
        let change =
            schedule_steps(&request.percentages).map(|steps| RolloutChange::ScheduleStart {
                steps,
                dwell_secs: request.dwell_seconds,
                min_comparisons: request.min_comparisons,
                cool_down_secs: (request.cool_down_seconds > 0)
                    .then_some(request.cool_down_seconds),
            });
        self.apply(change, None, request.actor, request.reason)
            .await
    }

    async fn pause_schedule(
        &self,
        request: Request<proto::PauseScheduleRequest>,
    ) -> Result<Response<proto::PauseScheduleResponse>, Status> {
        let request = audited(request);
        self.apply(
            Ok(RolloutChange::SchedulePause),
            None,
            request.actor,
            request.reason,
        )
        .await
    }

    async fn resume_schedule(
        &self,
        request: Request<proto::ResumeScheduleRequest>,
    ) -> Result<Response<proto::ResumeScheduleResponse>, Status> {
        let request = audited(request);
        self.apply(
            Ok(RolloutChange::ScheduleResume),
            None,
            request.actor,
            request.reason,
        )
        .await
    }

    async fn abort_schedule(
        &self,
        request: Request<proto::AbortScheduleRequest>,
    ) -> Result<Response<proto::AbortScheduleResponse>, Status> {
        let request = audited(request);
        self.apply(
            Ok(RolloutChange::ScheduleAbort),
            None,
            request.actor,
            request.reason,
        )
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
