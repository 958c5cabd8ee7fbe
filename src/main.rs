use std::process::ExitCode;

use clap::Parser;

use campaign_stats::cli::{Cli, is_broken_pipe, run};

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of our output left (`… | head`): nothing more to say.
        Err(error) if is_broken_pipe(&error) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "campaign-stats failed");
            eprintln!("campaign-stats: {error:#}");
            ExitCode::FAILURE
        }
    }
}
