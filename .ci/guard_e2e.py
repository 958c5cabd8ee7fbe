"""The guard, end to end, as an operator would see it: a server on a fresh PostgreSQL database
with generated legacy history, migrated to VERIFIED with the CLI, a progressive schedule to
100 % under synthetic read traffic, and a divergence planted in the new storage midway. Shows,
from the audit and the metrics, that the guard rolled reads back within a second of the first
disagreement and that the schedule stopped. Exits non-zero if either does not hold.

    python3 .ci/guard_e2e.py target/debug/campaign-stats

PostgreSQL: STATS_TEST_POSTGRES_URL (default postgres://postgres@127.0.0.1:5432/postgres); the
run makes a database of its own and drops it at the end.
"""

import datetime
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request

BINARY = os.path.abspath(sys.argv[1])
SERVER_URL = os.environ.get("STATS_TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/postgres")
DATABASE = f"cs_guard_e2e_{os.getpid()}"
DATABASE_URL = SERVER_URL.rsplit("/", 1)[0] + "/" + DATABASE
USERS, CAMPAIGNS, DAYS, END = 20, 60, 30, "2026-11-30"
STEPS = "1,5,25,50,100"
PLANT_AT_STEP = 3  # 25 %


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


ADDR = f"127.0.0.1:{free_port()}"
METRICS = f"127.0.0.1:{free_port()}"


def say(text):
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def psql(database_url, sql):
    subprocess.run(["psql", "-q", "-v", "ON_ERROR_STOP=1", database_url, "-c", sql], check=True,
                   capture_output=True, text=True)


def cli(*args):
    """Runs the CLI against the server; answers its stdout."""
    run = subprocess.run([BINARY, *args, "--server", ADDR], capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"FAIL: campaign-stats {' '.join(args)}\n{run.stdout}{run.stderr}")
    return run.stdout


def rollout():
    return json.loads(cli("rollout", "get", "-o", "json"))


def metrics():
    with urllib.request.urlopen(f"http://{METRICS}/metrics", timeout=5) as answer:
        return answer.read().decode()


def metric(text, series):
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return None


def when(stamp):
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))


class Traffic:
    """Readers calling GetStats for random users' campaigns with grpcurl, until stopped."""

    def __init__(self, readers=4):
        self.stop = threading.Event()
        self.reads = 0
        self.threads = [threading.Thread(target=self.read, daemon=True) for _ in range(readers)]

    def read(self):
        rng = random.Random()
        while not self.stop.is_set():
            campaign = rng.randrange(CAMPAIGNS)
            request = json.dumps({
                "user_id": f"user-{campaign % USERS:05}", "campaign_id": f"campaign-{campaign:07}",
                "start_date": "2026-11-01", "end_date": END,
            })
            subprocess.run(["grpcurl", "-plaintext", "-d", request, ADDR, "stats.v1.StatsService/GetStats"],
                           capture_output=True)
            self.reads += 1

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_):
        self.stop.set()
        for thread in self.threads:
            thread.join()


def wait_for(what, condition, seconds=60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        answer = condition()
        if answer:
            return answer
        time.sleep(0.2)
    sys.exit(f"FAIL: timed out waiting for {what}")


def main():
    psql(SERVER_URL, f"CREATE DATABASE {DATABASE}")
    server = None
    try:
        subprocess.run([BINARY, "migrate", "--database-url", DATABASE_URL], check=True, capture_output=True)
        say(f"generating legacy history: {CAMPAIGNS} campaigns of {USERS} users, {DAYS} days")
        subprocess.run([BINARY, "generate-legacy", "--campaigns", str(CAMPAIGNS), "--users", str(USERS),
                        "--days", str(DAYS), "--end-date", END, "--database-url", DATABASE_URL],
                       check=True, capture_output=True)
        server = subprocess.Popen(
            [BINARY, "serve", "--database-url", DATABASE_URL, "--listen-addr", ADDR, "--metrics-addr", METRICS,
             "--shadow-sample-rate", "1", "--guard-min-samples", "50", "--guard-quarantine-after", "0",
             "--rollout-refresh-ms", "200"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for("the server", lambda: subprocess.run(
            ["grpcurl", "-plaintext", ADDR, "grpc.health.v1.Health/Check"], capture_output=True).returncode == 0)

        say("migrating to VERIFIED")
        cli("migration", "transition", "DUAL_WRITE", "--reason", "e2e: dual-write")
        cli("backfill", "--batch-size", "2000")
        cli("migration", "transition", "BACKFILLED", "--reason", "e2e: backfilled")
        # The generated history has legacy rows that look wrong; copy them as they are, so
        # that both storages agree before the divergence is planted.
        cli("migration", "resolve", "--copy", "--reason", "e2e: keep legacy's numbers")
        cli("verify")
        cli("migration", "transition", "VERIFIED", "--reason", "e2e: verified")

        with Traffic() as traffic:
            say(f"schedule {STEPS} %, 2 s and 30 comparisons a step, under read traffic")
            cli("rollout", "schedule", "start", "--steps", STEPS, "--dwell-secs", "2", "--min-comparisons", "30",
                "--reason", "e2e: walk up")
            seen = 0
            while True:
                state = rollout()
                schedule = state["schedule"]
                if schedule["step"] != seen:
                    seen = schedule["step"]
                    say(f"schedule at step {seen} ({state['percentage']} %), {traffic.reads} reads so far")
                if seen >= PLANT_AT_STEP:
                    break
                if schedule["status"] != "RUNNING":
                    sys.exit(f"FAIL: the schedule stopped early: {state}")
                time.sleep(0.2)

            say("planting a divergence in the new storage (every rollup's sent + 1)")
            psql(DATABASE_URL, "UPDATE campaign_day_totals SET sent = sent + 1")
            tripped = wait_for("the guard", lambda: (lambda r: r if r["guard_tripped"] else None)(rollout()), 30)
            say(f"guard tripped: percentage {tripped['percentage']} %, kill switch "
                f"{'engaged' if tripped['kill_switch'] else 'released'}, schedule {tripped['schedule']['status']}")
            time.sleep(3)  # traffic goes on: nothing may move
            after = rollout()

        history = json.loads(cli("rollout", "history", "-o", "json", "--limit", "20"))
        say("audit, oldest first:")
        for change in reversed(history):
            print(f"    v{change['version']:<3} {change['actor']:<9} {change['change']:<40} "
                  f"{change['before']} -> {change['after']}\n          why: {change['reason']}")
        trip = next(c for c in history if c["actor"] == "guard")
        mismatches = json.loads(cli("rollout", "mismatches", "-o", "json"))
        first = min(when(m["at"]) for m in mismatches)
        reaction = (when(trip["at"]) - first).total_seconds()
        say(f"first disagreement seen at {first.time()}, rollback audited at {when(trip['at']).time()}: "
            f"{reaction * 1000:.0f} ms")

        scrape = metrics()
        say("metrics:")
        for series in ["campaign_stats_guard_tripped", 'campaign_stats_guard_trips_total{signal="mismatch_rate"}',
                       "campaign_stats_rollout_kill_switch", "campaign_stats_rollout_percentage",
                       "campaign_stats_schedule_step", 'campaign_stats_schedule_status{status="halted"}',
                       "campaign_stats_schedule_advances_total",
                       'campaign_stats_shadow_comparisons_total{method="campaign_totals",outcome="match"}',
                       'campaign_stats_shadow_comparisons_total{method="campaign_totals",outcome="mismatch"}',
                       "campaign_stats_shadow_dropped_reads_total"]:
            print(f"    {series} {metric(scrape, series)}")

        failures = []
        if reaction > 1.0:
            failures.append(f"the rollback came {reaction:.3f} s after the first disagreement (bound: 1 s)")
        if not after["kill_switch"] or after["schedule"]["status"] != "HALTED":
            failures.append(f"reads were not rolled back, or the schedule did not stop: {after}")
        if after["version"] != tripped["version"]:
            failures.append("the rollout moved after the trip (flapping)")
        if metric(scrape, "campaign_stats_guard_tripped") != 1.0:
            failures.append("the guard_tripped gauge is not 1")
        if failures:
            sys.exit("FAIL: " + "; ".join(failures))
        say(f"OK: the guard rolled reads back {reaction * 1000:.0f} ms after the first disagreement, "
            f"and the schedule stopped at step {after['schedule']['step']}")
    finally:
        if server:
            server.terminate()
            server.wait(timeout=30)
        psql(SERVER_URL, f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")


if __name__ == "__main__":
    main()
