use std::process::ExitCode;

use clap::Parser;

use campaign_stats::cli::{Cli, run};

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "campaign-stats failed");
            eprintln!("campaign-stats: {error:#}");
            ExitCode::FAILURE
        }
    }
}
