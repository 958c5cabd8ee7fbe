//! What the service tells its operators: logs through `tracing` (text for people, JSON for
//! collectors) and Prometheus metrics on their own port.

pub mod metrics;
pub mod rpc;

pub use metrics::{
    CAMPAIGN_TOTALS, DAILY_TOTALS, PoolUse, READ_METHODS, ReplicaSample, SHADOW_OUTCOMES,
    ServerMetrics, code_name, serve_metrics,
};
pub use rpc::RpcMetricsLayer;

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global subscriber. The filter comes from `RUST_LOG` (default `info`).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    // A second install (tests start many servers) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// `url` with any password replaced by `***`, fit for logs.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(_) => url.to_owned(),
        Err(_) => "<unparseable database URL>".to_owned(),
    }
}

/// `error` and its sources, `: `-separated, for the log.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn hides_passwords_only() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/stats"),
            "postgres://app:***@db:5432/stats"
        );
        assert_eq!(
            redact_url("sqlite://campaign-stats.db"),
            "sqlite://campaign-stats.db"
        );
        assert!(!redact_url("postgres://a:b c@/x y").contains("b c"));
    }
}
