//! Keeps the standard gRPC health service truthful: SERVING while the database answers,
//! NOT_SERVING while it does not.

use std::time::Duration;

use tokio::sync::watch;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::storage::Store;

/// The health service name that answers SERVING for as long as the process serves at all,
/// whatever the database does: what a liveness probe asks (restarting a replica cures no
/// database outage), where readiness asks `""`.
pub const LIVENESS: &str = "liveness";

/// The services whose health follows the database: the whole server (`""`) and each API.
pub const HEALTH_SERVICES: &[&str] = &[
    "",
    "stats.v1.StatsService",
    "stats.v1.RolloutService",
    "stats.v1.MigrationService",
];

/// Pings the database once (within `timeout`) and publishes the result.
pub async fn check_once<S: Store>(
    store: &S,
    reporter: &HealthReporter,
    timeout: Duration,
) -> ServingStatus {
    let status = match tokio::time::timeout(timeout, store.ping()).await {
        Ok(Ok(())) => ServingStatus::Serving,
        Ok(Err(error)) => {
            tracing::warn!(error = %error, "database health check failed");
            ServingStatus::NotServing
        }
        Err(_) => {
            tracing::warn!(?timeout, "database health check timed out");
            ServingStatus::NotServing
        }
    };
    for service in HEALTH_SERVICES {
        reporter.set_service_status(service, status).await;
    }
    status
}

/// Re-checks the database every `interval` until `stop` turns true (a check under way is
/// dropped), so that no check can publish SERVING after the server has said NOT_SERVING.
pub async fn watch_database<S: Store>(
    store: std::sync::Arc<S>,
    reporter: HealthReporter,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let checks = keep_checking(store, reporter, interval);
    tokio::select! {
        () = checks => {}
        _ = stop.wait_for(|stop| *stop) => {}
    }
}

/// Checks every `interval`, forever.
async fn keep_checking<S: Store>(
    store: std::sync::Arc<S>,
    reporter: HealthReporter,
    interval: Duration,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = None;
    loop {
        ticker.tick().await;
        // A check never outlasts the interval, so checks do not pile up.
        let status = check_once(
            store.as_ref(),
            &reporter,
            interval.max(Duration::from_millis(100)),
        )
        .await;
        if last != Some(status) {
            tracing::info!(?status, "health changed");
            last = Some(status);
        }
    }
}
