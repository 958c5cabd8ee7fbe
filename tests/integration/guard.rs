//! The guard and the progressive schedule: a divergence planted under traffic rolls reads back
//! by itself (audited as `guard`, with the figures) and never flaps; one user's divergence
//! quarantines that user alone; a schedule advances while the guard is green, stops and steps
//! back on a trip; and a second replica takes the schedule over when the driving one dies.

use std::time::{Duration, Instant};

use campaign_stats::app::{ScheduleSettings, ShadowSettings};
use campaign_stats::grpc::proto::rollout_service_client::RolloutServiceClient;
use campaign_stats::grpc::proto::{
    self as proto, EventType, ScheduleStatus, StartScheduleRequest, StorageSource,
};
use campaign_stats::migration::Phase;
use campaign_stats::rollout::{GuardAction, GuardSettings};
use campaign_stats::server::ServerConfig;
use campaign_stats::storage::PoolOptions;

use crate::common::api::current_rollout;
use crate::common::{Backend, ServerProcess, TestDb, TestServer, assert_names_fields, event};

crate::on_both_backends!(
    the_guard_rolls_reads_back_when_the_storages_disagree,
    one_replicas_trip_rolls_every_replica_back,
    a_user_whose_reads_disagree_is_quarantined_alone,
    the_schedule_advances_while_green_and_halts_on_a_trip,
    a_schedule_resumes_itself_once_after_its_cool_down,
    guard_thresholds_are_set_at_run_time_and_checked,
);

const START: &str = "2026-03-01";
const END: &str = "2026-03-31";

/// Every read shadowed, the guard on `guard`, the schedule looked at often.
fn guarded(guard: GuardSettings) -> ServerConfig {
    ServerConfig {
        shadow: ShadowSettings {
            sample_rate: 1.0,
            ..ShadowSettings::DEFAULT
        },
        guard,
        schedule: ScheduleSettings {
            tick: Duration::from_millis(50),
            ..ScheduleSettings::DEFAULT
        },
        ..TestServer::config()
    }
}

fn user(i: usize) -> String {
    format!("u{i:02}")
}

fn campaign(i: usize) -> String {
    format!("c{i:02}")
}

/// `users` users with one campaign each, sent 4 on the first of March.
async fn seed(server: &TestServer, users: usize) {
    let events = (0..users)
        .map(|i| event(&user(i), &campaign(i), EventType::Sent, 4, START))
        .collect();
    server.record(events).await;
}

/// Reads user `i`'s campaign: the storage that answered, and `sent`.
async fn read_sent(server: &TestServer, i: usize) -> (i32, u64) {
    let answer = server.get_stats(&user(i), &campaign(i), START, END).await;
    (answer.source, answer.metrics.unwrap_or_default().sent)
}

/// Reads user `i`'s campaign where the primary storage is right (legacy, or new before a
/// divergence); answers the storage that answered.
async fn read(server: &TestServer, i: usize) -> i32 {
    let (source, sent) = read_sent(server, i).await;
    assert_eq!(sent, 4, "the primary answer");
    source
}

/// Waits until `done` holds, polling; panics with `what` after 10 s.
async fn until<F: AsyncFn() -> bool>(what: &str, done: F) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until this replica's guard window holds `comparisons` comparisons.
async fn until_compared(server: &TestServer, comparisons: u64) {
    until(&format!("{comparisons} comparisons"), async || {
        server.guard().await.window.unwrap_or_default().comparisons >= comparisons
    })
    .await;
}

async fn the_guard_rolls_reads_back_when_the_storages_disagree(db: TestDb) {
    let db = db.in_phase(Phase::Verified);
    let settings = GuardSettings {
        min_samples: 20,
        quarantine_after: 0,
        ..GuardSettings::DEFAULT
    };
    let server = db
        .start_server_configured(&db.url, &PoolOptions::default(), guarded(settings))
        .await;
    seed(&server, 40).await;
    server.set_percentage(50.0, 0, false).await.expect("50 %");

    // Agreeing reads: the guard watches and stays green.
    for i in 0..20 {
        read(&server, i).await;
    }
    until_compared(&server, 20).await;
    let guard = server.guard().await;
    assert!(guard.active && !guard.tripped, "{guard:?}");
    assert_eq!(guard.window.unwrap_or_default().mismatches, 0);

    // The new storage goes wrong; the next read crosses the threshold (1 of 21 > 1 %).
    db.execute("UPDATE campaign_day_totals SET sent = sent + 1")
        .await;
    let crossed = Instant::now();
    read(&server, 20).await;
    until("the kill switch", async || {
        server.current_rollout().await.kill_switch
    })
    .await;
    let reaction = crossed.elapsed();
    assert!(
        reaction < Duration::from_secs(3),
        "rolled back after {reaction:?}"
    );
    let rolled_back = server.current_rollout().await;
    assert!(rolled_back.guard_tripped);
    let trip = &server.rollout_history(1, "").await.changes[0];
    assert_eq!(
        (trip.actor.as_str(), trip.change.as_str()),
        ("guard", "guard trip (mismatch_rate, kill-switch)")
    );
    assert!(
        trip.reason.contains("mismatches 1 of 21 comparisons"),
        "{}",
        trip.reason
    );
    let guard = server.guard().await;
    assert!(guard.tripped && !guard.active);
    assert_eq!(guard.trip_signal, "mismatch_rate");

    // Every read goes to LEGACY now; more disagreement changes nothing (no flapping).
    for i in 0..40 {
        assert_eq!(read(&server, i).await, i32::from(StorageSource::Legacy));
    }
    until_compared(&server, 40).await;
    assert_eq!(server.current_rollout().await.version, rolled_back.version);

    let scrape = server.metrics().await;
    assert_eq!(
        scrape.get("campaign_stats_guard_trips_total{signal=\"mismatch_rate\"}"),
        1.0
    );
    assert_eq!(scrape.get("campaign_stats_guard_tripped"), 1.0);
    assert_eq!(scrape.get("campaign_stats_rollout_kill_switch"), 1.0);
    assert!(scrape.get("campaign_stats_guard_window_comparisons") >= 40.0);
    assert!(scrape.get("campaign_stats_guard_window_mismatch_ratio") > 0.9);
    assert_eq!(scrape.get("campaign_stats_shadow_queued_reads"), 0.0);
    assert_eq!(scrape.get("campaign_stats_shadow_dropped_reads_total"), 0.0);
    assert!(
        scrape.get(
            "campaign_stats_shadow_comparisons_total{method=\"campaign_totals\",outcome=\"mismatch\"}"
        ) >= 41.0
    );

    // A person releasing the kill switch re-arms the guard, and says so in the audit.
    let released = server
        .kill_switch(false, "new storage repaired")
        .await
        .expect("release");
    assert!(!released.guard_tripped);
    let release = &server.rollout_history(1, "").await.changes[0];
    assert_eq!(release.after, "released; guard re-armed");
}

/// Two replicas on one database: only the first shadows reads, so only its guard can trip;
/// the second applies the trip through the rollout's normal propagation, as it would any
/// change.
async fn one_replicas_trip_rolls_every_replica_back(db: TestDb) {
    let db = db.in_phase(Phase::Verified);
    let settings = GuardSettings {
        min_samples: 10,
        quarantine_after: 0,
        ..GuardSettings::DEFAULT
    };
    let watcher = db
        .start_server_configured(&db.url, &PoolOptions::default(), guarded(settings))
        .await;
    let other = db
        .start_server_configured(&db.url, &PoolOptions::default(), TestServer::config())
        .await;
    seed(&watcher, 20).await;
    let raised = watcher
        .set_percentage(100.0, 0, false)
        .await
        .expect("100 %");
    until("the other replica at 100 %", async || {
        other.current_rollout().await.version == raised.version
    })
    .await;
    assert_eq!(read(&other, 0).await, i32::from(StorageSource::New));

    for i in 0..10 {
        read(&watcher, i).await;
    }
    until_compared(&watcher, 10).await;
    db.execute("UPDATE campaign_day_totals SET sent = sent + 1")
        .await;
    // The primary (new) answer is wrong now: only the shadow comparison matters here.
    read_sent(&watcher, 10).await;
    until("the trip on the replica that saw it", async || {
        watcher.current_rollout().await.guard_tripped
    })
    .await;
    let tripped = watcher.current_rollout().await;
    until("the trip on the other replica", async || {
        other.current_rollout().await.version == tripped.version
    })
    .await;
    let applied = other.current_rollout().await;
    assert!(applied.kill_switch && applied.guard_tripped, "{applied:?}");
    // Its own guard never compared anything, and has nothing to act on.
    let guard = other.guard().await;
    assert_eq!(guard.window.unwrap_or_default().comparisons, 0);
    assert!(guard.tripped && !guard.active, "{guard:?}");
    assert_eq!(
        read_sent(&other, 0).await,
        (i32::from(StorageSource::Legacy), 4),
        "the other replica reads legacy"
    );
    other.stop().await;
    watcher.stop().await;
}

async fn a_user_whose_reads_disagree_is_quarantined_alone(db: TestDb) {
    let db = db.in_phase(Phase::Verified);
    let settings = GuardSettings {
        min_samples: 1_000,
        quarantine_after: 3,
        ..GuardSettings::DEFAULT
    };
    let server = db
        .start_server_configured(&db.url, &PoolOptions::default(), guarded(settings))
        .await;
    seed(&server, 5).await;
    server.set_percentage(100.0, 0, false).await.expect("100 %");
    db.execute("UPDATE campaign_day_totals SET sent = sent + 1 WHERE user_id = 'u01'")
        .await;
    for _ in 0..3 {
        read(&server, 0).await;
        // New answers wrong for u01 until the guard pins them.
        read_sent(&server, 1).await;
    }
    until("u01's quarantine", async || {
        server.evaluate("u01").await.source == i32::from(StorageSource::Legacy)
    })
    .await;
    assert_eq!(
        read_sent(&server, 1).await,
        (i32::from(StorageSource::Legacy), 4),
        "u01 reads legacy's right answer"
    );
    assert_eq!(
        server.evaluate("u00").await.source,
        i32::from(StorageSource::New),
        "the others keep reading new"
    );
    let rollout = server.current_rollout().await;
    assert!(!rollout.guard_tripped && !rollout.kill_switch);
    assert_eq!(rollout.quarantined, 1);
    let quarantine = &server.rollout_history(1, "").await.changes[0];
    assert_eq!(
        (quarantine.actor.as_str(), quarantine.change.as_str()),
        ("guard", "quarantine u01")
    );
    assert_eq!(server.guard().await.quarantined_user_ids, ["u01"]);
    assert_eq!(
        server
            .metrics()
            .await
            .get("campaign_stats_guard_quarantines_total"),
        1.0
    );

    // An admin lists and releases quarantines.
    let addr = server.addr.to_string();
    let (ok, listed, stderr) =
        crate::cli::cli(&["rollout", "quarantines", "--server", &addr]).await;
    assert!(ok, "{stderr}");
    assert_eq!(listed.trim(), "u01");
    let (ok, _, stderr) = crate::cli::cli(&[
        "rollout",
        "release",
        "u01",
        "--reason",
        "account repaired",
        "--server",
        &addr,
    ])
    .await;
    assert!(ok, "{stderr}");
    assert_eq!(
        server.evaluate("u01").await.source,
        i32::from(StorageSource::New)
    );
    assert!(server.guard().await.quarantined_user_ids.is_empty());
}

async fn the_schedule_advances_while_green_and_halts_on_a_trip(db: TestDb) {
    let db = db.in_phase(Phase::Verified);
    let settings = GuardSettings {
        min_samples: 5,
        quarantine_after: 0,
        action: GuardAction::StepBack,
        ..GuardSettings::DEFAULT
    };
    let server = db
        .start_server_configured(&db.url, &PoolOptions::default(), guarded(settings))
        .await;
    seed(&server, 20).await;
    let started = server
        .start_schedule(&[10.0, 50.0, 100.0], 0, 3, 0)
        .await
        .expect("start");
    assert_eq!(started.percentage, 10.0);
    let schedule = started.schedule.expect("a schedule");
    assert_eq!(
        (schedule.step, schedule.status),
        (1, i32::from(ScheduleStatus::Running))
    );

    // Green reads move it on, one read at a time, until the second step.
    let mut reads = 0;
    loop {
        read(&server, reads % 20).await;
        reads += 1;
        let schedule = server.current_rollout().await.schedule.expect("a schedule");
        if schedule.step == 2 {
            break;
        }
        assert!(reads < 500, "the schedule never advanced");
    }
    let rollout = server.current_rollout().await;
    assert_eq!(rollout.percentage, 50.0);
    let advance = &server.rollout_history(1, "").await.changes[0];
    assert_eq!(
        (advance.actor.as_str(), advance.change.as_str()),
        ("schedule", "schedule advance")
    );

    // A divergence midway: the guard trips, steps back to the last green step, and the
    // schedule halts there.
    db.execute("UPDATE campaign_day_totals SET sent = sent + 1")
        .await;
    read(&server, 0).await;
    until("the trip", async || {
        server.current_rollout().await.guard_tripped
    })
    .await;
    let tripped = server.current_rollout().await;
    let schedule = tripped.schedule.expect("a schedule");
    assert_eq!(
        (tripped.percentage, tripped.kill_switch),
        (10.0, false),
        "stepped back"
    );
    assert_eq!(
        (schedule.step, schedule.status),
        (1, i32::from(ScheduleStatus::Halted))
    );
    for i in 0..10 {
        read(&server, i).await;
    }
    until_compared(&server, 10).await;
    let still = server.current_rollout().await;
    assert_eq!(still.version, tripped.version, "nothing moves after a trip");

    let scrape = server.metrics().await;
    assert_eq!(scrape.get("campaign_stats_schedule_step"), 1.0);
    assert_eq!(
        scrape.get("campaign_stats_schedule_status{status=\"halted\"}"),
        1.0
    );
    assert_eq!(
        scrape.get("campaign_stats_schedule_status{status=\"running\"}"),
        0.0
    );
    assert_eq!(scrape.get("campaign_stats_schedule_advances_total"), 1.0);

    // Resuming is a person's call; aborting leaves the percentage where it is.
    let addr = server.addr.to_string();
    let (ok, out, stderr) = crate::cli::cli(&[
        "rollout",
        "schedule",
        "abort",
        "--reason",
        "investigate",
        "--server",
        &addr,
    ])
    .await;
    assert!(ok, "{stderr}");
    assert!(out.contains("schedule ABORTED at step 1 of 3"), "{out}");
    assert_eq!(server.current_rollout().await.percentage, 10.0);
}

/// Reads the 20 seeded users in turn for `how_long` (the primary answer right), so that the
/// guard keeps comparing; answers the rollout afterwards.
async fn read_for(server: &TestServer, how_long: Duration) -> proto::Rollout {
    let until = Instant::now() + how_long;
    let mut i = 0;
    while Instant::now() < until {
        read(server, i % 20).await;
        i += 1;
    }
    server.current_rollout().await
}

/// The schedule's step (from 1) and status.
fn schedule_of(rollout: &proto::Rollout) -> (u32, i32) {
    let schedule = rollout.schedule.as_ref().expect("a schedule");
    (schedule.step, schedule.status)
}

async fn a_schedule_resumes_itself_once_after_its_cool_down(db: TestDb) {
    let db = db.in_phase(Phase::Verified);
    let settings = GuardSettings {
        min_samples: 5,
        window_secs: 1,
        quarantine_after: 0,
        action: GuardAction::KillSwitch,
        ..GuardSettings::DEFAULT
    };
    let server = db
        .start_server_configured(&db.url, &PoolOptions::default(), guarded(settings))
        .await;
    seed(&server, 20).await;
    let halted = i32::from(ScheduleStatus::Halted);
    let running = i32::from(ScheduleStatus::Running);
    let cool_down = Duration::from_secs(1);
    // 30 comparisons a step: the schedule cannot move on while the test looks at it.
    let started = server
        .start_schedule(&[10.0, 50.0, 100.0], 0, 30, 1)
        .await
        .expect("start");
    let schedule = started.schedule.expect("a schedule");
    assert_eq!(
        (schedule.cool_down_seconds, schedule.resumes_itself),
        (1, true)
    );
    until("the second step", async || {
        read(&server, 0).await;
        schedule_of(&server.current_rollout().await).0 == 2
    })
    .await;

    // A divergence: the kill switch stops the schedule on its second step. While the
    // storages still disagree, the cool-down passes and nothing resumes.
    db.execute("UPDATE campaign_day_totals SET sent = sent + 1")
        .await;
    until("the trip", async || {
        read(&server, 0).await;
        server.current_rollout().await.guard_tripped
    })
    .await;
    let still = read_for(&server, cool_down * 2).await;
    assert_eq!(schedule_of(&still), (2, halted));
    assert!(still.kill_switch && still.guard_tripped);

    // The divergence mended: once the window holds enough green comparisons, the schedule
    // resumes by itself at the last green step, the kill switch released.
    db.execute("UPDATE campaign_day_totals SET sent = sent - 1")
        .await;
    let i = std::sync::atomic::AtomicUsize::new(0);
    until("the schedule to resume itself", async || {
        read(
            &server,
            i.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 20,
        )
        .await;
        schedule_of(&server.current_rollout().await).1 == running
    })
    .await;
    let resumed = server.current_rollout().await;
    assert_eq!(schedule_of(&resumed), (1, running));
    assert_eq!(
        (
            resumed.percentage,
            resumed.kill_switch,
            resumed.guard_tripped
        ),
        (10.0, false, false)
    );
    assert!(
        !resumed
            .schedule
            .as_ref()
            .expect("a schedule")
            .resumes_itself
    );
    let recovered = &server.rollout_history(1, "").await.changes[0];
    assert_eq!(
        (recovered.actor.as_str(), recovered.change.as_str()),
        ("schedule", "schedule recover")
    );
    assert!(
        recovered.reason.contains("guard green again"),
        "{}",
        recovered.reason
    );

    // A second trip waits for a person, however green the guard gets again.
    db.execute("UPDATE campaign_day_totals SET sent = sent + 1")
        .await;
    until("the second trip", async || {
        read(&server, 0).await;
        server.current_rollout().await.guard_tripped
    })
    .await;
    db.execute("UPDATE campaign_day_totals SET sent = sent - 1")
        .await;
    let after = read_for(&server, cool_down * 3).await;
    assert_eq!(schedule_of(&after), (1, halted));
    assert!(after.kill_switch && after.guard_tripped);
}

#[cfg_attr(
    not(postgres_tests),
    ignore = "PostgreSQL: set STATS_TEST_POSTGRES_URL when building the tests to run it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_replica_takes_the_schedule_over_when_the_driver_dies() {
    let Some(db) = TestDb::create(Backend::Postgres).await else {
        return;
    };
    let db = db.in_phase(Phase::Verified);
    db.start_server().await.stop().await;
    let args = ["--schedule-lease-secs", "1", "--shadow-sample-rate", "0"];
    let first = ServerProcess::start(&db.url, &args).await;
    let mut driver = RolloutServiceClient::new(first.channel().await);
    driver
        .start_schedule(StartScheduleRequest {
            percentages: (1..=12).map(f64::from).collect(),
            dwell_seconds: 1,
            min_comparisons: 0,
            reason: "walk up".into(),
            actor: "tester".into(),
            cool_down_seconds: 0,
        })
        .await
        .expect("start");
    let step = async |client: &mut RolloutServiceClient<_>| {
        current_rollout(client).await.schedule.map_or(0, |s| s.step)
    };
    // Alone, the first replica drives.
    let deadline = Instant::now() + Duration::from_secs(15);
    while step(&mut driver).await < 2 {
        assert!(
            Instant::now() < deadline,
            "the first replica never advanced"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let second = ServerProcess::start(&db.url, &args).await;
    let mut survivor = RolloutServiceClient::new(second.channel().await);
    first.kill().await;
    let at_kill = step(&mut survivor).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while step(&mut survivor).await < at_kill + 2 {
        assert!(
            Instant::now() < deadline,
            "the second replica never took the schedule over (still at step {at_kill})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // One step at a time, every advance by the schedule: no replica doubled one.
    let reached = step(&mut survivor).await;
    let advances = db
        .scalar(
            "SELECT COUNT(*) FROM rollout_audit WHERE actor = 'schedule' \
             AND change = 'schedule advance'",
        )
        .await;
    assert_eq!(advances, i64::from(reached) - 1);
    second.stop().await;
}

async fn guard_thresholds_are_set_at_run_time_and_checked(db: TestDb) {
    let db = db.in_phase(Phase::Verified);
    let server = db
        .start_server_configured(
            &db.url,
            &PoolOptions::default(),
            guarded(GuardSettings::DEFAULT),
        )
        .await;
    let addr = server.addr.to_string();
    let guard = server.guard().await;
    assert!(!guard.settings_from_rollout && !guard.active && !guard.tripped);
    assert_eq!(guard.settings.unwrap_or_default().max_mismatch_rate, 0.01);

    // The CLI changes one threshold and keeps the rest; the change is audited.
    let (ok, _, stderr) = crate::cli::cli(&[
        "rollout",
        "guard",
        "set",
        "--max-mismatch-rate",
        "0.05",
        "--window-secs",
        "30",
        "--reason",
        "calmer",
        "--server",
        &addr,
    ])
    .await;
    assert!(ok, "{stderr}");
    let (ok, out, stderr) =
        crate::cli::cli(&["rollout", "guard", "-o", "json", "--server", &addr]).await;
    assert!(ok, "{stderr}");
    let shown: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(shown["settings_from_rollout"], true);
    assert_eq!(shown["settings"]["max_mismatch_rate"], 0.05);
    assert_eq!(shown["settings"]["window_seconds"], 30);
    assert_eq!(shown["settings"]["min_samples"], 100, "kept");
    let change = &server.rollout_history(1, "").await.changes[0];
    assert_eq!(change.change, "guard settings");
    assert!(
        change.after.contains("max mismatch 5.00%"),
        "{}",
        change.after
    );

    // Bad thresholds are refused, every bad field named.
    let refused = server
        .rollout()
        .await
        .set_guard_settings(proto::SetGuardSettingsRequest {
            settings: Some(proto::GuardSettings {
                max_mismatch_rate: 1.5,
                min_samples: 0,
                window_seconds: 10,
                action: proto::GuardAction::KillSwitch.into(),
                ..Default::default()
            }),
            server_default: false,
            reason: "typo".into(),
            actor: "tester".into(),
        })
        .await
        .expect_err("refused");
    assert_names_fields(
        &refused,
        tonic::Code::InvalidArgument,
        &["settings.max_mismatch_rate", "settings.min_samples"],
    );

    // `--default` hands the thresholds back to the flags; the reserved actors are refused.
    let (ok, _, stderr) = crate::cli::cli(&[
        "rollout",
        "guard",
        "set",
        "--default",
        "--reason",
        "back",
        "--server",
        &addr,
    ])
    .await;
    assert!(ok, "{stderr}");
    assert!(!server.guard().await.settings_from_rollout);
    let (ok, _, stderr) = crate::cli::cli(&[
        "rollout",
        "kill-switch",
        "on",
        "--reason",
        "x",
        "--actor",
        "guard",
        "--server",
        &addr,
    ])
    .await;
    assert!(!ok && stderr.contains("actor"), "{stderr}");
}
