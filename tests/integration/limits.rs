//! Bad input of any size and shape: every status stays small enough for any client to read,
//! and text that storage could not hold or a terminal would misread is refused, naming the
//! field, before anything is stored (issue 8, defects 2 to 4).

use campaign_stats::grpc::proto::migration_service_client::MigrationServiceClient;
use campaign_stats::grpc::proto::rollout_service_client::RolloutServiceClient;
use campaign_stats::grpc::proto::{
    EventType, GetRolloutRequest, GetRunReportRequest, GetRunRequest, GetStatsRequest,
    KillSwitchRequest, ListPhaseTransitionsRequest, ListRolloutHistoryRequest,
    ListUserOverridesRequest, RecordEventsRequest, SetRolloutPercentageRequest,
    SetUserOverrideRequest, StartBackfillRequest, StorageSource, TransitionPhaseRequest,
    VerifyConsistencyRequest,
};
use campaign_stats::grpc::{MAX_STATUS_BYTES, status_header_bytes};
use tonic::Code;
use tonic_types::StatusExt;

use crate::common::{TestDb, assert_names_fields, event};

crate::on_both_backends!(
    a_status_stays_small_whatever_the_input,
    control_characters_are_refused_in_every_text_field,
    free_text_has_a_length_limit,
);

async fn a_status_stays_small_whatever_the_input(db: TestDb) {
    let server = db.start_server().await;
    let mut stats = server.stats().await;

    // 400 bad events: the first violations are listed, the rest counted.
    let events = (0..400)
        .map(|i| {
            event(
                &format!("u{i}"),
                "",
                EventType::Unspecified,
                1,
                "2026-03-01",
            )
        })
        .collect();
    let status = stats
        .record_events(RecordEventsRequest { events })
        .await
        .expect_err("a batch of bad events is refused");
    assert_names_fields(&status, Code::InvalidArgument, &["events[0].campaign_id"]);
    assert!(
        status_header_bytes(&status) < MAX_STATUS_BYTES,
        "{} bytes",
        status_header_bytes(&status)
    );
    let listed = status
        .get_details_bad_request()
        .expect("BadRequest")
        .field_violations;
    assert!(listed.len() <= 50, "{} listed", listed.len());
    assert!(
        status.message().contains("of 800 listed in the details"),
        "the message counts every violation: {}",
        status.message()
    );

    // A 1 MB date is quoted by a short prefix only.
    let huge = "2".repeat(1 << 20);
    let status = stats
        .get_stats(GetStatsRequest {
            user_id: "u1".into(),
            campaign_id: "c1".into(),
            start_date: huge.clone(),
            end_date: "2026-03-01".into(),
        })
        .await
        .expect_err("a bad date is refused");
    assert_names_fields(&status, Code::InvalidArgument, &["start_date"]);
    assert!(
        status_header_bytes(&status) < 1024,
        "{} bytes",
        status_header_bytes(&status)
    );
    assert!(
        status.message().contains("(1048576 bytes)"),
        "{}",
        status.message()
    );

    // An unknown run id of 1 MB: refused as a bad id, also small.
    let mut migration = MigrationServiceClient::new(server.channel().await);
    let status = migration
        .get_run(GetRunRequest { run_id: huge })
        .await
        .expect_err("a huge run id is refused");
    assert_names_fields(&status, Code::InvalidArgument, &["run_id"]);
    assert!(
        status_header_bytes(&status) < 1024,
        "{} bytes",
        status_header_bytes(&status)
    );
    server.stop().await;
}

async fn control_characters_are_refused_in_every_text_field(db: TestDb) {
    let server = db.start_server().await;
    let mut rollout = RolloutServiceClient::new(server.channel().await);
    let mut migration = MigrationServiceClient::new(server.channel().await);
    for bad in ["a\0b", "fake\nrow", "\u{1b}[31mred"] {
        let status = rollout
            .set_rollout_percentage(SetRolloutPercentageRequest {
                percentage: 1.0,
                expected_version: 0,
                reason: bad.into(),
                force: true,
                actor: bad.into(),
            })
            .await
            .expect_err("control characters are refused");
        assert_names_fields(&status, Code::InvalidArgument, &["reason", "actor"]);
        let status = rollout
            .set_user_override(SetUserOverrideRequest {
                user_id: "u1".into(),
                source: StorageSource::New.into(),
                reason: "beta".into(),
                actor: bad.into(),
            })
            .await
            .expect_err("control characters are refused");
        assert_names_fields(&status, Code::InvalidArgument, &["actor"]);
        let status = rollout
            .kill_switch(KillSwitchRequest {
                engaged: true,
                reason: bad.into(),
                actor: "oncall".into(),
            })
            .await
            .expect_err("control characters are refused");
        assert_names_fields(&status, Code::InvalidArgument, &["reason"]);
        let status = rollout
            .list_user_overrides(ListUserOverridesRequest {
                page_size: 10,
                page_token: bad.into(),
            })
            .await
            .expect_err("control characters are refused");
        assert_names_fields(&status, Code::InvalidArgument, &["page_token"]);
        let status = migration
            .transition_phase(TransitionPhaseRequest {
                force: false,
                target: 2,
                reason: bad.into(),
                actor: bad.into(),
            })
            .await
            .expect_err("control characters are refused");
        assert_names_fields(&status, Code::InvalidArgument, &["reason", "actor"]);
        let status = migration
            .start_backfill(StartBackfillRequest {
                dry_run: true,
                batch_size: 10,
                throttle_ms: 0,
                actor: bad.into(),
            })
            .await
            .expect_err("control characters are refused");
        assert_names_fields(&status, Code::InvalidArgument, &["actor"]);
        let status = migration
            .verify_consistency(VerifyConsistencyRequest {
                start_date: String::new(),
                end_date: String::new(),
                actor: bad.into(),
            })
            .await
            .expect_err("control characters are refused");
        assert_names_fields(&status, Code::InvalidArgument, &["actor"]);
        for status in [
            migration
                .get_run(GetRunRequest { run_id: bad.into() })
                .await,
            migration
                .get_run_report(GetRunReportRequest { run_id: bad.into() })
                .await
                .map(|_| tonic::Response::new(Default::default())),
        ] {
            let status = status.expect_err("control characters are refused");
            assert_names_fields(&status, Code::InvalidArgument, &["run_id"]);
        }
        let mut stats = server.stats().await;
        let mut bad_event = event("u1", "c1", EventType::Sent, 1, "2026-03-01");
        bad_event.idempotency_key = bad.into();
        bad_event.email_account_id = bad.into();
        let status = stats
            .record_events(RecordEventsRequest {
                events: vec![bad_event],
            })
            .await
            .expect_err("control characters are refused");
        assert_names_fields(
            &status,
            Code::InvalidArgument,
            &["events[0].idempotency_key", "events[0].email_account_id"],
        );
    }
    // Nothing of it was stored, on either backend.
    let state = rollout
        .get_rollout(GetRolloutRequest {})
        .await
        .expect("GetRollout")
        .into_inner()
        .rollout
        .expect("rollout");
    assert_eq!(state.version, 0);
    let history = rollout
        .list_rollout_history(ListRolloutHistoryRequest {
            page_size: 10,
            page_token: String::new(),
        })
        .await
        .expect("history")
        .into_inner();
    assert!(history.changes.is_empty());
    let transitions = migration
        .list_phase_transitions(ListPhaseTransitionsRequest { limit: 10 })
        .await
        .expect("transitions")
        .into_inner();
    assert!(transitions.transitions.is_empty());
    assert_eq!(db.scalar("SELECT COUNT(*) FROM migration_runs").await, 0);
    server.stop().await;
}

async fn free_text_has_a_length_limit(db: TestDb) {
    let server = db.start_server().await;
    let mut rollout = RolloutServiceClient::new(server.channel().await);
    let longest = "r".repeat(1024);
    let too_long = "r".repeat(1025);
    let megabyte = "r".repeat(1 << 20);
    for reason in [&too_long, &megabyte] {
        let status = rollout
            .set_user_override(SetUserOverrideRequest {
                user_id: "u1".into(),
                source: StorageSource::New.into(),
                reason: reason.clone(),
                actor: reason.clone(),
            })
            .await
            .expect_err("over 1 KiB is refused");
        assert_names_fields(&status, Code::InvalidArgument, &["reason", "actor"]);
        assert!(
            status_header_bytes(&status) < 1024,
            "{} bytes",
            status_header_bytes(&status)
        );
    }
    let accepted = rollout
        .set_user_override(SetUserOverrideRequest {
            user_id: "u1".into(),
            source: StorageSource::New.into(),
            reason: longest.clone(),
            actor: longest.clone(),
        })
        .await
        .expect("1 KiB is accepted")
        .into_inner();
    assert_eq!(accepted.rollout.expect("rollout").version, 1);
    let history = rollout
        .list_rollout_history(ListRolloutHistoryRequest {
            page_size: 10,
            page_token: String::new(),
        })
        .await
        .expect("history")
        .into_inner();
    assert_eq!(history.changes.len(), 1);
    assert_eq!(history.changes[0].reason, longest);
    assert_eq!(history.changes[0].actor, longest);
    server.stop().await;
}
