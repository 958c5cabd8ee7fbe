"""Runs every grpcurl (and metrics curl) command of README.md against a freshly started binary, on SQLite and on
PostgreSQL, then its migration walkthrough on both, then its Python and Node clients against fresh servers on both databases,
so that the README's commands stay true. Exits non-zero on the first failure."""

import contextlib
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

BINARY = sys.argv[1]
ADDR = "127.0.0.1:50051"  # the default the README's commands use
METRICS_PORT = 9464  # the metrics port the README's commands use
POSTGRES = os.environ.get("STATS_TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/postgres")


def readme_grpcurl_commands():
    """The shell blocks of README.md that call grpcurl, in order."""
    with open("README.md", encoding="utf-8") as readme:
        blocks = re.findall(r"```sh\n(.*?)```", readme.read(), flags=re.S)
    return [
        block for block in blocks
        if ("grpcurl" in block or "/metrics" in block) and "pip install" not in block
    ]


def port_is_free(port):
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


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


@contextlib.contextmanager
def running_server(database_url, *args):
    """The binary serving `database_url` on the README's address until the block ends, then stopped with SIGTERM,
    as a deploy stops it: it must exit cleanly."""
    for port in (50051, METRICS_PORT):
        if not port_is_free(port):
            sys.exit(f"FAIL: something already listens on 127.0.0.1:{port}; the README's commands need that port")
    server = subprocess.Popen([BINARY, "--database-url", database_url, *args])
    try:
        wait_until_serving(server)
        yield server
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            sys.exit("FAIL: the server did not stop within 30 s of SIGTERM")
    if code != 0:
        sys.exit(f"FAIL: the server exited with {code} after SIGTERM")


def run_block(command, what="README command"):
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", command], capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"FAIL: {what} failed:\n{command}\n{run.stdout}{run.stderr}")
    return run.stdout


def smoke(database_url):
    print(f"-- {database_url}")
    with running_server(database_url, "--metrics-addr", f"127.0.0.1:{METRICS_PORT}"):
        outputs = []
        for command in readme_grpcurl_commands():
            outputs.append(run_block(command))
        everything = "\n".join(outputs)
        for expected in ["stats.v1.StatsService", '"sent": "3"', '"clicked": "2"', '"stored": "2"', '"STORAGE_SOURCE_LEGACY"', "MIGRATION_PHASE_DUAL_WRITE",
                         "campaign_stats_rollout_applied_version ", 'campaign_stats_migration_phase{phase="DUAL_WRITE"} 1']:
            if expected not in everything:
                sys.exit(f"FAIL: no {expected} in the README commands' output:\n{everything}")
    print(f"   {len(readme_grpcurl_commands())} README commands passed; stopped cleanly on SIGTERM")


DATABASE_NUMBERS = itertools.count()


@contextlib.contextmanager
def fresh_postgres_database():
    """A new database of this run's own (two runs on one machine never collide), dropped when the block ends."""
    name = f"cs_smoke_{os.getpid()}_{next(DATABASE_NUMBERS)}"
    subprocess.run(["psql", POSTGRES, "-qc", f"CREATE DATABASE {name}"], check=True)
    try:
        yield POSTGRES.rsplit("/", 1)[0] + "/" + name
    finally:
        subprocess.run(["psql", POSTGRES, "-qc", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"], check=True)


def readme_section_blocks(heading):
    """The shell blocks of one README section, in order."""
    with open("README.md", encoding="utf-8") as readme:
        section = readme.read().split(heading + "\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, flags=re.S)


def migration_walkthrough(database_url=None):
    """Runs the commands of README's "Migrating from the legacy table" and "Rolling out reads"
    sections as written, one after the other on one server,
    with `cargo run --release --` standing for the built binary, in a scratch directory;
    with `database_url`, on that database instead of the walkthrough's SQLite file."""
    blocks = readme_section_blocks("## Migrating from the legacy table") + readme_section_blocks("## Rolling out reads")
    prefix = "cargo run --release --"
    commands = [line.strip() for block in blocks for line in block.splitlines() if line.strip().startswith(prefix)]
    if database_url is not None:
        rehearsal = "sqlite://rehearsal.db"
        if not any(rehearsal in command for command in commands):
            sys.exit(f"FAIL: README's walkthrough no longer names {rehearsal}")
        commands = [command.replace(rehearsal, database_url) for command in commands]
    binary = os.path.abspath(BINARY)
    with tempfile.TemporaryDirectory() as directory:
        server = None
        try:
            for command in commands:
                args = command[len(prefix):].split()
                if args[0].startswith("--"):
                    # Starting the server: in the background, until the walkthrough ends.
                    server = subprocess.Popen([binary, *args], cwd=directory)
                    wait_until_serving(server)
                    continue
                run = subprocess.run(["bash", "-c", binary + command[len(prefix):]], cwd=directory, capture_output=True, text=True)
                if run.returncode != 0:
                    sys.exit(f"FAIL: README command failed:\n{command}\n{run.stdout}{run.stderr}")
                print(f"   ok: {command}")
            # The grpcurl calls again, on the database the walkthrough left (after it, not only
            # on a fresh one); the metrics calls need a metrics port this server does not have.
            after = [block for block in readme_grpcurl_commands() if "/metrics" not in block]
            for command in after:
                run = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=directory, capture_output=True, text=True)
                if run.returncode != 0:
                    sys.exit(f"FAIL: README command failed after the walkthrough:\n{command}\n{run.stdout}{run.stderr}")
            print(f"   {len(after)} grpcurl blocks of README passed again after the walkthrough")
        finally:
            if server is not None:
                server.send_signal(signal.SIGTERM)
                server.wait(timeout=30)
    print(f"   {len(commands)} migration and rollout commands of README passed")


def client_examples():
    """Runs README's "Calling it from Python / Node" as written: its install blocks once, then each client against a
    fresh server on SQLite and on a fresh server on PostgreSQL (each client moves the migration on)."""
    blocks = readme_section_blocks("## Calling it from Python / Node")
    clients = [block for block in blocks if "stats_client" in block]
    if len(clients) != 2:
        sys.exit(f"FAIL: README's Python / Node section should run two clients, found {len(clients)}")
    for block in blocks:
        if block not in clients:
            run_block(block, "README install command")
    for client in clients:
        name = "Python" if "python" in client else "Node"
        with tempfile.TemporaryDirectory() as directory, running_server(f"sqlite://{directory}/client.db"):
            print(f"-- the {name} client on SQLite")
            print(run_block(client, "README client"), end="")
        with fresh_postgres_database() as database_url, running_server(database_url):
            print(f"-- the {name} client on PostgreSQL")
            print(run_block(client, "README client"), end="")
    print(f"   {len(clients)} clients (Python, Node) passed on SQLite and on PostgreSQL")


with tempfile.TemporaryDirectory() as directory:
    smoke(f"sqlite://{directory}/smoke.db")
with fresh_postgres_database() as database_url:
    smoke(database_url)
migration_walkthrough()
with fresh_postgres_database() as database_url:
    print("-- the migration and rollout walkthrough again, on PostgreSQL")
    migration_walkthrough(database_url)
client_examples()
print("smoke: README's grpcurl calls, its migration and rollout walkthrough, and its Python and Node clients worked "
      "on SQLite and on PostgreSQL")
