//! One typed helper per control RPC that tests call again and again, in the manner of
//! zero-to-production's `tests/api/helpers.rs`: a test says what it does and asserts what it
//! gets, without rebuilding requests.

use campaign_stats::grpc::proto::migration_service_client::MigrationServiceClient;
use campaign_stats::grpc::proto::rollout_service_client::RolloutServiceClient;
use campaign_stats::grpc::proto::{
    GetMigrationStateRequest, GetMigrationStateResponse, KillSwitchRequest, MigrationPhase,
    Rollout, SetRolloutPercentageRequest, TransitionPhaseRequest,
};
use tonic::Status;
use tonic::transport::Channel;

use super::TestServer;

/// The actor every helper's change is made by.
pub const TESTER: &str = "tester";

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
}
