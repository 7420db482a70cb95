"""Metrics end to end: real agents over mutual TLS with stand-in workers, quil-coord serve, the dashboard.

The cluster has control host A with 2 workers. quil-coord serve runs as its
own process with --metrics-address and --log-format json, and host C joins
through it with a real token, which makes serve assign and apply. Afterwards
no log of any of these processes may contain a secret.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import DATA
from prometheus_client.parser import text_string_to_metric_families

from quil_cluster import __version__
from quil_cluster.common import pki
from quil_cluster.common.yamlio import dump, read_mapping
from quil_cluster.coordinator.demo import LocalCluster, free_port

pytestmark = pytest.mark.e2e

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "quil-cluster.json"
DEADLINE = 60.0
PEER_KEY = secrets.token_hex(57)
STORE_KEY = secrets.token_hex(32)


class Metered:
    def __init__(self, cluster: LocalCluster, serve_log: Path, agent_url: str, cluster_url: str, serve_address: str):
        self.cluster = cluster
        self.serve_log = serve_log
        self.agent_url = agent_url
        self.cluster_url = cluster_url
        self.serve_address = serve_address
        self.token = ""
        self.logs: list[Path] = [serve_log]


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(url, timeout=30) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(samples, name, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def _wait_until(url: str, check, what: str) -> dict:
    deadline = time.monotonic() + DEADLINE
    while True:
        samples = scrape(url)
        if check(samples):
            return samples
        assert time.monotonic() < deadline, f"{what} not reached in {DEADLINE} s: {samples}"
        time.sleep(0.2)


def _wait_port(address: str, process: subprocess.Popen) -> None:
    """Wait until address accepts connections; a GET would start serve's cached status pass too early."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + DEADLINE
    while True:
        assert process.poll() is None, "quil-coord serve exited"
        try:
            with socket.create_connection((host, int(port)), timeout=5):
                return
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.1)


@pytest.fixture(scope="module")
def metered(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    cluster = LocalCluster(root)
    control_config = root / "config-1.4.21.yml"
    text = (DATA / "config-1.4.21.yml").read_text()
    control_config.write_text(text.replace("REPLACE_WITH_ED448_PEER_PRIVKEY_HEX", PEER_KEY)
                              .replace("REPLACE_WITH_32_BYTE_HEX_KEYSTORE_KEY", STORE_KEY))
    assert cluster.init(control_config) == 0
    assert cluster.add_host("A", "127.0.0.2", "--control", "--workers", "2") == 0
    agent_yaml = cluster.agents["A"].config
    values = read_mapping(agent_yaml)
    values["metrics_address"] = f"127.0.0.2:{free_port('127.0.0.2')}"
    agent_yaml.write_bytes(dump(values))

    serve_address = f"127.0.0.1:{free_port('127.0.0.1')}"
    metrics_address = f"127.0.0.1:{free_port('127.0.0.1')}"
    serve_log = root / "serve.log"
    with open(serve_log, "wb") as log:
        serve = subprocess.Popen(
            [sys.executable, "-m", "quil_cluster.coordinator", "--home", str(cluster.home), "--log-format", "json",
             "serve", "--listen", serve_address, "--metrics-address", metrics_address],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, cwd=root)
    joined: list[subprocess.Popen] = []
    try:
        cluster.start_agent("A")
        assert cluster.coord("assign") == 0
        assert cluster.coord("apply") == 0
        _wait_port(metrics_address, serve)
        metered = Metered(cluster, serve_log, f"http://{values['metrics_address']}/metrics",
                          f"http://{metrics_address}/metrics", serve_address)
        metered.joined = joined
        metered.logs.append(cluster.agents["A"].log)
        yield metered
    finally:
        for process in [*joined, serve]:
            process.send_signal(signal.SIGTERM)
        for process in [*joined, serve]:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        cluster.stop_all()


def _worker_up(samples, cores) -> bool:
    return all(_value(samples, "quil_agent_worker_up", core=str(c), role="worker") == 1 for c in cores)


def test_agent_metrics_after_apply(metered):
    samples = _wait_until(metered.agent_url, lambda s: _worker_up(s, [1, 2]) and _value(
        s, "quil_agent_worker_up", core="0", role="control") == 1, "workers and control process up")
    for core in ("1", "2"):
        assert _value(samples, "quil_agent_worker_state", core=core, role="worker", state="running") == 1
        assert _value(samples, "quil_agent_worker_state", core=core, role="worker", state="backoff") == 0
        assert _value(samples, "quil_agent_worker_restarts_total", core=core, role="worker") == 0
    assert _value(samples, "quil_agent_worker_state", core="0", role="control", state="running") == 1

    config = (metered.cluster.root / "nodes" / "A" / ".config" / "config.yml").read_bytes()
    assignment = json.loads((metered.cluster.home / "assignment.json").read_text())
    assert _value(samples, "quil_agent_config_generation") == assignment["config_generation"]
    assert _value(samples, "quil_agent_config_info", sha256=hashlib.sha256(config).hexdigest()) == 1
    cert = (metered.cluster.root / "hosts" / "A" / "agent.crt").read_bytes()
    assert _value(samples, "quil_agent_certificate_expiry_timestamp_seconds") == pki.not_after(cert)
    assert _value(samples, "quil_agent_build_info", version=__version__) == 1


def test_agent_restart_counter_after_kill(metered):
    _wait_until(metered.agent_url, lambda s: _worker_up(s, [1, 2]), "workers up")
    pid_file = json.loads((metered.cluster.root / "hosts" / "A" / "state" / "processes.json").read_text())
    victim = next(row["pid"] for row in pid_file if row["core"] == 2)

    os.kill(victim, signal.SIGKILL)

    samples = _wait_until(metered.agent_url, lambda s: _value(
        s, "quil_agent_worker_restarts_total", core="2", role="worker") == 1 and _worker_up(s, [2]),
        "core 2 restarted once and up")
    assert _value(samples, "quil_agent_worker_restarts_total", core="1", role="worker") == 0
    assert _value(samples, "quil_agent_worker_state", core="2", role="worker", state="running") == 1


def test_join_through_serve_then_cluster_metrics(metered, capsys):
    cluster = metered.cluster
    capsys.readouterr()
    assert cluster.coord("token", "create", "--workers", "1", "--host-name", "C") == 0
    command = capsys.readouterr().out.splitlines()[-1]
    match = re.fullmatch(r"quil-agent join (\S+) --token (\S+) --ca-hash (\S+)", command)
    assert match, command
    metered.token = match.group(2)
    directory = cluster.root / "joined" / "C"
    started = time.time()
    join_log = cluster.root / "join.log"
    metered.logs.append(join_log)
    with open(join_log, "wb") as log:
        metered.joined.append(subprocess.Popen(
            [sys.executable, "-m", "quil_cluster.agent", "join", metered.serve_address, "--token", metered.token,
             "--ca-hash", match.group(3), "--address", "127.0.0.8", "--agent-port", str(free_port("127.0.0.8")),
             "--dir", str(directory), "--node-binary", str(cluster.node_binary),
             "--node-config-dir", str(directory / "node" / ".config"), "--state-dir", str(directory / "state"),
             "--run"], stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=cluster.root))

    # serve's first status pass runs at the first scrape, so scrape only after serve's apply for the join.
    deadline = time.monotonic() + DEADLINE
    while json.loads((cluster.home / "last-apply.json").read_text())["timestamp_seconds"] < started:
        assert time.monotonic() < deadline, join_log.read_text()
        time.sleep(0.2)
    _wait_running(cluster, capsys, 3)

    samples = scrape(metered.cluster_url)
    assert _value(samples, "quil_cluster_status_timestamp_seconds") > started
    assert _value(samples, "quil_cluster_hosts") == 2
    assert _value(samples, "quil_cluster_workers_desired") == 3
    assert _value(samples, "quil_cluster_workers_running") == 3
    assert _value(samples, "quil_cluster_host_up", host="A") == 1
    assert _value(samples, "quil_cluster_host_up", host="C") == 1
    assert _value(samples, "quil_cluster_last_apply_success") == 1
    assert 0 < _value(samples, "quil_cluster_last_apply_duration_seconds") < DEADLINE
    assert _value(samples, "quil_cluster_verify_violations") == 0

    capsys.readouterr()
    assert cluster.coord("metrics") == 0
    once = {name for name, _ in _samples_of(capsys.readouterr().out)}
    assert once == {name for name, _ in samples}


def _samples_of(text: str):
    return [(s.name, s.labels) for family in text_string_to_metric_families(text) for s in family.samples]


def _wait_running(cluster: LocalCluster, capsys, count: int) -> None:
    deadline = time.monotonic() + DEADLINE
    while True:
        capsys.readouterr()
        cluster.coord("status", "--json")
        hosts = json.loads(capsys.readouterr().out)["hosts"]
        running = [p for h in hosts for p in h["processes"] if p["core"] != 0 and p["state"] == "running"]
        if len(running) == count:
            return
        assert time.monotonic() < deadline, hosts
        time.sleep(0.2)


# -- the dashboard ----------------------------------------------------------------

_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset",
             "bool", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Return the metric names a PromQL expression selects (not functions, labels, keywords or variables)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "{}", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "[]", text)  # range and subquery durations
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # Grafana variables
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?", text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


def dashboard_queries(dashboard: dict) -> list[str]:
    """Return every PromQL expression of the dashboard: panel targets and query variables."""
    queries = []
    panels = list(dashboard.get("panels", []))
    while panels:
        panel = panels.pop()
        panels.extend(panel.get("panels", []))
        queries += [target["expr"] for target in panel.get("targets", []) if target.get("expr")]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        if variable.get("type") == "query" and query:
            match = re.fullmatch(r"label_values\((?:(.+),\s*)?\w+\)", query)
            if match and match.group(1):
                queries.append(match.group(1))
            elif not match:
                queries.append(query)
    return queries


def test_promql_metric_names():
    expr = ('sum by (instance) (rate(quil_agent_worker_cpu_seconds_total{role="worker",instance=~"$host"}[$__rate_'
            'interval])) / on(instance) group_left quil_agent_build_info > bool 0.5 or vector(0)')
    assert promql_metric_names(expr) == {"quil_agent_worker_cpu_seconds_total", "quil_agent_build_info"}
    assert promql_metric_names("time() - quil_cluster_last_apply_timestamp_seconds offset 5m") == {
        "quil_cluster_last_apply_timestamp_seconds"}


def test_dashboard_queries_only_exported_metrics(metered):
    dashboard = json.loads(DASHBOARD.read_text())
    queried = set().union(*(promql_metric_names(q) for q in dashboard_queries(dashboard)))
    exported = {name for name, _ in scrape(metered.agent_url)} | {name for name, _ in scrape(metered.cluster_url)}
    assert len(queried) >= 12
    assert sorted(queried - exported) == []


# -- secrets in logs ----------------------------------------------------------------


def _pem_body(path: Path) -> list[str]:
    """The base64 lines of a PEM file, each long enough to be unique."""
    return [line for line in path.read_text().splitlines() if not line.startswith("-----") and len(line) >= 40]


def test_no_secret_in_any_log(metered):
    assert metered.token, "test_join_through_serve_then_cluster_metrics runs first and sets the token"
    cluster = metered.cluster
    joined_log = cluster.root / "joined" / "C" / "agent.log"
    logs = [path for path in metered.logs if path.exists()] + ([joined_log] if joined_log.exists() else [])
    text = "\n".join(path.read_text(errors="replace") for path in logs)
    assert "listening: metrics on http://127.0.0.1:" in text
    secrets_found = {
        "token secret": metered.token.split(".", 1)[1],
        "peer private key": PEER_KEY,
        "key store key": STORE_KEY,
    }
    for path in (cluster.home / "ca.key", cluster.home / "coordinator.key", cluster.root / "hosts" / "A" / "agent.key",
                 cluster.root / "joined" / "C" / "agent.key"):
        for index, line in enumerate(_pem_body(path)):
            secrets_found[f"{path.name} line {index}"] = line
    # Each EC key PEM has at least two base64 lines of 64 characters.
    assert len(secrets_found) >= 3 + 4 * 2
    leaked = [name for name, secret in secrets_found.items() if secret in text]
    assert leaked == []
    for line in metered.serve_log.read_text().splitlines():
        assert isinstance(json.loads(line), dict), line
