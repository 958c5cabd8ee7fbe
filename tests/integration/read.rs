//! Reading statistics: GetStats, GetStatsForCampaigns, GetAggregatedDailyStats.

use campaign_stats::grpc::proto::stats_service_client::StatsServiceClient;
use campaign_stats::grpc::proto::{
    Bucket, EventType, GetAggregatedDailyStatsRequest, GetStatsForCampaignsRequest,
    GetStatsRequest, Granularity, Metrics, RecordEventsRequest,
};
use tonic::Code;
use tonic::transport::Channel;

use crate::common::{TestDb, assert_names_fields, event};

crate::on_both_backends_and_storages!(
    get_stats_sums_the_range_and_says_new,
    get_stats_validates_every_field,
    stats_for_campaigns_answers_in_request_order,
    stats_for_campaigns_limits_and_names_bad_ids,
    daily_weekly_monthly_buckets_at_year_and_iso_week_edges,
    fill_empty_zero_fills_every_bucket,
    series_for_a_subset_and_for_all_users,
    series_validates_its_fields,
);

fn series(
    user: &str,
    start: &str,
    end: &str,
    granularity: Granularity,
    fill_empty: bool,
) -> GetAggregatedDailyStatsRequest {
    GetAggregatedDailyStatsRequest {
        user_id: user.into(),
        start_date: start.into(),
        end_date: end.into(),
        granularity: granularity.into(),
        campaign_ids: vec![],
        fill_empty,
    }
}

/// `(bucket_start, sent)` of each bucket.
fn sent_by_bucket(buckets: &[Bucket]) -> Vec<(String, u64)> {
    buckets
        .iter()
        .map(|b| (b.bucket_start.clone(), b.metrics.unwrap_or_default().sent))
        .collect()
}

fn pairs(expected: &[(&str, u64)]) -> Vec<(String, u64)> {
    expected
        .iter()
        .map(|(d, n)| ((*d).to_owned(), *n))
        .collect()
}

async fn seed(
    client: &mut StatsServiceClient<Channel>,
    events: Vec<campaign_stats::grpc::proto::Event>,
) {
    client
        .record_events(RecordEventsRequest { events })
        .await
        .expect("seed events");
}

async fn get_stats_sums_the_range_and_says_new(db: TestDb) {
    let db_source = db.expected_source();
    let server = db.start_server().await;
    let mut client = server.stats().await;
    seed(
        &mut client,
        vec![
            event("u1", "c1", EventType::Sent, 10, "2026-01-31"),
            event("u1", "c1", EventType::Sent, 5, "2026-02-01"),
            event("u1", "c1", EventType::Replied, 2, "2026-02-28"),
            event("u1", "c1", EventType::Sent, 1, "2026-03-01"),
        ],
    )
    .await;
    let response = client
        .get_stats(GetStatsRequest {
            user_id: "u1".into(),
            campaign_id: "c1".into(),
            start_date: "2026-02-01".into(),
            end_date: "2026-02-28".into(),
        })
        .await
        .expect("GetStats")
        .into_inner();
    assert_eq!(response.campaign_id, "c1");
    assert_eq!(response.source, db_source);
    assert_eq!(
        response.metrics,
        Some(Metrics {
            sent: 5,
            replied: 2,
            ..Metrics::default()
        })
    );
    server.stop().await;
}

async fn get_stats_validates_every_field(db: TestDb) {
    let server = db.start_server().await;
    let mut client = server.stats().await;
    let good = || GetStatsRequest {
        user_id: "u1".into(),
        campaign_id: "c1".into(),
        start_date: "2026-01-01".into(),
        end_date: "2026-01-31".into(),
    };
    let cases = [
        (
            GetStatsRequest {
                user_id: String::new(),
                ..good()
            },
            vec!["user_id"],
        ),
        (
            GetStatsRequest {
                campaign_id: "x".repeat(129),
                ..good()
            },
            vec!["campaign_id"],
        ),
        (
            GetStatsRequest {
                start_date: "2026-1-1".into(),
                ..good()
            },
            vec!["start_date"],
        ),
        (
            GetStatsRequest {
                end_date: "31/01/2026".into(),
                ..good()
            },
            vec!["end_date"],
        ),
        (
            GetStatsRequest {
                start_date: String::new(),
                end_date: String::new(),
                ..good()
            },
            vec!["start_date", "end_date"],
        ),
        (
            GetStatsRequest {
                start_date: "2026-02-01".into(),
                ..good()
            },
            vec!["end_date"],
        ),
        (
            GetStatsRequest {
                start_date: "2016-01-01".into(),
                end_date: "2026-01-08".into(),
                ..good()
            },
            vec!["end_date"],
        ),
        (
            GetStatsRequest {
                user_id: String::new(),
                campaign_id: String::new(),
                ..good()
            },
            vec!["user_id", "campaign_id"],
        ),
    ];
    for (request, fields) in cases {
        let status = client
            .get_stats(request)
            .await
            .expect_err("invalid request");
        assert_names_fields(&status, Code::InvalidArgument, &fields);
    }
    // 3,660 days, both ends included, is the longest range allowed.
    client
        .get_stats(GetStatsRequest {
            start_date: "2016-01-01".into(),
            end_date: "2026-01-07".into(),
            ..good()
        })
        .await
        .expect("a range of 3,660 days");
    server.stop().await;
}

async fn stats_for_campaigns_answers_in_request_order(db: TestDb) {
    let db_source = db.expected_source();
    let server = db.start_server().await;
    let mut client = server.stats().await;
    seed(
        &mut client,
        vec![
            event("u1", "a", EventType::Sent, 1, "2026-01-10"),
            event("u1", "b", EventType::Opened, 2, "2026-01-10"),
            event("u2", "theirs", EventType::Sent, 9, "2026-01-10"),
        ],
    )
    .await;
    let response = client
        .get_stats_for_campaigns(GetStatsForCampaignsRequest {
            user_id: "u1".into(),
            campaign_ids: vec!["b".into(), "unknown".into(), "theirs".into(), "a".into()],
            start_date: "2026-01-01".into(),
            end_date: "2026-01-31".into(),
        })
        .await
        .expect("GetStatsForCampaigns")
        .into_inner();
    assert_eq!(response.source, db_source);
    let answered: Vec<(&str, Metrics)> = response
        .stats
        .iter()
        .map(|s| (s.campaign_id.as_str(), s.metrics.unwrap_or_default()))
        .collect();
    assert_eq!(
        answered,
        [
            (
                "b",
                Metrics {
                    opened: 2,
                    ..Metrics::default()
                }
            ),
            ("unknown", Metrics::default()),
            ("theirs", Metrics::default()),
            (
                "a",
                Metrics {
                    sent: 1,
                    ..Metrics::default()
                }
            ),
        ]
    );
    server.stop().await;
}

async fn stats_for_campaigns_limits_and_names_bad_ids(db: TestDb) {
    let server = db.start_server().await;
    let mut client = server.stats().await;
    let request = |campaign_ids: Vec<String>| GetStatsForCampaignsRequest {
        user_id: "u1".into(),
        campaign_ids,
        start_date: "2026-01-01".into(),
        end_date: "2026-01-31".into(),
    };
    let status = client
        .get_stats_for_campaigns(request((0..1_001).map(|i| format!("c{i}")).collect()))
        .await
        .expect_err("over the campaign limit");
    assert_names_fields(&status, Code::ResourceExhausted, &["campaign_ids"]);
    let full = client
        .get_stats_for_campaigns(request((0..1_000).map(|i| format!("c{i}")).collect()))
        .await
        .expect("1,000 campaigns are allowed")
        .into_inner();
    assert_eq!(full.stats.len(), 1_000);
    let status = client
        .get_stats_for_campaigns(request(vec!["ok".into(), String::new(), "bad\u{0}".into()]))
        .await
        .expect_err("bad campaign ids");
    assert_names_fields(
        &status,
        Code::InvalidArgument,
        &["campaign_ids[1]", "campaign_ids[2]"],
    );
    server.stop().await;
}

async fn daily_weekly_monthly_buckets_at_year_and_iso_week_edges(db: TestDb) {
    let db_source = db.expected_source();
    let server = db.start_server().await;
    let mut client = server.stats().await;
    // 2025-12-29 is a Monday; 2025-12-31 (Wednesday) and 2026-01-01 (Thursday) share its ISO
    // week; 2026-01-05 starts the next one. 2020-12-31 and 2021-01-03 share the week of 2020-12-28.
    seed(
        &mut client,
        vec![
            event("u1", "c1", EventType::Sent, 1, "2025-12-28"),
            event("u1", "c1", EventType::Sent, 2, "2025-12-31"),
            event("u1", "c1", EventType::Sent, 4, "2026-01-01"),
            event("u1", "c1", EventType::Sent, 8, "2026-01-04"),
            event("u1", "c1", EventType::Sent, 16, "2026-01-05"),
            event("u1", "c1", EventType::Sent, 32, "2026-01-31"),
            event("u1", "c1", EventType::Sent, 64, "2026-02-01"),
            event("u1", "c2", EventType::Sent, 100, "2020-12-31"),
            event("u1", "c2", EventType::Sent, 200, "2021-01-03"),
            event("u1", "c2", EventType::Sent, 400, "2021-01-04"),
        ],
    )
    .await;
    let mut run = async |start: &str, end: &str, granularity: Granularity| {
        let response = client
            .get_aggregated_daily_stats(series("u1", start, end, granularity, false))
            .await
            .expect("series")
            .into_inner();
        assert_eq!(response.source, db_source);
        sent_by_bucket(&response.buckets)
    };
    assert_eq!(
        run("2025-12-28", "2026-01-05", Granularity::Day).await,
        pairs(&[
            ("2025-12-28", 1),
            ("2025-12-31", 2),
            ("2026-01-01", 4),
            ("2026-01-04", 8),
            ("2026-01-05", 16)
        ])
    );
    // Unspecified granularity means DAY.
    assert_eq!(
        run("2026-01-01", "2026-01-01", Granularity::Unspecified).await,
        pairs(&[("2026-01-01", 4)])
    );
    assert_eq!(
        run("2025-12-28", "2026-02-01", Granularity::Week).await,
        pairs(&[
            ("2025-12-22", 1),
            ("2025-12-29", 14),
            ("2026-01-05", 16),
            ("2026-01-26", 96)
        ])
    );
    // A bucket may start before the range, but only days inside the range count.
    assert_eq!(
        run("2025-12-31", "2026-01-01", Granularity::Week).await,
        pairs(&[("2025-12-29", 6)])
    );
    assert_eq!(
        run("2020-12-01", "2021-01-31", Granularity::Week).await,
        pairs(&[("2020-12-28", 300), ("2021-01-04", 400)])
    );
    assert_eq!(
        run("2025-12-01", "2026-02-28", Granularity::Month).await,
        pairs(&[("2025-12-01", 3), ("2026-01-01", 60), ("2026-02-01", 64)])
    );
    assert_eq!(
        run("2026-01-15", "2026-02-15", Granularity::Month).await,
        pairs(&[("2026-01-01", 32), ("2026-02-01", 64)])
    );
    server.stop().await;
}

async fn fill_empty_zero_fills_every_bucket(db: TestDb) {
    let server = db.start_server().await;
    let mut client = server.stats().await;
    seed(
        &mut client,
        vec![event("u1", "c1", EventType::Bounced, 3, "2026-03-04")],
    )
    .await;
    let buckets = |response: tonic::Response<
        campaign_stats::grpc::proto::GetAggregatedDailyStatsResponse,
    >| {
        response
            .into_inner()
            .buckets
            .into_iter()
            .map(|b| (b.bucket_start, b.metrics.unwrap_or_default().bounced))
            .collect::<Vec<_>>()
    };
    let daily = client
        .get_aggregated_daily_stats(series(
            "u1",
            "2026-03-02",
            "2026-03-06",
            Granularity::Day,
            true,
        ))
        .await
        .expect("daily");
    assert_eq!(
        buckets(daily),
        pairs(&[
            ("2026-03-02", 0),
            ("2026-03-03", 0),
            ("2026-03-04", 3),
            ("2026-03-05", 0),
            ("2026-03-06", 0)
        ])
    );
    let weekly = client
        .get_aggregated_daily_stats(series(
            "u1",
            "2026-02-20",
            "2026-03-10",
            Granularity::Week,
            true,
        ))
        .await
        .expect("weekly");
    assert_eq!(
        buckets(weekly),
        pairs(&[
            ("2026-02-16", 0),
            ("2026-02-23", 0),
            ("2026-03-02", 3),
            ("2026-03-09", 0)
        ])
    );
    let monthly = client
        .get_aggregated_daily_stats(series(
            "u1",
            "2025-11-30",
            "2026-04-01",
            Granularity::Month,
            true,
        ))
        .await
        .expect("monthly");
    assert_eq!(
        buckets(monthly),
        pairs(&[
            ("2025-11-01", 0),
            ("2025-12-01", 0),
            ("2026-01-01", 0),
            ("2026-02-01", 0),
            ("2026-03-01", 3),
            ("2026-04-01", 0)
        ])
    );
    // Without fill_empty, a user with no events gets no buckets.
    let nothing = client
        .get_aggregated_daily_stats(series(
            "nobody",
            "2026-03-01",
            "2026-03-31",
            Granularity::Day,
            false,
        ))
        .await
        .expect("empty series")
        .into_inner();
    assert!(nothing.buckets.is_empty());
    server.stop().await;
}

async fn series_for_a_subset_and_for_all_users(db: TestDb) {
    // Clicks are visible whichever storage answers (LEGACY takes them from the new storage).
    let clicks = 8;
    let server = db.start_server().await;
    let mut client = server.stats().await;
    seed(
        &mut client,
        vec![
            event("u1", "a", EventType::Sent, 1, "2026-04-01"),
            event("u1", "b", EventType::Sent, 2, "2026-04-01"),
            event("u2", "c", EventType::Sent, 4, "2026-04-01"),
            event("u2", "c", EventType::Clicked, 8, "2026-04-02"),
        ],
    )
    .await;
    let mut run = async |user: &str, campaigns: &[&str]| {
        let mut request = series(user, "2026-04-01", "2026-04-30", Granularity::Month, false);
        request.campaign_ids = campaigns.iter().map(|c| (*c).to_owned()).collect();
        let response = client
            .get_aggregated_daily_stats(request)
            .await
            .expect("series")
            .into_inner();
        response
            .buckets
            .first()
            .and_then(|b| b.metrics)
            .unwrap_or_default()
    };
    assert_eq!(run("u1", &[]).await.sent, 3);
    assert_eq!(run("u1", &["b"]).await.sent, 2);
    // Another user's campaign in the subset counts nothing.
    assert_eq!(run("u1", &["b", "c"]).await.sent, 2);
    // The operator's view: every user together, or a subset of campaigns across users.
    let everyone = run("", &[]).await;
    assert_eq!((everyone.sent, everyone.clicked), (7, clicks));
    let subset = run("", &["a", "c"]).await;
    assert_eq!((subset.sent, subset.clicked), (5, clicks));
    let own = run("u2", &["c"]).await;
    assert_eq!((own.sent, own.clicked), (4, clicks));
    // Another user's clicks in the subset count nothing either.
    assert_eq!(run("u1", &["a", "c"]).await.clicked, 0);
    server.stop().await;
}

async fn series_validates_its_fields(db: TestDb) {
    let server = db.start_server().await;
    let mut client = server.stats().await;
    let good = || series("u1", "2026-01-01", "2026-01-31", Granularity::Week, false);
    let cases = [
        (
            GetAggregatedDailyStatsRequest {
                granularity: 9,
                ..good()
            },
            Code::InvalidArgument,
            vec!["granularity"],
        ),
        (
            GetAggregatedDailyStatsRequest {
                user_id: "u\u{7}".into(),
                ..good()
            },
            Code::InvalidArgument,
            vec!["user_id"],
        ),
        (
            GetAggregatedDailyStatsRequest {
                start_date: "2026-13-01".into(),
                ..good()
            },
            Code::InvalidArgument,
            vec!["start_date"],
        ),
        (
            GetAggregatedDailyStatsRequest {
                end_date: "2025-12-31".into(),
                ..good()
            },
            Code::InvalidArgument,
            vec!["end_date"],
        ),
        (
            GetAggregatedDailyStatsRequest {
                campaign_ids: vec![String::new()],
                ..good()
            },
            Code::InvalidArgument,
            vec!["campaign_ids[0]"],
        ),
        (
            GetAggregatedDailyStatsRequest {
                campaign_ids: (0..1_001).map(|i| i.to_string()).collect(),
                ..good()
            },
            Code::ResourceExhausted,
            vec!["campaign_ids"],
        ),
    ];
    for (request, code, fields) in cases {
        let status = client
            .get_aggregated_daily_stats(request)
            .await
            .expect_err("invalid request");
        assert_names_fields(&status, code, &fields);
    }
    server.stop().await;
}
