//! The per-user read rollout: its control API, routing, and propagation between replicas.

use std::time::{Duration, Instant};

use campaign_stats::grpc::proto::rollout_service_client::RolloutServiceClient;
use campaign_stats::grpc::proto::{
    EvaluateUserRequest, EventType, GetStatsRequest, KillSwitchRequest, ListUserOverridesRequest,
    SetRolloutPercentageRequest, StorageSource, WatchRolloutRequest,
};
use campaign_stats::migration::Phase;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::transport::Channel;

use crate::common::api::{TESTER, current_rollout};
use crate::common::{ServerProcess, TestDb, TestServer, assert_names_fields, event};

crate::on_both_backends!(
    changes_are_versioned_audited_and_bounded_by_the_phase,
    racing_controllers_one_wins,
    reads_follow_percentage_override_and_kill_switch,
    a_watcher_sees_the_current_state_then_each_change,
    another_replica_applies_a_change_quickly,
    every_service_reads_messages_up_to_the_same_limit,
    the_migration_state_says_where_reads_go_under_the_kill_switch,
);

/// `GetMigrationState`'s `read_source` comes from the rule that routes reads: in NEW_PRIMARY
/// the kill switch sends reads to LEGACY, and the state says so.
async fn the_migration_state_says_where_reads_go_under_the_kill_switch(db: TestDb) {
    let db = db.in_phase(Phase::NewPrimary);
    let server = db.start_server().await;
    let read_source = server.migration_state().await.read_source;
    assert_eq!(read_source, i32::from(StorageSource::New));
    server.kill_switch(true, "incident").await.expect("kill");
    let read_source = server.migration_state().await.read_source;
    assert_eq!(read_source, i32::from(StorageSource::Legacy));
    let stats = server
        .stats()
        .await
        .get_stats(GetStatsRequest {
            user_id: "u1".into(),
            campaign_id: "c1".into(),
            start_date: "2026-01-01".into(),
            end_date: "2026-01-31".into(),
        })
        .await
        .expect("read")
        .into_inner();
    assert_eq!(stats.source, i32::from(StorageSource::Legacy));
    server.stop().await;
}

async fn client(server: &TestServer) -> RolloutServiceClient<Channel> {
    RolloutServiceClient::new(server.channel().await)
}

fn percentage(percentage: f64, expected_version: u64, force: bool) -> SetRolloutPercentageRequest {
    SetRolloutPercentageRequest {
        percentage,
        expected_version,
        reason: "step".into(),
        force,
        actor: "controller".into(),
    }
}

async fn changes_are_versioned_audited_and_bounded_by_the_phase(db: TestDb) {
    let server = db.start_server().await;
    let mut rollout = client(&server).await;
    let start = current_rollout(&mut rollout).await;
    assert_eq!(
        (
            start.percentage,
            start.version,
            start.kill_switch,
            start.applied_version
        ),
        (0.0, 0, false, 0)
    );

    // Before VERIFIED the percentage stays 0 unless forced; forced, it is staged and audited.
    let status = rollout
        .set_rollout_percentage(percentage(10.0, 0, false))
        .await
        .expect_err("LEGACY_ONLY");
    assert_eq!(status.code(), Code::FailedPrecondition);
    let staged = rollout
        .set_rollout_percentage(percentage(10.0, 0, true))
        .await
        .expect("forced")
        .into_inner();
    assert_eq!(staged.rollout.expect("rollout").version, 1);
    let evaluated = server.evaluate("u1").await;
    assert_eq!(evaluated.source, i32::from(StorageSource::Legacy));
    assert!(
        evaluated.reason.contains("applies from VERIFIED"),
        "{}",
        evaluated.reason
    );

    // A stale expected version is refused, naming the current one.
    let status = rollout
        .set_rollout_percentage(percentage(20.0, 0, true))
        .await
        .expect_err("stale version");
    assert_eq!(status.code(), Code::Aborted);
    assert!(
        status.message().contains("current version is 1"),
        "{}",
        status.message()
    );

    for (bad, field) in [
        (100.01, "percentage"),
        (-1.0, "percentage"),
        (12.345, "percentage"),
        (f64::NAN, "percentage"),
    ] {
        let status = rollout
            .set_rollout_percentage(percentage(bad, 1, true))
            .await
            .expect_err("bad percentage");
        assert_names_fields(&status, Code::InvalidArgument, &[field]);
    }
    let status = rollout
        .set_rollout_percentage(SetRolloutPercentageRequest {
            reason: String::new(),
            ..percentage(5.0, 1, true)
        })
        .await
        .expect_err("no reason");
    assert_names_fields(&status, Code::InvalidArgument, &["reason"]);

    server
        .set_override("beta", StorageSource::New, "beta tester")
        .await
        .expect("override");
    server.clear_override("beta", "done").await.expect("clear");
    // Nothing left to clear: refused, with no new version and no audit entry.
    let again = server
        .clear_override("beta", "again")
        .await
        .expect_err("no override");
    assert_eq!(again.code(), Code::NotFound, "{again:?}");
    server.kill_switch(true, "incident").await.expect("kill");
    let after = server.current_rollout().await;
    assert_eq!(
        (after.version, after.kill_switch, after.percentage),
        (4, true, 10.0)
    );

    let history = server.rollout_history(0, "").await.changes;
    let entries: Vec<(u64, &str, &str, &str, &str, &str)> = history
        .iter()
        .map(|c| {
            (
                c.version,
                c.actor.as_str(),
                c.change.as_str(),
                c.before.as_str(),
                c.after.as_str(),
                c.reason.as_str(),
            )
        })
        .collect();
    assert_eq!(
        entries,
        [
            (4, TESTER, "kill switch", "released", "engaged", "incident"),
            (3, TESTER, "override beta", "new", "none", "done"),
            (2, TESTER, "override beta", "none", "new", "beta tester"),
            (
                1,
                "controller",
                "percentage (forced)",
                "0.00%",
                "10.00%",
                "step"
            ),
        ]
    );
    // Paging, newest first.
    let page = server.rollout_history(3, "").await;
    assert_eq!(page.changes.len(), 3);
    let rest = server.rollout_history(3, &page.next_page_token).await;
    assert_eq!(
        rest.changes.iter().map(|c| c.version).collect::<Vec<_>>(),
        [1]
    );
    server.stop().await;
}

async fn racing_controllers_one_wins(db: TestDb) {
    let db = db.in_phase(Phase::Verified);
    let server = db.start_server().await;
    let mut first = client(&server).await;
    let mut second = client(&server).await;
    let (a, b) = tokio::join!(
        first.set_rollout_percentage(percentage(5.0, 0, false)),
        second.set_rollout_percentage(percentage(7.0, 0, false)),
    );
    let codes = [
        a.as_ref().err().map(|s| s.code()),
        b.as_ref().err().map(|s| s.code()),
    ];
    assert!(
        codes == [None, Some(Code::Aborted)] || codes == [Some(Code::Aborted), None],
        "exactly one must win: {a:?} / {b:?}"
    );
    assert_eq!(current_rollout(&mut first).await.version, 1);
    server.stop().await;
}

async fn reads_follow_percentage_override_and_kill_switch(db: TestDb) {
    let db = db.in_phase(Phase::Verified);
    let server = db.start_server().await;
    let mut rollout = client(&server).await;
    let users: Vec<String> = (0..40).map(|i| format!("user-{i}")).collect();
    // Each user has one send, written to both storages (VERIFIED writes both).
    let events = users
        .iter()
        .map(|u| event(u, &format!("c-{u}"), EventType::Sent, 1, "2026-01-10"))
        .collect();
    server.record(events).await;
    // Legacy gets one more send per campaign, so the numbers tell the storages apart too.
    db.execute("UPDATE campaign_daily_stat_entries SET sent = sent + 1")
        .await;

    let read = |user: String| {
        let server = &server;
        async move {
            let campaign = format!("c-{user}");
            let response = server
                .get_stats(&user, &campaign, "2026-01-01", "2026-01-31")
                .await;
            (response.source, response.metrics.unwrap_or_default().sent)
        }
    };
    let expect = |source: StorageSource| {
        (
            i32::from(source),
            if source == StorageSource::New { 1 } else { 2 },
        )
    };

    rollout
        .set_rollout_percentage(percentage(50.0, 0, false))
        .await
        .expect("50%");
    let salt = server.current_rollout().await.salt;
    let mut on_new = 0;
    for user in &users {
        let in_range = campaign_stats::rollout::bucket(&salt, user) < 5_000;
        on_new += usize::from(in_range);
        let expected = if in_range {
            StorageSource::New
        } else {
            StorageSource::Legacy
        };
        assert_eq!(read(user.clone()).await, expect(expected), "{user}");
        let evaluated = server.evaluate(user).await;
        assert_eq!(evaluated.source, i32::from(expected));
        assert_eq!(
            evaluated.bucket,
            campaign_stats::rollout::bucket(&salt, user)
        );
    }
    assert!(on_new > 5 && on_new < 35, "{on_new} of 40 users in NEW");

    // An override wins over the percentage.
    let legacy_user = users
        .iter()
        .find(|u| campaign_stats::rollout::bucket(&salt, u) >= 5_000)
        .expect("a LEGACY user")
        .clone();
    server
        .set_override(&legacy_user, StorageSource::New, "beta")
        .await
        .expect("override");
    assert_eq!(read(legacy_user.clone()).await, expect(StorageSource::New));
    let listed = rollout
        .list_user_overrides(ListUserOverridesRequest {
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.overrides.len(), 1);

    // The all-users view is routed as the pseudo-user "*".
    let all_users = || async {
        server
            .all_users_daily("2026-01-01", "2026-01-31")
            .await
            .source
    };
    let star = campaign_stats::rollout::bucket(&salt, "*") < 5_000;
    assert_eq!(
        all_users().await,
        expect(if star {
            StorageSource::New
        } else {
            StorageSource::Legacy
        })
        .0
    );
    server
        .set_override("*", StorageSource::Legacy, "operator view stays")
        .await
        .expect("override *");
    assert_eq!(all_users().await, i32::from(StorageSource::Legacy));

    // The kill switch wins over everything.
    server.kill_switch(true, "incident").await.expect("kill");
    for user in &users {
        assert_eq!(
            read(user.clone()).await,
            expect(StorageSource::Legacy),
            "{user}"
        );
    }
    server
        .kill_switch(false, "resolved")
        .await
        .expect("release");
    assert_eq!(read(legacy_user).await, expect(StorageSource::New));

    // A new salt reshuffles.
    let new_salt = server.reset_salt("reshuffle").await.expect("salt").salt;
    assert_ne!(new_salt, salt);
    let moved = users
        .iter()
        .filter(|u| {
            campaign_stats::rollout::bucket(&salt, u)
                != campaign_stats::rollout::bucket(&new_salt, u)
        })
        .count();
    assert!(moved > 30, "{moved}");
    server.stop().await;
}

async fn a_watcher_sees_the_current_state_then_each_change(db: TestDb) {
    let db = db.in_phase(Phase::Verified);
    let server = db.start_server().await;
    let mut rollout = client(&server).await;
    let mut watch = rollout
        .watch_rollout(WatchRolloutRequest {})
        .await
        .expect("watch")
        .into_inner();
    let first = watch.next().await.expect("current state").expect("rollout");
    assert_eq!(first.version, 0);
    rollout
        .set_rollout_percentage(percentage(1.0, 0, false))
        .await
        .expect("1%");
    rollout
        .set_rollout_percentage(percentage(10.0, 1, false))
        .await
        .expect("10%");
    server.kill_switch(true, "drill").await.expect("kill");
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let update = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("a change within 10 s")
            .expect("stream open")
            .expect("rollout");
        seen.push((update.version, update.percentage, update.kill_switch));
    }
    assert_eq!(seen, [(1, 1.0, false), (2, 10.0, false), (3, 10.0, true)]);
    drop(watch);
    server.stop().await;
}

/// The version a replica applies, as its metrics report it.
async fn applied_version_metric(replica: &ServerProcess) -> f64 {
    replica
        .metrics()
        .await
        .get("campaign_stats_rollout_applied_version")
}

/// A second server *process* on the same database follows a change made through the first,
/// and says so in GetRollout, EvaluateUser and its metrics.
async fn another_replica_applies_a_change_quickly(db: TestDb) {
    let db = db.in_phase(Phase::Verified);
    let first = db.start_server().await;
    let second = ServerProcess::start(&db.url, &[]).await;
    let mut on_second = RolloutServiceClient::new(second.channel().await);
    let mut watch = second.watch_rollout().await;
    assert_eq!(watch.version, 0);
    assert_eq!(applied_version_metric(&second).await, 0.0);

    let changed = Instant::now();
    client(&first)
        .await
        .set_rollout_percentage(percentage(25.0, 0, false))
        .await
        .expect("change on the first replica");
    let took = watch.until_applied(1, changed).await;
    assert!(took < Duration::from_secs(5), "{took:?}");
    let applied = current_rollout(&mut on_second).await;
    assert_eq!(
        (applied.version, applied.applied_version, applied.percentage),
        (1, 1, 25.0)
    );
    assert_eq!(applied_version_metric(&second).await, 1.0);
    let metrics = second.metrics().await;
    assert_eq!(metrics.get("campaign_stats_rollout_percentage"), 25.0);
    assert_eq!(
        metrics.get(r#"campaign_stats_migration_phase{phase="VERIFIED"}"#),
        1.0
    );
    let evaluated = on_second
        .evaluate_user(EvaluateUserRequest {
            user_id: "u".into(),
        })
        .await
        .expect("evaluate")
        .into_inner();
    assert_eq!(evaluated.version, 1);
    drop(watch);
    first.stop().await;
    second.stop().await;
}

/// PostgreSQL only: a change reaches another server process through LISTEN/NOTIFY, without
/// waiting for its polling, and again after that process's LISTEN connection was cut.
#[cfg_attr(
    not(postgres_tests),
    ignore = "PostgreSQL: set STATS_TEST_POSTGRES_URL when building the tests to run it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_replicas_hear_changes_and_survive_a_cut_listener() {
    let Some(db) = TestDb::create(crate::common::Backend::Postgres).await else {
        return;
    };
    let db = db.in_phase(Phase::Verified);
    let first = db.start_server().await;
    // The second replica polls only every minute: what arrives sooner was pushed.
    let second = ServerProcess::start(&db.url, &["--rollout-refresh-ms", "60000"]).await;
    let mut watch = second.watch_rollout().await;
    assert_eq!(watch.version, 0);
    let mut controller = client(&first).await;

    for (percent, version) in [(10.0, 1), (20.0, 2)] {
        if version == 2 {
            // Cut every LISTEN connection: the listener must reconnect for this change.
            let cut = db
                .scalar(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                     WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()",
                )
                .await;
            assert!(cut >= 2, "both replicas listen; cut {cut}");
        }
        let changed = Instant::now();
        controller
            .set_rollout_percentage(percentage(percent, version - 1, false))
            .await
            .expect("change");
        let took = watch.until_applied(version, changed).await;
        assert!(
            took < Duration::from_secs(5),
            "version {version} took {took:?}"
        );
        assert_eq!(applied_version_metric(&second).await, version as f64);
    }
    drop(watch);
    first.stop().await;
    second.stop().await;
}

/// The control services read messages up to the same limit as StatsService (16 MiB, not
/// tonic's 4 MiB), so a large bad field gets its own answer instead of a transport error.
async fn every_service_reads_messages_up_to_the_same_limit(db: TestDb) {
    let server = db.start_server().await;
    let mut rollout = client(&server).await;
    let status = rollout
        .kill_switch(KillSwitchRequest {
            engaged: true,
            reason: "r".repeat(5 * 1024 * 1024),
            actor: "tester".into(),
        })
        .await
        .expect_err("a reason over 1,024 bytes");
    assert_names_fields(&status, Code::InvalidArgument, &["reason"]);
    assert!(
        !current_rollout(&mut rollout).await.kill_switch,
        "nothing changed"
    );
    server.stop().await;
}
