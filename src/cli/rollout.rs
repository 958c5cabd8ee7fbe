//! `rollout …`: the rollout controller's tool, a gRPC client of a running server.

use anyhow::Context;
use clap::{Subcommand, ValueEnum};
use serde_json::{Value, json};
use tokio_stream::StreamExt;

use super::admin::{
    Audited, ClientArgs, Output, ServerChannel, failed, metrics_json, print_json, time,
};
use super::printable;
use crate::grpc::proto::rollout_service_client::RolloutServiceClient;
use crate::grpc::proto::{
    self, ClearUserOverrideRequest, EvaluateUserRequest, GetRolloutRequest, GetRolloutResponse,
    KillSwitchRequest, ListRolloutHistoryRequest, ListShadowMismatchesRequest, ResetSaltRequest,
    Rollout, SetRolloutPercentageRequest, SetShadowSampleRateRequest, SetUserOverrideRequest,
    StorageSource, WatchRolloutRequest,
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
}

fn rollout_json(r: &Rollout) -> Value {
    json!({
        "percentage": r.percentage, "version": r.version, "applied_version": r.applied_version,
        "kill_switch": r.kill_switch, "salt": r.salt, "updated_at": time(r.updated_at),
        "phase": proto::MigrationPhase::try_from(r.phase).map(|p| p.as_str_name()).unwrap_or("UNKNOWN"),
        "overrides": r.overrides, "shadow_sample_rate": r.shadow_sample_rate,
    })
}

fn print_rollout(output: Output, rollout: &Rollout) -> std::io::Result<()> {
    match output {
        Output::Json => print_json(&rollout_json(rollout)),
        Output::Text => outln!(
            "version {} (applied {})  percentage {:.2}%  kill switch {}  overrides {}  phase {}  salt {}  shadow {}  updated {}",
            rollout.version,
            rollout.applied_version,
            rollout.percentage,
            if rollout.kill_switch {
                "ENGAGED"
            } else {
                "off"
            },
            rollout.overrides,
            proto::MigrationPhase::try_from(rollout.phase)
                .map(|p| p.as_str_name().trim_start_matches("MIGRATION_PHASE_"))
                .unwrap_or("UNKNOWN"),
            rollout.salt,
            rollout
                .shadow_sample_rate
                .map_or("server default".to_owned(), |rate| format!("{rate}")),
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
        change => {
            let rollout = change_rollout(&mut client, change).await?;
            Ok(print_rollout(args.output, &rollout)?)
        }
    }
}

/// The rollout a change answered with, or why it failed (`what` names the change).
fn changed(
    answer: Result<tonic::Response<GetRolloutResponse>, tonic::Status>,
    what: &str,
) -> anyhow::Result<Rollout> {
    answer
        .map_err(|s| failed(what, s))?
        .into_inner()
        .rollout
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
        RolloutCommand::Evaluate { .. }
        | RolloutCommand::History { .. }
        | RolloutCommand::Watch
        | RolloutCommand::Mismatches => {
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
