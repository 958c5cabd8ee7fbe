//! `stats.v1.MigrationService`: the phase machine. Backfill, verify and the storage report
//! answer UNIMPLEMENTED until they land.

use tonic::{Request, Response, Status};

use super::proto::migration_service_server::MigrationService;
use super::proto::{
    self, GetMigrationStateRequest, GetMigrationStateResponse, ListPhaseTransitionsRequest,
    ListPhaseTransitionsResponse, PhaseTransition, TransitionPhaseRequest,
};
use crate::app::Migration;
use crate::domain::ValidationError;
use crate::migration::{Phase, PhaseState, Transition};
use crate::storage::EventStore;

/// The `MigrationService` handlers.
#[derive(Debug)]
pub struct MigrationApi<S> {
    migration: Migration<S>,
}

impl<S: EventStore> MigrationApi<S> {
    pub fn new(migration: Migration<S>) -> Self {
        Self { migration }
    }
}

impl From<Phase> for proto::MigrationPhase {
    fn from(phase: Phase) -> Self {
        match phase {
            Phase::LegacyOnly => proto::MigrationPhase::LegacyOnly,
            Phase::DualWrite => proto::MigrationPhase::DualWrite,
            Phase::Backfilled => proto::MigrationPhase::Backfilled,
            Phase::Verified => proto::MigrationPhase::Verified,
            Phase::NewPrimary => proto::MigrationPhase::NewPrimary,
            Phase::LegacyRetired => proto::MigrationPhase::LegacyRetired,
        }
    }
}

/// The phase a request names in `field`.
fn phase_from_proto(field: &str, value: i32) -> Result<Phase, ValidationError> {
    let phase = match proto::MigrationPhase::try_from(value) {
        Ok(proto::MigrationPhase::LegacyOnly) => Phase::LegacyOnly,
        Ok(proto::MigrationPhase::DualWrite) => Phase::DualWrite,
        Ok(proto::MigrationPhase::Backfilled) => Phase::Backfilled,
        Ok(proto::MigrationPhase::Verified) => Phase::Verified,
        Ok(proto::MigrationPhase::NewPrimary) => Phase::NewPrimary,
        Ok(proto::MigrationPhase::LegacyRetired) => Phase::LegacyRetired,
        Ok(proto::MigrationPhase::Unspecified) => {
            return Err(ValidationError::single(field, "must be specified"));
        }
        Err(_) => {
            return Err(ValidationError::single(
                field,
                format!("unknown phase {value}"),
            ));
        }
    };
    Ok(phase)
}

fn timestamp(at: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        // Always below 2e9, so it fits.
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}

fn state_response(state: PhaseState) -> GetMigrationStateResponse {
    let phase = state.phase;
    let writes = phase.write_targets();
    GetMigrationStateResponse {
        phase: proto::MigrationPhase::from(phase).into(),
        allowed_transitions: phase
            .allowed_transitions()
            .into_iter()
            .map(|p| proto::MigrationPhase::from(p).into())
            .collect(),
        changed_at: Some(timestamp(state.changed_at)),
        read_source: proto::StorageSource::from(phase.read_source()).into(),
        writes_legacy: writes.legacy,
        writes_new: writes.new,
    }
}

fn transition_to_proto(transition: Transition) -> PhaseTransition {
    PhaseTransition {
        from: proto::MigrationPhase::from(transition.from).into(),
        to: proto::MigrationPhase::from(transition.to).into(),
        actor: transition.actor,
        reason: transition.reason,
        at: Some(timestamp(transition.at)),
    }
}

#[tonic::async_trait]
impl<S: EventStore> MigrationService for MigrationApi<S> {
    async fn get_migration_state(
        &self,
        _request: Request<GetMigrationStateRequest>,
    ) -> Result<Response<GetMigrationStateResponse>, Status> {
        Ok(Response::new(state_response(self.migration.state().await?)))
    }

    async fn transition_phase(
        &self,
        request: Request<TransitionPhaseRequest>,
    ) -> Result<Response<GetMigrationStateResponse>, Status> {
        let request = request.into_inner();
        let target = phase_from_proto("target", request.target);
        let reason = if request.reason.trim().is_empty() {
            Err(ValidationError::single(
                "reason",
                "must say why the phase changes",
            ))
        } else {
            Ok(request.reason)
        };
        let (target, reason) = match (target, reason) {
            (Ok(target), Ok(reason)) => (target, reason),
            (target, reason) => {
                let violations = [target.err(), reason.err()]
                    .into_iter()
                    .flatten()
                    .flat_map(|e| e.violations)
                    .collect();
                return Err(ValidationError { violations }.into());
            }
        };
        let actor = if request.actor.is_empty() {
            "unknown"
        } else {
            request.actor.as_str()
        };
        let state = self.migration.transition(target, actor, &reason).await?;
        Ok(Response::new(state_response(state)))
    }

    async fn list_phase_transitions(
        &self,
        request: Request<ListPhaseTransitionsRequest>,
    ) -> Result<Response<ListPhaseTransitionsResponse>, Status> {
        let history = self.migration.history(request.into_inner().limit).await?;
        Ok(Response::new(ListPhaseTransitionsResponse {
            transitions: history.into_iter().map(transition_to_proto).collect(),
        }))
    }
}
