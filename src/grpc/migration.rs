//! `stats.v1.MigrationService`: the phase machine, backfill and verify runs, the storage
//! report.

use tonic::{Request, Response, Status};

use super::proto::migration_service_server::MigrationService;
use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};

use super::auth::audited;
use super::convert::{audit, both_valid};
use super::proto::{
    self, GetMigrationStateRequest, GetMigrationStateResponse, GetRunRequest,
    GetStorageReportRequest, GetStorageReportResponse, ListPhaseTransitionsRequest,
    ListPhaseTransitionsResponse, PhaseTransition, StartBackfillRequest, StartBackfillResponse,
    TransitionPhaseRequest, VerifyConsistencyRequest, VerifyConsistencyResponse,
};
use crate::app::AppError;
use crate::app::{BackfillRequest, Migration, MigrationState};
use crate::domain::{
    DateRange, FieldViolation, LimitExceeded, MAX_TEXT_BYTES, ValidationError, parse_actor,
    parse_date, validate_id, validate_text,
};
use crate::migration::ambiguous::{
    AmbiguityKind, Resolution, ResolutionRecord, ResolveFilter, ResolveRequest,
};
use crate::migration::{Phase, Run, RunIssue, Transition};
use crate::storage::{Store, TableSize};

/// The `MigrationService` handlers.
#[derive(Debug)]
pub struct MigrationApi<S> {
    migration: Migration<S>,
}

impl<S: Store> MigrationApi<S> {
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

pub(super) fn timestamp(at: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        // Always below 2e9, so it fits.
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}

fn state_response(state: MigrationState) -> GetMigrationStateResponse {
    let MigrationState {
        phase: state,
        read_source,
    } = state;
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
        read_source: proto::StorageSource::from(read_source).into(),
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
        forced: transition.forced,
    }
}

fn run_to_proto(run: Run) -> proto::Run {
    proto::Run {
        run_id: run.run_id,
        state: run.state.name().to_owned(),
        processed: run.processed,
        copied: run.copied,
        skipped: run.skipped,
        ambiguous: run.ambiguous,
        failed: run.failed,
        kind: run.kind.name().to_owned(),
        dry_run: run.dry_run,
        actor: run.actor,
        started_at: Some(timestamp(run.started_at)),
        finished_at: run.finished_at.map(timestamp),
        batch_size: run.batch_size,
        compared: run.compared,
        mismatches: run.mismatches,
        checkpoint: run
            .checkpoint
            .map(|(campaign, day)| format!("{campaign}/{day}"))
            .unwrap_or_default(),
        last_error: run.last_error.unwrap_or_default(),
        resumes: run.resumes,
    }
}

fn issue_to_proto(issue: RunIssue) -> proto::RunIssue {
    proto::RunIssue {
        campaign_id: issue.campaign_id,
        user_id: issue.user_id,
        date: issue.stat_date.to_string(),
        reason: issue.reason,
        kind: issue
            .kind
            .map_or(
                proto::AmbiguityKind::Unspecified,
                proto::AmbiguityKind::from,
            )
            .into(),
        resolution: issue
            .resolution
            .map_or(proto::AmbiguousResolution::Unspecified, Into::into)
            .into(),
    }
}

impl From<AmbiguityKind> for proto::AmbiguityKind {
    fn from(kind: AmbiguityKind) -> Self {
        match kind {
            AmbiguityKind::NullCount => proto::AmbiguityKind::NullCount,
            AmbiguityKind::NegativeCount => proto::AmbiguityKind::NegativeCount,
            AmbiguityKind::TooLarge => proto::AmbiguityKind::TooLarge,
            AmbiguityKind::PositiveRepliesAboveReplied => {
                proto::AmbiguityKind::PositiveRepliesAboveReplied
            }
            AmbiguityKind::SeveralUsers => proto::AmbiguityKind::SeveralUsers,
            AmbiguityKind::OwnedByAnotherUser => proto::AmbiguityKind::OwnedByAnotherUser,
            AmbiguityKind::NewStorageAhead => proto::AmbiguityKind::NewStorageAhead,
            AmbiguityKind::InvalidId => proto::AmbiguityKind::InvalidId,
        }
    }
}

impl From<Resolution> for proto::AmbiguousResolution {
    fn from(resolution: Resolution) -> Self {
        match resolution {
            Resolution::Copy => proto::AmbiguousResolution::Copy,
            Resolution::Skip => proto::AmbiguousResolution::Skip,
        }
    }
}

/// Most rows one resolution may name.
pub const MAX_RESOLVE_ROWS: usize = 10_000;

impl TryFrom<proto::ResolveAmbiguousRowsRequest> for ResolveRequest {
    type Error = AppError;

    fn try_from(request: proto::ResolveAmbiguousRowsRequest) -> Result<Self, AppError> {
        LimitExceeded::check("rows", MAX_RESOLVE_ROWS, request.rows.len())?;
        let mut failures: Vec<Option<FieldViolation>> = Vec::new();
        let resolution = match proto::AmbiguousResolution::try_from(request.resolution) {
            Ok(proto::AmbiguousResolution::Copy) => Some(Resolution::Copy),
            Ok(proto::AmbiguousResolution::Skip) => Some(Resolution::Skip),
            _ => {
                failures.push(Some(FieldViolation::new(
                    "resolution",
                    "must be AMBIGUOUS_RESOLUTION_COPY or AMBIGUOUS_RESOLUTION_SKIP",
                )));
                None
            }
        };
        let audited = audit(
            request.actor,
            request.reason,
            "must say why these rows are resolved so",
        );
        let mut rows = Vec::with_capacity(request.rows.len());
        for (i, key) in request.rows.into_iter().enumerate() {
            let campaign = validate_text(
                &format!("rows[{i}].campaign_id"),
                &key.campaign_id,
                MAX_TEXT_BYTES,
            )
            .and_then(|()| {
                if key.campaign_id.is_empty() {
                    Err(FieldViolation::new(
                        format!("rows[{i}].campaign_id"),
                        "must not be empty",
                    ))
                } else {
                    Ok(key.campaign_id)
                }
            });
            match (campaign, parse_date(&format!("rows[{i}].date"), &key.date)) {
                (Ok(campaign), Ok(day)) => rows.push((campaign, day)),
                (campaign, day) => failures.extend([campaign.err(), day.err()]),
            }
        }
        let mut kinds = Vec::with_capacity(request.kinds.len());
        for (i, value) in request.kinds.into_iter().enumerate() {
            match proto::AmbiguityKind::try_from(value)
                .ok()
                .and_then(kind_from_proto)
            {
                Some(kind) => kinds.push(kind),
                None => failures.push(Some(FieldViolation::new(
                    format!("kinds[{i}]"),
                    format!("unknown kind {value}"),
                ))),
            }
        }
        let (actor, reason) = match audited {
            Ok(audited) => Some(audited),
            Err(invalid) => {
                failures.extend(invalid.violations.into_iter().map(Some));
                None
            }
        }
        .unzip();
        match (resolution, actor, reason) {
            (Some(resolution), Some(actor), Some(reason)) if failures.is_empty() => Ok(Self {
                resolution,
                filter: ResolveFilter { rows, kinds },
                actor,
                reason,
            }),
            _ => Err(ValidationError::from_failures(failures).into()),
        }
    }
}

fn kind_from_proto(kind: proto::AmbiguityKind) -> Option<AmbiguityKind> {
    AmbiguityKind::ALL
        .into_iter()
        .find(|k| proto::AmbiguityKind::from(*k) == kind)
}

fn resolution_to_proto(record: ResolutionRecord) -> proto::AmbiguousResolutionEntry {
    proto::AmbiguousResolutionEntry {
        id: record.id,
        resolution: proto::AmbiguousResolution::from(record.resolution).into(),
        actor: record.actor,
        reason: record.reason,
        filter: record.filter,
        rows: record.rows,
        copied: record.copied,
        at: Some(timestamp(record.at)),
    }
}

/// The range a verify covers: both dates, or neither (the whole history). Unlike reads, a
/// verify may span more than 3,660 days.
fn verify_range(start: &str, end: &str) -> Result<Option<DateRange>, ValidationError> {
    if start.is_empty() && end.is_empty() {
        return Ok(None);
    }
    let (start, end) = match (parse_date("start_date", start), parse_date("end_date", end)) {
        (Ok(start), Ok(end)) => (start, end),
        (start, end) => return Err(ValidationError::from_failures([start.err(), end.err()])),
    };
    if start > end {
        return Err(ValidationError::single(
            "end_date",
            format!("must not be before start_date ({start})"),
        ));
    }
    Ok(Some(DateRange { start, end }))
}

fn run_id(run_id: String) -> Result<String, ValidationError> {
    validate_id("run_id", &run_id)
        .map_err(|violation| ValidationError::from_failures([Some(violation)]))?;
    Ok(run_id)
}

/// The actor of a request (`unknown` when empty).
fn actor(value: String) -> Result<String, ValidationError> {
    parse_actor(value).map_err(|violation| ValidationError::from_failures([Some(violation)]))
}

/// The stream of `WatchRun`.
pub type RunStream = Pin<Box<dyn Stream<Item = Result<proto::Run, Status>> + Send>>;

/// What a repair's reason must say.
const REPAIR_REASON: &str = "must say why the rollups are repaired";
/// Most differing rows a repair lists (all are counted).
const REPAIR_ROWS_LISTED: usize = 1_000;

#[tonic::async_trait]
impl<S: Store> MigrationService for MigrationApi<S> {
    type WatchRunStream = RunStream;

    async fn start_backfill(
        &self,
        request: Request<StartBackfillRequest>,
    ) -> Result<Response<StartBackfillResponse>, Status> {
        let request = audited(request);
        let actor = actor(request.actor)?;
        let run = self
            .migration
            .start_backfill(BackfillRequest {
                actor,
                dry_run: request.dry_run,
                batch_size: request.batch_size,
                throttle: Duration::from_millis(u64::from(request.throttle_ms)),
            })
            .await?;
        Ok(Response::new(StartBackfillResponse { run_id: run.run_id }))
    }

    async fn get_storage_report(
        &self,
        _request: Request<GetStorageReportRequest>,
    ) -> Result<Response<GetStorageReportResponse>, Status> {
        let report = self.migration.storage_report().await?;
        let total = |tables: &[TableSize]| {
            tables
                .iter()
                .fold((0, 0), |(rows, bytes), t| (rows + t.rows, bytes + t.bytes))
        };
        let (legacy_rows, legacy_bytes) = total(&report.legacy);
        let (new_rows, new_bytes) = total(&report.new);
        let listed = |storage: &'static str, tables: Vec<TableSize>| {
            tables.into_iter().map(move |t| proto::TableSize {
                table: t.table.to_owned(),
                storage: storage.to_owned(),
                rows: t.rows,
                bytes: t.bytes,
            })
        };
        Ok(Response::new(GetStorageReportResponse {
            legacy_rows,
            legacy_bytes,
            new_rows,
            new_bytes,
            legacy_zero_rows: report.legacy_zero_rows,
            tables: listed("legacy", report.legacy)
                .chain(listed("new", report.new))
                .collect(),
        }))
    }

    async fn verify_consistency(
        &self,
        request: Request<VerifyConsistencyRequest>,
    ) -> Result<Response<VerifyConsistencyResponse>, Status> {
        let request = audited(request);
        let range = verify_range(&request.start_date, &request.end_date)?;
        let actor = actor(request.actor)?;
        let (run, outcome) = self.migration.verify(&actor, range).await?;
        Ok(Response::new(VerifyConsistencyResponse {
            run_id: run.run_id,
            compared: outcome.compared,
            mismatches: outcome.mismatches,
            ambiguous: outcome.ambiguous,
            ambiguous_resolved: outcome.resolved,
            ambiguous_unresolved: outcome.ambiguous - outcome.resolved,
            sample: outcome
                .sample
                .into_iter()
                .map(|m| proto::Mismatch {
                    user_id: m.user_id,
                    campaign_id: m.campaign_id,
                    date: m.date.to_string(),
                    metric: m.metric.to_owned(),
                    legacy: m.legacy,
                    new: m.new,
                })
                .collect(),
        }))
    }

    async fn repair_rollups(
        &self,
        request: Request<proto::RepairRollupsRequest>,
    ) -> Result<Response<proto::RepairRollupsResponse>, Status> {
        let request = audited(request);
        let (range, (actor, reason)) = both_valid(
            DateRange::parse(&request.start_date, &request.end_date),
            audit(request.actor, request.reason, REPAIR_REASON),
        )?;
        let outcome = self
            .migration
            .repair_rollups(range, request.apply, &actor, &reason)
            .await?;
        Ok(Response::new(proto::RepairRollupsResponse {
            checked: outcome.checked,
            differing: outcome.fixes.len() as u64,
            rows: outcome
                .fixes
                .into_iter()
                .take(REPAIR_ROWS_LISTED)
                .map(|fix| proto::RollupRepair {
                    user_id: fix.key.0,
                    campaign_id: fix.key.1,
                    date: fix.key.2.to_string(),
                    stored: Some(fix.stored.into()),
                    expected: Some(fix.expected.into()),
                })
                .collect(),
            all_users_days: outcome.all_users_days,
            applied: request.apply,
        }))
    }

    async fn list_runs(
        &self,
        request: Request<proto::ListRunsRequest>,
    ) -> Result<Response<proto::ListRunsResponse>, Status> {
        let runs = self.migration.runs(request.into_inner().limit).await?;
        Ok(Response::new(proto::ListRunsResponse {
            runs: runs.into_iter().map(run_to_proto).collect(),
        }))
    }

    async fn cancel_run(
        &self,
        request: Request<proto::CancelRunRequest>,
    ) -> Result<Response<proto::Run>, Status> {
        let request = audited(request);
        let id = run_id(request.run_id);
        let (id, actor) = super::convert::both_valid(id, actor(request.actor))?;
        let run = self.migration.cancel_run(&id, &actor).await?;
        Ok(Response::new(run_to_proto(run)))
    }

    async fn get_run(
        &self,
        request: Request<GetRunRequest>,
    ) -> Result<Response<proto::Run>, Status> {
        let run = self
            .migration
            .run(&run_id(request.into_inner().run_id)?)
            .await?;
        Ok(Response::new(run_to_proto(run)))
    }

    async fn get_run_report(
        &self,
        request: Request<proto::GetRunReportRequest>,
    ) -> Result<Response<proto::GetRunReportResponse>, Status> {
        let (run, issues) = self
            .migration
            .report(&run_id(request.into_inner().run_id)?)
            .await?;
        Ok(Response::new(proto::GetRunReportResponse {
            run: Some(run_to_proto(run)),
            ambiguous: issues.issues.into_iter().map(issue_to_proto).collect(),
            resolved: issues.resolved,
            unresolved: issues.unresolved,
        }))
    }

    async fn watch_run(
        &self,
        request: Request<proto::WatchRunRequest>,
    ) -> Result<Response<Self::WatchRunStream>, Status> {
        let run_id = run_id(request.into_inner().run_id)?;
        let runs = self.migration.watch_run(&run_id).await?;
        Ok(Response::new(Box::pin(
            runs.map(|run| run.map(run_to_proto).map_err(Status::from)),
        )))
    }

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
        let request = audited(request);
        let (target, (actor, reason)) = both_valid(
            phase_from_proto("target", request.target),
            audit(
                request.actor,
                request.reason,
                "must say why the phase changes",
            ),
        )?;
        let state = self
            .migration
            .transition(target, &actor, &reason, request.force)
            .await?;
        Ok(Response::new(state_response(state)))
    }

    async fn resolve_ambiguous_rows(
        &self,
        request: Request<proto::ResolveAmbiguousRowsRequest>,
    ) -> Result<Response<proto::ResolveAmbiguousRowsResponse>, Status> {
        let request = ResolveRequest::try_from(audited(request))?;
        let outcome = self.migration.resolve(&request).await?;
        Ok(Response::new(proto::ResolveAmbiguousRowsResponse {
            resolution_id: outcome.resolution_id,
            resolved: outcome.resolved,
            copied: outcome.copied,
            unresolved: outcome.unresolved,
        }))
    }

    async fn list_ambiguous_resolutions(
        &self,
        request: Request<proto::ListAmbiguousResolutionsRequest>,
    ) -> Result<Response<proto::ListAmbiguousResolutionsResponse>, Status> {
        let resolutions = self
            .migration
            .resolutions(request.into_inner().limit)
            .await?;
        Ok(Response::new(proto::ListAmbiguousResolutionsResponse {
            resolutions: resolutions.into_iter().map(resolution_to_proto).collect(),
        }))
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
