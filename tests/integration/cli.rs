//! The admin command line, run as a user runs it, against a real server.

use std::time::{Duration, Instant};

use tokio::io::AsyncBufReadExt;

use serde_json::Value;

use crate::common::{ServerProcess, TestDb};

crate::on_both_backends!(
    operator_migrates_with_the_cli_alone,
    controller_moves_the_rollout_with_the_cli,
    a_controller_drives_two_server_processes_with_the_cli,
    the_server_may_be_named_as_host_port,
    a_closed_pipe_ends_the_cli_quietly,
    stored_control_characters_are_escaped_on_output,
    phases_and_errors_read_alike_in_every_command,
    an_operator_leaves_a_backfill_and_comes_back_to_it,
    a_person_reads_stats_from_the_cli,
);

/// Runs `campaign-stats ARGS…` and returns its exit success and stdout.
pub(crate) async fn cli(args: &[&str]) -> (bool, String, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_campaign-stats"))
        .args(args)
        .output()
        .await
        .expect("run campaign-stats");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

async fn cli_json(args: &[&str]) -> Value {
    let (ok, stdout, stderr) = cli(args).await;
    assert!(ok, "{args:?} failed: {stderr}");
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {stdout}"))
}

async fn operator_migrates_with_the_cli_alone(db: TestDb) {
    // Generated legacy history, written as the legacy system would have.
    let (ok, stdout, stderr) = cli(&[
        "generate-legacy",
        "--campaigns",
        "60",
        "--users",
        "9",
        "--days",
        "90",
        "--seed",
        "3",
        "--database-url",
        &db.url,
    ])
    .await;
    assert!(ok, "generate-legacy failed: {stderr}");
    assert!(stdout.contains("5400 legacy rows"), "{stdout}");
    let server = db.start_server_keeping_phase().await;
    let address = format!("http://{}", server.addr);
    let server_args = ["--server", address.as_str(), "--output", "json"];
    let with = |args: &[&'static str]| [args, &server_args[..]].concat();

    let status = cli_json(&with(&["migration", "status"])).await;
    assert_eq!(status["phase"], "LEGACY_ONLY");

    // A backfill before dual-write is refused, and says so with a failing exit code.
    let (ok, _, stderr) = cli(&with(&["backfill"])).await;
    assert!(!ok);
    assert!(stderr.contains("DUAL_WRITE"), "{stderr}");

    let moved = cli_json(&with(&[
        "migration",
        "transition",
        "dual-write",
        "--reason",
        "start",
    ]))
    .await;
    assert_eq!(moved["phase"], "DUAL_WRITE");

    let report_file = tempfile::NamedTempFile::new().expect("report file");
    let report_path = report_file.path().to_str().expect("path").to_owned();
    let run = cli_json(
        &[
            with(&["backfill", "--batch-size", "500"]),
            vec!["--report", report_path.as_str()],
        ]
        .concat(),
    )
    .await;
    assert_eq!(run["state"], "completed");
    assert_eq!(run["processed"], 5400);
    assert!(run["copied"].as_u64().expect("copied") > 0);
    let ambiguous = run["ambiguous"].as_u64().expect("ambiguous");
    assert_eq!(
        run["ambiguous_rows"].as_array().expect("rows").len() as u64,
        ambiguous
    );
    let saved: Value =
        serde_json::from_str(&std::fs::read_to_string(&report_path).expect("report"))
            .expect("JSON report");
    assert_eq!(saved["run_id"], run["run_id"]);

    let verified = cli_json(&with(&["verify"])).await;
    assert_eq!(verified["mismatches"], 0);
    assert_eq!(verified["ambiguous"].as_u64(), Some(ambiguous));
    assert_eq!(verified["ambiguous_unresolved"].as_u64(), Some(ambiguous));
    assert_eq!(run["unresolved"].as_u64(), Some(ambiguous));

    // The operator decides on the ambiguous rows: a resolve needs a reason and one of
    // --copy and --skip, and is audited.
    let (ok, _, stderr) = cli(&with(&["migration", "resolve", "--reason", "x"])).await;
    assert!(!ok && stderr.contains("--copy"), "{stderr}");
    let resolved = cli_json(&with(&[
        "migration",
        "resolve",
        "--skip",
        "--reason",
        "rows the legacy system got wrong",
    ]))
    .await;
    assert_eq!(resolved["resolved"].as_u64(), Some(ambiguous));
    assert_eq!(resolved["unresolved"], 0);
    let audit = cli_json(&with(&["migration", "resolutions"])).await;
    assert_eq!(audit[0]["resolution"], "skip");
    assert_eq!(audit[0]["rows"].as_u64(), Some(ambiguous));
    assert_eq!(audit[0]["reason"], "rows the legacy system got wrong");

    for phase in ["BACKFILLED", "verified", "new_primary"] {
        cli_json(&with(&[
            "migration",
            "transition",
            phase,
            "--reason",
            "next",
        ]))
        .await;
    }
    let history = cli_json(&with(&["migration", "history"])).await;
    assert_eq!(history.as_array().expect("history").len(), 4);
    assert_eq!(history[0]["to"], "NEW_PRIMARY");

    let sizes = cli_json(&with(&["storage-report"])).await;
    assert_eq!(sizes["legacy"]["rows"], 5400);
    assert!(sizes["new"]["rows"].as_u64().expect("rows") > 0);

    // A difference makes verify fail.
    db.execute("UPDATE campaign_daily_stat_entries SET sent = sent + 1 WHERE id = (SELECT MIN(id) FROM campaign_daily_stat_entries WHERE sent > 0 AND sent < 1000)").await;
    let (ok, stdout, _) = cli(&with(&["verify"])).await;
    assert!(!ok, "verify passed with a difference: {stdout}");
    server.stop().await;
}

async fn controller_moves_the_rollout_with_the_cli(db: TestDb) {
    let db = db.in_phase(campaign_stats::migration::Phase::Verified);
    let server = db.start_server().await;
    let address = format!("http://{}", server.addr);
    let server_args = ["--server", address.as_str(), "--output", "json"];
    let with = |args: &[&'static str]| [args, &server_args[..]].concat();

    let set = cli_json(&with(&["rollout", "set", "10", "--reason", "first step"])).await;
    assert_eq!(
        (set["percentage"].as_f64(), set["version"].as_u64()),
        (Some(10.0), Some(1))
    );
    let set = cli_json(&with(&[
        "rollout",
        "set",
        "50",
        "--expected-version",
        "1",
        "--reason",
        "half",
    ]))
    .await;
    assert_eq!(set["version"], 2);
    // A stale expected version fails, and says why.
    let (ok, _, stderr) = cli(&with(&[
        "rollout",
        "set",
        "60",
        "--expected-version",
        "1",
        "--reason",
        "stale",
    ]))
    .await;
    assert!(!ok);
    assert!(stderr.contains("current version is 2"), "{stderr}");

    cli_json(&with(&[
        "rollout",
        "override",
        "beta",
        "new",
        "--reason",
        "beta tester",
    ]))
    .await;
    let evaluated = cli_json(&with(&["rollout", "evaluate", "beta"])).await;
    assert_eq!(evaluated["source"], "new");
    assert!(
        evaluated["reason"]
            .as_str()
            .expect("reason")
            .contains("override")
    );
    let killed = cli_json(&with(&[
        "rollout",
        "kill-switch",
        "on",
        "--reason",
        "incident",
    ]))
    .await;
    assert_eq!(killed["kill_switch"], true);
    assert_eq!(
        cli_json(&with(&["rollout", "evaluate", "beta"])).await["source"],
        "legacy"
    );
    cli_json(&with(&[
        "rollout",
        "kill-switch",
        "off",
        "--reason",
        "resolved",
    ]))
    .await;
    cli_json(&with(&[
        "rollout",
        "clear-override",
        "beta",
        "--reason",
        "done",
    ]))
    .await;
    let salted = cli_json(&with(&["rollout", "reset-salt", "--reason", "reshuffle"])).await;
    assert_eq!(salted["version"], 7);

    let history = cli_json(&with(&["rollout", "history"])).await;
    let changes: Vec<&str> = history
        .as_array()
        .expect("history")
        .iter()
        .map(|c| c["change"].as_str().expect("change"))
        .collect();
    assert_eq!(
        changes,
        [
            "salt",
            "override beta",
            "kill switch",
            "kill switch",
            "override beta",
            "percentage",
            "percentage"
        ]
    );
    let got = cli_json(&with(&["rollout", "get"])).await;
    assert_eq!(
        (got["version"].as_u64(), got["applied_version"].as_u64()),
        (Some(7), Some(7))
    );

    // kubectl habits: short -s / -o, and a percentage may carry its sign.
    let set = cli_json(&[
        "rollout",
        "set",
        "12.5%",
        "--reason",
        "with a sign",
        "-s",
        address.as_str(),
        "-o",
        "json",
    ])
    .await;
    assert_eq!(
        (set["percentage"].as_f64(), set["version"].as_u64()),
        (Some(12.5), Some(8))
    );
    let (ok, _, stderr) = cli(&with(&["rollout", "set", "ten", "--reason", "typo"])).await;
    assert!(!ok);
    assert!(stderr.contains("is not a percentage"), "{stderr}");
    server.stop().await;
}

/// Issue 4's "done when", as a controller does it: two server processes on one database, the
/// CLI against the first moves the rollout 0% → 100% in steps, lets a beta user in, pulls and
/// releases the kill switch; the second process applies each change within the bound, and
/// reads back the whole audit trail.
async fn a_controller_drives_two_server_processes_with_the_cli(db: TestDb) {
    let db = db.in_phase(campaign_stats::migration::Phase::Verified);
    // The first server prepares the database (schema, phase); then two real processes.
    db.start_server().await.stop().await;
    let first = ServerProcess::start(&db.url, &[]).await;
    let second = ServerProcess::start(&db.url, &[]).await;
    let controller = format!("http://{}", first.addr);
    let on_second = format!("http://{}", second.addr);
    let mut applied_by_second = second.watch_rollout().await;
    assert_eq!(applied_by_second.version, 0);

    let steps: [&[&str]; 8] = [
        &["set", "1", "--reason", "first users"],
        &["override", "beta-user", "new", "--reason", "beta tester"],
        &["set", "10", "--reason", "no mismatches at 1%"],
        &["kill-switch", "on", "--reason", "incident drill"],
        &["kill-switch", "off", "--reason", "drill over"],
        &["set", "50%", "--reason", "half"],
        &["set", "100", "--reason", "everyone"],
        &["clear-override", "beta-user", "--reason", "beta over"],
    ];
    let mut slowest = Duration::ZERO;
    for step in steps {
        let args = [
            &["rollout"],
            step,
            &["-s", controller.as_str(), "-o", "json", "--actor", "ctl"],
        ]
        .concat();
        let changed = Instant::now();
        let version = cli_json(&args).await["version"].as_u64().expect("version");
        let took = applied_by_second.until_applied(version, changed).await;
        slowest = slowest.max(took);
        if step[0] == "kill-switch" && step[1] == "on" {
            let evaluated = cli_json(&[
                "rollout",
                "evaluate",
                "beta-user",
                "-s",
                &on_second,
                "-o",
                "json",
            ])
            .await;
            assert_eq!(evaluated["source"], "legacy", "{evaluated}");
        }
    }
    println!("slowest change to reach the second process: {slowest:?}");
    assert_eq!(applied_by_second.version, 8);
    let metrics = second.metrics().await;
    assert_eq!(metrics.get("campaign_stats_rollout_applied_version"), 8.0);
    assert_eq!(metrics.get("campaign_stats_rollout_percentage"), 100.0);

    // The full audit trail, read from the other replica, newest first.
    let history = cli_json(&["rollout", "history", "-s", &on_second, "-o", "json"]).await;
    let entries: Vec<(u64, &str, &str, &str)> = history
        .as_array()
        .expect("history")
        .iter()
        .map(|e| {
            (
                e["version"].as_u64().expect("version"),
                e["actor"].as_str().expect("actor"),
                e["change"].as_str().expect("change"),
                e["reason"].as_str().expect("reason"),
            )
        })
        .collect();
    assert_eq!(
        entries,
        [
            (8, "ctl", "override beta-user", "beta over"),
            (7, "ctl", "percentage", "everyone"),
            (6, "ctl", "percentage", "half"),
            (5, "ctl", "kill switch", "drill over"),
            (4, "ctl", "kill switch", "incident drill"),
            (3, "ctl", "percentage", "no mismatches at 1%"),
            (2, "ctl", "override beta-user", "beta tester"),
            (1, "ctl", "percentage", "first users"),
        ]
    );
    drop(applied_by_second);
    first.stop().await;
    second.stop().await;
}

/// `--help` shows env values of plain options, never of the database URL, which may hold a
/// password.
#[tokio::test]
async fn help_never_shows_the_database_password() {
    for command in [
        &["--help"][..],
        &["serve", "--help"],
        &["migrate", "--help"],
    ] {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_campaign-stats"))
            .args(command)
            .env(
                "STATS_DATABASE_URL",
                "postgres://stats:s3cret-pw@db.internal:5432/stats",
            )
            .env("STATS_LISTEN_ADDR", "127.0.0.1:50999")
            .output()
            .await
            .expect("run campaign-stats");
        let help = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{command:?}: {help}");
        assert!(help.contains("STATS_DATABASE_URL"), "{help}");
        assert!(
            !help.contains("s3cret-pw"),
            "{command:?} shows the password: {help}"
        );
        // Other options still show what the environment sets.
        if help.contains("STATS_LISTEN_ADDR") {
            assert!(help.contains("127.0.0.1:50999"), "{help}");
        }
    }
}

async fn the_server_may_be_named_as_host_port(db: TestDb) {
    let server = db.start_server().await;
    let bare = server.addr.to_string();
    let with_scheme = format!("http://{}", server.addr);
    for address in [bare.as_str(), with_scheme.as_str()] {
        let status = cli_json(&["migration", "status", "-s", address, "-o", "json"]).await;
        assert_eq!(status["phase"], "LEGACY_ONLY", "{address}");
    }
    server.stop().await;
}

/// Writes `count` phase changes straight into the history, each with `reason`.
async fn fill_history(db: &TestDb, count: usize, reason: &str) {
    let rows: Vec<String> = (0..count)
        .map(|_| format!("('LEGACY_ONLY', 'DUAL_WRITE', 'ops', {reason}, '2026-03-01T00:00:00Z')"))
        .collect();
    db.execute(&format!(
        "INSERT INTO migration_transitions (from_phase, to_phase, actor, reason, at) VALUES {}",
        rows.join(", ")
    ))
    .await;
}

async fn a_closed_pipe_ends_the_cli_quietly(db: TestDb) {
    use tokio::io::AsyncReadExt;

    let server = db.start_server().await;
    // Far more output than a pipe holds, so the CLI is still writing when the reader leaves.
    fill_history(&db, 1_000, &format!("'{}'", "r".repeat(300))).await;
    let address = server.addr.to_string();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_campaign-stats"))
        .args(["migration", "history", "--limit", "1000", "-s", &address])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run campaign-stats");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut first = [0u8; 10];
    stdout
        .read_exact(&mut first)
        .await
        .expect("the first bytes");
    drop(stdout); // as `head -c 10` does
    let output = child.wait_with_output().await.expect("exit");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{:?}: {stderr}", output.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
    server.stop().await;
}

async fn stored_control_characters_are_escaped_on_output(db: TestDb) {
    let server = db.start_server().await;
    // Text written before the service refused control characters, or by another tool: a
    // newline and an ANSI colour that would fake a row of the listing.
    let faked = match db.backend {
        crate::common::Backend::Sqlite => {
            "'real' || char(10) || char(27) || '[31m2026-01-01T00:00:00Z LEGACY_ONLY NEW_PRIMARY'"
        }
        crate::common::Backend::Postgres => {
            "'real' || chr(10) || chr(27) || '[31m2026-01-01T00:00:00Z LEGACY_ONLY NEW_PRIMARY'"
        }
    };
    fill_history(&db, 1, faked).await;
    let (ok, stdout, stderr) = cli(&["migration", "history", "-s", &server.addr.to_string()]).await;
    assert!(ok, "{stderr}");
    assert_eq!(stdout.lines().count(), 2, "a header and one row: {stdout}");
    assert!(!stdout.contains('\u{1b}'), "{stdout:?}");
    assert!(stdout.contains("real\\n\\u{1b}[31m"), "{stdout:?}");
    server.stop().await;
}

/// Values out of range are refused with a message naming the option, never quietly replaced.
#[tokio::test]
async fn out_of_range_options_are_refused_by_name() {
    for (args, option) in [
        (&["backfill", "--batch-size", "0"][..], "--batch-size"),
        (&["backfill", "--batch-size", "50001"], "--batch-size"),
        (
            &["serve", "--db-statement-timeout-ms", "0"],
            "--db-statement-timeout-ms",
        ),
        (
            &["serve", "--db-max-connections", "0"],
            "--db-max-connections",
        ),
        (
            &["serve", "--rollout-refresh-ms", "0"],
            "--rollout-refresh-ms",
        ),
        (
            &["serve", "--health-check-interval-ms", "9"],
            "--health-check-interval-ms",
        ),
    ] {
        let (ok, _, stderr) = cli(args).await;
        assert!(!ok, "{args:?} was accepted");
        assert!(stderr.contains(option), "{args:?}: {stderr}");
    }
}

async fn phases_and_errors_read_alike_in_every_command(db: TestDb) {
    let server = db.start_server().await;
    let addr = server.addr.to_string();
    let rollout = cli_json(&["rollout", "get", "-o", "json", "--server", &addr]).await;
    let migration = cli_json(&["migration", "status", "-o", "json", "--server", &addr]).await;
    assert_eq!(rollout["phase"], migration["phase"]);
    assert_eq!(rollout["phase"], db.expected_phase_name());

    // A refusal under -o json is JSON on stderr, with the canonical code; in text, one line.
    let (ok, stdout, stderr) = cli(&[
        "rollout",
        "clear-override",
        "nobody",
        "--reason",
        "tidy",
        "-o",
        "json",
        "--server",
        &addr,
    ])
    .await;
    assert!(!ok && stdout.is_empty());
    let error: Value = serde_json::from_str(stderr.trim()).expect("JSON on stderr");
    assert_eq!(error["error"]["code"], "NOT_FOUND", "{stderr}");
    assert!(
        error["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("nobody")),
        "{stderr}"
    );
    let (ok, _, stderr) = cli(&[
        "rollout",
        "clear-override",
        "nobody",
        "--reason",
        "tidy",
        "--server",
        &addr,
    ])
    .await;
    assert!(!ok);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("(NOT_FOUND)"), "{stderr}");
    let after = cli_json(&["rollout", "get", "-o", "json", "--server", &addr]).await;
    assert_eq!(after["version"], rollout["version"], "nothing changed");

    // verify names the flags the operator typed, not the request's fields.
    let (ok, _, stderr) = cli(&[
        "verify",
        "--from",
        "2026-02-30",
        "--to",
        "2026-03-01",
        "--server",
        &addr,
    ])
    .await;
    assert!(!ok);
    assert!(
        stderr.contains("--from") && !stderr.contains("start_date"),
        "{stderr}"
    );
}

/// Starts `campaign-stats` with `args` in the background, its output piped.
fn spawn_cli(args: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_campaign-stats"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start campaign-stats")
}

async fn an_operator_leaves_a_backfill_and_comes_back_to_it(db: TestDb) {
    let (ok, _, stderr) = cli(&[
        "generate-legacy",
        "--campaigns",
        "40",
        "--users",
        "5",
        "--days",
        "60",
        "--seed",
        "4",
        "--database-url",
        &db.url,
    ])
    .await;
    assert!(ok, "{stderr}");
    let server = db.start_server_keeping_phase().await;
    let addr = server.addr.to_string();
    let (ok, _, stderr) = cli(&[
        "migration",
        "transition",
        "dual-write",
        "--reason",
        "start",
        "--server",
        &addr,
    ])
    .await;
    assert!(ok, "{stderr}");

    // A batch size of 0 is refused, not read as the default.
    let (ok, _, stderr) = cli(&["backfill", "--batch-size", "0", "--server", &addr]).await;
    assert!(!ok && stderr.contains("--batch-size"), "{stderr}");

    // A slow backfill (small batches, a pause between them), followed without a terminal:
    // plain progress lines on stderr, not a progress bar.
    let mut follower = spawn_cli(&[
        "backfill",
        "--batch-size",
        "20",
        "--throttle-ms",
        "100",
        "--server",
        &addr,
    ]);
    let mut lines = tokio::io::BufReader::new(follower.stderr.take().expect("stderr")).lines();
    let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("a progress line in time")
        .expect("read stderr")
        .expect("a line");
    assert!(
        first.starts_with("backfill ") && first.contains(" of 2,400 rows"),
        "{first}"
    );

    // Ctrl-C stops following, not the run, and says how to come back.
    let pid = follower.id().expect("pid").to_string();
    let signalled = tokio::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .await
        .expect("run kill");
    assert!(signalled.success());
    let mut rest = String::new();
    while let Ok(Some(line)) = lines.next_line().await {
        rest.push_str(&line);
        rest.push('\n');
    }
    let status = follower.wait().await.expect("exit");
    assert!(!status.success());
    assert!(
        rest.contains("goes on on the server") && rest.contains("backfill watch"),
        "{rest}"
    );
    let running = cli_json(&["backfill", "status", "-o", "json", "--server", &addr]).await;
    assert_eq!(running["state"], "running", "{running}");

    // Cancel it (the latest backfill by default), and find it listed with its outcome.
    let cancelled = cli_json(&["backfill", "cancel", "-o", "json", "--server", &addr]).await;
    assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
    assert_eq!(cancelled["run_id"], running["run_id"]);
    let runs = cli_json(&["runs", "-o", "json", "--server", &addr]).await;
    assert_eq!(runs[0]["run_id"], running["run_id"]);
    assert_eq!(runs[0]["state"], "cancelled");
    let (ok, _, stderr) = cli(&["backfill", "cancel", "--server", &addr]).await;
    assert!(!ok && stderr.contains("not running"), "{stderr}");

    // Starting it again resumes it; `backfill watch` follows it to the end.
    let resumed = spawn_cli(&[
        "backfill",
        "--batch-size",
        "500",
        "-o",
        "json",
        "--server",
        &addr,
    ]);
    // Watch once the server has resumed it (before that, the latest run is the cancelled one).
    let deadline = Instant::now() + Duration::from_secs(20);
    while cli_json(&["backfill", "status", "-o", "json", "--server", &addr]).await["state"]
        == "cancelled"
    {
        assert!(Instant::now() < deadline, "the backfill never resumed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let watched = cli_json(&["backfill", "watch", "-o", "json", "--server", &addr]).await;
    assert_eq!(watched["state"], "completed", "{watched}");
    assert_eq!(
        watched["run_id"], running["run_id"],
        "the same run, resumed"
    );
    assert_eq!(watched["processed"], 2400);
    assert_eq!(watched["resumes"], 1, "its status says it was resumed");
    let output = resumed.wait_with_output().await.expect("backfill");
    assert!(output.status.success());
}

async fn a_person_reads_stats_from_the_cli(db: TestDb) {
    let server = db.start_server().await;
    let addr = server.addr.to_string();
    for (day, count) in [("01", "3"), ("02", "5"), ("09", "8")] {
        let at = format!("2026-03-{day}T12:00:00Z");
        let (ok, stdout, stderr) = cli(&[
            "stats", "record", "u1", "c1", "sent", "--count", count, "--at", &at, "--server", &addr,
        ])
        .await;
        assert!(ok && stdout.trim() == "recorded", "{stdout}{stderr}");
    }
    let (ok, stdout, _) = cli(&[
        "stats",
        "record",
        "u1",
        "c2",
        "clicked",
        "--idempotency-key",
        "k1",
        "--server",
        &addr,
    ])
    .await;
    assert!(ok && stdout.trim() == "recorded");
    let again = cli_json(&[
        "stats",
        "record",
        "u1",
        "c2",
        "clicked",
        "--idempotency-key",
        "k1",
        "-o",
        "json",
        "--server",
        &addr,
    ])
    .await;
    assert_eq!(again["duplicate"], true);

    let got = cli_json(&[
        "stats",
        "get",
        "u1",
        "c1",
        "c2",
        "--from",
        "2026-03-01",
        "--to",
        "2026-03-31",
        "-o",
        "json",
        "--server",
        &addr,
    ])
    .await;
    assert_eq!(got["campaigns"][0]["metrics"]["sent"], 16);
    assert_eq!(got["campaigns"][1]["campaign_id"], "c2");

    // A month by day: a table and a chart under it, every line within 80 columns.
    let (ok, table, stderr) = cli(&[
        "stats",
        "series",
        "u1",
        "--from",
        "2026-03-01",
        "--to",
        "2026-03-31",
        "--server",
        &addr,
    ])
    .await;
    assert!(ok, "{stderr}");
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 1 + 31 + 3, "{table}");
    assert!(
        lines[2].starts_with("2026-03-02") && lines[2].contains(" 5 "),
        "{table}"
    );
    let chart = lines.last().expect("chart");
    assert_eq!(chart.chars().count(), 31, "{table}");
    assert_eq!(chart.chars().nth(8), Some('█'), "the highest day: {table}");
    assert!(
        table.lines().all(|line| line.chars().count() <= 80),
        "{table}"
    );
    let weeks = cli_json(&[
        "stats",
        "series",
        "u1",
        "--from",
        "2026-03-01",
        "--to",
        "2026-03-31",
        "--by",
        "week",
        "-o",
        "json",
        "--server",
        &addr,
    ])
    .await;
    assert_eq!(weeks["buckets"][1]["bucket_start"], "2026-03-02");
    assert_eq!(weeks["buckets"][1]["metrics"]["sent"], 5);
}
