//! Backfill: copying legacy history into the new storage.

use campaign_stats::grpc::proto::migration_service_client::MigrationServiceClient;
use campaign_stats::grpc::proto::stats_service_client::StatsServiceClient;
use campaign_stats::grpc::proto::{
    AmbiguityKind, AmbiguousResolution, EventType, GetRunReportRequest, GetRunReportResponse,
    GetRunRequest, GetStatsForCampaignsRequest, GetStatsForCampaignsResponse, LegacyRowKey,
    ListAmbiguousResolutionsRequest, ListPhaseTransitionsRequest, MigrationPhase,
    RecordEventRequest, RecordEventsRequest, ResolveAmbiguousRowsRequest,
    ResolveAmbiguousRowsResponse, Run, StartBackfillRequest, StorageSource, TransitionPhaseRequest,
    VerifyConsistencyRequest, VerifyConsistencyResponse, WatchRunRequest,
};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::transport::Channel;

use crate::common::{ServerProcess, TestDb, TestServer, assert_names_fields, event};

crate::on_both_backends!(
    backfill_copies_history_once_and_reports_ambiguous_rows,
    dry_run_counts_but_writes_nothing,
    the_day_dual_write_began_counts_once,
    a_stopped_backfill_resumes_to_the_same_result,
    a_backfill_killed_mid_run_completes_to_the_same_result,
    a_real_backfill_needs_dual_write,
    legacy_to_new_primary_keeps_every_total_while_events_arrive,
    verify_names_a_difference_planted_in_either_storage,
    storage_report_compares_both_storages,
    ambiguous_rows_are_resolved_by_copy_or_skip_and_hold_verified_back,
);

/// Legacy rows the way the legacy system left them: `campaigns` campaigns of `users` users
/// over `days` days from 2025-01-01, most rows all zeros, plus five rows that look wrong.
/// Deterministic, so two databases seeded alike hold the same history.
async fn seed_legacy(db: &TestDb, campaigns: u32, users: u32, days: u32) -> u64 {
    let mut values = Vec::new();
    for c in 0..campaigns {
        for d in 0..days {
            let day = chrono::NaiveDate::from_ymd_opt(2025, 1, 1).expect("date")
                + chrono::Days::new(u64::from(d));
            let n = (c * 31 + d * 17) % 100;
            // About 70% of rows are all zeros, as in the real table.
            let (sent, opened, replied, positive) = if n < 70 {
                (0, 0, 0, 0)
            } else {
                (n, n / 2, n / 5, n / 10)
            };
            values.push(format!(
                "('camp-{c:03}', 'user-{}', '{day}', {sent}, {opened}, {replied}, {positive}, {})",
                c % users,
                n % 3
            ));
        }
    }
    // Rows that look wrong: negative, NULL, more positive replies than replies, and a
    // campaign that appears under two users. And a big campaign's day, far above one event's
    // limit, which is right: legacy counts are aggregates, copied whole.
    values.extend([
        "('bad-negative', 'user-0', '2025-02-01', -3, 0, 0, 0, 0)".to_owned(),
        "('bad-null', 'user-0', '2025-02-01', 1, NULL, 0, 0, 0)".to_owned(),
        "('bad-positive', 'user-0', '2025-02-01', 5, 0, 1, 2, 0)".to_owned(),
        "('camp-huge', 'user-0', '2025-02-01', 5000000, 0, 0, 0, 0)".to_owned(),
        "('bad-shared', 'user-0', '2025-02-01', 4, 0, 0, 0, 0)".to_owned(),
        "('bad-shared', 'user-1', '2025-02-02', 4, 0, 0, 0, 0)".to_owned(),
    ]);
    let rows = values.len() as u64;
    db.execute(&format!(
        "INSERT INTO campaign_daily_stat_entries (campaign_id, user_id, stat_date, sent, opened, \
         replied, positive_replies, bounced) VALUES {}",
        values.join(", ")
    ))
    .await;
    rows
}

const AMBIGUOUS_ROWS: u64 = 5;

async fn move_to(server: &TestServer, phase: MigrationPhase) {
    server
        .transition(phase, false, "test")
        .await
        .expect("transition");
}

/// Starts a backfill and follows its progress stream to the end.
pub(crate) async fn backfill(
    client: &mut MigrationServiceClient<Channel>,
    dry_run: bool,
    batch_size: u32,
) -> Run {
    let run_id = client
        .start_backfill(StartBackfillRequest {
            dry_run,
            batch_size,
            throttle_ms: 0,
            actor: "tester".into(),
        })
        .await
        .expect("StartBackfill")
        .into_inner()
        .run_id;
    follow(client, &run_id).await
}

/// Follows a run's progress stream until it ends; the counters never go back.
async fn follow(client: &mut MigrationServiceClient<Channel>, run_id: &str) -> Run {
    let mut updates = client
        .watch_run(WatchRunRequest {
            run_id: run_id.into(),
        })
        .await
        .expect("WatchRun")
        .into_inner();
    let mut last: Option<Run> = None;
    while let Some(update) = updates.next().await {
        let update = update.expect("progress");
        if let Some(previous) = &last {
            assert!(update.processed >= previous.processed, "progress went back");
        }
        last = Some(update);
    }
    last.expect("at least one update")
}

/// Per campaign and legacy column, the sums in legacy and in the new storage, for the
/// campaigns whose rows all look right.
async fn totals(db: &TestDb) -> (i64, i64, i64, i64) {
    let legacy = "FROM campaign_daily_stat_entries WHERE campaign_id LIKE 'camp-%'";
    (
        db.scalar(&format!("SELECT COALESCE(SUM(sent), 0) {legacy}")).await,
        db.scalar(&format!("SELECT COALESCE(SUM(opened) + SUM(replied) * 1000 + SUM(positive_replies) * 1000000 + SUM(bounced) * 100000000, 0) {legacy}")).await,
        db.scalar("SELECT COALESCE(SUM(sent), 0) FROM campaign_day_totals").await,
        db.scalar(
            "SELECT COALESCE(SUM(opened) + SUM(replied) * 1000 + SUM(positive_replies) * 1000000 \
             + SUM(bounced) * 100000000, 0) FROM campaign_day_totals",
        )
        .await,
    )
}

async fn backfill_copies_history_once_and_reports_ambiguous_rows(db: TestDb) {
    let server = db.start_server().await;
    let rows = seed_legacy(&db, 12, 4, 40).await;
    let mut client = MigrationServiceClient::new(server.channel().await);
    move_to(&server, MigrationPhase::DualWrite).await;

    let run = backfill(&mut client, false, 37).await;
    assert_eq!(run.state, "completed", "{run:?}");
    assert_eq!(run.processed, rows);
    assert_eq!(run.ambiguous, AMBIGUOUS_ROWS);
    assert_eq!(run.copied + run.skipped + run.ambiguous, run.processed);
    assert!(run.copied > 0 && run.skipped > 0);
    let (legacy_sent, legacy_rest, new_sent, new_rest) = totals(&db).await;
    assert_eq!((new_sent, new_rest), (legacy_sent, legacy_rest));
    // A huge legacy day is copied whole.
    assert_eq!(
        db.scalar("SELECT sent FROM campaign_day_totals WHERE campaign_id = 'camp-huge'")
            .await,
        5_000_000
    );
    // The all-users rollup grew by exactly what the campaign rollups grew by.
    let fingerprint = "SUM(sent) + SUM(opened) * 3 + SUM(replied) * 7 + SUM(positive_replies) * 11 \
         + SUM(bounced) * 13";
    assert_eq!(
        db.scalar(&format!("SELECT {fingerprint} FROM all_day_totals"))
            .await,
        db.scalar(&format!("SELECT {fingerprint} FROM campaign_day_totals"))
            .await
    );
    // Nothing of the ambiguous rows was copied.
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM campaign_day_totals WHERE campaign_id LIKE 'bad-%'")
            .await,
        0
    );

    let report = client
        .get_run_report(GetRunReportRequest {
            run_id: run.run_id.clone(),
        })
        .await
        .expect("report")
        .into_inner();
    let mut reported: Vec<(String, String)> = report
        .ambiguous
        .iter()
        .map(|i| (i.campaign_id.clone(), i.reason.clone()))
        .collect();
    reported.sort();
    let campaigns: Vec<&str> = reported.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(
        campaigns,
        [
            "bad-negative",
            "bad-null",
            "bad-positive",
            "bad-shared",
            "bad-shared"
        ]
    );
    assert!(reported[0].1.contains("negative"), "{reported:?}");
    assert!(reported[1].1.contains("NULL"), "{reported:?}");

    // A second run copies nothing and changes nothing.
    let again = backfill(&mut client, false, 1000).await;
    assert_eq!(
        (again.state.as_str(), again.copied),
        ("completed", 0),
        "{again:?}"
    );
    assert_eq!(
        totals(&db).await,
        (legacy_sent, legacy_rest, new_sent, new_rest)
    );

    // The backfill is the precondition of BACKFILLED.
    move_to(&server, MigrationPhase::Backfilled).await;
    server.stop().await;
}

async fn dry_run_counts_but_writes_nothing(db: TestDb) {
    let server = db.start_server().await;
    let rows = seed_legacy(&db, 5, 2, 20).await;
    let mut client = MigrationServiceClient::new(server.channel().await);
    // A dry run is allowed in any phase.
    let run = backfill(&mut client, true, 10).await;
    assert_eq!(
        (run.state.as_str(), run.dry_run, run.processed),
        ("completed", true, rows)
    );
    assert!(run.copied > 0);
    for table in ["events", "campaign_day_totals", "all_day_totals"] {
        assert_eq!(
            db.scalar(&format!("SELECT COUNT(*) FROM {table}")).await,
            0,
            "{table}"
        );
    }
    // It does not count as the backfill BACKFILLED needs.
    move_to(&server, MigrationPhase::DualWrite).await;
    let status = server
        .transition(MigrationPhase::Backfilled, false, "dry run only")
        .await
        .expect_err("a dry run is not a backfill");
    assert_eq!(status.code(), Code::FailedPrecondition);
    server.stop().await;
}

async fn the_day_dual_write_began_counts_once(db: TestDb) {
    let server = db.start_server().await;
    db.execute(
        "INSERT INTO campaign_daily_stat_entries (campaign_id, user_id, stat_date, sent, opened) \
         VALUES ('c1', 'u1', '2026-03-01', 5, 2)",
    )
    .await;
    let mut client = MigrationServiceClient::new(server.channel().await);
    move_to(&server, MigrationPhase::DualWrite).await;
    // Later the same day, events reach both storages.
    let mut stats = server.stats().await;
    for (event_type, count) in [(EventType::Sent, 3), (EventType::Opened, 1)] {
        stats
            .record_event(RecordEventRequest {
                event: Some(event("u1", "c1", event_type, count, "2026-03-01")),
            })
            .await
            .expect("dual-written event");
    }
    assert_eq!(
        db.scalar("SELECT sent FROM campaign_daily_stat_entries")
            .await,
        8
    );
    let run = backfill(&mut client, false, 100).await;
    assert_eq!((run.state.as_str(), run.copied), ("completed", 1));
    assert_eq!(
        db.scalar("SELECT SUM(sent) FROM campaign_day_totals").await,
        8
    );
    assert_eq!(
        db.scalar("SELECT SUM(opened) FROM campaign_day_totals")
            .await,
        3
    );
    server.stop().await;
}

/// The new storage's rollups, row by row.
async fn rollup_fingerprint(db: &TestDb) -> i64 {
    db.scalar(
        "SELECT COALESCE(SUM((sent * 8 + opened * 9 + clicked * 10 + replied * 11 \
         + positive_replies * 12 + bounced * 13) * (LENGTH(campaign_id) + 3)), 0) \
         + COUNT(*) * 1000000 FROM campaign_day_totals",
    )
    .await
}

/// Starts a backfill in batches of 7 rows, `throttle_ms` apart, and returns its run id once
/// at least 50 rows are done.
async fn slow_backfill_under_way(
    client: &mut MigrationServiceClient<Channel>,
    throttle_ms: u32,
) -> String {
    let run_id = client
        .start_backfill(StartBackfillRequest {
            dry_run: false,
            batch_size: 7,
            throttle_ms,
            actor: "tester".into(),
        })
        .await
        .expect("start")
        .into_inner()
        .run_id;
    let mut updates = client
        .watch_run(WatchRunRequest {
            run_id: run_id.clone(),
        })
        .await
        .expect("watch")
        .into_inner();
    while let Some(update) = updates.next().await {
        if update.expect("progress").processed >= 50 {
            return run_id;
        }
    }
    panic!("the backfill ended before 50 rows were done")
}

async fn a_stopped_backfill_resumes_to_the_same_result(db: TestDb) {
    let expected = uninterrupted_fingerprint(&db, 10, 3, 30).await;
    let server = db.start_server().await;
    let rows = seed_legacy(&db, 10, 3, 30).await;
    let mut client = MigrationServiceClient::new(server.channel().await);
    move_to(&server, MigrationPhase::DualWrite).await;
    // Stop the server mid-run, once some batches are in.
    let run_id = slow_backfill_under_way(&mut client, 20).await;
    server.stop().await;
    let stopped = db
        .scalar(&format!(
            "SELECT processed FROM migration_runs WHERE run_id = '{run_id}'"
        ))
        .await;
    assert!(
        stopped >= 50 && (stopped as u64) < rows,
        "stopped after {stopped} of {rows} rows"
    );

    // A new server: starting the backfill again resumes the same run from its checkpoint.
    let server = db.start_server_keeping_phase().await;
    let mut client = MigrationServiceClient::new(server.channel().await);
    let resumed = client
        .start_backfill(StartBackfillRequest {
            dry_run: false,
            batch_size: 1000,
            throttle_ms: 0,
            actor: "tester".into(),
        })
        .await
        .expect("resume")
        .into_inner()
        .run_id;
    assert_eq!(resumed, run_id);
    let run = follow(&mut client, &run_id).await;
    assert_eq!((run.state.as_str(), run.processed), ("completed", rows));
    assert_eq!(rollup_fingerprint(&db).await, expected);
    server.stop().await;
}

/// The fingerprint of the same history backfilled without interruption, in a database of
/// its own.
async fn uninterrupted_fingerprint(db: &TestDb, campaigns: u32, users: u32, days: u32) -> i64 {
    let reference = TestDb::create(db.backend).await.expect("a second database");
    let server = reference.start_server().await;
    seed_legacy(&reference, campaigns, users, days).await;
    let mut client = MigrationServiceClient::new(server.channel().await);
    move_to(&server, MigrationPhase::DualWrite).await;
    assert_eq!(backfill(&mut client, false, 1000).await.state, "completed");
    server.stop().await;
    rollup_fingerprint(&reference).await
}

/// A server process killed with SIGKILL in the middle of a backfill (no shutdown, a batch
/// possibly in flight): a backfill started afterwards still ends with every row counted
/// exactly once.
async fn a_backfill_killed_mid_run_completes_to_the_same_result(db: TestDb) {
    let expected = uninterrupted_fingerprint(&db, 10, 3, 30).await;
    // The process has migrated the schema once it listens.
    let process = ServerProcess::start(&db.url, &[]).await;
    let rows = seed_legacy(&db, 10, 3, 30).await;
    let mut client = MigrationServiceClient::new(process.channel().await);
    client
        .transition_phase(TransitionPhaseRequest {
            target: MigrationPhase::DualWrite.into(),
            force: false,
            reason: "test".into(),
            actor: "tester".into(),
        })
        .await
        .expect("transition");
    let run_id = slow_backfill_under_way(&mut client, 5).await;
    process.kill().await;
    let killed_at = db
        .scalar(&format!(
            "SELECT processed FROM migration_runs WHERE run_id = '{run_id}'"
        ))
        .await;
    assert!(
        killed_at >= 50 && (killed_at as u64) < rows,
        "killed after {killed_at} of {rows} rows"
    );
    let half_done = rollup_fingerprint(&db).await;
    assert!(half_done > 0 && half_done < expected);

    let server = db.start_server_keeping_phase().await;
    let mut client = MigrationServiceClient::new(server.channel().await);
    let run = backfill(&mut client, false, 1000).await;
    assert_eq!((run.state.as_str(), run.processed), ("completed", rows));
    assert_eq!(rollup_fingerprint(&db).await, expected);
    move_to(&server, MigrationPhase::Backfilled).await;
    let verified = verify(&mut client, "2025-01-01", "2025-12-31").await;
    assert!(verified.compared > 0);
    assert_eq!(verified.mismatches, 0, "{verified:?}");
    server.stop().await;
}

async fn a_real_backfill_needs_dual_write(db: TestDb) {
    let server = db.start_server().await;
    let mut client = MigrationServiceClient::new(server.channel().await);
    let status = client
        .start_backfill(StartBackfillRequest {
            dry_run: false,
            batch_size: 0,
            throttle_ms: 0,
            actor: String::new(),
        })
        .await
        .expect_err("LEGACY_ONLY");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("DUAL_WRITE"),
        "{}",
        status.message()
    );
    let status = client
        .start_backfill(StartBackfillRequest {
            dry_run: true,
            batch_size: 50_001,
            throttle_ms: 0,
            actor: String::new(),
        })
        .await
        .expect_err("batch too large");
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = client
        .get_run(GetRunRequest {
            run_id: "nope".into(),
        })
        .await
        .expect_err("unknown run");
    assert_eq!(status.code(), Code::NotFound);
    server.stop().await;
}

async fn verify(
    client: &mut MigrationServiceClient<Channel>,
    start: &str,
    end: &str,
) -> VerifyConsistencyResponse {
    client
        .verify_consistency(VerifyConsistencyRequest {
            start_date: start.into(),
            end_date: end.into(),
            actor: "tester".into(),
        })
        .await
        .expect("VerifyConsistency")
        .into_inner()
}

/// Every seeded campaign's totals over 2025, and the storage that answered.
async fn all_totals(
    stats: &mut StatsServiceClient<Channel>,
    users: u32,
    campaigns: u32,
) -> Vec<GetStatsForCampaignsResponse> {
    let mut answers = Vec::new();
    for user in 0..users {
        let campaign_ids = (0..campaigns)
            .filter(|c| c % users == user)
            .map(|c| format!("camp-{c:03}"))
            .collect();
        let answer = stats
            .get_stats_for_campaigns(GetStatsForCampaignsRequest {
                user_id: format!("user-{user}"),
                campaign_ids,
                start_date: "2025-01-01".into(),
                end_date: "2025-12-31".into(),
            })
            .await
            .expect("GetStatsForCampaigns")
            .into_inner();
        answers.push(answer);
    }
    answers
}

/// The answers without their `source`.
fn numbers(
    answers: &[GetStatsForCampaignsResponse],
) -> Vec<(String, Option<campaign_stats::grpc::proto::Metrics>)> {
    answers
        .iter()
        .flat_map(|a| a.stats.iter().map(|s| (s.campaign_id.clone(), s.metrics)))
        .collect()
}

async fn legacy_to_new_primary_keeps_every_total_while_events_arrive(db: TestDb) {
    let server = db.start_server().await;
    seed_legacy(&db, 12, 4, 40).await;
    let mut client = MigrationServiceClient::new(server.channel().await);
    let mut stats = server.stats().await;
    let arrive = |i: u32| RecordEventsRequest {
        events: (0..12)
            .map(|c| {
                event(
                    &format!("user-{}", c % 4),
                    &format!("camp-{c:03}"),
                    EventType::Sent,
                    1 + i,
                    "2025-01-15",
                )
            })
            .collect(),
    };

    stats
        .record_events(arrive(0))
        .await
        .expect("events in LEGACY_ONLY");
    move_to(&server, MigrationPhase::DualWrite).await;
    stats
        .record_events(arrive(1))
        .await
        .expect("events in DUAL_WRITE");
    let run = backfill(&mut client, false, 50).await;
    assert_eq!(run.state, "completed");
    stats
        .record_events(arrive(2))
        .await
        .expect("events after the backfill");
    move_to(&server, MigrationPhase::Backfilled).await;

    let report = verify(&mut client, "", "").await;
    assert_eq!(report.mismatches, 0, "{:?}", report.sample);
    assert!(report.compared > 400, "{report:?}");
    // The rows the backfill reported are counted apart.
    assert_eq!(report.ambiguous, AMBIGUOUS_ROWS);
    let before = all_totals(&mut stats, 4, 12).await;
    assert!(
        before
            .iter()
            .all(|a| a.source == i32::from(StorageSource::Legacy))
    );

    // The operator looked at the reported rows and leaves them out.
    let skipped = resolve(
        &mut client,
        resolve_request(AmbiguousResolution::Skip, &[], &[]),
    )
    .await;
    assert_eq!((skipped.resolved, skipped.unresolved), (AMBIGUOUS_ROWS, 0));
    move_to(&server, MigrationPhase::Verified).await;
    move_to(&server, MigrationPhase::NewPrimary).await;
    let after = all_totals(&mut stats, 4, 12).await;
    assert!(
        after
            .iter()
            .all(|a| a.source == i32::from(StorageSource::New))
    );
    assert_eq!(numbers(&after), numbers(&before));

    // Events keep arriving in NEW_PRIMARY, and both storages still agree.
    stats
        .record_events(arrive(3))
        .await
        .expect("events in NEW_PRIMARY");
    assert_eq!(
        verify(&mut client, "2025-01-01", "2025-12-31")
            .await
            .mismatches,
        0
    );
    server.stop().await;
}

async fn verify_names_a_difference_planted_in_either_storage(db: TestDb) {
    let server = db.start_server().await;
    seed_legacy(&db, 4, 2, 30).await;
    let mut client = MigrationServiceClient::new(server.channel().await);
    move_to(&server, MigrationPhase::DualWrite).await;
    backfill(&mut client, false, 1000).await;
    assert_eq!(
        verify(&mut client, "2025-01-01", "2025-12-31")
            .await
            .mismatches,
        0
    );

    // In legacy: one more send on one row.
    db.execute("UPDATE campaign_daily_stat_entries SET sent = sent + 1 WHERE campaign_id = 'camp-001' AND stat_date = '2025-01-10'").await;
    let report = verify(&mut client, "2025-01-01", "2025-12-31").await;
    assert_eq!(report.mismatches, 1);
    let m = &report.sample[0];
    assert_eq!(
        (
            m.campaign_id.as_str(),
            m.user_id.as_str(),
            m.date.as_str(),
            m.metric.as_str()
        ),
        ("camp-001", "user-1", "2025-01-10", "sent")
    );
    assert_eq!(m.legacy, m.new + 1);
    // A clean verify is required for VERIFIED: this one is not.
    move_to(&server, MigrationPhase::Backfilled).await;
    let status = server
        .transition(MigrationPhase::Verified, false, "x")
        .await
        .expect_err("mismatches");
    assert_eq!(status.code(), Code::FailedPrecondition);
    db.execute("UPDATE campaign_daily_stat_entries SET sent = sent - 1 WHERE campaign_id = 'camp-001' AND stat_date = '2025-01-10'").await;

    // In the new storage: a bounce that legacy never saw.
    db.execute("INSERT INTO campaign_day_totals (user_id, campaign_id, day, bounced) VALUES ('user-0', 'camp-002', '2025-03-01', 2)").await;
    let report = verify(&mut client, "", "").await;
    assert_eq!(report.mismatches, 1);
    let m = &report.sample[0];
    assert_eq!(
        (
            m.campaign_id.as_str(),
            m.date.as_str(),
            m.metric.as_str(),
            m.legacy,
            m.new
        ),
        ("camp-002", "2025-03-01", "bounced", 0, 2)
    );
    // Outside the range asked for, it is not seen.
    assert_eq!(
        verify(&mut client, "2025-01-01", "2025-02-28")
            .await
            .mismatches,
        0
    );

    let status = client
        .verify_consistency(VerifyConsistencyRequest {
            start_date: "2025-01-01".into(),
            end_date: String::new(),
            actor: String::new(),
        })
        .await
        .expect_err("half a range");
    crate::common::assert_names_fields(&status, Code::InvalidArgument, &["end_date"]);
    // Each verify is recorded as a run.
    let run = client
        .get_run(GetRunRequest {
            run_id: report.run_id,
        })
        .await
        .expect("run")
        .into_inner();
    assert_eq!(
        (run.kind.as_str(), run.state.as_str(), run.mismatches),
        ("verify", "completed", 1)
    );
    server.stop().await;
}

async fn storage_report_compares_both_storages(db: TestDb) {
    let server = db.start_server().await;
    let rows = seed_legacy(&db, 10, 2, 30).await;
    let mut client = MigrationServiceClient::new(server.channel().await);
    move_to(&server, MigrationPhase::DualWrite).await;
    backfill(&mut client, false, 1000).await;
    let report = client
        .get_storage_report(campaign_stats::grpc::proto::GetStorageReportRequest {})
        .await
        .expect("GetStorageReport")
        .into_inner();
    assert_eq!(report.legacy_rows, rows);
    let zero = db
        .scalar("SELECT COUNT(*) FROM campaign_daily_stat_entries WHERE sent = 0 AND opened = 0 AND replied = 0 AND positive_replies = 0 AND bounced = 0")
        .await;
    assert_eq!(report.legacy_zero_rows, zero as u64);
    assert!(zero > 0);
    // Backfilled history is kept as rollups, not as synthesized events.
    let events = db.scalar("SELECT COUNT(*) FROM events").await as u64;
    let rollups = db.scalar("SELECT COUNT(*) FROM campaign_day_totals").await as u64;
    assert!(events == 0 && rollups > 0);
    let tables: Vec<(&str, &str, u64)> = report
        .tables
        .iter()
        .map(|t| (t.table.as_str(), t.storage.as_str(), t.rows))
        .collect();
    assert_eq!(tables[0], ("campaign_daily_stat_entries", "legacy", rows));
    assert!(tables.contains(&("events", "new", events)));
    assert!(tables.contains(&("campaign_day_totals", "new", rollups)));
    assert!(
        report.tables.iter().all(|t| t.bytes > 0),
        "{:?}",
        report.tables
    );
    assert_eq!(
        report.new_rows,
        report
            .tables
            .iter()
            .filter(|t| t.storage == "new")
            .map(|t| t.rows)
            .sum::<u64>()
    );
    assert!(report.legacy_bytes > 0 && report.new_bytes > 0);
    server.stop().await;
}

fn resolve_request(
    resolution: AmbiguousResolution,
    kinds: &[AmbiguityKind],
    rows: &[(&str, &str)],
) -> ResolveAmbiguousRowsRequest {
    ResolveAmbiguousRowsRequest {
        resolution: resolution.into(),
        reason: "checked with the campaign owner".into(),
        actor: "ops@example.com".into(),
        rows: rows
            .iter()
            .map(|(campaign, date)| LegacyRowKey {
                campaign_id: (*campaign).into(),
                date: (*date).into(),
            })
            .collect(),
        kinds: kinds.iter().map(|k| (*k).into()).collect(),
    }
}

async fn resolve(
    client: &mut MigrationServiceClient<Channel>,
    request: ResolveAmbiguousRowsRequest,
) -> ResolveAmbiguousRowsResponse {
    client
        .resolve_ambiguous_rows(request)
        .await
        .expect("ResolveAmbiguousRows")
        .into_inner()
}

async fn report(
    client: &mut MigrationServiceClient<Channel>,
    run_id: &str,
) -> GetRunReportResponse {
    client
        .get_run_report(GetRunReportRequest {
            run_id: run_id.into(),
        })
        .await
        .expect("GetRunReport")
        .into_inner()
}

/// The new storage's sent, replied and positive replies of one campaign (all days).
async fn copied(db: &TestDb, campaign: &str) -> (i64, i64, i64) {
    let sum = |column: &str| {
        format!(
            "SELECT COALESCE(SUM({column}), 0) FROM campaign_day_totals \
             WHERE campaign_id = '{campaign}'"
        )
    };
    (
        db.scalar(&sum("sent")).await,
        db.scalar(&sum("replied")).await,
        db.scalar(&sum("positive_replies")).await,
    )
}

/// Whether the newest phase change was forced.
async fn last_move_forced(client: &mut MigrationServiceClient<Channel>) -> bool {
    client
        .list_phase_transitions(ListPhaseTransitionsRequest { limit: 1 })
        .await
        .expect("history")
        .into_inner()
        .transitions[0]
        .forced
}

async fn ambiguous_rows_are_resolved_by_copy_or_skip_and_hold_verified_back(db: TestDb) {
    let server = db.start_server().await;
    seed_legacy(&db, 6, 2, 20).await;
    let mut client = MigrationServiceClient::new(server.channel().await);
    move_to(&server, MigrationPhase::DualWrite).await;
    let run = backfill(&mut client, false, 50).await;
    assert_eq!(run.ambiguous, AMBIGUOUS_ROWS, "{run:?}");
    let first = report(&mut client, &run.run_id).await;
    assert_eq!((first.resolved, first.unresolved), (0, AMBIGUOUS_ROWS));
    let mut kinds: Vec<(String, AmbiguityKind)> = first
        .ambiguous
        .iter()
        .map(|i| (i.campaign_id.clone(), i.kind()))
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            ("bad-negative".into(), AmbiguityKind::NegativeCount),
            ("bad-null".into(), AmbiguityKind::NullCount),
            (
                "bad-positive".into(),
                AmbiguityKind::PositiveRepliesAboveReplied
            ),
            ("bad-shared".into(), AmbiguityKind::SeveralUsers),
            ("bad-shared".into(), AmbiguityKind::SeveralUsers),
        ]
    );
    move_to(&server, MigrationPhase::Backfilled).await;
    let clean = verify(&mut client, "", "").await;
    assert_eq!(clean.mismatches, 0, "{clean:?}");
    assert_eq!(
        (
            clean.ambiguous,
            clean.ambiguous_resolved,
            clean.ambiguous_unresolved
        ),
        (AMBIGUOUS_ROWS, 0, AMBIGUOUS_ROWS)
    );

    // Unresolved rows hold VERIFIED back, with the count.
    let refused = server
        .transition(MigrationPhase::Verified, false, "test")
        .await
        .expect_err("unresolved rows");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused
            .message()
            .contains("ambiguous rows of the last backfill: 5"),
        "{refused:?}"
    );

    // Bad requests name their fields, and resolve nothing.
    let mut bad = resolve_request(
        AmbiguousResolution::Unspecified,
        &[],
        &[("c", "2025-13-01")],
    );
    bad.reason = String::new();
    let status = client
        .resolve_ambiguous_rows(bad)
        .await
        .expect_err("invalid");
    assert_names_fields(
        &status,
        Code::InvalidArgument,
        &["resolution", "reason", "rows[0].date"],
    );

    // COPY of every row is refused as a whole: a negative count and a shared campaign
    // cannot be copied.
    let status = client
        .resolve_ambiguous_rows(resolve_request(AmbiguousResolution::Copy, &[], &[]))
        .await
        .expect_err("uncopiable rows");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("cannot copy 3"), "{status:?}");
    assert_eq!(
        report(&mut client, &run.run_id).await.unresolved,
        AMBIGUOUS_ROWS
    );
    assert_eq!(copied(&db, "bad-null").await, (0, 0, 0));

    // COPY by kind: NULL read as 0, more positive replies than replies taken as they are.
    let copy = resolve(
        &mut client,
        resolve_request(
            AmbiguousResolution::Copy,
            &[
                AmbiguityKind::NullCount,
                AmbiguityKind::PositiveRepliesAboveReplied,
            ],
            &[],
        ),
    )
    .await;
    assert_eq!((copy.resolved, copy.copied, copy.unresolved), (2, 2, 3));
    assert!(copy.resolution_id > 0);
    assert_eq!(copied(&db, "bad-null").await, (1, 0, 0));
    assert_eq!(copied(&db, "bad-positive").await, (5, 1, 2));
    // Resolving the same rows again finds nothing left to do.
    let again = resolve(
        &mut client,
        resolve_request(AmbiguousResolution::Copy, &[AmbiguityKind::NullCount], &[]),
    )
    .await;
    assert_eq!((again.resolved, again.resolution_id), (0, 0));

    // SKIP by row.
    let skip = resolve(
        &mut client,
        resolve_request(
            AmbiguousResolution::Skip,
            &[],
            &[("bad-negative", "2025-02-01")],
        ),
    )
    .await;
    assert_eq!((skip.resolved, skip.copied, skip.unresolved), (1, 0, 2));

    // Verify compares the copied rows and sets the skipped and unresolved ones apart.
    let after = verify(&mut client, "", "").await;
    assert_eq!(after.mismatches, 0, "{after:?}");
    assert_eq!(
        (
            after.ambiguous,
            after.ambiguous_resolved,
            after.ambiguous_unresolved
        ),
        (3, 1, 2)
    );

    // Forced past the two unresolved rows: allowed, and the history says so.
    server
        .transition(
            MigrationPhase::Verified,
            true,
            "shared campaigns are tracked in TICKET-1",
        )
        .await
        .expect("forced transition");
    assert!(last_move_forced(&mut client).await);

    // Back, resolve the rest, and VERIFIED needs no force.
    move_to(&server, MigrationPhase::Backfilled).await;
    let rest = resolve(
        &mut client,
        resolve_request(AmbiguousResolution::Skip, &[], &[]),
    )
    .await;
    assert_eq!((rest.resolved, rest.unresolved), (2, 0));
    move_to(&server, MigrationPhase::Verified).await;
    assert!(!last_move_forced(&mut client).await);

    let done = report(&mut client, &run.run_id).await;
    assert_eq!((done.resolved, done.unresolved), (AMBIGUOUS_ROWS, 0));
    let mut resolutions: Vec<(String, AmbiguousResolution)> = done
        .ambiguous
        .iter()
        .map(|i| (i.campaign_id.clone(), i.resolution()))
        .collect();
    resolutions.sort();
    assert_eq!(
        resolutions,
        [
            ("bad-negative".into(), AmbiguousResolution::Skip),
            ("bad-null".into(), AmbiguousResolution::Copy),
            ("bad-positive".into(), AmbiguousResolution::Copy),
            ("bad-shared".into(), AmbiguousResolution::Skip),
            ("bad-shared".into(), AmbiguousResolution::Skip),
        ]
    );

    // Each call is audited: who, why, what it covered, how many.
    let audit = client
        .list_ambiguous_resolutions(ListAmbiguousResolutionsRequest { limit: 0 })
        .await
        .expect("resolutions")
        .into_inner()
        .resolutions;
    let entries: Vec<(AmbiguousResolution, &str, u64, u64)> = audit
        .iter()
        .map(|r| (r.resolution(), r.filter.as_str(), r.rows, r.copied))
        .collect();
    assert_eq!(
        entries,
        [
            (AmbiguousResolution::Skip, "all", 2, 0),
            (
                AmbiguousResolution::Skip,
                "rows=bad-negative/2025-02-01",
                1,
                0
            ),
            (
                AmbiguousResolution::Copy,
                "kinds=null-count,positive-replies-above-replied",
                2,
                2
            ),
        ]
    );
    assert!(
        audit
            .iter()
            .all(|r| r.actor == "ops@example.com" && r.reason == "checked with the campaign owner")
    );

    // A later backfill honours the resolutions: the rows are reported again, already
    // resolved, and nothing is copied twice.
    move_to(&server, MigrationPhase::DualWrite).await;
    let later = backfill(&mut client, false, 50).await;
    assert_eq!(
        (later.ambiguous, later.copied),
        (AMBIGUOUS_ROWS, 0),
        "{later:?}"
    );
    let later_report = report(&mut client, &later.run_id).await;
    assert_eq!(
        (later_report.resolved, later_report.unresolved),
        (AMBIGUOUS_ROWS, 0)
    );
    assert_eq!(copied(&db, "bad-null").await, (1, 0, 0));
    assert_eq!(copied(&db, "bad-positive").await, (5, 1, 2));
    server.stop().await;
}
