//! Services declared in the API whose issues have not landed yet: every method answers
//! `UNIMPLEMENTED` (the generated default stubs), so clients and reflection see them already.

use super::proto::rollout_service_server::RolloutService;

/// `stats.v1.RolloutService`, not implemented yet.
#[derive(Debug, Default)]
pub struct RolloutApi;

#[tonic::async_trait]
impl RolloutService for RolloutApi {}
