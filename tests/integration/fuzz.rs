//! Arbitrary input, generated: strings of any characters and length, dates, counts,
//! timestamps, enum values and list sizes. Every answer is a success or a clean status of a
//! kind that blames the request (never INTERNAL, UNKNOWN or a broken connection, which a
//! panic would cause), every status stays small, and a refused write stores nothing.

use campaign_stats::grpc::proto::{
    Event, GetAggregatedDailyStatsRequest, GetStatsForCampaignsRequest, GetStatsRequest,
    RecordEventsRequest,
};
use campaign_stats::grpc::{MAX_STATUS_BYTES, status_header_bytes};
use campaign_stats::migration::Phase;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};
use tonic::Code;

use crate::common::TestDb;

crate::on_both_backends!(arbitrary_requests_get_clean_answers_and_refused_writes_store_nothing);

/// Generated requests per run: enough to meet every rule many times, quick enough for CI.
const CASES: usize = 300;

/// Text as clients send it by mistake or on purpose: empty, plain, any Unicode (control
/// characters, NUL, combining marks), or around and past the 128-byte id limit.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => Just(String::new()),
        8 => "[a-z0-9_-]{1,12}",
        1 => any::<String>(),
        1 => "\\PC{100,140}",
        1 => ".{0,300}",
    ]
}

/// An optional field's text: mostly absent or plain, sometimes anything.
fn optional_text() -> impl Strategy<Value = String> {
    prop_oneof![4 => Just(String::new()), 4 => "[a-z0-9]{1,12}", 1 => text()]
}

/// Dates: valid, almost valid, or anything.
fn date() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => "20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9])",
        1 => "[0-9]{1,5}-[0-9]{1,3}-[0-9]{1,3}",
        1 => any::<String>(),
        1 => Just(String::new()),
    ]
}

fn timestamp() -> impl Strategy<Value = Option<prost_types::Timestamp>> {
    prop_oneof![
        2 => Just(None),
        1 => (any::<i64>(), any::<i32>())
            .prop_map(|(seconds, nanos)| Some(prost_types::Timestamp { seconds, nanos })),
        2 => (1_700_000_000i64..1_790_000_000, 0i32..1_000_000_000)
            .prop_map(|(seconds, nanos)| Some(prost_types::Timestamp { seconds, nanos })),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    (
        (text(), text(), prop_oneof![4 => 0i32..8, 1 => any::<i32>()]),
        (
            prop_oneof![4 => 0u32..5, 1 => any::<u32>()],
            timestamp(),
            optional_text(),
            optional_text(),
        ),
    )
        .prop_map(
            |((user_id, campaign_id, event_type), (count, occurred_at, email, key))| Event {
                user_id,
                campaign_id,
                event_type,
                count,
                occurred_at,
                email_account_id: email,
                idempotency_key: key,
            },
        )
}

#[derive(Debug, Clone)]
enum Call {
    Record(Vec<Event>),
    Stats(GetStatsRequest),
    Campaigns(GetStatsForCampaignsRequest),
    Series(GetAggregatedDailyStatsRequest),
}

fn call() -> impl Strategy<Value = Call> {
    let campaigns = prop_oneof![
        prop::collection::vec(text(), 0..4),
        prop::collection::vec("[a-z]{1,4}", 1000..1003),
    ];
    prop_oneof![
        3 => prop::collection::vec(event(), 0..4).prop_map(Call::Record),
        1 => (text(), text(), date(), date()).prop_map(|(user_id, campaign_id, start_date, end_date)| {
            Call::Stats(GetStatsRequest { user_id, campaign_id, start_date, end_date })
        }),
        1 => (text(), campaigns.clone(), date(), date()).prop_map(
            |(user_id, campaign_ids, start_date, end_date)| {
                Call::Campaigns(GetStatsForCampaignsRequest { user_id, campaign_ids, start_date, end_date })
            }
        ),
        1 => (text(), campaigns, date(), date(), any::<i32>(), any::<bool>()).prop_map(
            |(user_id, campaign_ids, start_date, end_date, granularity, fill_empty)| {
                Call::Series(GetAggregatedDailyStatsRequest {
                    user_id, campaign_ids, start_date, end_date, granularity, fill_empty,
                })
            }
        ),
    ]
}

/// The statuses that say the request was at fault (or, for reads, that a total cannot be
/// shown); anything else means the server failed.
const CLEAN: [Code; 4] = [
    Code::InvalidArgument,
    Code::OutOfRange,
    Code::ResourceExhausted,
    Code::PermissionDenied,
];

async fn arbitrary_requests_get_clean_answers_and_refused_writes_store_nothing(db: TestDb) {
    // DUAL_WRITE keeps every stored event in the events table (LEGACY_ONLY keeps only clicks
    // there), so its row count says what a call stored.
    let db = db.in_phase(Phase::DualWrite);
    let server = db.start_server().await;
    let mut stats = server.stats().await;
    // Fixed seed: a failure names its case and comes back on every run.
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        proptest::test_runner::TestRng::deterministic_rng(
            proptest::test_runner::RngAlgorithm::ChaCha,
        ),
    );
    let strategy = call();
    let (mut accepted, mut refused) = (0, 0);
    for case in 0..CASES {
        let call = strategy.new_tree(&mut runner).expect("a case").current();
        let stored_before = db.scalar("SELECT COUNT(*) FROM events").await;
        let answer = match call.clone() {
            Call::Record(events) => stats
                .record_events(RecordEventsRequest { events })
                .await
                .map(|r| Some(r.into_inner())),
            Call::Stats(request) => stats.get_stats(request).await.map(|_| None),
            Call::Campaigns(request) => stats.get_stats_for_campaigns(request).await.map(|_| None),
            Call::Series(request) => stats
                .get_aggregated_daily_stats(request)
                .await
                .map(|_| None),
        };
        let stored = db.scalar("SELECT COUNT(*) FROM events").await - stored_before;
        match answer {
            Ok(recorded) => {
                accepted += 1;
                let newly = recorded.map_or(0, |r| r.stored);
                assert_eq!(stored as u64, newly, "case {case}: {call:?}");
            }
            Err(status) => {
                refused += 1;
                assert!(
                    CLEAN.contains(&status.code()),
                    "case {case}: {status:?} for {call:?}"
                );
                assert!(
                    status_header_bytes(&status) <= MAX_STATUS_BYTES,
                    "case {case}: a status of {} bytes",
                    status_header_bytes(&status)
                );
                assert_eq!(
                    stored, 0,
                    "case {case}: a refused request stored events: {call:?}"
                );
            }
        }
    }
    println!("{CASES} generated calls: {accepted} answered, {refused} refused cleanly");
    assert!(
        accepted > 0 && refused > 0,
        "the cases met only one side of the rules"
    );
    server.stop().await;
}
