//! The migration phases: the phase machine, and writes and reads following the phase.

use campaign_stats::grpc::proto::migration_service_client::MigrationServiceClient;
use campaign_stats::grpc::proto::{
    EventType, GetMigrationStateRequest, ListPhaseTransitionsRequest, MigrationPhase,
    RecordEventRequest, StorageSource, TransitionPhaseRequest,
};
use tonic::Code;
use tonic::transport::Channel;

use crate::common::{Backend, TestDb, assert_names_fields, campaign_metrics, event};

crate::on_both_backends!(
    a_new_database_starts_legacy_only,
    forward_one_step_back_to_any_and_every_move_is_recorded,
    transition_names_bad_fields,
    writes_follow_the_phase,
    legacy_rows_grow_in_place_and_are_never_all_zero,
    a_campaign_in_the_legacy_table_belongs_to_its_legacy_user,
    a_failed_legacy_write_leaves_neither_storage_changed,
);

fn transition(target: MigrationPhase, reason: &str) -> TransitionPhaseRequest {
    TransitionPhaseRequest {
        force: false,
        target: target.into(),
        reason: reason.into(),
        actor: "ops@example.com".into(),
    }
}

async fn phase_of(client: &mut MigrationServiceClient<Channel>) -> MigrationPhase {
    let state = client
        .get_migration_state(GetMigrationStateRequest {})
        .await
        .expect("GetMigrationState")
        .into_inner();
    MigrationPhase::try_from(state.phase).expect("a known phase")
}

async fn a_new_database_starts_legacy_only(db: TestDb) {
    let server = db.start_server().await;
    let mut client = MigrationServiceClient::new(server.channel().await);
    let state = client
        .get_migration_state(GetMigrationStateRequest {})
        .await
        .expect("GetMigrationState")
        .into_inner();
    assert_eq!(state.phase, i32::from(MigrationPhase::LegacyOnly));
    assert_eq!(
        state.allowed_transitions,
        [i32::from(MigrationPhase::DualWrite)]
    );
    assert_eq!(state.read_source, i32::from(StorageSource::Legacy));
    assert!(state.writes_legacy && !state.writes_new);
    assert!(state.changed_at.is_some());
    server.stop().await;
}

async fn forward_one_step_back_to_any_and_every_move_is_recorded(db: TestDb) {
    let server = db.start_server().await;
    let mut client = MigrationServiceClient::new(server.channel().await);

    // Forward moves go one step at a time.
    let status = client
        .transition_phase(transition(MigrationPhase::Backfilled, "skip ahead"))
        .await
        .expect_err("two steps forward");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("one phase at a time"),
        "{}",
        status.message()
    );

    let state = client
        .transition_phase(transition(MigrationPhase::DualWrite, "start dual-write"))
        .await
        .expect("LEGACY_ONLY -> DUAL_WRITE")
        .into_inner();
    assert_eq!(state.phase, i32::from(MigrationPhase::DualWrite));
    assert!(state.writes_legacy && state.writes_new);
    assert_eq!(state.read_source, i32::from(StorageSource::Legacy));
    assert_eq!(
        state.allowed_transitions,
        [
            i32::from(MigrationPhase::LegacyOnly),
            i32::from(MigrationPhase::Backfilled)
        ]
    );

    // BACKFILLED needs a completed backfill; none ran.
    let status = client
        .transition_phase(transition(MigrationPhase::Backfilled, "no backfill yet"))
        .await
        .expect_err("no backfill");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("backfill"),
        "{}",
        status.message()
    );
    assert_eq!(phase_of(&mut client).await, MigrationPhase::DualWrite);

    // Asking for the current phase again is a safe retry: nothing changes, nothing is recorded.
    client
        .transition_phase(transition(MigrationPhase::DualWrite, "retry"))
        .await
        .expect("same phase");

    // Back to any earlier phase at any time: the rollback.
    client
        .transition_phase(transition(MigrationPhase::LegacyOnly, "roll back"))
        .await
        .expect("DUAL_WRITE -> LEGACY_ONLY");
    client
        .transition_phase(transition(MigrationPhase::DualWrite, "again"))
        .await
        .expect("LEGACY_ONLY -> DUAL_WRITE");

    let history = client
        .list_phase_transitions(ListPhaseTransitionsRequest { limit: 0 })
        .await
        .expect("history")
        .into_inner()
        .transitions;
    let moves: Vec<(i32, i32, &str)> = history
        .iter()
        .map(|t| (t.from, t.to, t.reason.as_str()))
        .collect();
    assert_eq!(
        moves,
        [
            (
                MigrationPhase::LegacyOnly.into(),
                MigrationPhase::DualWrite.into(),
                "again"
            ),
            (
                MigrationPhase::DualWrite.into(),
                MigrationPhase::LegacyOnly.into(),
                "roll back"
            ),
            (
                MigrationPhase::LegacyOnly.into(),
                MigrationPhase::DualWrite.into(),
                "start dual-write"
            ),
        ]
    );
    assert!(
        history
            .iter()
            .all(|t| t.actor == "ops@example.com" && t.at.is_some())
    );
    let newest = history[0].at.expect("time");
    let oldest = history[2].at.expect("time");
    assert!((newest.seconds, newest.nanos) >= (oldest.seconds, oldest.nanos));
    server.stop().await;
}

async fn transition_names_bad_fields(db: TestDb) {
    let server = db.start_server().await;
    let mut client = MigrationServiceClient::new(server.channel().await);
    for (request, fields) in [
        (
            TransitionPhaseRequest {
                force: false,
                target: 0,
                reason: "x".into(),
                actor: String::new(),
            },
            vec!["target"],
        ),
        (
            TransitionPhaseRequest {
                force: false,
                target: 99,
                reason: "x".into(),
                actor: String::new(),
            },
            vec!["target"],
        ),
        (transition(MigrationPhase::DualWrite, " "), vec!["reason"]),
        (
            TransitionPhaseRequest {
                force: false,
                target: 0,
                reason: String::new(),
                actor: String::new(),
            },
            vec!["target", "reason"],
        ),
    ] {
        let status = client.transition_phase(request).await.expect_err("invalid");
        assert_names_fields(&status, Code::InvalidArgument, &fields);
    }
    assert_eq!(phase_of(&mut client).await, MigrationPhase::LegacyOnly);
    server.stop().await;
}

/// Rows of the raw events table and the sum of the legacy `sent` column.
async fn storage_counts(db: &TestDb) -> (i64, i64) {
    (
        db.scalar("SELECT COUNT(*) FROM events").await,
        db.scalar("SELECT COALESCE(SUM(sent), 0) FROM campaign_daily_stat_entries")
            .await,
    )
}

async fn writes_follow_the_phase(db: TestDb) {
    let server = db.start_server().await;
    let mut stats = server.stats().await;
    let mut migration = MigrationServiceClient::new(server.channel().await);
    let record = |count| RecordEventRequest {
        event: Some(event("u1", "c1", EventType::Sent, count, "2026-03-01")),
    };

    // LEGACY_ONLY: the legacy table only.
    stats.record_event(record(1)).await.expect("record");
    assert_eq!(storage_counts(&db).await, (0, 1));
    // Clicks have no legacy column: they go to the new storage in every phase.
    let click = event("u1", "c1", EventType::Clicked, 4, "2026-03-01");
    stats
        .record_event(RecordEventRequest { event: Some(click) })
        .await
        .expect("click");
    assert_eq!(storage_counts(&db).await, (1, 1));

    // DUAL_WRITE: both, in one transaction.
    migration
        .transition_phase(transition(MigrationPhase::DualWrite, "go"))
        .await
        .expect("dual-write");
    stats.record_event(record(2)).await.expect("record");
    assert_eq!(storage_counts(&db).await, (2, 3));
    assert_eq!(
        db.scalar("SELECT COALESCE(SUM(sent), 0) FROM campaign_day_totals")
            .await,
        2
    );
    // Reads still come from legacy, which has everything.
    assert_eq!(
        campaign_metrics(&mut stats, "u1", "c1", "2026-03-01", "2026-03-01")
            .await
            .sent,
        3
    );

    // Back to LEGACY_ONLY: legacy only again.
    migration
        .transition_phase(transition(MigrationPhase::LegacyOnly, "back"))
        .await
        .expect("rollback");
    stats.record_event(record(4)).await.expect("record");
    assert_eq!(storage_counts(&db).await, (2, 7));
    server.stop().await;
}

async fn legacy_rows_grow_in_place_and_are_never_all_zero(db: TestDb) {
    let server = db.start_server().await;
    // A row the legacy system wrote before the service took over.
    db.execute(
        "INSERT INTO campaign_daily_stat_entries (campaign_id, user_id, stat_date, sent, opened, \
         replied, positive_replies, bounced) VALUES ('c1', 'u1', '2026-03-01', 5, 1, 0, 0, 0)",
    )
    .await;
    let mut stats = server.stats().await;
    stats
        .record_events(campaign_stats::grpc::proto::RecordEventsRequest {
            events: vec![
                event("u1", "c1", EventType::Sent, 2, "2026-03-01"),
                event("u1", "c1", EventType::Replied, 1, "2026-03-01"),
                event("u1", "c1", EventType::Sent, 1, "2026-03-02"),
                // Only a click on 2026-03-03: no legacy row for that day.
                event("u1", "c1", EventType::Clicked, 1, "2026-03-03"),
            ],
        })
        .await
        .expect("record");
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM campaign_daily_stat_entries")
            .await,
        2
    );
    assert_eq!(
        db.scalar("SELECT sent * 100 + replied * 10 + opened FROM campaign_daily_stat_entries WHERE stat_date = '2026-03-01'").await,
        711
    );
    let metrics = campaign_metrics(&mut stats, "u1", "c1", "2026-03-01", "2026-03-31").await;
    assert_eq!(
        (
            metrics.sent,
            metrics.opened,
            metrics.replied,
            metrics.clicked
        ),
        // The click lives in the new storage only, and a legacy read shows it.
        (8, 1, 1, 1)
    );
    server.stop().await;
}

async fn a_campaign_in_the_legacy_table_belongs_to_its_legacy_user(db: TestDb) {
    let server = db.start_server().await;
    db.execute(
        "INSERT INTO campaign_daily_stat_entries (campaign_id, user_id, stat_date, sent) \
         VALUES ('old', 'legacy-user', '2025-06-01', 3)",
    )
    .await;
    let mut stats = server.stats().await;
    let status = stats
        .record_event(RecordEventRequest {
            event: Some(event(
                "someone-else",
                "old",
                EventType::Sent,
                1,
                "2026-03-01",
            )),
        })
        .await
        .expect_err("the legacy table says whose campaign it is");
    assert_names_fields(&status, Code::PermissionDenied, &["event.campaign_id"]);
    stats
        .record_event(RecordEventRequest {
            event: Some(event(
                "legacy-user",
                "old",
                EventType::Sent,
                1,
                "2026-03-01",
            )),
        })
        .await
        .expect("its owner may write");
    assert_eq!(
        campaign_metrics(&mut stats, "legacy-user", "old", "2025-01-01", "2026-12-31")
            .await
            .sent,
        4
    );
    assert_eq!(
        campaign_metrics(
            &mut stats,
            "someone-else",
            "old",
            "2025-01-01",
            "2026-12-31"
        )
        .await
        .sent,
        0
    );
    server.stop().await;
}

async fn a_failed_legacy_write_leaves_neither_storage_changed(db: TestDb) {
    let server = db.start_server().await;
    let mut migration = MigrationServiceClient::new(server.channel().await);
    migration
        .transition_phase(transition(MigrationPhase::DualWrite, "dual"))
        .await
        .expect("dual-write");
    // The failure: the legacy table refuses writes, as a broken or locked legacy table would.
    // On PostgreSQL it is a serialization failure (retryable); on SQLite, an aborting trigger.
    match db.backend {
        Backend::Postgres => {
            db.execute(
                "CREATE FUNCTION refuse_legacy() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
                 RAISE EXCEPTION 'injected legacy failure' USING ERRCODE = '40001'; END $$; \
                 CREATE TRIGGER refuse_legacy BEFORE INSERT OR UPDATE ON campaign_daily_stat_entries \
                 FOR EACH ROW EXECUTE FUNCTION refuse_legacy();",
            )
            .await
        }
        Backend::Sqlite => {
            db.execute(
                "CREATE TRIGGER refuse_legacy BEFORE INSERT ON campaign_daily_stat_entries \
                 BEGIN SELECT RAISE(ABORT, 'injected legacy failure'); END;",
            )
            .await
        }
    }
    let mut stats = server.stats().await;
    let sent = RecordEventRequest {
        event: Some(crate::common::event(
            "u1",
            "c1",
            EventType::Sent,
            3,
            "2026-03-01",
        )),
    };
    let mut keyed = sent.clone();
    keyed.event.as_mut().expect("event").idempotency_key = "retry-me".into();
    let status = stats
        .record_event(keyed.clone())
        .await
        .expect_err("the legacy write fails");
    match db.backend {
        Backend::Postgres => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        Backend::Sqlite => assert_eq!(status.code(), Code::Internal, "{status:?}"),
    }
    assert!(
        !status.message().contains("injected"),
        "internal details leaked: {status:?}"
    );
    for table in [
        "events",
        "campaign_day_totals",
        "all_day_totals",
        "campaign_daily_stat_entries",
        "idempotency_keys",
        "campaigns",
    ] {
        assert_eq!(
            db.scalar(&format!("SELECT COUNT(*) FROM {table}")).await,
            0,
            "{table} changed"
        );
    }
    // Once the legacy table accepts writes again, the retry succeeds and counts once.
    db.execute(match db.backend {
        Backend::Postgres => "DROP TRIGGER refuse_legacy ON campaign_daily_stat_entries",
        Backend::Sqlite => "DROP TRIGGER refuse_legacy",
    })
    .await;
    let retried = stats.record_event(keyed).await.expect("retry").into_inner();
    assert!(!retried.duplicate);
    assert_eq!(
        db.scalar("SELECT COALESCE(SUM(sent), 0) FROM campaign_daily_stat_entries")
            .await,
        3
    );
    assert_eq!(
        db.scalar("SELECT COALESCE(SUM(sent + opened + clicked + replied + positive_replies + bounced), 0) FROM campaign_day_totals")
            .await,
        3
    );
    server.stop().await;
}
