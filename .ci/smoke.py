"""Runs every grpcurl command of README.md against a freshly started binary, on SQLite and on
PostgreSQL, so that the README's commands stay true. Exits non-zero on the first failure."""

import os
import re
import signal
import subprocess
import sys
import tempfile
import time

BINARY = sys.argv[1]
ADDR = "127.0.0.1:50051"  # the default the README's commands use
POSTGRES = os.environ.get("STATS_TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/postgres")


def readme_grpcurl_commands():
    """The shell blocks of README.md that call grpcurl, in order."""
    with open("README.md", encoding="utf-8") as readme:
        blocks = re.findall(r"```sh\n(.*?)```", readme.read(), flags=re.S)
    return [block for block in blocks if "grpcurl" in block and "pip install" not in block]


def wait_until_serving(server):
    for _ in range(300):
        if server.poll() is not None:
            sys.exit(f"FAIL: the server exited with {server.returncode} before serving")
        check = subprocess.run(
            ["grpcurl", "-plaintext", ADDR, "grpc.health.v1.Health/Check"],
            capture_output=True, text=True,
        )
        if check.returncode == 0 and "SERVING" in check.stdout:
            return
        time.sleep(0.1)
    sys.exit("FAIL: the server did not become SERVING")


def smoke(database_url):
    print(f"-- {database_url}")
    server = subprocess.Popen([BINARY, "--database-url", database_url])
    try:
        wait_until_serving(server)
        outputs = []
        for command in readme_grpcurl_commands():
            run = subprocess.run(["bash", "-euo", "pipefail", "-c", command], capture_output=True, text=True)
            if run.returncode != 0:
                sys.exit(f"FAIL: README command failed:\n{command}\n{run.stdout}{run.stderr}")
            outputs.append(run.stdout)
        everything = "\n".join(outputs)
        for expected in ["stats.v1.StatsService", '"sent": "3"', '"stored": "2"', '"STORAGE_SOURCE_LEGACY"', "MIGRATION_PHASE_DUAL_WRITE"]:
            if expected not in everything:
                sys.exit(f"FAIL: no {expected} in the README commands' output:\n{everything}")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            sys.exit("FAIL: the server did not stop within 30 s of SIGTERM")
    if code != 0:
        sys.exit(f"FAIL: the server exited with {code} after SIGTERM")
    print(f"   {len(readme_grpcurl_commands())} README commands passed; stopped cleanly on SIGTERM")


def fresh_postgres_database():
    name = "cs_smoke"
    for sql in (f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", f"CREATE DATABASE {name}"):
        subprocess.run(["psql", POSTGRES, "-qc", sql], check=True)
    return POSTGRES.rsplit("/", 1)[0] + "/" + name


with tempfile.TemporaryDirectory() as directory:
    smoke(f"sqlite://{directory}/smoke.db")
smoke(fresh_postgres_database())
print("smoke: every README grpcurl command worked on SQLite and on PostgreSQL")
