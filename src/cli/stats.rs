//! `stats …`: quick looks at the statistics, and a test event, for people and scripts.

use clap::{Subcommand, ValueEnum};
use serde_json::{Value, json};

use super::admin::{ClientArgs, Output, ServerChannel, failed, metrics_json, print_json};
use super::printable;
use crate::domain::EventType;
use crate::grpc::proto::stats_service_client::StatsServiceClient;
use crate::grpc::proto::{
    self, Event, GetAggregatedDailyStatsRequest, GetStatsForCampaignsRequest, Granularity,
    RecordEventRequest,
};

#[derive(Debug, Subcommand)]
pub enum StatsCommand {
    /// Totals of one or many of a user's campaigns over a range, as a table.
    Get {
        /// The user.
        user: String,
        /// One or more of the user's campaigns.
        #[arg(required = true)]
        campaigns: Vec<String>,
        /// First day (YYYY-MM-DD).
        #[arg(long)]
        from: String,
        /// Last day (YYYY-MM-DD), included.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// A user's series by day, week or month (`*` or an empty user: all users), as a table
    /// with a chart of one metric under it.
    Series {
        /// The user (`*`: every user, the operator's view).
        user: String,
        /// First day (YYYY-MM-DD).
        #[arg(long)]
        from: String,
        /// Last day (YYYY-MM-DD), included.
        #[arg(long)]
        to: String,
        /// Bucket size.
        #[arg(long, value_enum, default_value_t = Bucket::Day)]
        by: Bucket,
        /// Only these campaigns of the user (repeat the option).
        #[arg(long = "campaign")]
        campaigns: Vec<String>,
        /// The metric the chart shows.
        #[arg(long, value_enum, default_value_t = Metric::Sent)]
        chart: Metric,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Record one event (a quick test).
    Record {
        /// The user.
        user: String,
        /// The user's campaign.
        campaign: String,
        /// What happened: sent, opened, clicked, replied, positive-reply, bounced.
        #[arg(value_parser = parse_event_type)]
        event_type: EventType,
        /// How many.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// When (RFC 3339, e.g. 2026-03-01T12:00:00Z); default: now.
        #[arg(long)]
        at: Option<chrono::DateTime<chrono::Utc>>,
        /// A retry with the same key counts once.
        #[arg(long)]
        idempotency_key: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

impl StatsCommand {
    /// Where the server is and how to print.
    pub fn client(&self) -> &ClientArgs {
        match self {
            StatsCommand::Get { client, .. }
            | StatsCommand::Series { client, .. }
            | StatsCommand::Record { client, .. } => client,
        }
    }
}

/// A series' bucket size, as typed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Bucket {
    Day,
    Week,
    Month,
}

/// An event type as typed: its API name in any case, `-` or `_` (`sent`, `positive-reply`).
fn parse_event_type(value: &str) -> Result<EventType, String> {
    let name = value.trim().to_ascii_uppercase().replace('-', "_");
    EventType::ALL
        .into_iter()
        .find(|t| t.names().api_name == name)
        .ok_or_else(|| {
            let names: Vec<String> = EventType::ALL
                .iter()
                .map(|t| t.names().api_name.to_ascii_lowercase().replace('_', "-"))
                .collect();
            format!("unknown event type {value:?}; one of {}", names.join(", "))
        })
}

/// The metric a chart shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Metric {
    Sent,
    Opened,
    Clicked,
    Replied,
    PositiveReplies,
    Bounced,
}

impl Metric {
    fn of(self, m: &proto::Metrics) -> u64 {
        match self {
            Metric::Sent => m.sent,
            Metric::Opened => m.opened,
            Metric::Clicked => m.clicked,
            Metric::Replied => m.replied,
            Metric::PositiveReplies => m.positive_replies,
            Metric::Bounced => m.bounced,
        }
    }
}

/// The widest a chart is drawn (it fits 80 columns with its margin).
const CHART_WIDTH: usize = 72;

/// One character per value (`▁` to `█`), scaled to the largest; at most [`CHART_WIDTH`]
/// characters, neighbouring values summed when there are more.
pub fn sparkline(values: &[u64]) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let per = values.len().div_ceil(CHART_WIDTH).max(1);
    let columns: Vec<u64> = values.chunks(per).map(|c| c.iter().sum()).collect();
    let top = columns.iter().copied().max().unwrap_or(0);
    columns
        .iter()
        .map(|&v| match (v, top) {
            (0, _) => ' ',
            (_, 0) => BARS[0],
            (v, top) => BARS[((v as f64 / top as f64) * 7.0).round() as usize],
        })
        .collect()
}

fn source_name(source: i32) -> &'static str {
    match proto::StorageSource::try_from(source) {
        Ok(proto::StorageSource::Legacy) => "legacy",
        Ok(proto::StorageSource::New) => "new",
        _ => "unknown",
    }
}

const HEADER: &str = "     SENT   OPENED  CLICKED  REPLIED POSITIVE  BOUNCED";

fn row(m: &proto::Metrics) -> String {
    format!(
        "{:>9}{:>9}{:>9}{:>9}{:>9}{:>9}",
        m.sent, m.opened, m.clicked, m.replied, m.positive_replies, m.bounced
    )
}

/// Runs a `stats …` command.
pub async fn stats(command: StatsCommand) -> anyhow::Result<()> {
    let output = command.client().output;
    let mut client = StatsServiceClient::new(command.client().channel().await?);
    match command {
        StatsCommand::Get {
            user,
            campaigns,
            from,
            to,
            ..
        } => get(&mut client, user, campaigns, from, to, output).await,
        StatsCommand::Series {
            user,
            from,
            to,
            by,
            campaigns,
            chart,
            ..
        } => {
            let request = GetAggregatedDailyStatsRequest {
                user_id: if user == "*" { String::new() } else { user },
                start_date: from,
                end_date: to,
                granularity: match by {
                    Bucket::Day => Granularity::Day,
                    Bucket::Week => Granularity::Week,
                    Bucket::Month => Granularity::Month,
                }
                .into(),
                campaign_ids: campaigns,
                fill_empty: true,
            };
            series(&mut client, request, chart, output).await
        }
        StatsCommand::Record {
            user,
            campaign,
            event_type,
            count,
            at,
            idempotency_key,
            ..
        } => {
            let event = Event {
                user_id: user,
                campaign_id: campaign,
                // The stored code is the API's enum value (domain::EVENT_TYPES).
                event_type: i32::from(event_type.names().code),
                count,
                occurred_at: at.map(|at| prost_types::Timestamp {
                    seconds: at.timestamp(),
                    nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
                }),
                email_account_id: String::new(),
                idempotency_key: idempotency_key.unwrap_or_default(),
            };
            let answer = client
                .record_event(RecordEventRequest { event: Some(event) })
                .await
                .map_err(|s| failed("cannot record the event", s))?
                .into_inner();
            match output {
                Output::Json => print_json(&json!({"duplicate": answer.duplicate}))?,
                Output::Text => outln!(
                    "{}",
                    if answer.duplicate {
                        "recorded before (same idempotency key): counted once"
                    } else {
                        "recorded"
                    }
                )?,
            }
            Ok(())
        }
    }
}

async fn get(
    client: &mut StatsServiceClient<ServerChannel>,
    user: String,
    campaigns: Vec<String>,
    from: String,
    to: String,
    output: Output,
) -> anyhow::Result<()> {
    let answer = client
        .get_stats_for_campaigns(GetStatsForCampaignsRequest {
            user_id: user,
            campaign_ids: campaigns,
            start_date: from,
            end_date: to,
        })
        .await
        .map_err(|s| failed("cannot read the stats", s))?
        .into_inner();
    match output {
        Output::Json => print_json(&json!({
            "source": source_name(answer.source),
            "campaigns": answer.stats.iter().map(|s| json!({
                "campaign_id": s.campaign_id,
                "metrics": metrics_json(&s.metrics.unwrap_or_default()),
            })).collect::<Vec<Value>>(),
        }))?,
        Output::Text => {
            outln!("{:<20}{HEADER}", "CAMPAIGN")?;
            for s in &answer.stats {
                outln!(
                    "{:<20}{}",
                    printable(&s.campaign_id),
                    row(&s.metrics.unwrap_or_default())
                )?;
            }
            outln!("(answered by {})", source_name(answer.source))?;
        }
    }
    Ok(())
}

async fn series(
    client: &mut StatsServiceClient<ServerChannel>,
    request: GetAggregatedDailyStatsRequest,
    chart: Metric,
    output: Output,
) -> anyhow::Result<()> {
    let answer = client
        .get_aggregated_daily_stats(request)
        .await
        .map_err(|s| failed("cannot read the series", s))?
        .into_inner();
    match output {
        Output::Json => print_json(&json!({
            "source": source_name(answer.source),
            "buckets": answer.buckets.iter().map(|b| json!({
                "bucket_start": b.bucket_start,
                "metrics": metrics_json(&b.metrics.unwrap_or_default()),
            })).collect::<Vec<Value>>(),
        }))?,
        Output::Text => {
            outln!("{:<12}{HEADER}", "FROM")?;
            for b in &answer.buckets {
                outln!(
                    "{:<12}{}",
                    b.bucket_start,
                    row(&b.metrics.unwrap_or_default())
                )?;
            }
            let values: Vec<u64> = answer
                .buckets
                .iter()
                .map(|b| chart.of(&b.metrics.unwrap_or_default()))
                .collect();
            if let (Some(first), Some(last)) = (answer.buckets.first(), answer.buckets.last()) {
                let top = values.iter().copied().max().unwrap_or(0);
                outln!()?;
                outln!(
                    "{} from {} to {} (highest {top}; answered by {})",
                    chart
                        .to_possible_value()
                        .map_or_else(String::new, |v| v.get_name().to_owned()),
                    first.bucket_start,
                    last.bucket_start,
                    source_name(answer.source)
                )?;
                outln!("{}", sparkline(&values))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_types_are_typed_as_the_api_names_them() {
        assert_eq!(
            parse_event_type("positive-reply"),
            Ok(EventType::PositiveReply)
        );
        assert_eq!(parse_event_type("SENT"), Ok(EventType::Sent));
        assert!(parse_event_type("sends").is_err_and(|e| e.contains("positive-reply")));
    }

    #[test]
    fn sparklines_scale_to_the_highest_and_fit_the_terminal() {
        assert_eq!(sparkline(&[0, 1, 2, 4, 8]), " ▂▃▅█");
        assert_eq!(sparkline(&[]), "");
        let year: Vec<u64> = (0..365).map(|d| d % 7).collect();
        assert!(sparkline(&year).chars().count() <= CHART_WIDTH);
    }
}
