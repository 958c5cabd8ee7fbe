//! One typed helper per RPC that tests call again and again, in the manner of
//! zero-to-production's `tests/api/helpers.rs`: a test says what it does and asserts what it
//! gets, without rebuilding requests.

use campaign_stats::grpc::proto::migration_service_client::MigrationServiceClient;
use campaign_stats::grpc::proto::rollout_service_client::RolloutServiceClient;
use campaign_stats::grpc::proto::{
    ClearUserOverrideRequest, EvaluateUserRequest, EvaluateUserResponse, Event,
    GetAggregatedDailyStatsRequest, GetAggregatedDailyStatsResponse, GetMigrationStateRequest,
    GetMigrationStateResponse, GetRolloutRequest, GetStatsRequest, GetStatsResponse,
    KillSwitchRequest, ListRolloutHistoryRequest, ListRolloutHistoryResponse, MigrationPhase,
    RecordEventsRequest, RecordEventsResponse, ResetSaltRequest, Rollout,
    SetRolloutPercentageRequest, SetUserOverrideRequest, StorageSource, TransitionPhaseRequest,
};
use campaign_stats::grpc::proto::{GetGuardRequest, GetGuardResponse, StartScheduleRequest};
use tonic::Status;
use tonic::transport::Channel;

use super::TestServer;

/// The actor every helper's change is made by.
pub const TESTER: &str = "tester";

/// `GetRollout` through `client` (a replica of any kind): the rollout it applies.
pub async fn current_rollout(client: &mut RolloutServiceClient<Channel>) -> Rollout {
    client
        .get_rollout(GetRolloutRequest {})
        .await
        .expect("GetRollout")
        .into_inner()
        .rollout
        .expect("rollout")
}

impl TestServer {
    pub async fn rollout(&self) -> RolloutServiceClient<Channel> {
        RolloutServiceClient::new(self.channel().await)
    }

    pub async fn migration(&self) -> MigrationServiceClient<Channel> {
        MigrationServiceClient::new(self.channel().await)
    }

    /// `GetMigrationState`.
    pub async fn migration_state(&self) -> GetMigrationStateResponse {
        self.migration()
            .await
            .get_migration_state(GetMigrationStateRequest {})
            .await
            .expect("GetMigrationState")
            .into_inner()
    }

    /// `TransitionPhase` to `target` (forced past unresolved rows when `force`), by
    /// [`TESTER`], saying `reason`.
    pub async fn transition(
        &self,
        target: MigrationPhase,
        force: bool,
        reason: &str,
    ) -> Result<GetMigrationStateResponse, Status> {
        self.migration()
            .await
            .transition_phase(TransitionPhaseRequest {
                target: target.into(),
                force,
                reason: reason.into(),
                actor: TESTER.into(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// `KillSwitch`, by [`TESTER`], saying `reason`: the rollout after it.
    pub async fn kill_switch(&self, engaged: bool, reason: &str) -> Result<Rollout, Status> {
        self.rollout()
            .await
            .kill_switch(KillSwitchRequest {
                engaged,
                reason: reason.into(),
                actor: TESTER.into(),
            })
            .await
            .map(|response| response.into_inner().rollout.expect("rollout"))
    }

    /// `SetRolloutPercentage` at `expected_version` (0: any), by [`TESTER`]: the rollout after
    /// it.
    pub async fn set_percentage(
        &self,
        percentage: f64,
        expected_version: u64,
        force: bool,
    ) -> Result<Rollout, Status> {
        self.rollout()
            .await
            .set_rollout_percentage(SetRolloutPercentageRequest {
                percentage,
                expected_version,
                force,
                reason: format!("{percentage}%"),
                actor: TESTER.into(),
            })
            .await
            .map(|response| response.into_inner().rollout.expect("rollout"))
    }

    /// `GetRollout`: the rollout this replica applies.
    pub async fn current_rollout(&self) -> Rollout {
        current_rollout(&mut self.rollout().await).await
    }

    /// `EvaluateUser`: where `user_id`'s reads go now.
    pub async fn evaluate(&self, user_id: &str) -> EvaluateUserResponse {
        self.rollout()
            .await
            .evaluate_user(EvaluateUserRequest {
                user_id: user_id.into(),
            })
            .await
            .expect("EvaluateUser")
            .into_inner()
    }

    /// `SetUserOverride` of `user_id` to `source`, by [`TESTER`], saying `reason`.
    pub async fn set_override(
        &self,
        user_id: &str,
        source: StorageSource,
        reason: &str,
    ) -> Result<Rollout, Status> {
        self.rollout()
            .await
            .set_user_override(SetUserOverrideRequest {
                user_id: user_id.into(),
                source: source.into(),
                reason: reason.into(),
                actor: TESTER.into(),
            })
            .await
            .map(|response| response.into_inner().rollout.expect("rollout"))
    }

    /// `ClearUserOverride` of `user_id`, by [`TESTER`], saying `reason`.
    pub async fn clear_override(&self, user_id: &str, reason: &str) -> Result<Rollout, Status> {
        self.rollout()
            .await
            .clear_user_override(ClearUserOverrideRequest {
                user_id: user_id.into(),
                reason: reason.into(),
                actor: TESTER.into(),
            })
            .await
            .map(|response| response.into_inner().rollout.expect("rollout"))
    }

    /// `ListRolloutHistory`: a page of `page_size` changes (0: the default) from `page_token`.
    pub async fn rollout_history(
        &self,
        page_size: u32,
        page_token: &str,
    ) -> ListRolloutHistoryResponse {
        self.rollout()
            .await
            .list_rollout_history(ListRolloutHistoryRequest {
                page_size,
                page_token: page_token.into(),
            })
            .await
            .expect("ListRolloutHistory")
            .into_inner()
    }

    /// `ResetSalt`, by [`TESTER`], saying `reason`.
    pub async fn reset_salt(&self, reason: &str) -> Result<Rollout, Status> {
        self.rollout()
            .await
            .reset_salt(ResetSaltRequest {
                reason: reason.into(),
                actor: TESTER.into(),
            })
            .await
            .map(|response| response.into_inner().rollout.expect("rollout"))
    }

    /// `RecordEvents` of `events`; panics when refused.
    pub async fn record(&self, events: Vec<Event>) -> RecordEventsResponse {
        self.stats()
            .await
            .record_events(RecordEventsRequest { events })
            .await
            .expect("RecordEvents")
            .into_inner()
    }

    /// `GetStats` of `user_id`'s `campaign_id` from `start` to `end`; panics when refused.
    pub async fn get_stats(
        &self,
        user_id: &str,
        campaign_id: &str,
        start: &str,
        end: &str,
    ) -> GetStatsResponse {
        self.stats()
            .await
            .get_stats(GetStatsRequest {
                user_id: user_id.into(),
                campaign_id: campaign_id.into(),
                start_date: start.into(),
                end_date: end.into(),
            })
            .await
            .expect("GetStats")
            .into_inner()
    }

    /// `GetAggregatedDailyStats` over all users from `start` to `end` (the operator's view).
    pub async fn all_users_daily(&self, start: &str, end: &str) -> GetAggregatedDailyStatsResponse {
        self.stats()
            .await
            .get_aggregated_daily_stats(GetAggregatedDailyStatsRequest {
                start_date: start.into(),
                end_date: end.into(),
                ..Default::default()
            })
            .await
            .expect("GetAggregatedDailyStats")
            .into_inner()
    }

    /// `GetGuard`: what this replica's guard sees.
    pub async fn guard(&self) -> GetGuardResponse {
        self.rollout()
            .await
            .get_guard(GetGuardRequest {})
            .await
            .expect("GetGuard")
            .into_inner()
    }

    /// `StartSchedule` through `percentages`, `dwell_seconds` and `min_comparisons` a step,
    /// resuming itself `cool_down_seconds` after a trip (0: only a person resumes it), by
    /// [`TESTER`].
    pub async fn start_schedule(
        &self,
        percentages: &[f64],
        dwell_seconds: u32,
        min_comparisons: u32,
        cool_down_seconds: u32,
    ) -> Result<Rollout, Status> {
        self.rollout()
            .await
            .start_schedule(StartScheduleRequest {
                percentages: percentages.to_vec(),
                dwell_seconds,
                min_comparisons,
                reason: "walk the rollout up".into(),
                actor: TESTER.into(),
                cool_down_seconds,
            })
            .await
            .map(|response| response.into_inner().rollout.expect("rollout"))
    }
}
