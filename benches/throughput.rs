//! Ingest throughput and read latency of the real server over loopback, on SQLite and (when
//! `STATS_TEST_POSTGRES_URL` is set) PostgreSQL, beside the database's own limits measured in
//! the same run (raw `COPY`, a naive transaction per event). Prints figures; it asserts only
//! that every acknowledged event is counted once.
//!
//! Run with `cargo bench --bench throughput`.

use std::time::{Duration, Instant};

use campaign_stats::app::GroupCommitSettings;
use campaign_stats::grpc::proto::migration_service_client::MigrationServiceClient;
use campaign_stats::grpc::proto::stats_service_client::StatsServiceClient;
use campaign_stats::grpc::proto::{
    Event, EventType, GetAggregatedDailyStatsRequest, GetStatsRequest, Granularity, MigrationPhase,
    RecordEventRequest, RecordEventsRequest, TransitionPhaseRequest,
};
use campaign_stats::server::{ServerConfig, launch};
use campaign_stats::storage::{Database, PoolOptions, PostgresStore, SqliteStore, Store};
use sqlx::Connection;
use tokio::net::TcpListener;
use tonic::transport::Channel;

const USERS: u32 = 100;
const CAMPAIGNS_PER_USER: u32 = 10;
const DAYS: i64 = 365;
const BATCH_SIZE: u32 = 1_000;
const READS: usize = 2_000;

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let dir = tempfile::tempdir().expect("temporary directory");
        let sqlite_url = format!("sqlite://{}", dir.path().join("bench.db").display());
        let sqlite = |options| {
            let url = sqlite_url.clone();
            async move { SqliteStore::connect(&url, &options).await.expect("SQLite") }
        };
        let mut next = 0;
        run("SQLite", &sqlite, &sqlite_url, None, &mut next).await;

        match std::env::var("STATS_TEST_POSTGRES_URL") {
            Ok(server_url) if !server_url.is_empty() => {
                let url = fresh_postgres_database(&server_url, "cs_bench").await;
                let postgres = |options| {
                    let url = url.clone();
                    async move {
                        PostgresStore::connect(&url, &options)
                            .await
                            .expect("PostgreSQL")
                    }
                };
                let mut next = 0;
                run("PostgreSQL", &postgres, &url, Some(&url), &mut next).await;
                propagation(&url).await;
            }
            _ => println!("\nPostgreSQL skipped: set STATS_TEST_POSTGRES_URL to include it."),
        }
    });
    decision_cost();
}

/// Every comparison on one backend, in the phases writes differ in: DUAL_WRITE (both
/// storages written, reads from legacy) and, after the migration, LEGACY_RETIRED (the new
/// storage alone); reads, shadow reads and the guard are timed in NEW_PRIMARY. `url`: the
/// database's; `postgres`: the same when it is PostgreSQL, for the raw-SQL anchors.
async fn run<S, F, Fut>(name: &str, connect: &F, url: &str, postgres: Option<&str>, next: &mut u32)
where
    S: Store,
    F: Fn(PoolOptions) -> Fut,
    Fut: std::future::Future<Output = S>,
{
    let server = BenchServer::start(
        connect(PoolOptions::default()).await,
        ServerConfig::default(),
    )
    .await;
    move_to(server.channel.clone(), MigrationPhase::DualWrite).await;
    for spread in [Spread::Year, Spread::Live] {
        bulk_ingest(name, "DUAL_WRITE", spread, &server.channel, postgres, next).await;
    }
    server.stop().await;
    if let Some(url) = postgres {
        raw_naive_postgres(url).await;
    }
    unary_comparison(name, "DUAL_WRITE", connect, &GROUPINGS, next).await;

    let server = BenchServer::start(
        connect(PoolOptions::default()).await,
        ServerConfig::default(),
    )
    .await;
    to_new_primary(server.channel.clone()).await;
    reads(name, server.channel.clone()).await;
    shadow_cost(name, &server).await;
    server.stop().await;
    guard_reaction(name, connect, url).await;
    let server = BenchServer::start(
        connect(PoolOptions::default()).await,
        ServerConfig::default(),
    )
    .await;
    move_to(server.channel.clone(), MigrationPhase::LegacyRetired).await;
    for spread in [Spread::Year, Spread::Live] {
        bulk_ingest(
            name,
            "LEGACY_RETIRED",
            spread,
            &server.channel,
            postgres,
            next,
        )
        .await;
    }
    server.stop().await;
    let default = GroupCommitSettings::default();
    unary_comparison(
        name,
        "LEGACY_RETIRED",
        connect,
        &[(default.window.as_micros() as u64, flushers_of(name))],
        next,
    )
    .await;
}

/// The flushers the CLI starts by default on the backend `name`.
fn flushers_of(name: &str) -> usize {
    if name == "PostgreSQL" { 4 } else { 2 }
}

/// A server of the benchmark, on a port of its own (and its metrics on another).
struct BenchServer {
    channel: Channel,
    metrics: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), campaign_stats::server::LaunchError>>,
}

impl BenchServer {
    async fn start<S: Store>(store: S, config: ServerConfig) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let metrics_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let metrics = metrics_listener.local_addr().expect("address");
        let listeners = campaign_stats::server::Listeners {
            grpc: listener,
            metrics: Some(metrics_listener),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(launch(listeners, store, config, async {
            let _ = stopped.await;
        }));
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
        Self {
            channel,
            metrics,
            stop,
            task,
        }
    }

    /// [`BenchServer::shadow_counts`] once no shadow read waits and the count holds still
    /// (the workers finished what they took).
    async fn shadow_reads_settled(&self) -> (f64, f64) {
        let mut last = self.shadow_counts().await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if Instant::now() > deadline {
                println!("WARNING: shadow reads still running after 30 s; counted as they stand");
                return last;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = self.shadow_counts().await;
            let queued = samples(&self.scrape().await, &|line| {
                line.starts_with("campaign_stats_shadow_queued_reads ")
            });
            if now == last && queued == 0.0 {
                return now;
            }
            last = now;
        }
    }

    /// The server's metrics as Prometheus reads them.
    async fn scrape(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.metrics)
            .await
            .expect("metrics");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n")
            .await
            .expect("scrape");
        let mut scrape = String::new();
        stream.read_to_string(&mut scrape).await.expect("scrape");
        scrape
    }

    /// Shadow reads compared so far (any outcome but `skipped`), and dropped for a full
    /// queue, from the server's metrics.
    async fn shadow_counts(&self) -> (f64, f64) {
        let scrape = self.scrape().await;
        let compared = samples(&scrape, &|line| {
            line.starts_with("campaign_stats_shadow_comparisons_total{")
                && !line.contains("outcome=\"skipped\"")
        });
        let dropped = samples(&scrape, &|line| {
            line.starts_with("campaign_stats_shadow_dropped_reads_total ")
        });
        (compared, dropped)
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.expect("server task").expect("server");
    }
}

/// The sum of the samples of a scrape whose lines `keep` picks.
fn samples(scrape: &str, keep: &dyn Fn(&str) -> bool) -> f64 {
    scrape
        .lines()
        .filter(|line| keep(line))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Recreates the database `name` on the server of `server_url` and returns its URL.
async fn fresh_postgres_database(server_url: &str, name: &str) -> String {
    let mut admin = sqlx::PgConnection::connect(server_url)
        .await
        .expect("reach PostgreSQL");
    for sql in [
        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        format!("CREATE DATABASE {name}"),
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
            .execute(&mut admin)
            .await
            .expect(&sql);
    }
    let mut url = url::Url::parse(server_url).expect("PostgreSQL URL");
    url.set_path(name);
    url.to_string()
}

fn event(i: u32) -> Event {
    let user = i % USERS;
    let campaign = user * CAMPAIGNS_PER_USER + (i / USERS) % CAMPAIGNS_PER_USER;
    let day = chrono::NaiveDate::from_ymd_opt(2025, 1, 1).expect("date")
        + chrono::Days::new((i64::from(i) * 7919 % DAYS) as u64);
    let event_type = [
        EventType::Sent,
        EventType::Opened,
        EventType::Clicked,
        EventType::Replied,
    ][(i % 4) as usize];
    Event {
        user_id: format!("user-{user}"),
        campaign_id: format!("campaign-{campaign}"),
        event_type: event_type.into(),
        count: 1,
        occurred_at: Some(prost_types::Timestamp {
            seconds: day
                .and_hms_opt(10, 0, 0)
                .expect("time")
                .and_utc()
                .timestamp(),
            nanos: 0,
        }),
        email_account_id: String::new(),
        idempotency_key: format!("key-{i}"),
    }
}

/// How the bulk comparison's events are spread.
#[derive(Debug, Clone, Copy)]
enum Spread {
    /// Over a year of days and evenly over the campaigns ([`event`]): no two events of a
    /// batch share a rollup or legacy row, the hardest case for the write path.
    Year,
    /// As live producers send them ([`live_event`]): on one day, over campaigns skewed as
    /// Zipf's law has it (a few busy, many quiet), so that a batch's events share rows.
    Live,
}

impl Spread {
    fn event(self, i: u32) -> Event {
        match self {
            Spread::Year => event(i),
            Spread::Live => live_event(i),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Spread::Year => "events spread over a year and every campaign",
            Spread::Live => "live: one day, campaigns skewed (Zipf)",
        }
    }
}

/// The `i`-th event of live traffic: all on one day, the campaign drawn with Zipf's law
/// (exponent 1: campaign rank `r` has a share proportional to `1/r`), mostly sends. Each
/// campaign belongs to the same user as in [`event`].
fn live_event(i: u32) -> Event {
    let campaigns = USERS * CAMPAIGNS_PER_USER;
    // A uniform draw in [0, 1) from `i` (Knuth's multiplicative hash), then a log-uniform
    // rank: campaigns^u is Zipf-distributed with exponent 1.
    let u = f64::from(i.wrapping_mul(2_654_435_761)) / 4_294_967_296.0;
    let campaign = (f64::from(campaigns).powf(u) as u32).clamp(1, campaigns) - 1;
    let event_type = [
        EventType::Sent,
        EventType::Sent,
        EventType::Sent,
        EventType::Sent,
        EventType::Opened,
        EventType::Opened,
        EventType::Clicked,
        EventType::Replied,
    ][(i % 8) as usize];
    let mut live = event(i);
    live.user_id = format!("user-{}", campaign / CAMPAIGNS_PER_USER);
    live.campaign_id = format!("campaign-{campaign}");
    live.event_type = event_type.into();
    live.occurred_at = Some(prost_types::Timestamp {
        seconds: chrono::NaiveDate::from_ymd_opt(2025, 12, 30)
            .expect("date")
            .and_hms_opt(10, 0, 0)
            .expect("time")
            .and_utc()
            .timestamp()
            + i64::from(i % 36_000),
        nanos: 0,
    });
    live
}

/// Rounds of the bulk comparison: each round writes [`ROUND_BATCHES`] batches by
/// `RecordEvents`, as many events by `StreamEvents` and (PostgreSQL) the same rows by raw
/// `COPY`, one after the other, so that a slow spell of a shared machine hits all three.
const ROUNDS: u32 = 4;
/// Batches of [`BATCH_SIZE`] per path and round.
const ROUND_BATCHES: u32 = 25;

/// Bulk ingest beside the database's own bulk limit, in the phase the database is in.
async fn bulk_ingest(
    name: &str,
    phase: &str,
    spread: Spread,
    channel: &Channel,
    postgres: Option<&str>,
    next: &mut u32,
) {
    println!("\n== {name}: bulk ingest in {phase}, {} ==", spread.name());
    let mut client = StatsServiceClient::new(channel.clone());
    let mut copy = match postgres {
        Some(url) => Some(raw_connection(url).await),
        None => None,
    };
    let counted_before = events_counted(channel.clone()).await;
    let round_events = ROUND_BATCHES * BATCH_SIZE;
    let (mut batched, mut streamed, mut copied) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let (mut batched_cpu, mut streamed_cpu) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..ROUNDS {
        let first = *next;
        let cpu = process_cpu();
        let started = Instant::now();
        for batch in 0..ROUND_BATCHES {
            let from = first + batch * BATCH_SIZE;
            let events = (from..from + BATCH_SIZE).map(|i| spread.event(i)).collect();
            client
                .record_events(RecordEventsRequest { events })
                .await
                .expect("RecordEvents");
        }
        batched += started.elapsed();
        batched_cpu += cpu_since(cpu);
        if let Some(connection) = copy.as_mut() {
            copied += copy_rows(connection, spread, first..first + round_events).await;
        }
        let from = first + round_events;
        let stream =
            tokio_stream::iter(
                (from..from + round_events).map(move |i| RecordEventRequest {
                    event: Some(spread.event(i)),
                }),
            );
        let cpu = process_cpu();
        let started = Instant::now();
        client.stream_events(stream).await.expect("StreamEvents");
        streamed += started.elapsed();
        streamed_cpu += cpu_since(cpu);
        *next += 2 * round_events;
    }
    let total = ROUNDS * round_events;
    let per_million = |cpu: Duration| {
        format!(
            "{:.0} CPU s per million events",
            cpu.as_secs_f64() * 1e6 / f64::from(total)
        )
    };
    let of_copy = |took: Duration| {
        if copy.is_some() {
            format!(
                "{:.0}% of raw COPY's rate, ",
                copied.as_secs_f64() / took.as_secs_f64() * 100.0
            )
        } else {
            String::new()
        }
    };
    report_rate("RecordEvents (batches of 1,000)", total, batched);
    println!(
        "  ({}{}, server and client)",
        of_copy(batched),
        per_million(batched_cpu)
    );
    report_rate("StreamEvents", total, streamed);
    println!(
        "  ({}{}, server and client)",
        of_copy(streamed),
        per_million(streamed_cpu)
    );
    if copy.is_some() {
        report_rate(
            "raw COPY of the same rows into the events table",
            total,
            copied,
        );
    }
    // Every acknowledged event is counted once.
    let counted = events_counted(channel.clone()).await - counted_before;
    assert_eq!(
        counted,
        2 * u64::from(total),
        "events counted by the all-users view"
    );
}

/// CPU time this process has used since `before`.
fn cpu_since(before: Option<Duration>) -> Duration {
    process_cpu()
        .zip(before)
        .map_or(Duration::ZERO, |(after, before)| {
            after.saturating_sub(before)
        })
}

/// Read latency in NEW_PRIMARY.
async fn reads(name: &str, channel: Channel) {
    let mut client = StatsServiceClient::new(channel);
    println!("\n== {name}: reads in NEW_PRIMARY (answered by the new storage) ==");
    let mut one = Vec::with_capacity(READS);
    for i in 0..READS as u32 {
        let user = i % USERS;
        let request = GetStatsRequest {
            user_id: format!("user-{user}"),
            campaign_id: format!(
                "campaign-{}",
                user * CAMPAIGNS_PER_USER + i % CAMPAIGNS_PER_USER
            ),
            start_date: "2025-01-01".into(),
            end_date: "2025-12-31".into(),
        };
        let started = Instant::now();
        client.get_stats(request).await.expect("GetStats");
        one.push(started.elapsed());
    }
    report_latency("GetStats, one campaign, a year", &mut one);

    let mut daily = Vec::with_capacity(READS);
    for i in 0..READS as u32 {
        let request = GetAggregatedDailyStatsRequest {
            user_id: format!("user-{}", i % USERS),
            start_date: "2025-01-01".into(),
            end_date: "2025-12-31".into(),
            granularity: Granularity::Day.into(),
            campaign_ids: vec![],
            fill_empty: true,
        };
        let started = Instant::now();
        client
            .get_aggregated_daily_stats(request)
            .await
            .expect("series");
        daily.push(started.elapsed());
    }
    report_latency("GetAggregatedDailyStats, a user, a year by day", &mut daily);

    let mut everyone = Vec::with_capacity(100);
    for _ in 0..100 {
        let request = all_users_year();
        let started = Instant::now();
        client
            .get_aggregated_daily_stats(request)
            .await
            .expect("all users");
        everyone.push(started.elapsed());
    }
    report_latency(
        "GetAggregatedDailyStats, all users, a year by month",
        &mut everyone,
    );
}

/// One campaign of one user over a year, the `i`-th of the reads' round robin.
fn campaign_year(i: u32) -> GetStatsRequest {
    let user = i % USERS;
    GetStatsRequest {
        user_id: format!("user-{user}"),
        campaign_id: format!(
            "campaign-{}",
            user * CAMPAIGNS_PER_USER + i % CAMPAIGNS_PER_USER
        ),
        start_date: "2025-01-01".into(),
        end_date: "2025-12-31".into(),
    }
}

/// Sets the shadow sample rate for every replica, as an operator would.
async fn shadow_rate(channel: Channel, rate: f64) {
    use campaign_stats::grpc::proto::SetShadowSampleRateRequest;
    use campaign_stats::grpc::proto::rollout_service_client::RolloutServiceClient;
    RolloutServiceClient::new(channel)
        .set_shadow_sample_rate(SetShadowSampleRateRequest {
            rate,
            server_default: false,
            reason: "bench".into(),
            actor: "bench".into(),
        })
        .await
        .expect("shadow rate");
}

/// Rounds of [`shadow_cost`], each arm in turn, so that drift hits every arm alike.
const SHADOW_ROUNDS: usize = 6;
/// Reads of each arm of [`shadow_cost`], over its rounds: the p99 of 2,000 (its 20 slowest)
/// moved by tens of percent between runs with nothing changed; 6,000 steadies it.
const SHADOW_READS: usize = 6_000;
/// The shadow sample rates compared: off, the default, every read.
const SHADOW_ARMS: [f64; 3] = [0.0, 0.01, 1.0];
/// Reads a second of the paced client (about half of what one closed-loop client makes).
const PACED_READS_PER_SECOND: u64 = 500;

/// What shadowing costs the primary read: `GetStats` latency and process CPU per read at each
/// of [`SHADOW_ARMS`], in alternating rounds on one server (NEW_PRIMARY: the primary is the
/// new storage, the shadow read asks legacy). Twice: a closed-loop client (the next read as
/// soon as the last is answered: the machine never idles, the worst case for work done beside
/// the answer), and a client paced at [`PACED_READS_PER_SECOND`], as traffic from elsewhere
/// arrives.
async fn shadow_cost(name: &str, server: &BenchServer) {
    println!("\n== {name}: shadow reads (NEW_PRIMARY; the shadow read asks legacy) ==");
    let channel = server.channel.clone();
    for paced in [false, true] {
        let mut client = StatsServiceClient::new(channel.clone());
        let mut latencies = vec![Vec::new(); SHADOW_ARMS.len()];
        let mut cpu = vec![Duration::ZERO; SHADOW_ARMS.len()];
        // Shadow reads compared and dropped in each arm.
        let mut shadowed = vec![(0.0, 0.0); SHADOW_ARMS.len()];
        let mut i = 0;
        for _ in 0..SHADOW_ROUNDS {
            for (arm, rate) in SHADOW_ARMS.iter().enumerate() {
                shadow_rate(channel.clone(), *rate).await;
                let mut pace = tokio::time::interval(Duration::from_micros(
                    1_000_000 / PACED_READS_PER_SECOND,
                ));
                let before = process_cpu();
                let counted_before = server.shadow_counts().await;
                for _ in 0..SHADOW_READS / SHADOW_ROUNDS {
                    if paced {
                        pace.tick().await;
                    }
                    let started = Instant::now();
                    client.get_stats(campaign_year(i)).await.expect("GetStats");
                    latencies[arm].push(started.elapsed());
                    i += 1;
                }
                cpu[arm] += cpu_since(before);
                // The arm's shadow reads finish before the next arm starts: left over, they
                // would slow that arm's reads and count as its own.
                let counted = server.shadow_reads_settled().await;
                shadowed[arm].0 += counted.0 - counted_before.0;
                shadowed[arm].1 += counted.1 - counted_before.1;
            }
        }
        let mode = if paced {
            format!("paced at {PACED_READS_PER_SECOND}/s")
        } else {
            "closed loop".to_owned()
        };
        let mut p99s = Vec::new();
        for (arm, rate) in SHADOW_ARMS.iter().enumerate() {
            let samples = &mut latencies[arm];
            let calls = samples.len();
            report_latency(
                &format!("GetStats, {mode}, shadow sample rate {rate}"),
                samples,
            );
            p99s.push(samples[(calls - 1) * 99 / 100]);
            println!(
                "  ({:.0} µs of process CPU a read, server and client{}; {:.0} shadow reads \
                 compared, {:.0} dropped for a full queue)",
                cpu[arm].as_secs_f64() * 1e6 / calls as f64,
                if name == "PostgreSQL" {
                    "; PostgreSQL's own processes not counted"
                } else {
                    ", SQLite included"
                },
                shadowed[arm].0,
                shadowed[arm].1
            );
        }
        for (arm, rate) in SHADOW_ARMS.iter().enumerate().skip(1) {
            println!(
                "{:<55} {:>+8.1}%  (target <= 5% at rate 1)",
                format!("p99 added, {mode}, rate {rate}"),
                (p99s[arm].as_secs_f64() / p99s[0].as_secs_f64() - 1.0) * 100.0
            );
        }
    }
    shadow_rate(channel.clone(), 0.0).await;
    report_trip(channel).await;
}

/// Says whether the guard tripped during a section (the storages disagreed on some reads),
/// with what it saw, and re-arms it so that the sections after it read as configured. A
/// trip means the reads after it went to LEGACY first: that section's figures are not
/// comparable.
async fn report_trip(channel: Channel) {
    use campaign_stats::grpc::proto::rollout_service_client::RolloutServiceClient;
    use campaign_stats::grpc::proto::{
        GetGuardRequest, KillSwitchRequest, ListShadowMismatchesRequest,
    };
    let mut rollout = RolloutServiceClient::new(channel);
    let guard = rollout
        .get_guard(GetGuardRequest {})
        .await
        .expect("GetGuard")
        .into_inner();
    if !guard.tripped {
        return;
    }
    println!(
        "WARNING: the guard tripped during this section ({}: {}); the reads after the trip \
         went to LEGACY first, so the figures above are not comparable",
        guard.trip_signal, guard.trip_figures
    );
    let mismatches = rollout
        .list_shadow_mismatches(ListShadowMismatchesRequest {})
        .await
        .expect("mismatches")
        .into_inner()
        .mismatches;
    for m in mismatches.iter().take(5) {
        println!(
            "  {} user {} campaign {} day {}: legacy {:?} new {:?}",
            m.method, m.user_id, m.campaign_id, m.date, m.legacy, m.new
        );
    }
    rollout
        .kill_switch(KillSwitchRequest {
            engaged: false,
            reason: "bench: re-arm after a trip".into(),
            actor: "bench".into(),
        })
        .await
        .expect("re-arm");
}

/// Runs `sql` on the database at `url` directly (a divergence planted behind the service).
async fn execute_sql(url: &str, sql: &'static str) {
    if url.starts_with("sqlite:") {
        let mut connection = sqlx::SqliteConnection::connect(url).await.expect("SQLite");
        sqlx::query(sql).execute(&mut connection).await.expect(sql);
    } else {
        let mut connection = raw_connection(url).await;
        sqlx::query(sql).execute(&mut connection).await.expect(sql);
    }
}

/// Trips measured by [`guard_reaction`].
const TRIPS: usize = 10;

/// How soon the guard rolls reads back: each round starts a server (a fresh guard window)
/// that shadows every read, makes 20 agreeing reads, plants a divergence in the new storage,
/// and times from the answer of the next read (1 disagreement of 21 > 1 %: it crosses the
/// threshold) until a `WatchRollout` of the same replica shows the kill switch engaged. The
/// round then repairs the divergence and releases the kill switch.
async fn guard_reaction<S, F, Fut>(name: &str, connect: &F, url: &str)
where
    S: Store,
    F: Fn(PoolOptions) -> Fut,
    Fut: std::future::Future<Output = S>,
{
    use campaign_stats::grpc::proto::rollout_service_client::RolloutServiceClient;
    use campaign_stats::grpc::proto::{GetGuardRequest, KillSwitchRequest, WatchRolloutRequest};
    use campaign_stats::rollout::GuardSettings;
    use tokio_stream::StreamExt;

    let config = ServerConfig {
        guard: GuardSettings {
            min_samples: 20,
            quarantine_after: 0,
            ..GuardSettings::DEFAULT
        },
        ..ServerConfig::default()
    };
    let mut samples = Vec::with_capacity(TRIPS);
    for trip in 0..TRIPS as u32 {
        let server =
            BenchServer::start(connect(PoolOptions::default()).await, config.clone()).await;
        let channel = server.channel.clone();
        shadow_rate(channel.clone(), 1.0).await;
        let mut rollout = RolloutServiceClient::new(channel.clone());
        let mut stats = StatsServiceClient::new(channel.clone());
        for i in 0..20 {
            stats.get_stats(campaign_year(i)).await.expect("GetStats");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while rollout
            .get_guard(GetGuardRequest {})
            .await
            .expect("GetGuard")
            .into_inner()
            .window
            .unwrap_or_default()
            .comparisons
            < 20
        {
            assert!(Instant::now() < deadline, "shadow reads never landed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut watch = rollout
            .watch_rollout(WatchRolloutRequest {})
            .await
            .expect("watch")
            .into_inner();
        watch.next().await.expect("current").expect("rollout");
        execute_sql(url, "UPDATE campaign_day_totals SET sent = sent + 1").await;
        stats
            .get_stats(campaign_year(trip))
            .await
            .expect("GetStats");
        let crossed = Instant::now();
        let rolled_back = async {
            while !watch
                .next()
                .await
                .expect("stream")
                .expect("rollout")
                .kill_switch
            {}
        };
        tokio::time::timeout(Duration::from_secs(30), rolled_back)
            .await
            .expect("the guard did not roll back within 30 s");
        samples.push(crossed.elapsed());
        drop(watch);
        execute_sql(url, "UPDATE campaign_day_totals SET sent = sent - 1").await;
        rollout
            .kill_switch(KillSwitchRequest {
                engaged: false,
                reason: "bench: re-arm".into(),
                actor: "bench".into(),
            })
            .await
            .expect("release");
        shadow_rate(channel, 0.0).await;
        server.stop().await;
    }
    report_latency(
        &format!("{name}: guard reaction, crossing read to rollback applied"),
        &mut samples,
    );
}

/// Concurrent single-event callers, as producers with many workers call `RecordEvent`.
const CALLERS: u32 = 64;
/// Events each caller sends, one call at a time.
const CALLS_PER_CALLER: u32 = 150;
/// Group-commit settings compared: window in microseconds, flushers.
const GROUPINGS: [(u64, usize); 6] = [(0, 1), (0, 2), (0, 4), (500, 2), (2_000, 2), (5_000, 2)];

/// 64 callers of `RecordEvent` at once under several group-commit windows, beside the naive
/// path on the same schema: one transaction per event (the storage's own write, called by
/// 64 tasks with a pool of 64 connections, no gRPC). Runs after [`run`], so the phase is
/// NEW_PRIMARY (both storages written).
async fn unary_comparison<S, F, Fut>(
    name: &str,
    phase: &str,
    connect: &F,
    groupings: &[(u64, usize)],
    next: &mut u32,
) where
    S: Store,
    F: Fn(PoolOptions) -> Fut,
    Fut: std::future::Future<Output = S>,
{
    use std::sync::Arc;

    println!("\n== {name}: RecordEvent from {CALLERS} concurrent callers in {phase} ==");
    let total = CALLERS * CALLS_PER_CALLER;
    let naive = Arc::new(
        connect(PoolOptions {
            max_connections: CALLERS,
            ..PoolOptions::default()
        })
        .await,
    );
    let started = Instant::now();
    let callers: Vec<_> = (0..CALLERS)
        .map(|caller| {
            let store = Arc::clone(&naive);
            let first = *next + caller * CALLS_PER_CALLER;
            tokio::spawn(async move {
                for i in first..first + CALLS_PER_CALLER {
                    let one: campaign_stats::domain::Event =
                        event(i).try_into().expect("a valid event");
                    store.record_events(&[one]).await.expect("a naive write");
                }
            })
        })
        .collect();
    for caller in callers {
        caller.await.expect("naive caller");
    }
    let naive_rate = f64::from(total) / started.elapsed().as_secs_f64();
    report_rate(
        "naive: a transaction per event (64 tasks, no gRPC)",
        total,
        started.elapsed(),
    );
    *next += total;
    drop(naive);

    for &(window_us, flushers) in groupings {
        let config = ServerConfig {
            group_commit: GroupCommitSettings {
                window: Duration::from_micros(window_us),
                flushers,
                ..GroupCommitSettings::default()
            },
            ..ServerConfig::default()
        };
        let server = BenchServer::start(connect(PoolOptions::default()).await, config).await;
        let channel = server.channel.clone();
        let counted_before = events_counted(channel.clone()).await;
        let cpu_before = process_cpu();
        let started = Instant::now();
        let callers: Vec<_> = (0..CALLERS)
            .map(|caller| {
                let mut client = StatsServiceClient::new(channel.clone());
                let first = *next + caller * CALLS_PER_CALLER;
                tokio::spawn(async move {
                    let mut latencies = Vec::with_capacity(CALLS_PER_CALLER as usize);
                    for i in first..first + CALLS_PER_CALLER {
                        let call = Instant::now();
                        client
                            .record_event(RecordEventRequest {
                                event: Some(event(i)),
                            })
                            .await
                            .expect("RecordEvent");
                        latencies.push(call.elapsed());
                    }
                    latencies
                })
            })
            .collect();
        let mut latencies = Vec::with_capacity(total as usize);
        for caller in callers {
            latencies.extend(caller.await.expect("caller"));
        }
        let took = started.elapsed();
        *next += total;
        let rate = f64::from(total) / took.as_secs_f64();
        report_rate(
            &format!("RecordEvent, window {window_us} µs, {flushers} flusher(s)"),
            total,
            took,
        );
        let cpu = process_cpu().zip(cpu_before).map(|(after, before)| {
            after.saturating_sub(before).as_secs_f64() * 1e6 / f64::from(total)
        });
        report_latency(
            &format!(
                "  ({:.2}× naive, {} CPU s per million events, server and client)",
                rate / naive_rate,
                cpu.map_or("?".to_owned(), |s| format!("{s:.0}"))
            ),
            &mut latencies,
        );
        // Every acknowledged event is counted once.
        let counted = events_counted(channel.clone()).await - counted_before;
        assert_eq!(
            counted,
            u64::from(total),
            "events counted by the all-users view"
        );
        server.stop().await;
    }
}

/// The all-users view of 2025 by month.
fn all_users_year() -> GetAggregatedDailyStatsRequest {
    GetAggregatedDailyStatsRequest {
        user_id: String::new(),
        start_date: "2025-01-01".into(),
        end_date: "2025-12-31".into(),
        granularity: Granularity::Month.into(),
        campaign_ids: vec![],
        fill_empty: false,
    }
}

/// Every event of 2025 as the all-users view counts it (each benchmark event counts 1).
async fn events_counted(channel: Channel) -> u64 {
    let mut client = StatsServiceClient::new(channel);
    let year = client
        .get_aggregated_daily_stats(all_users_year())
        .await
        .expect("all users")
        .into_inner();
    year.buckets
        .iter()
        .filter_map(|bucket| bucket.metrics.as_ref())
        .map(|m| m.sent + m.opened + m.clicked + m.replied + m.positive_replies + m.bounced)
        .sum()
}

/// A plain connection for the raw-SQL anchors, with Nagle's algorithm off as the service's
/// own connections have it (else the anchors would wait on delayed ACKs the service does not).
async fn raw_connection(url: &str) -> sqlx::PgConnection {
    let mut connection = sqlx::PgConnection::connect(url).await.expect("connect");
    let port = url::Url::parse(url)
        .ok()
        .and_then(|u| u.port())
        .unwrap_or(5432);
    campaign_stats::storage::disable_nagle(&mut connection, port)
        .await
        .expect("TCP_NODELAY");
    connection
}

/// The database's own bulk limit: the rows `rows` by text `COPY` straight into the
/// partitioned events table with its indexes, in batches of [`BATCH_SIZE`] (one `COPY`
/// each). `RecordEvents` does far more per row (keys, rollups, the legacy row); this says how
/// far it is from the raw insert. Answers the time taken.
async fn copy_rows(
    connection: &mut sqlx::PgConnection,
    spread: Spread,
    rows: std::ops::Range<u32>,
) -> Duration {
    let started = Instant::now();
    let mut from = rows.start;
    while from < rows.end {
        let to = (from + BATCH_SIZE).min(rows.end);
        let mut data = String::with_capacity(BATCH_SIZE as usize * 96);
        for i in from..to {
            let e = spread.event(i);
            let at = e.occurred_at.expect("a time");
            let at = chrono::DateTime::from_timestamp(at.seconds, 0).expect("a valid time");
            // Ids and keys of the benchmark need no escaping.
            data.push_str(&format!(
                "{}\t{}\t{}\t{}\t{}\t\\N\t{}\n",
                e.user_id,
                e.campaign_id,
                e.event_type,
                e.count,
                at.to_rfc3339(),
                e.idempotency_key
            ));
        }
        let mut copy = connection
            .copy_in_raw(
                "COPY events (user_id, campaign_id, event_type, count, occurred_at, \
                 email_account_id, idempotency_key) FROM STDIN",
            )
            .await
            .expect("COPY");
        copy.send(data.as_bytes()).await.expect("COPY data");
        copy.finish().await.expect("COPY done");
        from = to;
    }
    started.elapsed()
}

/// The database's own naive path, as a pgbench script would run it: 64 connections, each
/// writing one event per transaction in four statements (dedupe key, event row, campaign
/// rollup, legacy row) on the service's schema, in a database of its own (`cs_bench_raw`
/// beside `url`'s): its rows grow legacy and the campaign rollups but not the all-users
/// rollup, so in the service's database they would make the two storages disagree on the
/// all-users view, and the shadow reads later in the run would count that as a mismatch
/// (they did: the guard tripped in some runs, on exactly those days).
async fn raw_naive_postgres(url: &str) {
    let url = &fresh_postgres_database(url, "cs_bench_raw").await;
    PostgresStore::connect(url, &PoolOptions::default())
        .await
        .expect("PostgreSQL")
        .update_schema()
        .await
        .expect("the schema");
    let total = CALLERS * CALLS_PER_CALLER;
    let started = Instant::now();
    let callers: Vec<_> = (0..CALLERS)
        .map(|caller| {
            let url = url.to_owned();
            tokio::spawn(async move {
                let mut connection = raw_connection(&url).await;
                for i in 0..CALLS_PER_CALLER {
                    let n = 20_000_000 + caller * CALLS_PER_CALLER + i;
                    let (user, campaign) = (format!("raw-user-{caller}"), format!("raw-{caller}"));
                    let day = chrono::NaiveDate::from_ymd_opt(2025, 1, 1).expect("date")
                        + chrono::Days::new(u64::from(n % 365));
                    let mut tx = connection.begin().await.expect("begin");
                    sqlx::query(
                        "INSERT INTO idempotency_keys (user_id, idempotency_key) VALUES ($1, $2) \
                         ON CONFLICT DO NOTHING",
                    )
                    .bind(&user)
                    .bind(format!("raw-key-{n}"))
                    .execute(&mut *tx)
                    .await
                    .expect("key");
                    sqlx::query(
                        "INSERT INTO events (user_id, campaign_id, event_type, count, occurred_at) \
                         VALUES ($1, $2, 1, 1, $3::date + time '10:00')",
                    )
                    .bind(&user)
                    .bind(&campaign)
                    .bind(day)
                    .execute(&mut *tx)
                    .await
                    .expect("event");
                    sqlx::query(
                        "INSERT INTO campaign_day_totals (user_id, campaign_id, day, sent) \
                         VALUES ($1, $2, $3, 1) ON CONFLICT (user_id, campaign_id, day) \
                         DO UPDATE SET sent = campaign_day_totals.sent + 1",
                    )
                    .bind(&user)
                    .bind(&campaign)
                    .bind(day)
                    .execute(&mut *tx)
                    .await
                    .expect("rollup");
                    sqlx::query(
                        "INSERT INTO campaign_daily_stat_entries (campaign_id, user_id, \
                         stat_date, sent) VALUES ($1, $2, $3, 1) \
                         ON CONFLICT (campaign_id, stat_date) \
                         DO UPDATE SET sent = campaign_daily_stat_entries.sent + 1",
                    )
                    .bind(&campaign)
                    .bind(&user)
                    .bind(day)
                    .execute(&mut *tx)
                    .await
                    .expect("legacy");
                    tx.commit().await.expect("commit");
                }
            })
        })
        .collect();
    for caller in callers {
        caller.await.expect("raw caller");
    }
    println!();
    report_rate(
        "raw SQL: a transaction per event (64 connections, 4 statements)",
        total,
        started.elapsed(),
    );
}

/// CPU time this process (server and client alike: they share it) has used so far, from
/// `/proc/self/stat`; `None` where there is no such file.
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which ends with ')'): utime and stime are the 12th and
    // 13th, in clock ticks (100 per second on Linux).
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

fn report_rate(what: &str, events: u32, took: Duration) {
    println!(
        "{what:<55} {:>10.0} events/s  ({events} events in {took:.2?})",
        f64::from(events) / took.as_secs_f64()
    );
}

fn report_latency(what: &str, samples: &mut [Duration]) {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    println!(
        "{what:<55} p50 {:>9.2?}  p99 {:>9.2?}  ({} calls)",
        at(0.5),
        at(0.99),
        samples.len()
    );
}

/// What one rollout decision costs (the work every read does to pick a storage).
fn decision_cost() {
    use campaign_stats::migration::Phase;
    use campaign_stats::rollout::{RolloutConfig, decide};
    let users: Vec<String> = (0..10_000).map(|i| format!("user-{i:08}")).collect();
    let config = RolloutConfig {
        basis_points: 2_500,
        kill_switch: false,
        salt: "bench".into(),
        version: 1,
        shadow_sample_ppm: None,
        automation: Default::default(),
    };
    let rounds = 200;
    let started = Instant::now();
    let mut on_new = 0u64;
    for _ in 0..rounds {
        for user in &users {
            let decision = decide(Phase::Verified, &config, None, std::hint::black_box(user));
            on_new += u64::from(decision.source == campaign_stats::domain::StorageSource::New);
        }
    }
    let took = started.elapsed();
    let calls = rounds * users.len();
    println!("\n== rollout ==");
    println!(
        "{:<55} {:>9.1} ns/call  ({calls} calls, {:.1}% on NEW)",
        "decide (bucket + decision)",
        took.as_nanos() as f64 / calls as f64,
        on_new as f64 * 100.0 / calls as f64
    );
}

/// How long a rollout change made through one replica takes to be applied by another, on
/// one PostgreSQL database (LISTEN/NOTIFY; the second replica's polling is set to a minute).
async fn propagation(url: &str) {
    use campaign_stats::grpc::proto::rollout_service_client::RolloutServiceClient;
    use campaign_stats::grpc::proto::{SetRolloutPercentageRequest, WatchRolloutRequest};
    use tokio_stream::StreamExt;

    let start = async |refresh| {
        let store = PostgresStore::connect(url, &PoolOptions::default())
            .await
            .expect("PostgreSQL");
        let config = ServerConfig {
            rollout_refresh_interval: refresh,
            ..ServerConfig::default()
        };
        BenchServer::start(store, config).await
    };
    let first_server = start(Duration::from_millis(500)).await;
    let second_server = start(Duration::from_secs(60)).await;
    let mut first = RolloutServiceClient::new(first_server.channel.clone());
    let mut second = RolloutServiceClient::new(second_server.channel.clone());
    let mut watch = second
        .watch_rollout(WatchRolloutRequest {})
        .await
        .expect("watch")
        .into_inner();
    let mut version = watch
        .next()
        .await
        .expect("current")
        .expect("rollout")
        .version;
    let mut samples = Vec::new();
    for i in 0..20 {
        let changed = Instant::now();
        first
            .set_rollout_percentage(SetRolloutPercentageRequest {
                percentage: f64::from(i % 2),
                expected_version: version,
                reason: "bench".into(),
                force: true,
                actor: "bench".into(),
            })
            .await
            .expect("change");
        version += 1;
        while watch
            .next()
            .await
            .expect("stream")
            .expect("rollout")
            .version
            < version
        {}
        samples.push(changed.elapsed());
    }
    drop(watch);
    report_latency(
        "rollout change applied by another replica (PostgreSQL)",
        &mut samples,
    );
    first_server.stop().await;
    second_server.stop().await;
}

/// Moves the migration to `phase`, as an operator would.
async fn move_to(channel: Channel, phase: MigrationPhase) {
    MigrationServiceClient::new(channel)
        .transition_phase(TransitionPhaseRequest {
            force: false,
            target: phase.into(),
            reason: "bench".into(),
            actor: "bench".into(),
        })
        .await
        .expect("transition");
}

/// Takes the database from DUAL_WRITE through the migration to NEW_PRIMARY, as an operator
/// would: the backfill finds nothing missing (every write so far went to both storages).
async fn to_new_primary(channel: Channel) {
    use campaign_stats::grpc::proto::{
        StartBackfillRequest, VerifyConsistencyRequest, WatchRunRequest,
    };
    use tokio_stream::StreamExt;

    let mut client = MigrationServiceClient::new(channel.clone());
    let run_id = client
        .start_backfill(StartBackfillRequest {
            dry_run: false,
            batch_size: 1000,
            throttle_ms: 0,
            actor: "bench".into(),
        })
        .await
        .expect("backfill")
        .into_inner()
        .run_id;
    let mut progress = client
        .watch_run(WatchRunRequest { run_id })
        .await
        .expect("watch")
        .into_inner();
    while progress.next().await.is_some() {}
    move_to(channel.clone(), MigrationPhase::Backfilled).await;
    client
        .verify_consistency(VerifyConsistencyRequest {
            start_date: String::new(),
            end_date: String::new(),
            actor: "bench".into(),
        })
        .await
        .expect("verify");
    move_to(channel.clone(), MigrationPhase::Verified).await;
    move_to(channel, MigrationPhase::NewPrimary).await;
}
