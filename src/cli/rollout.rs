//! `rollout …`: the rollout controller's tool, a gRPC client of a running server.

use anyhow::Context;
use clap::{Subcommand, ValueEnum};
use serde_json::{Value, json};
use tokio_stream::StreamExt;

use super::admin::{
    Audited, ClientArgs, Output, ServerChannel, failed, metrics_json, phase_name, print_json, time,
};
use super::printable;
use crate::grpc::proto::rollout_service_client::RolloutServiceClient;
use crate::grpc::proto::{
    self, ClearUserOverrideRequest, EvaluateUserRequest, GetRolloutRequest, KillSwitchRequest,
    ListRolloutHistoryRequest, ListShadowMismatchesRequest, ResetSaltRequest, Rollout,
    SetRolloutPercentageRequest, SetShadowSampleRateRequest, SetUserOverrideRequest, StorageSource,
    WatchRolloutRequest,
};

/// A storage, as typed on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Storage {
    New,
    Legacy,
}

/// `on` or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    On,
    Off,
}

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// The rollout this server applies.
    Get,
    /// Set the share of users reading NEW (0 to 100, in 0.01 steps).
    Set {
        /// Percent of users reading NEW, e.g. 12.5 (or 12.5%).
        #[arg(value_parser = parse_percent)]
        percent: f64,
        /// Refuse the change unless the rollout is at this version (default: the version
        /// read just before).
        #[arg(long)]
        expected_version: Option<u64>,
        /// Stage a percentage before VERIFIED (it takes effect from VERIFIED).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        audit: Audited,
    },
    /// Send a user's reads to one storage whatever the percentage.
    Override {
        /// The user id.
        user: String,
        /// Where the user's reads go.
        storage: Storage,
        #[command(flatten)]
        audit: Audited,
    },
    /// Remove a user's override.
    ClearOverride {
        /// The user id.
        user: String,
        #[command(flatten)]
        audit: Audited,
    },
    /// Engage (every read to LEGACY) or release the kill switch.
    KillSwitch {
        /// `on`: every read to LEGACY; `off`: back to the percentage.
        state: Switch,
        #[command(flatten)]
        audit: Audited,
    },
    /// A new salt: every user gets a new bucket.
    ResetSalt {
        #[command(flatten)]
        audit: Audited,
    },
    /// Where a user's reads go now, and why.
    Evaluate {
        /// The user id (`*` for the all-users view).
        user: String,
    },
    /// Every change, newest first.
    History {
        /// Most changes shown (the newest).
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Print the rollout, then every change, until interrupted.
    Watch,
    /// The recent disagreements this server's shadow reads found, newest first.
    Mismatches,
    /// Set the share of reads shadowed on every replica (0 to 1), or `default` for each
    /// replica's own --shadow-sample-rate.
    ShadowRate {
        #[arg(value_parser = parse_rate)]
        rate: SampleRate,
        #[command(flatten)]
        audit: Audited,
    },
    /// The guard that rolls reads back by itself: its state and thresholds (default), or set
    /// them.
    Guard {
        #[command(subcommand)]
        command: Option<GuardCommand>,
    },
    /// The progressive schedule: start, pause, resume, abort.
    Schedule {
        #[command(subcommand)]
        command: ScheduleCommand,
    },
    /// The users the guard quarantined (pinned to LEGACY because their reads disagreed).
    Quarantines,
    /// Release a quarantined user (clears their override).
    Release {
        /// The user id.
        user: String,
        #[command(flatten)]
        audit: Audited,
    },
}

#[derive(Debug, Subcommand)]
pub enum GuardCommand {
    /// What the guard sees now on the server asked.
    Status,
    /// Set the thresholds for every replica; an option left out keeps the value in effect.
    Set {
        /// Trip above this share (0 to 1) of disagreeing shadow comparisons.
        #[arg(long)]
        max_mismatch_rate: Option<f64>,
        /// Trip above this share (0 to 1) of failing new-storage reads.
        #[arg(long)]
        max_error_rate: Option<f64>,
        /// Trip when new's p99 read time exceeds legacy's by more than this factor (0: off).
        #[arg(long)]
        max_p99_ratio: Option<f64>,
        /// Samples a signal needs before it counts.
        #[arg(long)]
        min_samples: Option<u32>,
        /// The sliding window, in seconds.
        #[arg(long)]
        window_secs: Option<u32>,
        /// `kill-switch` or `step-back`.
        #[arg(long, value_parser = ["kill-switch", "step-back"])]
        action: Option<String>,
        /// Quarantine a user after this many disagreements in the window (0: off).
        #[arg(long)]
        quarantine_after: Option<u32>,
        /// Most users quarantined at once.
        #[arg(long)]
        max_quarantined: Option<u32>,
        /// Hand the thresholds back to each replica's --guard-* flags.
        #[arg(long, conflicts_with_all = ["max_mismatch_rate", "max_error_rate", "max_p99_ratio", "min_samples", "window_secs", "action", "quarantine_after", "max_quarantined"])]
        default: bool,
        #[command(flatten)]
        audit: Audited,
    },
}

#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// Start walking the percentage up, e.g. `--steps 1,5,25,50,100 --dwell-secs 300`.
    Start {
        /// The steps' percentages, rising, comma-separated.
        #[arg(long, value_delimiter = ',', required = true, value_parser = parse_percent)]
        steps: Vec<f64>,
        /// Least seconds on each step.
        #[arg(long, default_value_t = 300)]
        dwell_secs: u32,
        /// Least shadow comparisons on each step.
        #[arg(long, default_value_t = 100)]
        min_comparisons: u32,
        /// After a guard trip halts it, resume by itself once this many seconds later, at the
        /// last green step and with the guard green again (once; 0: only a person resumes it).
        #[arg(long, default_value_t = 0)]
        cool_down_secs: u32,
        #[command(flatten)]
        audit: Audited,
    },
    /// Stop advancing; the percentage stays.
    Pause {
        #[command(flatten)]
        audit: Audited,
    },
    /// Go on from the step in effect (after a pause, or after the guard halted it).
    Resume {
        #[command(flatten)]
        audit: Audited,
    },
    /// Abandon the schedule; the percentage stays.
    Abort {
        #[command(flatten)]
        audit: Audited,
    },
}

fn rollout_json(r: &Rollout) -> Value {
    json!({
        "percentage": r.percentage, "version": r.version, "applied_version": r.applied_version,
        "kill_switch": r.kill_switch, "salt": r.salt, "updated_at": time(r.updated_at),
        "phase": phase_name(r.phase),
        "overrides": r.overrides, "shadow_sample_rate": r.shadow_sample_rate,
        "guard_tripped": r.guard_tripped, "quarantined": r.quarantined,
        "schedule": r.schedule.as_ref().map(schedule_json),
    })
}

fn schedule_status(schedule: &proto::Schedule) -> &'static str {
    proto::ScheduleStatus::try_from(schedule.status)
        .map(|s| s.as_str_name().trim_start_matches("SCHEDULE_STATUS_"))
        .unwrap_or("UNKNOWN")
}

fn schedule_json(schedule: &proto::Schedule) -> Value {
    json!({
        "percentages": schedule.percentages, "step": schedule.step,
        "status": schedule_status(schedule), "dwell_seconds": schedule.dwell_seconds,
        "min_comparisons": schedule.min_comparisons,
        "step_started_at": time(schedule.step_started_at),
        "cool_down_seconds": schedule.cool_down_seconds,
        "resumes_itself": schedule.resumes_itself,
    })
}

/// `RUNNING at step 2 of 5 (5.00%)`, and `; resumes itself 600 s after a trip` while it
/// would.
fn schedule_text(schedule: &proto::Schedule) -> String {
    let mut text = format!(
        "{} at step {} of {} ({:.2}%)",
        schedule_status(schedule),
        schedule.step,
        schedule.percentages.len(),
        schedule
            .percentages
            .get(schedule.step.saturating_sub(1) as usize)
            .copied()
            .unwrap_or(0.0)
    );
    if schedule.resumes_itself {
        text.push_str(&format!(
            "; resumes itself {} s after a trip",
            schedule.cool_down_seconds
        ));
    }
    text
}

fn print_rollout(output: Output, rollout: &Rollout) -> std::io::Result<()> {
    match output {
        Output::Json => print_json(&rollout_json(rollout)),
        Output::Text => outln!(
            "version {} (applied {})  percentage {:.2}%  kill switch {}  overrides {}  phase {}  salt {}  shadow {}  guard {}  schedule {}  updated {}",
            rollout.version,
            rollout.applied_version,
            rollout.percentage,
            if rollout.kill_switch {
                "ENGAGED"
            } else {
                "off"
            },
            rollout.overrides,
            phase_name(rollout.phase),
            rollout.salt,
            rollout
                .shadow_sample_rate
                .map_or("server default".to_owned(), |rate| format!("{rate}")),
            if rollout.guard_tripped {
                "TRIPPED"
            } else {
                "armed"
            },
            rollout
                .schedule
                .as_ref()
                .map_or("none".to_owned(), schedule_text),
            time(rollout.updated_at),
        ),
    }
}

async fn connect(args: &ClientArgs) -> anyhow::Result<RolloutServiceClient<ServerChannel>> {
    Ok(RolloutServiceClient::new(args.channel().await?))
}

async fn get(client: &mut RolloutServiceClient<ServerChannel>) -> anyhow::Result<Rollout> {
    changed(
        client.get_rollout(GetRolloutRequest {}).await,
        "cannot read the rollout",
    )
}

/// A shadow sample rate as typed: a fraction, or `default`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SampleRate {
    /// Each replica's own `--shadow-sample-rate`.
    ServerDefault,
    /// 0 to 1 (the server checks the range).
    Rate(f64),
}

/// `0.05`, or `default`.
fn parse_rate(value: &str) -> Result<SampleRate, String> {
    if value.trim().eq_ignore_ascii_case("default") {
        return Ok(SampleRate::ServerDefault);
    }
    value
        .trim()
        .parse::<f64>()
        .map(SampleRate::Rate)
        .map_err(|_| format!("{value:?} is neither a rate from 0 to 1 nor `default`"))
}

/// `12.5` or `12.5%`; the server checks the range and the 0.01 steps.
fn parse_percent(value: &str) -> Result<f64, String> {
    let number = value.trim().trim_end_matches('%').trim_end();
    number
        .parse::<f64>()
        .ok()
        .filter(|p| p.is_finite())
        .ok_or_else(|| format!("{value:?} is not a percentage (e.g. 12.5 or 12.5%)"))
}

/// Runs a `rollout …` command.
pub async fn rollout(command: RolloutCommand, args: ClientArgs) -> anyhow::Result<()> {
    let mut client = connect(&args).await?;
    match command {
        RolloutCommand::Evaluate { user } => evaluate(&mut client, user, args.output).await,
        RolloutCommand::History { limit } => history(&mut client, limit, args.output).await,
        RolloutCommand::Watch => watch(&mut client, args.output).await,
        RolloutCommand::Mismatches => mismatches(&mut client, args.output).await,
        RolloutCommand::Guard {
            command: None | Some(GuardCommand::Status),
        } => guard(&mut client, args.output).await,
        RolloutCommand::Quarantines => quarantines(&mut client, args.output).await,
        change => {
            let rollout = change_rollout(&mut client, change).await?;
            Ok(print_rollout(args.output, &rollout)?)
        }
    }
}

/// The rollout a change answered with, or why it failed (`what` names the change).
fn changed<A: Into<Option<Rollout>>>(
    answer: Result<tonic::Response<A>, tonic::Status>,
    what: &str,
) -> anyhow::Result<Rollout> {
    answer
        .map_err(|s| failed(what, s))?
        .into_inner()
        .into()
        .context("the server sent no rollout")
}

/// `get` and the commands that change the rollout: each answers with the rollout.
async fn change_rollout(
    client: &mut RolloutServiceClient<ServerChannel>,
    command: RolloutCommand,
) -> anyhow::Result<Rollout> {
    match command {
        RolloutCommand::Get => get(client).await,
        RolloutCommand::Set {
            percent,
            expected_version,
            force,
            audit: Audited { reason, actor },
        } => {
            let expected_version = match expected_version {
                Some(version) => version,
                None => get(client).await?.version,
            };
            let request = SetRolloutPercentageRequest {
                percentage: percent,
                expected_version,
                reason,
                force,
                actor,
            };
            changed(
                client.set_rollout_percentage(request).await,
                "cannot set the percentage",
            )
        }
        RolloutCommand::Override {
            user,
            storage,
            audit: Audited { reason, actor },
        } => {
            let source = match storage {
                Storage::New => StorageSource::New,
                Storage::Legacy => StorageSource::Legacy,
            };
            let request = SetUserOverrideRequest {
                user_id: user,
                source: source.into(),
                reason,
                actor,
            };
            changed(
                client.set_user_override(request).await,
                "cannot set the override",
            )
        }
        RolloutCommand::ClearOverride {
            user,
            audit: Audited { reason, actor },
        } => {
            let request = ClearUserOverrideRequest {
                user_id: user,
                reason,
                actor,
            };
            changed(
                client.clear_user_override(request).await,
                "cannot clear the override",
            )
        }
        RolloutCommand::KillSwitch {
            state,
            audit: Audited { reason, actor },
        } => {
            let request = KillSwitchRequest {
                engaged: state == Switch::On,
                reason,
                actor,
            };
            changed(
                client.kill_switch(request).await,
                "cannot move the kill switch",
            )
        }
        RolloutCommand::ShadowRate {
            rate,
            audit: Audited { reason, actor },
        } => {
            let request = SetShadowSampleRateRequest {
                rate: match rate {
                    SampleRate::Rate(rate) => rate,
                    SampleRate::ServerDefault => 0.0,
                },
                server_default: matches!(rate, SampleRate::ServerDefault),
                reason,
                actor,
            };
            changed(
                client.set_shadow_sample_rate(request).await,
                "cannot set the shadow sample rate",
            )
        }
        RolloutCommand::ResetSalt {
            audit: Audited { reason, actor },
        } => changed(
            client.reset_salt(ResetSaltRequest { reason, actor }).await,
            "cannot reset the salt",
        ),
        RolloutCommand::Guard {
            command:
                Some(GuardCommand::Set {
                    max_mismatch_rate,
                    max_error_rate,
                    max_p99_ratio,
                    min_samples,
                    window_secs,
                    action,
                    quarantine_after,
                    max_quarantined,
                    default,
                    audit: Audited { reason, actor },
                }),
        } => {
            let mut settings = guard_status(client).await?.settings.unwrap_or_default();
            let or = |value: Option<f64>, current: &mut f64| {
                if let Some(value) = value {
                    *current = value;
                }
            };
            or(max_mismatch_rate, &mut settings.max_mismatch_rate);
            or(max_error_rate, &mut settings.max_error_rate);
            or(max_p99_ratio, &mut settings.max_p99_ratio);
            settings.min_samples = min_samples.unwrap_or(settings.min_samples);
            settings.window_seconds = window_secs.unwrap_or(settings.window_seconds);
            settings.quarantine_after = quarantine_after.unwrap_or(settings.quarantine_after);
            settings.max_quarantined = max_quarantined.unwrap_or(settings.max_quarantined);
            if let Some(action) = action {
                settings.action = match action.as_str() {
                    "step-back" => proto::GuardAction::StepBack,
                    _ => proto::GuardAction::KillSwitch,
                }
                .into();
            }
            let request = proto::SetGuardSettingsRequest {
                settings: Some(settings),
                server_default: default,
                reason,
                actor,
            };
            changed(
                client.set_guard_settings(request).await,
                "cannot set the guard's thresholds",
            )
        }
        RolloutCommand::Schedule { command } => schedule(client, command).await,
        RolloutCommand::Release {
            user,
            audit: Audited { reason, actor },
        } => {
            let request = ClearUserOverrideRequest {
                user_id: user,
                reason,
                actor,
            };
            changed(
                client.clear_user_override(request).await,
                "cannot release the user",
            )
        }
        RolloutCommand::Evaluate { .. }
        | RolloutCommand::History { .. }
        | RolloutCommand::Watch
        | RolloutCommand::Mismatches
        | RolloutCommand::Quarantines
        | RolloutCommand::Guard { .. } => {
            unreachable!("rollout() answers the commands that change nothing")
        }
    }
}

async fn evaluate(
    client: &mut RolloutServiceClient<ServerChannel>,
    user: String,
    output: Output,
) -> anyhow::Result<()> {
    let decision = client
        .evaluate_user(EvaluateUserRequest {
            user_id: user.clone(),
        })
        .await
        .map_err(|s| failed("cannot evaluate the user", s))?
        .into_inner();
    let source = if decision.source == i32::from(StorageSource::New) {
        "new"
    } else {
        "legacy"
    };
    match output {
        Output::Json => print_json(
            &json!({"user_id": user, "source": source, "bucket": decision.bucket, "reason": decision.reason, "version": decision.version}),
        )?,
        Output::Text => outln!(
            "{}: {source} (bucket {}; {}; version {})",
            printable(&user),
            decision.bucket,
            printable(&decision.reason),
            decision.version
        )?,
    }
    Ok(())
}

async fn history(
    client: &mut RolloutServiceClient<ServerChannel>,
    limit: u32,
    output: Output,
) -> anyhow::Result<()> {
    let changes = client
        .list_rollout_history(ListRolloutHistoryRequest {
            page_size: limit,
            page_token: String::new(),
        })
        .await
        .map_err(|s| failed("cannot read the history", s))?
        .into_inner()
        .changes;
    match output {
        Output::Json => print_json(&Value::Array(
            changes
                .iter()
                .map(|c| json!({"version": c.version, "at": time(c.changed_at), "actor": c.actor, "change": c.change, "before": c.before, "after": c.after, "reason": c.reason}))
                .collect(),
        ))?,
        Output::Text => {
            outln!("{:<8} {:<22} {:<16} {:<24} {:<10} {:<10} REASON", "VERSION", "AT", "ACTOR", "CHANGE", "BEFORE", "AFTER")?;
            for c in &changes {
                outln!(
                    "{:<8} {:<22} {:<16} {:<24} {:<10} {:<10} {}",
                    c.version,
                    time(c.changed_at),
                    printable(&c.actor),
                    printable(&c.change),
                    printable(&c.before),
                    printable(&c.after),
                    printable(&c.reason)
                )?;
            }
        }
    }
    Ok(())
}

async fn watch(
    client: &mut RolloutServiceClient<ServerChannel>,
    output: Output,
) -> anyhow::Result<()> {
    let mut updates = client
        .watch_rollout(WatchRolloutRequest {})
        .await
        .map_err(|s| failed("cannot watch the rollout", s))?
        .into_inner();
    while let Some(update) = updates.next().await {
        print_rollout(
            output,
            &update.map_err(|s| failed("lost the rollout stream", s))?,
        )?;
    }
    Ok(())
}

async fn mismatches(
    client: &mut RolloutServiceClient<ServerChannel>,
    output: Output,
) -> anyhow::Result<()> {
    let found = client
        .list_shadow_mismatches(ListShadowMismatchesRequest {})
        .await
        .map_err(|s| failed("cannot read the mismatches", s))?
        .into_inner()
        .mismatches;
    let sent = |m: &Option<proto::Metrics>| m.unwrap_or_default();
    match output {
        Output::Json => print_json(&Value::Array(
            found
                .iter()
                .map(|m| {
                    let (legacy, new) = (sent(&m.legacy), sent(&m.new));
                    json!({"at": time(m.at), "method": m.method, "user_id": m.user_id,
                           "campaign_id": m.campaign_id, "date": m.date,
                           "legacy": metrics_json(&legacy), "new": metrics_json(&new)})
                })
                .collect(),
        ))?,
        Output::Text => {
            for m in &found {
                let (legacy, new) = (sent(&m.legacy), sent(&m.new));
                outln!(
                    "{} {} user {} {}{}: legacy sent {} opened {} replied {} | new sent {} opened {} replied {}",
                    time(m.at),
                    m.method,
                    printable(&m.user_id),
                    printable(&m.campaign_id),
                    m.date,
                    legacy.sent,
                    legacy.opened,
                    legacy.replied,
                    new.sent,
                    new.opened,
                    new.replied
                )?;
            }
        }
    }
    Ok(())
}

async fn schedule(
    client: &mut RolloutServiceClient<ServerChannel>,
    command: ScheduleCommand,
) -> anyhow::Result<Rollout> {
    match command {
        ScheduleCommand::Start {
            steps,
            dwell_secs,
            min_comparisons,
            cool_down_secs,
            audit: Audited { reason, actor },
        } => {
            let request = proto::StartScheduleRequest {
                percentages: steps,
                dwell_seconds: dwell_secs,
                min_comparisons,
                cool_down_seconds: cool_down_secs,
                reason,
                actor,
            };
            changed(
                client.start_schedule(request).await,
                "cannot start the schedule",
            )
        }
        ScheduleCommand::Pause {
            audit: Audited { reason, actor },
        } => changed(
            client
                .pause_schedule(proto::PauseScheduleRequest { reason, actor })
                .await,
            "cannot pause the schedule",
        ),
        ScheduleCommand::Resume {
            audit: Audited { reason, actor },
        } => changed(
            client
                .resume_schedule(proto::ResumeScheduleRequest { reason, actor })
                .await,
            "cannot resume the schedule",
        ),
        ScheduleCommand::Abort {
            audit: Audited { reason, actor },
        } => changed(
            client
                .abort_schedule(proto::AbortScheduleRequest { reason, actor })
                .await,
            "cannot abort the schedule",
        ),
    }
}

async fn guard_status(
    client: &mut RolloutServiceClient<ServerChannel>,
) -> anyhow::Result<proto::GetGuardResponse> {
    Ok(client
        .get_guard(proto::GetGuardRequest {})
        .await
        .map_err(|s| failed("cannot read the guard", s))?
        .into_inner())
}

fn action_name(settings: &proto::GuardSettings) -> &'static str {
    match proto::GuardAction::try_from(settings.action) {
        Ok(proto::GuardAction::StepBack) => "step-back",
        _ => "kill-switch",
    }
}

async fn guard(
    client: &mut RolloutServiceClient<ServerChannel>,
    output: Output,
) -> anyhow::Result<()> {
    let status = guard_status(client).await?;
    let settings = status.settings.unwrap_or_default();
    let window = status.window.unwrap_or_default();
    match output {
        Output::Json => print_json(&json!({
            "active": status.active, "tripped": status.tripped,
            "tripped_at": status.tripped_at.map(|t| time(Some(t))),
            "trip_signal": status.trip_signal, "trip_figures": status.trip_figures,
            "settings_from_rollout": status.settings_from_rollout,
            "settings": {
                "max_mismatch_rate": settings.max_mismatch_rate,
                "max_error_rate": settings.max_error_rate,
                "max_p99_ratio": settings.max_p99_ratio, "min_samples": settings.min_samples,
                "window_seconds": settings.window_seconds, "action": action_name(&settings),
                "quarantine_after": settings.quarantine_after,
                "max_quarantined": settings.max_quarantined,
            },
            "window": {
                "comparisons": window.comparisons, "mismatches": window.mismatches,
                "new_reads": window.new_reads, "new_errors": window.new_errors,
                "legacy_reads": window.legacy_reads, "new_p99_ms": window.new_p99_ms,
                "legacy_p99_ms": window.legacy_p99_ms,
            },
            "quarantined_user_ids": status.quarantined_user_ids,
        }))?,
        Output::Text => {
            let state = match (status.tripped, status.active) {
                (true, _) => format!(
                    "TRIPPED at {} on {}: {}",
                    time(status.tripped_at),
                    status.trip_signal,
                    printable(&status.trip_figures)
                ),
                (false, true) => "armed, watching".to_owned(),
                (false, false) => "armed, idle (no read goes to new)".to_owned(),
            };
            outln!("guard {state}")?;
            outln!(
                "thresholds ({}): mismatch rate > {}, new error rate > {}, p99 ratio > {}, min samples {}, window {} s, action {}, quarantine after {} (at most {})",
                if status.settings_from_rollout {
                    "set for every replica"
                } else {
                    "this server's flags"
                },
                settings.max_mismatch_rate,
                settings.max_error_rate,
                if settings.max_p99_ratio == 0.0 {
                    "off".to_owned()
                } else {
                    settings.max_p99_ratio.to_string()
                },
                settings.min_samples,
                settings.window_seconds,
                action_name(&settings),
                settings.quarantine_after,
                settings.max_quarantined,
            )?;
            outln!(
                "window here: {} comparisons, {} mismatches; new reads {}, errors {}; legacy reads {}",
                window.comparisons,
                window.mismatches,
                window.new_reads,
                window.new_errors,
                window.legacy_reads
            )?;
            outln!("quarantined users: {}", status.quarantined_user_ids.len())?;
        }
    }
    Ok(())
}

async fn quarantines(
    client: &mut RolloutServiceClient<ServerChannel>,
    output: Output,
) -> anyhow::Result<()> {
    let users = guard_status(client).await?.quarantined_user_ids;
    match output {
        Output::Json => print_json(&json!(users))?,
        Output::Text => {
            for user in &users {
                outln!("{}", printable(user))?;
            }
        }
    }
    Ok(())
}
