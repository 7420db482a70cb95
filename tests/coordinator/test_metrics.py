"""Cluster metrics: the apply and verify records, the cached status pass, and quil-coord metrics."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import pytest
from helpers import DATA
from prometheus_client.parser import text_string_to_metric_families

from quil_cluster.common.errors import InventoryError
from quil_cluster.common.exitcodes import ExitCode
from quil_cluster.coordinator import metrics
from quil_cluster.coordinator.cli import main
from quil_cluster.coordinator.demo import free_port
from quil_cluster.coordinator.home import Home
from quil_cluster.coordinator.metrics import CachedStatus, StatusPass, record_apply, record_verify


@pytest.fixture
def home(tmp_path: Path) -> Path:
    control = tmp_path / "config.yml"
    control.write_bytes((DATA / "config-1.4.21.yml").read_bytes())
    home = tmp_path / "coord"
    assert main(["--home", str(home), "init", "--control-config", str(control)]) == 0
    return home


@pytest.fixture
def two_hosts(home: Path, tmp_path: Path) -> Path:
    """Two hosts whose agents are not running (port 9 on loopback refuses at once), and an assignment."""
    for name, address, extra in (("a", "127.0.0.2", ["--control", "--workers", "2"]),
                                 ("b", "127.0.0.3", ["--workers", "3"])):
        assert main(["--home", str(home), "host", "add", name, "--address", address, "--agent", f"{address}:9",
                     "--cpus", "4", "--bundle", str(tmp_path / "bundles" / name), *extra]) == 0
    assert main(["--home", str(home), "assign"]) == 0
    return home


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _metrics(home: Path, capsys) -> dict[tuple[str, tuple], float]:
    capsys.readouterr()
    assert main(["--home", str(home), "metrics"]) == 0
    return _samples(capsys.readouterr().out)


@pytest.fixture
def clock():
    class Clock:
        now = 1000.0

        def __call__(self) -> float:
            return self.now

    return Clock()


class _Report:
    def __init__(self, exit_code: ExitCode = ExitCode.OK, violations=(), errors=None) -> None:
        self.exit_code = exit_code
        self.violations = list(violations)
        self.errors = errors or {}


def test_metrics_command_counts_hosts_and_workers(two_hosts, capsys):
    samples = _metrics(two_hosts, capsys)
    assert samples[("quil_cluster_hosts", ())] == 2
    assert samples[("quil_cluster_workers_desired", ())] == 5
    assert samples[("quil_cluster_workers_running", ())] == 0
    assert samples[("quil_cluster_host_up", (("host", "a"),))] == 0
    assert samples[("quil_cluster_host_up", (("host", "b"),))] == 0
    assert samples[("quil_cluster_status_timestamp_seconds", ())] > 0


def test_metrics_command_without_records_has_no_apply_series(two_hosts, capsys):
    names = {name for name, _ in _metrics(two_hosts, capsys)}
    assert not [n for n in names if n.startswith(("quil_cluster_last_", "quil_cluster_verify_"))]


def test_metrics_command_on_empty_cluster(home, capsys):
    samples = _metrics(home, capsys)
    assert samples[("quil_cluster_hosts", ())] == 0
    assert samples[("quil_cluster_workers_desired", ())] == 0


def test_metrics_command_without_home_exits_3(tmp_path, capsys):
    assert main(["--home", str(tmp_path / "none"), "metrics"]) == 3
    assert capsys.readouterr().err == (f"error: {tmp_path / 'none'}: not a quil-coord state directory; "
                                       "run quil-coord init first\n")


def test_metrics_output_file_is_atomic_and_readable(two_hosts, tmp_path, capsys):
    target = tmp_path / "textfile" / "quil.prom"
    target.parent.mkdir()
    assert main(["--home", str(two_hosts), "metrics", "--output", str(target)]) == 0
    assert capsys.readouterr().out == ""
    assert target.stat().st_mode & 0o777 == 0o644
    assert _samples(target.read_text())[("quil_cluster_hosts", ())] == 2
    assert [p.name for p in target.parent.iterdir()] == ["quil.prom"]


def test_metrics_output_unwritable_exits_3(two_hosts, tmp_path, capsys):
    target = tmp_path / "missing" / "quil.prom"
    capsys.readouterr()
    assert main(["--home", str(two_hosts), "metrics", "--output", str(target)]) == 3
    assert capsys.readouterr().err == (f"error: --output {target}: cannot write (No such file or directory); "
                                       "choose a writable directory\n")


def test_record_apply_success(home, capsys):
    record_apply(lambda h: _Report())(Home(home))
    record = json.loads((home / metrics.LAST_APPLY_FILE).read_text())
    assert record["success"] is True
    assert 0 <= record["duration_seconds"] < 60
    samples = _metrics(home, capsys)
    assert samples[("quil_cluster_last_apply_success", ())] == 1
    assert samples[("quil_cluster_last_apply_duration_seconds", ())] == record["duration_seconds"]
    assert samples[("quil_cluster_last_apply_timestamp_seconds", ())] == record["timestamp_seconds"]
    assert (home / metrics.LAST_APPLY_FILE).stat().st_mode & 0o777 == 0o600


def test_record_apply_failed_host(home, capsys):
    report = record_apply(lambda h: _Report(ExitCode.HOST_FAILED))(Home(home))
    assert report.exit_code == ExitCode.HOST_FAILED
    assert _metrics(home, capsys)[("quil_cluster_last_apply_success", ())] == 0


def test_record_apply_rejected_run_keeps_record(home):
    record_apply(lambda h: _Report())(Home(home))
    before = (home / metrics.LAST_APPLY_FILE).read_bytes()

    def rejected(_home):
        raise InventoryError("assignment is stale")

    with pytest.raises(InventoryError, match="assignment is stale"):
        record_apply(rejected)(Home(home))
    assert (home / metrics.LAST_APPLY_FILE).read_bytes() == before


def test_record_apply_write_failure_is_logged(home, caplog):
    (home / metrics.LAST_APPLY_FILE).mkdir()
    report = record_apply(lambda h: _Report())(Home(home))
    assert report.exit_code == ExitCode.OK
    assert caplog.records[-1].levelno == logging.WARNING
    assert caplog.messages[-1] == (f"metrics record not written: {home / metrics.LAST_APPLY_FILE} (Is a directory);"
                                   " the cluster metrics keep the previous one")


def test_record_verify_counts_violations(home, capsys):
    record_verify(lambda h: _Report(violations=["x", "y"], errors={"b": "unavailable"}))(Home(home))
    samples = _metrics(home, capsys)
    assert samples[("quil_cluster_verify_violations", ())] == 2
    assert samples[("quil_cluster_verify_unreachable_hosts", ())] == 1
    assert samples[("quil_cluster_last_verify_timestamp_seconds", ())] > 0


def test_unreadable_record_is_left_out_with_json_warning(home, capsys):
    (home / metrics.LAST_VERIFY_FILE).write_text("{not json")
    capsys.readouterr()
    assert main(["--home", str(home), "--log-format", "json", "metrics"]) == 0
    captured = capsys.readouterr()
    assert "quil_cluster_verify_violations" not in captured.out
    entry = json.loads(captured.err)
    assert (entry["level"], entry["logger"]) == ("warning", "quil_cluster.coordinator.metrics")
    assert entry["msg"].startswith(f"metrics record unreadable: {home / metrics.LAST_VERIFY_FILE} (Expecting")


def test_cached_status_reused_within_interval(home, clock, monkeypatch):
    calls = []
    monkeypatch.setattr(metrics, "status_pass", lambda h, hosts: calls.append(hosts) or StatusPass(clock.now))
    cache = CachedStatus(Home(home), interval=15.0, clock=clock)
    first = cache.get([])
    clock.now += 14.9
    assert cache.get([]) is first
    assert len(calls) == 1
    clock.now += 0.1
    assert cache.get([]).timestamp == 1015.0
    assert len(calls) == 2


def test_serve_rejects_bad_metrics_address(home, capsys):
    capsys.readouterr()
    assert main(["--home", str(home), "serve", "--listen", "127.0.0.1:0", "--metrics-address", "9742"]) == 3
    assert capsys.readouterr().err == ("error: --metrics-address: '9742' is not HOST:PORT; use e.g. "
                                       "127.0.0.1:9742, or 'off'\n")


def test_serve_with_taken_metrics_port_exits_3(home, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        enrollment = free_port("127.0.0.1")
        capsys.readouterr()
        code = main(["--home", str(home), "serve", "--listen", f"127.0.0.1:{enrollment}",
                     "--metrics-address", f"127.0.0.1:{port}"])
    assert code == 3
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: --metrics-address: cannot listen on 127.0.0.1:{port} for metrics (Address already in use); "
        "choose a free address, or 'off'")
    # The enrollment endpoint was stopped again, so its port is free.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", enrollment))
