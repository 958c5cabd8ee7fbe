use std::process::ExitCode;

use clap::Parser;

use campaign_stats::cli::{Cli, is_broken_pipe, report_failure, run};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let output = cli.output();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of our output left (`… | head`): nothing more to say.
        Err(error) if is_broken_pipe(&error) => ExitCode::SUCCESS,
        Err(error) => {
            report_failure(&error, output);
            ExitCode::FAILURE
        }
    }
}
