//! Admin commands: a gRPC client of a running server, for operators and scripts. Text for
//! people, `--output json` for scripts; the exit code is non-zero when the work failed.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use tokio_stream::StreamExt;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use super::printable;
use crate::grpc::proto::migration_service_client::MigrationServiceClient;
use crate::grpc::proto::{
    self, GetMigrationStateRequest, GetRunReportRequest, GetRunRequest, GetStorageReportRequest,
    ListPhaseTransitionsRequest, MigrationPhase, RepairRollupsRequest, StartBackfillRequest,
    TransitionPhaseRequest, VerifyConsistencyRequest, WatchRunRequest,
};
use crate::migration::Phase;
use crate::migration::ambiguous::AmbiguityKind;

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Output {
    #[default]
    Text,
    Json,
}

/// Where the server is and how to print.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// The server's gRPC address: `host:port` (as grpcurl takes it) or `http://host:port`.
    #[arg(
        short,
        long,
        env = "STATS_SERVER",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub server: String,
    /// `text` for people, `json` for scripts.
    #[arg(short, long, value_enum, default_value_t = Output::Text, global = true)]
    pub output: Output,
    /// The bearer token to call with (the server's `--auth-tokens-file` lists its hash); the
    /// admin commands need an `admin` token.
    #[arg(long, env = "STATS_TOKEN", hide_env_values = true, global = true,
          value_parser = BearerToken::parse)]
    pub token: Option<BearerToken>,
    /// The CA (PEM) that signed the server's certificate; implies TLS. An `https://` server
    /// without it is verified against the system's roots.
    #[arg(long, env = "STATS_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,
    /// A client certificate (PEM), for servers that verify clients; implies TLS.
    #[arg(
        long,
        env = "STATS_TLS_CLIENT_CERT",
        global = true,
        requires = "tls_client_key"
    )]
    pub tls_client_cert: Option<PathBuf>,
    /// The private key of `--tls-client-cert` (PEM).
    #[arg(
        long,
        env = "STATS_TLS_CLIENT_KEY",
        global = true,
        requires = "tls_client_cert"
    )]
    pub tls_client_key: Option<PathBuf>,
}

/// A bearer token, sent as `authorization: Bearer <token>` on every call; `Debug` hides it.
#[derive(Clone)]
pub struct BearerToken(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl BearerToken {
    fn parse(token: &str) -> Result<Self, String> {
        format!("Bearer {}", token.trim())
            .parse()
            .map(Self)
            .map_err(|_| "a token must be printable ASCII".to_owned())
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<hidden>)")
    }
}

/// Adds the token, when there is one, to every call.
#[derive(Debug, Clone)]
pub struct WithToken(Option<BearerToken>);

impl tonic::service::Interceptor for WithToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(BearerToken(value)) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A connection to the server that sends the caller's token.
pub type ServerChannel = tonic::service::interceptor::InterceptedService<Channel, WithToken>;

impl ClientArgs {
    /// A connection to the server, sending the token.
    pub(super) async fn channel(&self) -> anyhow::Result<ServerChannel> {
        let tls = self.tls_ca.is_some() || self.tls_client_cert.is_some();
        let uri = endpoint_uri(&self.server, tls);
        let mut endpoint = Channel::from_shared(uri.clone())
            .with_context(|| format!("invalid server address {:?}", self.server))?;
        if uri.starts_with("https://") {
            endpoint = endpoint
                .tls_config(self.tls_config()?)
                .context("unusable TLS settings")?;
        }
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("cannot reach the server at {}", self.server))?;
        Ok(ServerChannel::new(channel, WithToken(self.token.clone())))
    }

    /// TLS towards the server: its CA (or the system's roots) and the client's identity.
    fn tls_config(&self) -> anyhow::Result<ClientTlsConfig> {
        let read = |path: &PathBuf| {
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
        };
        let mut config = match &self.tls_ca {
            Some(ca) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?)),
            None => ClientTlsConfig::new().with_native_roots(),
        };
        if let (Some(cert), Some(key)) = (&self.tls_client_cert, &self.tls_client_key) {
            config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        Ok(config)
    }

    pub(super) async fn migration(&self) -> anyhow::Result<MigrationServiceClient<ServerChannel>> {
        Ok(MigrationServiceClient::new(self.channel().await?))
    }
}

/// The URI of a server address: a bare `host:port` means `http://host:port`, or
/// `https://host:port` when `tls` is asked for.
fn endpoint_uri(server: &str, tls: bool) -> String {
    if server.contains("://") {
        server.to_owned()
    } else if tls {
        format!("https://{server}")
    } else {
        format!("http://{server}")
    }
}

/// Why and who, kept in the audit trail of a change.
#[derive(Debug, Clone, Args)]
pub struct Audited {
    /// Why (required; kept in the audit trail).
    #[arg(long)]
    pub reason: String,
    /// Who (kept in the audit trail); defaults to $USER.
    #[arg(long, env = "USER", default_value = "cli")]
    pub actor: String,
}

#[derive(Debug, Subcommand)]
pub enum MigrationCommand {
    /// The phase, the moves allowed from it, and what it means for reads and writes.
    Status,
    /// Move to another phase (forward one step, or back to any earlier one).
    Transition {
        /// The target phase, e.g. DUAL_WRITE (or dual-write).
        #[arg(value_parser = parse_phase)]
        phase: Phase,
        #[command(flatten)]
        audit: Audited,
        /// Enter VERIFIED although the last backfill's ambiguous rows are not all resolved
        /// (the history marks the move as forced).
        #[arg(long)]
        force: bool,
    },
    /// Every phase change, newest first.
    History {
        /// Most entries shown (the newest).
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Resolve ambiguous rows of the last backfill: copy them (NULL read as 0) or skip them
    /// on purpose. Without --row or --kind, every unresolved row.
    Resolve(ResolveArgs),
    /// Every resolution of ambiguous rows, newest first.
    Resolutions {
        /// Most resolutions shown (the newest).
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

/// What `migration resolve` resolves, and how.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("resolution").required(true).args(["copy", "skip"])))]
pub struct ResolveArgs {
    /// Copy the rows into the new storage (refused as a whole if any cannot be copied).
    #[arg(long)]
    copy: bool,
    /// Leave the rows out of the new storage, on purpose.
    #[arg(long)]
    skip: bool,
    /// Only this row, as CAMPAIGN/YYYY-MM-DD (repeatable).
    #[arg(long = "row", value_name = "CAMPAIGN/DATE", value_parser = parse_row_key)]
    rows: Vec<proto::LegacyRowKey>,
    /// Only rows reported for this reason (repeatable), e.g. null-count.
    #[arg(long = "kind", value_parser = parse_kind)]
    kinds: Vec<AmbiguityKind>,
    #[command(flatten)]
    audit: Audited,
}

fn parse_row_key(value: &str) -> Result<proto::LegacyRowKey, String> {
    let (campaign_id, date) = value
        .rsplit_once('/')
        .ok_or_else(|| format!("{value:?} is not CAMPAIGN/YYYY-MM-DD"))?;
    Ok(proto::LegacyRowKey {
        campaign_id: campaign_id.to_owned(),
        date: date.to_owned(),
    })
}

fn parse_kind(value: &str) -> Result<AmbiguityKind, String> {
    AmbiguityKind::from_name(value).ok_or_else(|| {
        let names: Vec<&str> = AmbiguityKind::ALL.iter().map(|k| k.name()).collect();
        format!("unknown kind {value:?}; one of: {}", names.join(", "))
    })
}

/// The CLI's name for a kind a server sent (`-` for none).
fn kind_name(value: i32) -> &'static str {
    let kind = proto::AmbiguityKind::try_from(value).unwrap_or_default();
    AmbiguityKind::ALL
        .into_iter()
        .find(|k| proto::AmbiguityKind::from(*k) == kind)
        .map_or("-", AmbiguityKind::name)
}

/// The CLI's name for a resolution a server sent (`unresolved` for none).
fn resolution_name(value: i32) -> &'static str {
    match proto::AmbiguousResolution::try_from(value) {
        Ok(proto::AmbiguousResolution::Copy) => "copy",
        Ok(proto::AmbiguousResolution::Skip) => "skip",
        _ => "unresolved",
    }
}

/// Options of `backfill`.
#[derive(Debug, Clone, Args)]
pub struct BackfillArgs {
    /// Count and report only; write nothing to the new storage.
    #[arg(long)]
    pub dry_run: bool,
    /// Legacy rows per batch (one transaction each), 1 to 50,000.
    #[arg(long, default_value_t = 1_000,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(crate::app::MAX_BATCH_SIZE)))]
    pub batch_size: u32,
    /// Pause between batches, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub throttle_ms: u32,
    /// Write the run's report (its summary and ambiguous rows) to this file, as JSON.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Who (kept with the run); defaults to $USER.
    #[arg(long, env = "USER", default_value = "cli")]
    pub actor: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `backfill watch|status|cancel`: back to a run started earlier (by this or another CLI).
#[derive(Debug, Subcommand)]
pub enum BackfillCommand {
    /// Follow a run to its end with the progress bar (default: the latest backfill).
    Watch {
        /// The run (default: the latest backfill).
        run_id: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Where a run stands (default: the latest backfill).
    Status {
        /// The run (default: the latest backfill).
        run_id: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Stop a running backfill after its current batch (default: the latest backfill);
    /// starting `backfill` again resumes it from its checkpoint.
    Cancel {
        /// The run (default: the latest backfill).
        run_id: Option<String>,
        /// Who (logged); defaults to $USER.
        #[arg(long, env = "USER", default_value = "cli")]
        actor: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

impl BackfillCommand {
    /// Where the server is and how to print.
    pub fn client(&self) -> &ClientArgs {
        match self {
            BackfillCommand::Watch { client, .. }
            | BackfillCommand::Status { client, .. }
            | BackfillCommand::Cancel { client, .. } => client,
        }
    }
}

/// Options of `verify`.
#[derive(Debug, Clone, Args)]
pub struct VerifyArgs {
    /// First day (YYYY-MM-DD); with `--to`. Without both: the whole history.
    #[arg(long, requires = "to")]
    pub from: Option<String>,
    /// Last day (YYYY-MM-DD); with `--from`.
    #[arg(long, requires = "from")]
    pub to: Option<String>,
    /// Who (kept with the run); defaults to $USER.
    #[arg(long, env = "USER", default_value = "cli")]
    pub actor: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Clone, Args)]
pub struct RepairArgs {
    /// First day (YYYY-MM-DD).
    #[arg(long)]
    pub from: String,
    /// Last day (YYYY-MM-DD).
    #[arg(long)]
    pub to: String,
    /// Rewrite the rows that differ (without it: only report them).
    #[arg(long)]
    pub apply: bool,
    #[command(flatten)]
    pub audit: Audited,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `DUAL_WRITE`, `dual-write` or `dual_write`.
fn parse_phase(value: &str) -> Result<Phase, String> {
    let name = value.trim().to_ascii_uppercase().replace('-', "_");
    let name = name.strip_prefix("MIGRATION_PHASE_").unwrap_or(&name);
    Phase::from_name(name).ok_or_else(|| {
        let names: Vec<&str> = Phase::ALL.iter().map(|p| p.name()).collect();
        format!("unknown phase {value:?}; one of {}", names.join(", "))
    })
}

/// A phase as every command prints it, text or JSON: `NEW_PRIMARY`.
pub(super) fn phase_name(value: i32) -> &'static str {
    MigrationPhase::try_from(value)
        .map(|p| p.as_str_name().trim_start_matches("MIGRATION_PHASE_"))
        .unwrap_or("UNKNOWN")
}

fn to_proto(phase: Phase) -> MigrationPhase {
    match phase {
        Phase::LegacyOnly => MigrationPhase::LegacyOnly,
        Phase::DualWrite => MigrationPhase::DualWrite,
        Phase::Backfilled => MigrationPhase::Backfilled,
        Phase::Verified => MigrationPhase::Verified,
        Phase::NewPrimary => MigrationPhase::NewPrimary,
        Phase::LegacyRetired => MigrationPhase::LegacyRetired,
    }
}

fn source_name(value: i32) -> &'static str {
    match proto::StorageSource::try_from(value) {
        Ok(proto::StorageSource::Legacy) => "legacy",
        Ok(proto::StorageSource::New) => "new",
        _ => "unknown",
    }
}

/// A timestamp as RFC 3339 UTC, to the millisecond (audit entries a guard writes within a
/// second of each other stay apart).
pub(super) fn time(ts: Option<prost_types::Timestamp>) -> String {
    ts.and_then(|t| {
        chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0))
    })
    .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
    .unwrap_or_default()
}

pub(super) fn print_json(value: &Value) -> std::io::Result<()> {
    outln!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    )
}

/// A call the server refused, as the operator (or, under `-o json`, a script) reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// What the command could not do, e.g. `cannot move to VERIFIED`.
    pub what: String,
    pub code: tonic::Code,
    /// The server's message, control characters escaped.
    pub message: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} ({})",
            self.what,
            self.message,
            crate::telemetry::code_name(self.code)
        )
    }
}

impl std::error::Error for Refused {}

impl Refused {
    /// The error as `-o json` prints it on stderr.
    pub fn to_json(&self) -> Value {
        json!({"error": {"code": crate::telemetry::code_name(self.code), "message": self.message, "what": self.what}})
    }
}

/// A server error as the operator should read it.
pub(super) fn failed(what: &str, status: tonic::Status) -> anyhow::Error {
    Refused {
        what: what.to_owned(),
        code: status.code(),
        message: super::printable(status.message()).into_owned(),
    }
    .into()
}

/// Runs a `migration …` command.
pub async fn migration(command: MigrationCommand, client_args: ClientArgs) -> anyhow::Result<()> {
    let mut client = client_args.migration().await?;
    let state = match command {
        MigrationCommand::Status => client
            .get_migration_state(GetMigrationStateRequest {})
            .await
            .map_err(|s| failed("cannot read the phase", s))?
            .into_inner(),
        MigrationCommand::Transition {
            phase,
            audit: Audited { reason, actor },
            force,
        } => client
            .transition_phase(TransitionPhaseRequest {
                target: to_proto(phase).into(),
                reason,
                actor,
                force,
            })
            .await
            .map_err(|s| failed(&format!("cannot move to {phase}"), s))?
            .into_inner(),
        MigrationCommand::History { limit } => {
            return transitions(&mut client, limit, client_args.output).await;
        }
        MigrationCommand::Resolve(args) => return resolve(&mut client, args, client_args).await,
        MigrationCommand::Resolutions { limit } => {
            return resolutions(&mut client, limit, client_args).await;
        }
    };
    print_state(&state, client_args.output)
}

/// Runs `migration history`: the phase transitions, newest first.
async fn transitions(
    client: &mut MigrationServiceClient<ServerChannel>,
    limit: u32,
    output: Output,
) -> anyhow::Result<()> {
    let history = client
        .list_phase_transitions(ListPhaseTransitionsRequest { limit })
        .await
        .map_err(|s| failed("cannot read the history", s))?
        .into_inner()
        .transitions;
    let rows: Vec<Value> = history
        .iter()
        .map(|t| json!({"at": time(t.at), "from": phase_name(t.from), "to": phase_name(t.to), "actor": t.actor, "reason": t.reason, "forced": t.forced}))
        .collect();
    match output {
        Output::Json => print_json(&Value::Array(rows))?,
        Output::Text => {
            outln!(
                "{:<22} {:<15} {:<15} {:<20} REASON",
                "AT",
                "FROM",
                "TO",
                "ACTOR"
            )?;
            for t in &history {
                outln!(
                    "{:<22} {:<15} {:<15} {:<20} {}{}",
                    time(t.at),
                    phase_name(t.from),
                    phase_name(t.to),
                    printable(&t.actor),
                    if t.forced { "(forced) " } else { "" },
                    printable(&t.reason)
                )?;
            }
        }
    }
    Ok(())
}

/// The phase, where reads and writes go, and where the phase may move.
fn print_state(state: &proto::GetMigrationStateResponse, output: Output) -> anyhow::Result<()> {
    let allowed: Vec<&str> = state
        .allowed_transitions
        .iter()
        .map(|p| phase_name(*p))
        .collect();
    let writes = match (state.writes_legacy, state.writes_new) {
        (true, true) => "legacy + new",
        (true, false) => "legacy",
        (false, true) => "new",
        (false, false) => "nothing",
    };
    match output {
        Output::Json => print_json(&json!({
            "phase": phase_name(state.phase),
            "allowed_transitions": allowed,
            "changed_at": time(state.changed_at),
            "reads": source_name(state.read_source),
            "writes_legacy": state.writes_legacy,
            "writes_new": state.writes_new,
        }))?,
        Output::Text => {
            outln!("phase:    {}", phase_name(state.phase))?;
            outln!("since:    {}", time(state.changed_at))?;
            outln!("reads:    {}", source_name(state.read_source))?;
            outln!("writes:   {writes}")?;
            outln!("can move: {}", allowed.join(", "))?;
        }
    }
    Ok(())
}

/// Runs `migration resolve`.
async fn resolve(
    client: &mut MigrationServiceClient<ServerChannel>,
    args: ResolveArgs,
    client_args: ClientArgs,
) -> anyhow::Result<()> {
    let resolution = if args.copy {
        proto::AmbiguousResolution::Copy
    } else {
        proto::AmbiguousResolution::Skip
    };
    let outcome = client
        .resolve_ambiguous_rows(proto::ResolveAmbiguousRowsRequest {
            resolution: resolution.into(),
            reason: args.audit.reason,
            actor: args.audit.actor,
            rows: args.rows,
            kinds: args
                .kinds
                .into_iter()
                .map(|k| proto::AmbiguityKind::from(k).into())
                .collect(),
        })
        .await
        .map_err(|s| failed("cannot resolve the rows", s))?
        .into_inner();
    match client_args.output {
        Output::Json => print_json(&json!({
            "resolution_id": outcome.resolution_id, "resolved": outcome.resolved,
            "copied": outcome.copied, "unresolved": outcome.unresolved,
        }))?,
        Output::Text => {
            outln!("{:<11} {:>12}", "resolved", outcome.resolved)?;
            outln!("{:<11} {:>12}", "copied", outcome.copied)?;
            outln!(
                "{:<11} {:>12}  (left to resolve)",
                "unresolved",
                outcome.unresolved
            )?;
        }
    }
    Ok(())
}

/// Runs `migration resolutions`.
async fn resolutions(
    client: &mut MigrationServiceClient<ServerChannel>,
    limit: u32,
    client_args: ClientArgs,
) -> anyhow::Result<()> {
    let list = client
        .list_ambiguous_resolutions(proto::ListAmbiguousResolutionsRequest { limit })
        .await
        .map_err(|s| failed("cannot read the resolutions", s))?
        .into_inner()
        .resolutions;
    match client_args.output {
        Output::Json => print_json(&Value::Array(
            list.iter()
                .map(|r| json!({"id": r.id, "at": time(r.at), "resolution": resolution_name(r.resolution), "actor": r.actor, "reason": r.reason, "filter": r.filter, "rows": r.rows, "copied": r.copied}))
                .collect(),
        ))?,
        Output::Text => {
            outln!(
                "{:<6} {:<22} {:<5} {:>8} {:>8} {:<20} {:<24} REASON",
                "ID",
                "AT",
                "WHAT",
                "ROWS",
                "COPIED",
                "ACTOR",
                "FILTER"
            )?;
            for r in &list {
                outln!(
                    "{:<6} {:<22} {:<5} {:>8} {:>8} {:<20} {:<24} {}",
                    r.id,
                    time(r.at),
                    resolution_name(r.resolution),
                    r.rows,
                    r.copied,
                    printable(&r.actor),
                    printable(&r.filter),
                    printable(&r.reason)
                )?;
            }
        }
    }
    Ok(())
}

fn run_json(run: &proto::Run) -> Value {
    json!({
        "run_id": run.run_id, "kind": run.kind, "state": run.state, "dry_run": run.dry_run,
        "actor": run.actor, "started_at": time(run.started_at), "finished_at": time(run.finished_at),
        "batch_size": run.batch_size, "processed": run.processed, "copied": run.copied,
        "skipped": run.skipped, "ambiguous": run.ambiguous, "failed": run.failed,
        "compared": run.compared, "mismatches": run.mismatches, "checkpoint": run.checkpoint,
        "last_error": run.last_error, "resumes": run.resumes,
    })
}

/// The legacy table's rows: what sizes a backfill's progress bar.
async fn legacy_rows(client: &mut MigrationServiceClient<ServerChannel>) -> anyhow::Result<u64> {
    Ok(client
        .get_storage_report(GetStorageReportRequest {})
        .await
        .map_err(|s| failed("cannot size the legacy table", s))?
        .into_inner()
        .legacy_rows)
}

/// `run_id`, or the latest backfill's.
async fn run_or_latest(
    client: &mut MigrationServiceClient<ServerChannel>,
    run_id: Option<String>,
) -> anyhow::Result<String> {
    if let Some(run_id) = run_id {
        return Ok(run_id);
    }
    let runs = client
        .list_runs(proto::ListRunsRequest { limit: 100 })
        .await
        .map_err(|s| failed("cannot list the runs", s))?
        .into_inner()
        .runs;
    runs.into_iter()
        .find(|r| r.kind == "backfill")
        .map(|r| r.run_id)
        .context("no backfill has run on this server's database yet")
}

/// Runs `backfill watch|status|cancel`.
pub async fn backfill_again(command: BackfillCommand) -> anyhow::Result<()> {
    let output = command.client().output;
    let mut client = command.client().migration().await?;
    let run = match command {
        BackfillCommand::Watch { run_id, .. } => {
            let run_id = run_or_latest(&mut client, run_id).await?;
            let total = legacy_rows(&mut client).await?;
            follow_run(&mut client, &run_id, total, output).await?
        }
        BackfillCommand::Status { run_id, .. } => {
            let run_id = run_or_latest(&mut client, run_id).await?;
            client
                .get_run(GetRunRequest { run_id })
                .await
                .map_err(|s| failed("cannot read the run", s))?
                .into_inner()
        }
        BackfillCommand::Cancel { run_id, actor, .. } => {
            let run_id = run_or_latest(&mut client, run_id).await?;
            client
                .cancel_run(proto::CancelRunRequest { run_id, actor })
                .await
                .map_err(|s| failed("cannot cancel the backfill", s))?
                .into_inner()
        }
    };
    match output {
        Output::Json => print_json(&run_json(&run))?,
        Output::Text => print_run_text(&run)?,
    }
    Ok(())
}

/// A run for a person: its state and counts.
fn print_run_text(run: &proto::Run) -> std::io::Result<()> {
    use indicatif::HumanCount;
    outln!(
        "{} {} {}{}{}  started {}{}",
        run.kind,
        printable(&run.run_id),
        run.state,
        if run.dry_run { " (dry run)" } else { "" },
        match run.resumes {
            0 => String::new(),
            1 => " (resumed once)".to_owned(),
            n => format!(" (resumed {n} times)"),
        },
        time(run.started_at),
        match run.finished_at {
            Some(at) => format!("  ended {}", time(Some(at))),
            None => String::new(),
        }
    )?;
    if run.kind == "verify" {
        outln!(
            "  compared {} · mismatches {}",
            HumanCount(run.compared),
            HumanCount(run.mismatches)
        )?;
    } else {
        outln!(
            "  processed {} · {} · failed {}",
            HumanCount(run.processed),
            run_counters(run),
            HumanCount(run.failed)
        )?;
        if matches!(run.state.as_str(), "cancelled" | "failed") && !run.checkpoint.is_empty() {
            outln!(
                "  checkpoint {} (a new `backfill` resumes after it)",
                printable(&run.checkpoint)
            )?;
        }
    }
    if !run.last_error.is_empty() {
        outln!("  last error {}", printable(&run.last_error))?;
    }
    Ok(())
}

/// Runs `runs`: the newest runs and how they ended.
pub async fn runs(limit: u32, client_args: ClientArgs) -> anyhow::Result<()> {
    let runs = client_args
        .migration()
        .await?
        .list_runs(proto::ListRunsRequest { limit })
        .await
        .map_err(|s| failed("cannot list the runs", s))?
        .into_inner()
        .runs;
    match client_args.output {
        Output::Json => print_json(&Value::Array(runs.iter().map(run_json).collect()))?,
        Output::Text => {
            for run in &runs {
                print_run_text(run)?;
            }
        }
    }
    Ok(())
}

/// Runs `backfill`: starts (or resumes) it and follows its progress to the end.
pub async fn backfill(args: BackfillArgs) -> anyhow::Result<()> {
    let mut client = args.client.migration().await?;
    let total = legacy_rows(&mut client).await?;
    let run_id = client
        .start_backfill(StartBackfillRequest {
            dry_run: args.dry_run,
            batch_size: args.batch_size,
            throttle_ms: args.throttle_ms,
            actor: args.actor.clone(),
        })
        .await
        .map_err(|s| failed("cannot start the backfill", s))?
        .into_inner()
        .run_id;
    let run = follow_run(&mut client, &run_id, total, args.client.output).await?;
    let report = client
        .get_run_report(GetRunReportRequest {
            run_id: run_id.clone(),
        })
        .await
        .map_err(|s| failed("cannot read the run's report", s))?
        .into_inner();
    let ambiguous: Vec<Value> = report
        .ambiguous
        .iter()
        .map(|i| json!({"campaign_id": i.campaign_id, "user_id": i.user_id, "date": i.date, "reason": i.reason, "kind": kind_name(i.kind), "resolution": resolution_name(i.resolution)}))
        .collect();
    let mut summary = run_json(&run);
    summary["ambiguous_rows"] = Value::Array(ambiguous);
    summary["resolved"] = report.resolved.into();
    summary["unresolved"] = report.unresolved.into();
    if let Some(path) = &args.report {
        std::fs::write(path, serde_json::to_string_pretty(&summary)?)
            .with_context(|| format!("cannot write the report to {}", path.display()))?;
    }
    match args.client.output {
        Output::Json => print_json(&summary)?,
        Output::Text => print_backfill_text(&run, &report)?,
    }
    if run.state != "completed" {
        bail!("the backfill ended {}", run.state);
    }
    Ok(())
}

/// The end of a backfill for a person: the counts, and the first ambiguous rows.
fn print_backfill_text(
    run: &proto::Run,
    report: &proto::GetRunReportResponse,
) -> std::io::Result<()> {
    outln!("{:<12} {}", "run", printable(&run.run_id))?;
    outln!(
        "{:<12} {}{}",
        "state",
        run.state,
        if run.dry_run {
            " (dry run: nothing written)"
        } else {
            ""
        }
    )?;
    for (name, value) in [
        ("processed", run.processed),
        ("copied", run.copied),
        ("skipped", run.skipped),
        ("ambiguous", run.ambiguous),
        ("failed", run.failed),
    ] {
        outln!("{name:<12} {value:>12}")?;
    }
    if run.ambiguous > 0 {
        outln!(
            "{:<12} {:>12}  (of the ambiguous; see `migration resolve`)",
            "unresolved",
            report.unresolved
        )?;
    }
    // One short line each (80 columns); the user, kind and resolution are in the report.
    for issue in report.ambiguous.iter().take(10) {
        outln!(
            "  {} {}: {}",
            printable(&issue.campaign_id),
            issue.date,
            printable(&issue.reason)
        )?;
    }
    if run.ambiguous > 10 {
        outln!(
            "  … {} more in the run's report (--report FILE)",
            run.ambiguous - 10
        )?;
    }
    if !run.last_error.is_empty() {
        outln!("{:<12} {}", "last error", printable(&run.last_error))?;
    }
    Ok(())
}

/// How often a plain progress line is printed when stderr is not a terminal.
const PLAIN_PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// The progress bar of a backfill on a terminal of `columns` columns: two lines that fit 80
/// (the bar takes what the first line leaves), counters and a rounded rate on the second; on a
/// narrower terminal, three shorter lines.
fn backfill_bar(total: u64, columns: u16) -> ProgressBar {
    let template = if columns >= 80 {
        "{spinner} {elapsed_precise} {wide_bar} {percent:>3}% {human_pos}/{human_len}\n  {msg} · {rate} · eta {eta}"
    } else {
        "{spinner} {elapsed_precise} {wide_bar} {percent:>3}%\n  {human_pos}/{human_len} · {rate} · eta {eta}\n  {msg}"
    };
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .with_key(
                "rate",
                |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(
                        w,
                        "{} rows/s",
                        indicatif::HumanCount(state.per_sec() as u64)
                    );
                },
            ),
    );
    bar
}

/// `copied 1,234 · skipped 5,678 · ambiguous 9`.
fn run_counters(run: &proto::Run) -> String {
    use indicatif::HumanCount;
    format!(
        "copied {} · skipped {} · ambiguous {}",
        HumanCount(run.copied),
        HumanCount(run.skipped),
        HumanCount(run.ambiguous)
    )
}

/// Follows backfill `run_id` to its end, with a progress bar over the legacy table's `total`
/// rows on a terminal, a plain line every few seconds otherwise (piped, CI, `kubectl exec`),
/// nothing under `-o json`; the run as it ended. Ctrl-C stops following, not the run, and
/// says how to come back; a server that goes away is said plainly.
async fn follow_run(
    client: &mut MigrationServiceClient<ServerChannel>,
    run_id: &str,
    total: u64,
    output: Output,
) -> anyhow::Result<proto::Run> {
    use std::io::IsTerminal;
    let text = output == Output::Text;
    let terminal = text && std::io::stderr().is_terminal();
    let bar = if terminal {
        backfill_bar(total, console::Term::stderr().size().1)
    } else {
        ProgressBar::hidden()
    };
    let mut updates = client
        .watch_run(WatchRunRequest {
            run_id: run_id.to_string(),
        })
        .await
        .map_err(|s| failed("cannot follow the backfill", s))?
        .into_inner();
    let started = std::time::Instant::now();
    let mut printed_at: Option<std::time::Instant> = None;
    let mut last: Option<proto::Run> = None;
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        let update = tokio::select! {
            update = updates.next() => update,
            _ = &mut interrupted => {
                bar.finish_and_clear();
                bail!(
                    "stopped following; backfill {run_id} goes on on the server. Follow it with \
                     `campaign-stats backfill watch {run_id}`, stop it with \
                     `campaign-stats backfill cancel {run_id}`"
                );
            }
        };
        let Some(update) = update else { break };
        let run = update.map_err(|status| server_went_away(run_id, status))?;
        if last.is_none() && text {
            bar.println(format!(
                "backfill {run_id}{}{}",
                if run.dry_run { " (dry run)" } else { "" },
                if run.resumes > 0 {
                    " (resumed from its checkpoint)"
                } else {
                    ""
                }
            ));
        }
        bar.set_position(run.processed);
        bar.set_message(run_counters(&run));
        if text && !terminal && printed_at.is_none_or(|at| at.elapsed() >= PLAIN_PROGRESS_EVERY) {
            printed_at = Some(std::time::Instant::now());
            let seconds = started.elapsed().as_secs_f64().max(0.001);
            eprintln!(
                "backfill {run_id}: {} of {} rows ({:.0}%) · {} · {} rows/s",
                indicatif::HumanCount(run.processed),
                indicatif::HumanCount(total),
                if total == 0 {
                    100.0
                } else {
                    run.processed as f64 * 100.0 / total as f64
                },
                run_counters(&run),
                indicatif::HumanCount((run.processed as f64 / seconds) as u64)
            );
        }
        last = Some(run);
    }
    bar.finish_and_clear();
    last.context("the server sent no progress")
}

/// What following a run says when the server stops answering: plainly that it went away,
/// what becomes of the run, and how to follow it again.
fn server_went_away(run_id: &str, status: tonic::Status) -> anyhow::Error {
    let gone = matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::Internal
    );
    if !gone {
        return failed("lost the backfill's progress", status);
    }
    anyhow::anyhow!(
        "the server went away while backfill {run_id} ran (it stopped or restarted). The run \
         stopped at its last checkpoint; start `campaign-stats backfill` again once the server \
         is back and it resumes from there (`campaign-stats backfill status` shows where it \
         stands)"
    )
}

/// Runs `repair-rollups`: lists the rows that differ from their sources, and rewrites them
/// with `--apply`.
pub async fn repair_rollups(args: RepairArgs) -> anyhow::Result<()> {
    let mut client = args.client.migration().await?;
    let result = client
        .repair_rollups(RepairRollupsRequest {
            start_date: args.from,
            end_date: args.to,
            apply: args.apply,
            reason: args.audit.reason,
            actor: args.audit.actor,
        })
        .await
        .map_err(|s| failed("cannot repair the rollups", s))?
        .into_inner();
    let sent = |m: &Option<proto::Metrics>| m.unwrap_or_default();
    match args.client.output {
        Output::Json => print_json(&json!({
            "checked": result.checked, "differing": result.differing,
            "all_users_days": result.all_users_days, "applied": result.applied,
            "rows": result.rows.iter().map(|r| json!({
                "user_id": r.user_id, "campaign_id": r.campaign_id, "date": r.date,
                "stored": metrics_json(&sent(&r.stored)), "expected": metrics_json(&sent(&r.expected)),
            })).collect::<Vec<_>>(),
        }))?,
        Output::Text => {
            outln!("{:<15} {:>12}", "checked", result.checked)?;
            outln!("{:<15} {:>12}", "differing", result.differing)?;
            outln!("{:<15} {:>12}", "all-users days", result.all_users_days)?;
            outln!(
                "{}",
                if result.applied {
                    "applied: the rows now hold what their sources say"
                } else {
                    "dry run: nothing changed (--apply rewrites these rows)"
                }
            )?;
            for r in &result.rows {
                outln!(
                    "  {}/{} {}: {} -> {}",
                    printable(&r.user_id),
                    printable(&r.campaign_id),
                    r.date,
                    metrics_text(&sent(&r.stored)),
                    metrics_text(&sent(&r.expected))
                )?;
            }
        }
    }
    Ok(())
}

/// Six totals as JSON, named as in the API.
pub(super) fn metrics_json(m: &proto::Metrics) -> Value {
    json!({"sent": m.sent, "opened": m.opened, "clicked": m.clicked, "replied": m.replied,
           "positive_replies": m.positive_replies, "bounced": m.bounced})
}

fn metrics_text(m: &proto::Metrics) -> String {
    format!(
        "sent {} opened {} clicked {} replied {} positive {} bounced {}",
        m.sent, m.opened, m.clicked, m.replied, m.positive_replies, m.bounced
    )
}

/// Runs `verify`; fails when the storages differ.
pub async fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    let mut client = args.client.migration().await?;
    let result = client
        .verify_consistency(VerifyConsistencyRequest {
            start_date: args.from.unwrap_or_default(),
            end_date: args.to.unwrap_or_default(),
            actor: args.actor,
        })
        .await
        // The server names its request's fields; the operator typed --from and --to.
        .map_err(|s| {
            let message = s
                .message()
                .replace("start_date", "--from")
                .replace("end_date", "--to");
            failed("cannot verify", tonic::Status::new(s.code(), message))
        })?
        .into_inner();
    match args.client.output {
        Output::Json => print_json(&json!({
            "run_id": result.run_id, "compared": result.compared, "mismatches": result.mismatches,
            "ambiguous": result.ambiguous, "ambiguous_resolved": result.ambiguous_resolved,
            "ambiguous_unresolved": result.ambiguous_unresolved,
            "sample": result.sample.iter().map(|m| json!({"user_id": m.user_id, "campaign_id": m.campaign_id, "date": m.date, "metric": m.metric, "legacy": m.legacy, "new": m.new})).collect::<Vec<_>>(),
        }))?,
        Output::Text => {
            outln!("{:<11} {}", "run", result.run_id)?;
            outln!("{:<11} {:>12}", "compared", result.compared)?;
            outln!("{:<11} {:>12}", "mismatches", result.mismatches)?;
            outln!(
                "{:<11} {:>12}  (set apart, not compared: {} resolved as skipped, {} unresolved)",
                "ambiguous",
                result.ambiguous,
                result.ambiguous_resolved,
                result.ambiguous_unresolved
            )?;
            if !result.sample.is_empty() {
                outln!(
                    "{:<12} {:<20} {:<11} {:<17} {:>8} {:>8}",
                    "USER",
                    "CAMPAIGN",
                    "DATE",
                    "METRIC",
                    "LEGACY",
                    "NEW"
                )?;
                for m in &result.sample {
                    outln!(
                        "{:<12} {:<20} {:<11} {:<17} {:>8} {:>8}",
                        printable(&m.user_id),
                        printable(&m.campaign_id),
                        m.date,
                        m.metric,
                        m.legacy,
                        m.new
                    )?;
                }
            }
        }
    }
    if result.mismatches > 0 {
        bail!(
            "{} between the storages",
            match result.mismatches {
                1 => "1 key differs".to_owned(),
                n => format!("{n} keys differ"),
            }
        );
    }
    Ok(())
}

/// Runs `storage-report`.
pub async fn storage_report(args: ClientArgs) -> anyhow::Result<()> {
    let mut client = args.migration().await?;
    let report = client
        .get_storage_report(GetStorageReportRequest {})
        .await
        .map_err(|s| failed("cannot read the storage report", s))?
        .into_inner();
    match args.output {
        Output::Json => print_json(&json!({
            "legacy": {"rows": report.legacy_rows, "bytes": report.legacy_bytes, "all_zero_rows": report.legacy_zero_rows},
            "new": {"rows": report.new_rows, "bytes": report.new_bytes},
            "tables": report.tables.iter().map(|t| json!({"table": t.table, "storage": t.storage, "rows": t.rows, "bytes": t.bytes})).collect::<Vec<_>>(),
        }))?,
        Output::Text => {
            outln!(
                "{:<30} {:<7} {:>12} {:>14}",
                "TABLE",
                "STORAGE",
                "ROWS",
                "BYTES"
            )?;
            for t in &report.tables {
                outln!(
                    "{:<30} {:<7} {:>12} {:>14}",
                    t.table,
                    t.storage,
                    t.rows,
                    t.bytes
                )?;
            }
            outln!(
                "{:<30} {:<7} {:>12} {:>14}",
                "total",
                "legacy",
                report.legacy_rows,
                report.legacy_bytes
            )?;
            outln!(
                "{:<30} {:<7} {:>12} {:>14}",
                "total",
                "new",
                report.new_rows,
                report.new_bytes
            )?;
            if report.legacy_rows > 0 {
                outln!(
                    "legacy rows all zeros: {} ({:.1}%)",
                    report.legacy_zero_rows,
                    report.legacy_zero_rows as f64 * 100.0 / report.legacy_rows as f64
                )?;
            }
            if report.legacy_bytes > 0 {
                outln!(
                    "new storage size: {:.1}% of legacy",
                    report.new_bytes as f64 * 100.0 / report.legacy_bytes as f64
                )?;
            }
        }
    }
    Ok(())
}
