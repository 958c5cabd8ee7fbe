//! Writing events: RecordEvent, RecordEvents, StreamEvents; validation, atomicity,
//! idempotency and campaign ownership.

use campaign_stats::grpc::proto::{
    Event, EventType, RecordEventRequest, RecordEventsRequest, RecordEventsResponse,
};
use chrono::{Duration, Utc};
use tonic::Code;

use crate::common::{TestDb, assert_names_fields, campaign_metrics, event, noon};

crate::on_both_backends_and_storages!(
    recorded_event_is_read_back_at_once,
    count_zero_means_one_and_missing_time_means_now,
    every_validation_rule_names_its_field_and_stores_nothing,
    batch_is_all_or_nothing_and_names_every_bad_index,
    batch_over_the_limit_is_refused,
    oversized_message_is_refused,
    full_batch_is_stored,
    retried_idempotency_key_counts_once,
    idempotency_holds_across_a_restart,
    idempotency_keys_are_per_user,
    concurrent_retries_count_each_event_once,
    campaign_belongs_to_its_first_user,
    stream_acknowledges_what_it_stored,
    bad_event_ends_the_stream_naming_its_position,
);

fn record(event: Event) -> RecordEventRequest {
    RecordEventRequest { event: Some(event) }
}

fn keyed(mut event: Event, key: &str) -> Event {
    event.idempotency_key = key.into();
    event
}

async fn recorded_event_is_read_back_at_once(db: TestDb) {
    let server = db.start_server().await;
    let mut client = server.stats().await;
    for (event_type, count) in [
        (EventType::Sent, 5),
        (EventType::Opened, 3),
        (EventType::Clicked, 2),
        (EventType::Replied, 2),
        (EventType::PositiveReply, 1),
        (EventType::Bounced, 4),
    ] {
        let response = client
            .record_event(record(event("u1", "c1", event_type, count, "2026-03-10")))
            .await
            .expect("RecordEvent")
            .into_inner();
        assert!(!response.duplicate);
    }
    let metrics = campaign_metrics(&mut client, "u1", "c1", "2026-03-10", "2026-03-10").await;
    assert_eq!(
        (
            metrics.sent,
            metrics.opened,
            metrics.clicked,
            metrics.replied,
            metrics.positive_replies,
            metrics.bounced
        ),
        // Clicks are visible whichever storage answers (LEGACY takes them from the new storage).
        (5, 3, 2, 2, 1, 4)
    );
    // The day before and after do not see it.
    let other_days = campaign_metrics(&mut client, "u1", "c1", "2026-03-11", "2026-03-20").await;
    assert_eq!(other_days, Default::default());
    server.stop().await;
}

async fn count_zero_means_one_and_missing_time_means_now(db: TestDb) {
    let server = db.start_server().await;
    let mut client = server.stats().await;
    let mut now_event = event("u1", "c1", EventType::Sent, 0, "2026-01-01");
    now_event.occurred_at = None;
    let before = Utc::now().date_naive();
    client
        .record_event(record(now_event))
        .await
        .expect("RecordEvent");
    let after = Utc::now().date_naive();
    let metrics = campaign_metrics(
        &mut client,
        "u1",
        "c1",
        &before.to_string(),
        &after.to_string(),
    )
    .await;
    assert_eq!(metrics.sent, 1);
    server.stop().await;
}

async fn every_validation_rule_names_its_field_and_stores_nothing(db: TestDb) {
    let server = db.start_server().await;
    let mut client = server.stats().await;
    let good = || event("u1", "c1", EventType::Sent, 1, "2026-01-05");
    let too_late = Utc::now() + Duration::days(1) + Duration::minutes(5);
    let cases: Vec<(Option<Event>, &str)> = vec![
        (None, "event"),
        (
            Some(Event {
                user_id: String::new(),
                ..good()
            }),
            "event.user_id",
        ),
        (
            Some(Event {
                user_id: "u".repeat(129),
                ..good()
            }),
            "event.user_id",
        ),
        (
            Some(Event {
                user_id: "u\u{1}".into(),
                ..good()
            }),
            "event.user_id",
        ),
        (
            Some(Event {
                campaign_id: String::new(),
                ..good()
            }),
            "event.campaign_id",
        ),
        (
            Some(Event {
                campaign_id: "c\n1".into(),
                ..good()
            }),
            "event.campaign_id",
        ),
        (
            Some(Event {
                event_type: EventType::Unspecified.into(),
                ..good()
            }),
            "event.event_type",
        ),
        (
            Some(Event {
                event_type: 42,
                ..good()
            }),
            "event.event_type",
        ),
        (
            Some(Event {
                count: 1_000_001,
                ..good()
            }),
            "event.count",
        ),
        (
            Some(Event {
                occurred_at: Some(noon("1999-12-31")),
                ..good()
            }),
            "event.occurred_at",
        ),
        (
            Some(Event {
                occurred_at: Some(prost_types::Timestamp {
                    seconds: too_late.timestamp(),
                    nanos: 0,
                }),
                ..good()
            }),
            "event.occurred_at",
        ),
        (
            Some(Event {
                occurred_at: Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: -5,
                }),
                ..good()
            }),
            "event.occurred_at",
        ),
        (
            Some(Event {
                email_account_id: "e".repeat(200),
                ..good()
            }),
            "event.email_account_id",
        ),
        (
            Some(Event {
                idempotency_key: "k\u{7f}".into(),
                ..good()
            }),
            "event.idempotency_key",
        ),
    ];
    for (event, field) in cases {
        let status = client
            .record_event(RecordEventRequest { event })
            .await
            .expect_err(field);
        assert_names_fields(&status, Code::InvalidArgument, &[field]);
    }
    // The limits themselves are accepted.
    let edge = Event {
        user_id: "u".repeat(128),
        campaign_id: "edge".into(),
        count: 1_000_000,
        occurred_at: Some(noon("2000-01-01")),
        ..good()
    };
    client
        .record_event(record(edge))
        .await
        .expect("edge values are valid");
    let metrics = campaign_metrics(&mut client, "u1", "c1", "2025-12-01", "2026-12-01").await;
    assert_eq!(
        metrics,
        Default::default(),
        "a refused event stored something"
    );
    let edge = campaign_metrics(
        &mut client,
        &"u".repeat(128),
        "edge",
        "2000-01-01",
        "2000-01-01",
    )
    .await;
    assert_eq!(edge.sent, 1_000_000);
    server.stop().await;
}

async fn batch_is_all_or_nothing_and_names_every_bad_index(db: TestDb) {
    let server = db.start_server().await;
    let mut client = server.stats().await;
    let events = vec![
        event("u1", "c1", EventType::Sent, 1, "2026-02-01"),
        Event {
            count: 2_000_000,
            ..event("u1", "c1", EventType::Sent, 1, "2026-02-01")
        },
        Event {
            user_id: String::new(),
            ..event("u1", "c2", EventType::Opened, 1, "2026-02-01")
        },
        event("u1", "c2", EventType::Opened, 1, "2026-02-01"),
    ];
    let status = client
        .record_events(RecordEventsRequest { events })
        .await
        .expect_err("a bad batch is refused");
    assert_names_fields(
        &status,
        Code::InvalidArgument,
        &["events[1].count", "events[2].user_id"],
    );
    assert!(!status.message().contains("events[0]"));
    for campaign in ["c1", "c2"] {
        let metrics =
            campaign_metrics(&mut client, "u1", campaign, "2026-01-01", "2026-12-31").await;
        assert_eq!(
            metrics,
            Default::default(),
            "{campaign}: part of a refused batch was stored"
        );
    }
    server.stop().await;
}

async fn batch_over_the_limit_is_refused(db: TestDb) {
    let server = db.start_server().await;
    let mut client = server.stats().await;
    let events = vec![event("u1", "c1", EventType::Sent, 1, "2026-02-01"); 10_001];
    let status = client
        .record_events(RecordEventsRequest { events })
        .await
        .expect_err("over the batch limit");
    assert_names_fields(&status, Code::ResourceExhausted, &["events"]);
    assert!(status.message().contains("10000"), "{}", status.message());
    let metrics = campaign_metrics(&mut client, "u1", "c1", "2026-01-01", "2026-12-31").await;
    assert_eq!(metrics.sent, 0);
    server.stop().await;
}

async fn oversized_message_is_refused(db: TestDb) {
    let server = db.start_server().await;
    let mut client = server.stats().await;
    let huge = Event {
        email_account_id: "x".repeat(17 * 1024 * 1024),
        ..event("u1", "c1", EventType::Sent, 1, "2026-02-01")
    };
    let status = client
        .record_event(record(huge))
        .await
        .expect_err("over 16 MiB");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert_eq!(
        campaign_metrics(&mut client, "u1", "c1", "2026-02-01", "2026-02-01")
            .await
            .sent,
        0
    );
    server.stop().await;
}

async fn full_batch_is_stored(db: TestDb) {
    let server = db.start_server().await;
    let mut client = server.stats().await;
    // 10,000 events over 40 campaigns and 25 days, half of them keyed.
    let events: Vec<Event> = (0..10_000u32)
        .map(|i| {
            let day = format!("2026-04-{:02}", 1 + i % 25);
            let mut e = event(
                "u1",
                &format!("c{}", i % 40),
                EventType::Sent,
                1 + i % 3,
                &day,
            );
            if i % 2 == 0 {
                e.idempotency_key = format!("k{i}");
            }
            e
        })
        .collect();
    let expected: u64 = events.iter().map(|e| u64::from(e.count)).sum();
    let response = client
        .record_events(RecordEventsRequest {
            events: events.clone(),
        })
        .await
        .expect("a full batch is accepted")
        .into_inner();
    assert_eq!(
        response,
        RecordEventsResponse {
            stored: 10_000,
            duplicates: 0
        }
    );
    let series = client
        .get_aggregated_daily_stats(
            campaign_stats::grpc::proto::GetAggregatedDailyStatsRequest {
                user_id: "u1".into(),
                start_date: "2026-04-01".into(),
                end_date: "2026-04-30".into(),
                granularity: campaign_stats::grpc::proto::Granularity::Month.into(),
                ..Default::default()
            },
        )
        .await
        .expect("series")
        .into_inner();
    assert_eq!(series.buckets.len(), 1);
    assert_eq!(series.buckets[0].metrics.unwrap_or_default().sent, expected);
    server.stop().await;
}

async fn retried_idempotency_key_counts_once(db: TestDb) {
    let server = db.start_server().await;
    let mut client = server.stats().await;
    let sent = keyed(
        event("u1", "c1", EventType::Sent, 7, "2026-05-05"),
        "send-1",
    );
    let first = client
        .record_event(record(sent.clone()))
        .await
        .expect("first")
        .into_inner();
    let retry = client
        .record_event(record(sent.clone()))
        .await
        .expect("a retry succeeds")
        .into_inner();
    assert!(!first.duplicate);
    assert!(retry.duplicate);
    // The same key through the batch and the stream, and twice inside one batch.
    let other = keyed(
        event("u1", "c1", EventType::Sent, 1, "2026-05-05"),
        "send-2",
    );
    let batch = client
        .record_events(RecordEventsRequest {
            events: vec![sent.clone(), other.clone(), other.clone()],
        })
        .await
        .expect("batch")
        .into_inner();
    assert_eq!(
        batch,
        RecordEventsResponse {
            stored: 1,
            duplicates: 2
        }
    );
    let streamed = client
        .stream_events(tokio_stream::iter(vec![record(sent), record(other)]))
        .await
        .expect("stream")
        .into_inner();
    assert_eq!(
        streamed,
        RecordEventsResponse {
            stored: 0,
            duplicates: 2
        }
    );
    let metrics = campaign_metrics(&mut client, "u1", "c1", "2026-05-01", "2026-05-31").await;
    assert_eq!(metrics.sent, 8);
    server.stop().await;
}

async fn idempotency_holds_across_a_restart(db: TestDb) {
    let sent = keyed(
        event("u1", "c1", EventType::Sent, 3, "2026-05-05"),
        "restart-key",
    );
    let server = db.start_server().await;
    server
        .stats()
        .await
        .record_event(record(sent.clone()))
        .await
        .expect("first");
    server.stop().await;

    let server = db.start_server().await;
    let mut client = server.stats().await;
    let retry = client
        .record_event(record(sent))
        .await
        .expect("retry after restart")
        .into_inner();
    assert!(retry.duplicate);
    let metrics = campaign_metrics(&mut client, "u1", "c1", "2026-05-05", "2026-05-05").await;
    assert_eq!(metrics.sent, 3);
    server.stop().await;
}

async fn idempotency_keys_are_per_user(db: TestDb) {
    let server = db.start_server().await;
    let mut client = server.stats().await;
    for (user, campaign) in [("u1", "c1"), ("u2", "c2")] {
        let e = keyed(
            event(user, campaign, EventType::Opened, 1, "2026-05-05"),
            "shared-key",
        );
        assert!(
            !client
                .record_event(record(e))
                .await
                .expect("record")
                .into_inner()
                .duplicate
        );
    }
    assert_eq!(
        campaign_metrics(&mut client, "u1", "c1", "2026-05-05", "2026-05-05")
            .await
            .opened,
        1
    );
    assert_eq!(
        campaign_metrics(&mut client, "u2", "c2", "2026-05-05", "2026-05-05")
            .await
            .opened,
        1
    );
    server.stop().await;
}

async fn concurrent_retries_count_each_event_once(db: TestDb) {
    let server = db.start_server().await;
    // Eight producers send the same 400 keyed events (in different orders and batch
    // sizes) at once, on a few hot campaigns and days: each event must count exactly once.
    let events: Vec<Event> = (0..400u32)
        .map(|i| {
            let day = if i % 2 == 0 {
                "2026-08-01"
            } else {
                "2026-08-02"
            };
            keyed(
                event(
                    "u1",
                    &format!("hot{}", i % 3),
                    EventType::Sent,
                    1 + i % 5,
                    day,
                ),
                &format!("k{i}"),
            )
        })
        .collect();
    let expected: u64 = events.iter().map(|e| u64::from(e.count)).sum();
    let mut producers = Vec::new();
    for producer in 0..8usize {
        let mut client = server.stats().await;
        let mut mine = events.clone();
        mine.rotate_left(producer * 50);
        producers.push(tokio::spawn(async move {
            let mut stored = 0;
            for batch in mine.chunks(10 + producer * 7) {
                stored += client
                    .record_events(RecordEventsRequest {
                        events: batch.to_vec(),
                    })
                    .await
                    .expect("concurrent batch")
                    .into_inner()
                    .stored;
            }
            stored
        }));
    }
    let mut stored = 0;
    for producer in producers {
        stored += producer.await.expect("producer");
    }
    assert_eq!(stored, 400, "each event is stored by exactly one producer");
    let mut client = server.stats().await;
    let mut total = 0;
    for campaign in ["hot0", "hot1", "hot2"] {
        total += campaign_metrics(&mut client, "u1", campaign, "2026-08-01", "2026-08-02")
            .await
            .sent;
    }
    assert_eq!(total, expected);
    server.stop().await;
}

async fn campaign_belongs_to_its_first_user(db: TestDb) {
    let server = db.start_server().await;
    let mut client = server.stats().await;
    client
        .record_event(record(event(
            "owner",
            "c1",
            EventType::Sent,
            2,
            "2026-06-01",
        )))
        .await
        .expect("the first user claims the campaign");

    let status = client
        .record_event(record(event(
            "intruder",
            "c1",
            EventType::Sent,
            5,
            "2026-06-01",
        )))
        .await
        .expect_err("another user's campaign");
    assert_names_fields(&status, Code::PermissionDenied, &["event.campaign_id"]);

    // One foreign event refuses its whole batch.
    let status = client
        .record_events(RecordEventsRequest {
            events: vec![
                event("intruder", "mine", EventType::Sent, 1, "2026-06-01"),
                event("intruder", "c1", EventType::Sent, 1, "2026-06-01"),
            ],
        })
        .await
        .expect_err("batch naming another user's campaign");
    assert_names_fields(&status, Code::PermissionDenied, &["events[1].campaign_id"]);
    assert_eq!(
        campaign_metrics(&mut client, "intruder", "mine", "2026-06-01", "2026-06-01")
            .await
            .sent,
        0
    );

    // Two users claiming one new campaign in one batch: the first wins, the batch is refused.
    let status = client
        .record_events(RecordEventsRequest {
            events: vec![
                event("a", "fresh", EventType::Sent, 1, "2026-06-01"),
                event("b", "fresh", EventType::Sent, 1, "2026-06-01"),
            ],
        })
        .await
        .expect_err("one campaign under two users");
    assert_names_fields(&status, Code::PermissionDenied, &["events[1].campaign_id"]);

    // Reads: the owner sees its numbers; anyone else sees zeros, as for an unknown campaign.
    assert_eq!(
        campaign_metrics(&mut client, "owner", "c1", "2026-06-01", "2026-06-01")
            .await
            .sent,
        2
    );
    assert_eq!(
        campaign_metrics(&mut client, "intruder", "c1", "2026-06-01", "2026-06-01").await,
        Default::default()
    );
    assert_eq!(
        campaign_metrics(&mut client, "a", "fresh", "2026-06-01", "2026-06-01")
            .await
            .sent,
        0
    );
    server.stop().await;
}

async fn stream_acknowledges_what_it_stored(db: TestDb) {
    let server = db.start_server().await;
    let mut client = server.stats().await;
    // More than one commit chunk.
    let events: Vec<RecordEventRequest> = (0..2_500)
        .map(|i| {
            record(event(
                "u1",
                "c1",
                EventType::Opened,
                1,
                if i % 2 == 0 {
                    "2026-07-01"
                } else {
                    "2026-07-02"
                },
            ))
        })
        .collect();
    let response = client
        .stream_events(tokio_stream::iter(events))
        .await
        .expect("stream")
        .into_inner();
    assert_eq!(
        response,
        RecordEventsResponse {
            stored: 2_500,
            duplicates: 0
        }
    );
    assert_eq!(
        campaign_metrics(&mut client, "u1", "c1", "2026-07-01", "2026-07-02")
            .await
            .opened,
        2_500
    );
    // An empty stream stores nothing and succeeds.
    let empty = client
        .stream_events(tokio_stream::iter(Vec::<RecordEventRequest>::new()))
        .await
        .expect("empty stream")
        .into_inner();
    assert_eq!(empty, RecordEventsResponse::default());
    server.stop().await;
}

async fn bad_event_ends_the_stream_naming_its_position(db: TestDb) {
    let server = db.start_server().await;
    let mut client = server.stats().await;
    // The first 1,000 events form a committed chunk; the bad one is at position 1,200.
    let mut events: Vec<RecordEventRequest> = (0..1_500)
        .map(|_| record(event("u1", "c1", EventType::Sent, 1, "2026-07-01")))
        .collect();
    events[1_200].event.as_mut().expect("event").event_type = EventType::Unspecified.into();
    let status = client
        .stream_events(tokio_stream::iter(events))
        .await
        .expect_err("the bad event ends the stream");
    assert_names_fields(&status, Code::InvalidArgument, &["events[1200].event_type"]);
    let stored = status
        .metadata()
        .get("x-stored-count")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    assert_eq!(stored, Some(1_000));
    // Exactly the acknowledged part is stored: nothing of the chunk holding the bad event.
    assert_eq!(
        campaign_metrics(&mut client, "u1", "c1", "2026-07-01", "2026-07-01")
            .await
            .sent,
        1_000
    );
    server.stop().await;
}

/// PostgreSQL only: a large batch's raw events go by binary `COPY`; every field arrives as
/// sent (ids, type, count, the time to the microsecond, and the optional fields, set or not).
#[cfg_attr(
    not(postgres_tests),
    ignore = "PostgreSQL: set STATS_TEST_POSTGRES_URL when building the tests to run it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_large_batch_keeps_every_field_of_its_raw_events() {
    use campaign_stats::migration::Phase;
    use sqlx::Connection;

    let Some(db) = TestDb::create(crate::common::Backend::Postgres).await else {
        return;
    };
    let db = db.in_phase(Phase::NewPrimary);
    let server = db.start_server().await;
    let mut client = server.stats().await;
    let types = [
        EventType::Sent,
        EventType::Opened,
        EventType::Clicked,
        EventType::Bounced,
    ];
    let events: Vec<Event> = (0..600u32)
        .map(|i| {
            let mut one = event(
                &format!("u{}", i % 7),
                &format!("c{}-{}", i % 7, i % 3),
                types[i as usize % 4],
                1 + i % 5,
                "2026-03-10",
            );
            let at = one.occurred_at.as_mut().expect("a time");
            at.seconds += i64::from(i);
            at.nanos = (i * 1_001) as i32 * 1_000; // whole microseconds
            if i % 2 == 0 {
                one.email_account_id = format!("acct-{i}");
            }
            if i % 3 == 0 {
                one.idempotency_key = format!("key-{i}");
            }
            one
        })
        .collect();
    client
        .record_events(RecordEventsRequest {
            events: events.clone(),
        })
        .await
        .expect("RecordEvents");

    let mut connection = sqlx::PgConnection::connect(&db.url).await.expect("connect");
    type Row = (
        String,
        String,
        i16,
        i32,
        chrono::DateTime<Utc>,
        Option<String>,
        Option<String>,
    );
    let mut stored: Vec<Row> = sqlx::query_as(
        "SELECT user_id, campaign_id, event_type, count, occurred_at, email_account_id, \
         idempotency_key FROM events",
    )
    .fetch_all(&mut connection)
    .await
    .expect("the raw events");
    let mut sent: Vec<Row> = events
        .iter()
        .map(|e| {
            let at = e.occurred_at.expect("a time");
            (
                e.user_id.clone(),
                e.campaign_id.clone(),
                e.event_type as i16,
                e.count as i32,
                chrono::DateTime::from_timestamp(at.seconds, at.nanos as u32).expect("a time"),
                Some(e.email_account_id.clone()).filter(|s| !s.is_empty()),
                Some(e.idempotency_key.clone()).filter(|s| !s.is_empty()),
            )
        })
        .collect();
    stored.sort();
    sent.sort();
    assert_eq!(stored, sent);
    server.stop().await;
}
