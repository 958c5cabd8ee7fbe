//! Counts past a column's range: a write that would overflow a legacy `int` column is refused
//! as a whole with OUT_OF_RANGE on both backends alike, and a total past 64 bits is an error,
//! never a wrap (issue 8, defect 5).

use campaign_stats::grpc::proto::{
    EventType, GetAggregatedDailyStatsRequest, GetStatsRequest, Granularity, RecordEventRequest,
    RecordEventsRequest,
};
use campaign_stats::migration::Phase;
use tonic::Code;

use crate::common::{TestDb, assert_names_fields, campaign_metrics, event};

mod dual_write {
    use super::*;
    crate::on_both_backends!(
        a_legacy_overflow_is_refused_as_a_whole,
        a_claim_in_a_refused_batch_is_not_remembered,
    );
}

mod new_primary {
    use super::*;
    crate::on_both_backends!(totals_past_64_bits_are_errors_not_wraps);
}

/// Just under what a legacy `int` column holds.
const NEARLY_FULL: i64 = 2_147_483_000;

/// Campaign `c1` of `u1` on 2026-03-01, in legacy, [`NEARLY_FULL`] sends.
async fn nearly_full_legacy_row(db: &TestDb) {
    db.execute(&format!(
        "INSERT INTO campaign_daily_stat_entries (campaign_id, user_id, stat_date, sent) \
         VALUES ('c1', 'u1', '2026-03-01', {NEARLY_FULL})"
    ))
    .await;
}

async fn a_legacy_overflow_is_refused_as_a_whole(db: TestDb) {
    let db = db.in_phase(Phase::DualWrite);
    let server = db.start_server().await;
    nearly_full_legacy_row(&db).await;
    let mut stats = server.stats().await;
    let mut too_many = event("u1", "c1", EventType::Sent, 1_000, "2026-03-01");
    too_many.idempotency_key = "k1".into();

    let status = stats
        .record_event(RecordEventRequest {
            event: Some(too_many.clone()),
        })
        .await
        .expect_err("a legacy overflow is refused");
    assert_names_fields(&status, Code::OutOfRange, &["event.count"]);
    assert!(status.message().contains("legacy"), "{}", status.message());
    // Nothing of it was stored: not the event, not its key, not a count.
    assert_eq!(db.scalar("SELECT COUNT(*) FROM events").await, 0);
    assert_eq!(db.scalar("SELECT COUNT(*) FROM idempotency_keys").await, 0);
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM campaign_day_totals").await,
        0
    );
    assert_eq!(
        db.scalar("SELECT sent FROM campaign_daily_stat_entries WHERE campaign_id = 'c1'")
            .await,
        NEARLY_FULL
    );

    // Other metrics of that day, and other days, carry on.
    for other in [
        event("u1", "c1", EventType::Opened, 5, "2026-03-01"),
        event("u1", "c1", EventType::Sent, 1_000, "2026-03-02"),
    ] {
        stats
            .record_event(RecordEventRequest { event: Some(other) })
            .await
            .expect("other metrics and days are written");
    }
    // The refused key was not consumed: a retry that fits is stored, not a duplicate.
    too_many.count = 600;
    let retried = stats
        .record_event(RecordEventRequest {
            event: Some(too_many),
        })
        .await
        .expect("a retry that fits is stored")
        .into_inner();
    assert!(!retried.duplicate);
    let day = campaign_metrics(&mut stats, "u1", "c1", "2026-03-01", "2026-03-01").await;
    assert_eq!((day.sent, day.opened), (NEARLY_FULL as u64 + 600, 5));

    // In a batch, the event that overflows is named and nothing of the batch is stored.
    let status = stats
        .record_events(RecordEventsRequest {
            events: vec![
                event("u1", "c2", EventType::Sent, 1, "2026-03-01"),
                event("u1", "c1", EventType::Sent, 100, "2026-03-01"),
            ],
        })
        .await
        .expect_err("a batch with an overflow is refused");
    assert_names_fields(&status, Code::OutOfRange, &["events[1].count"]);
    assert!(
        !status.message().contains("events[0]"),
        "{}",
        status.message()
    );
    let c2 = campaign_metrics(&mut stats, "u1", "c2", "2026-03-01", "2026-03-01").await;
    assert_eq!(c2.sent, 0);

    // A batch whose own events pass the column, on a day legacy does not have yet.
    let events = (0..2_200)
        .map(|_| event("u1", "c3", EventType::Sent, 1_000_000, "2026-03-03"))
        .collect();
    let status = stats
        .record_events(RecordEventsRequest { events })
        .await
        .expect_err("a batch passing the column alone is refused");
    assert_names_fields(&status, Code::OutOfRange, &["events[0].count"]);
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM campaign_daily_stat_entries WHERE campaign_id = 'c3'")
            .await,
        0
    );
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM events WHERE campaign_id = 'c3'")
            .await,
        0
    );
    server.stop().await;
}

async fn totals_past_64_bits_are_errors_not_wraps(db: TestDb) {
    let db = db.in_phase(Phase::NewPrimary);
    let server = db.start_server().await;
    // Rollups as large as a BIGINT holds, on three days: each day fits, their sum does not.
    db.execute(
        "INSERT INTO campaign_day_totals (user_id, campaign_id, day, sent) VALUES \
         ('u1', 'c1', '2026-03-01', 9000000000000000000), \
         ('u1', 'c1', '2026-03-02', 9000000000000000000), \
         ('u1', 'c1', '2026-03-03', 9000000000000000000)",
    )
    .await;
    let mut stats = server.stats().await;
    let day = campaign_metrics(&mut stats, "u1", "c1", "2026-03-01", "2026-03-01").await;
    assert_eq!(day.sent, 9_000_000_000_000_000_000);

    let status = stats
        .get_stats(GetStatsRequest {
            user_id: "u1".into(),
            campaign_id: "c1".into(),
            start_date: "2026-03-01".into(),
            end_date: "2026-03-03".into(),
        })
        .await
        .expect_err("a total past 64 bits is an error");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");

    let series = |granularity: Granularity| GetAggregatedDailyStatsRequest {
        user_id: "u1".into(),
        start_date: "2026-03-01".into(),
        end_date: "2026-03-31".into(),
        granularity: granularity.into(),
        campaign_ids: vec![],
        fill_empty: false,
    };
    let daily = stats
        .get_aggregated_daily_stats(series(Granularity::Day))
        .await
        .expect("each day fits")
        .into_inner();
    assert_eq!(daily.buckets.len(), 3);
    let status = stats
        .get_aggregated_daily_stats(series(Granularity::Month))
        .await
        .expect_err("a month past u64 is an error");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    server.stop().await;
}

/// The store remembers campaign owners it has seen committed (they never change): an owner
/// claimed in a batch that was then refused must not be remembered.
async fn a_claim_in_a_refused_batch_is_not_remembered(db: TestDb) {
    let db = db.in_phase(Phase::DualWrite);
    let server = db.start_server().await;
    nearly_full_legacy_row(&db).await;
    let mut stats = server.stats().await;
    // "fresh" would be claimed by "a", but the batch is refused for its other event.
    let status = stats
        .record_events(RecordEventsRequest {
            events: vec![
                event("a", "fresh", EventType::Sent, 1, "2026-03-01"),
                event("u1", "c1", EventType::Sent, 1_000, "2026-03-01"),
            ],
        })
        .await
        .expect_err("a legacy overflow refuses the batch");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    // So "fresh" is still free: "b" claims it, and from then on it is "b"'s, whether the
    // owner is read from the database or from memory.
    for _ in 0..2 {
        stats
            .record_event(RecordEventRequest {
                event: Some(event("b", "fresh", EventType::Sent, 1, "2026-03-01")),
            })
            .await
            .expect("the campaign is b's");
        let status = stats
            .record_event(RecordEventRequest {
                event: Some(event("a", "fresh", EventType::Sent, 1, "2026-03-01")),
            })
            .await
            .expect_err("the campaign is not a's");
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    }
    let fresh = campaign_metrics(&mut stats, "b", "fresh", "2026-03-01", "2026-03-01").await;
    assert_eq!(fresh.sent, 2);
    server.stop().await;
}
