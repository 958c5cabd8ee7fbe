//! Background runs: a backfill is a loop around one batch ([`CutoverStore::backfill_batch`]),
//! run as a job the server stops cleanly at shutdown ([`super::Jobs`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::migration::{Run, RunState};
use crate::storage::{CutoverStore, RunStore};

/// How often a failing batch is retried when the failure is transient.
const TRANSIENT_RETRIES: u32 = 5;

/// Runs a backfill from its checkpoint to the end, one batch (one transaction) at a time,
/// pausing `throttle` between batches. Stops with `cancelled` (resumable) when `stop` turns
/// true, with `failed` on an error that retries do not cure.
pub async fn run_backfill<S: RunStore + CutoverStore>(
    store: Arc<S>,
    mut run: Run,
    throttle: Duration,
    mut stop: watch::Receiver<bool>,
) -> RunState {
    let mut retries = 0;
    let (state, error) = loop {
        if *stop.borrow() {
            break (RunState::Cancelled, None);
        }
        match store.backfill_batch(&run).await {
            Ok(outcome) => {
                retries = 0;
                match outcome.last_key {
                    None => break (RunState::Completed, None),
                    Some(key) => run.checkpoint = Some(key),
                }
            }
            Err(error) if error.is_retryable() && retries < TRANSIENT_RETRIES => {
                retries += 1;
                tracing::warn!(run_id = %run.run_id, %error, retries, "backfill batch failed; retrying");
                tokio::time::sleep(Duration::from_millis(200 * u64::from(retries))).await;
                continue;
            }
            Err(error) => {
                tracing::error!(run_id = %run.run_id, error = %error, source = ?std::error::Error::source(&error), "backfill failed");
                break (RunState::Failed, Some(error.to_string()));
            }
        }
        if !throttle.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(throttle) => {}
                _ = stop.changed() => {}
            }
        }
    };
    if let Err(error) = store.finish_run(&run.run_id, state, error.as_deref()).await {
        // The run stays `running` with an old heartbeat: the next start resumes it.
        tracing::error!(run_id = %run.run_id, %error, "could not record the end of the backfill");
    }
    tracing::info!(run_id = %run.run_id, %state, "backfill ended");
    state
}
