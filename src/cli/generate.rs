//! `generate-legacy`: fills a database's legacy table with generated history.

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use super::DatabaseArgs;
use crate::migration::generate::{LegacyShape, legacy_rows};
use crate::storage::{Backend, PostgresStore, SqliteStore, Store};
use crate::telemetry::{self, LogFormat};

/// Rows written per statement batch.
const CHUNK: usize = 10_000;

#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// Campaigns to generate (one row per campaign per day).
    #[arg(long, default_value_t = 1_000)]
    pub campaigns: u32,
    /// Users the campaigns are spread over.
    #[arg(long, default_value_t = 100)]
    pub users: u32,
    /// Days of history, ending on `--end-date`.
    #[arg(long, default_value_t = 365)]
    pub days: u32,
    /// The last day of history.
    #[arg(long, default_value = "2025-12-31")]
    pub end_date: chrono::NaiveDate,
    /// The same seed gives the same rows.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[command(flatten)]
    pub database: DatabaseArgs,
}

pub async fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    telemetry::init(LogFormat::Text);
    let url = args.database.database_url.expose();
    let options = args.database.pool_options();
    match Backend::from_url(url)? {
        Backend::Sqlite => fill(SqliteStore::connect(url, &options).await?, &args).await,
        Backend::Postgres => fill(PostgresStore::connect(url, &options).await?, &args).await,
    }
}

async fn fill<S: Store>(store: S, args: &GenerateArgs) -> anyhow::Result<()> {
    // The schema (and so the legacy table, where absent) first.
    store.update_schema().await?;
    let shape = LegacyShape {
        campaigns: args.campaigns,
        users: args.users,
        days: args.days,
        end_date: args.end_date,
        seed: args.seed,
    };
    let total = u64::from(args.campaigns) * u64::from(args.days);
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {wide_bar} {pos}/{len} legacy rows ({per_sec})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut rows = legacy_rows(&shape);
    let mut written = 0;
    loop {
        let chunk: Vec<_> = rows.by_ref().take(CHUNK).collect();
        if chunk.is_empty() {
            break;
        }
        written += store.insert_legacy_rows(&chunk).await?;
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    store.close().await;
    outln!(
        "generated {total} legacy rows ({written} new) for {} campaigns of {} users over {} days",
        args.campaigns,
        args.users,
        args.days
    )?;
    Ok(())
}
