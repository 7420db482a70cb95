"""The files in deploy/: systemd units that verify and stay sandboxed, the dashboard and the scrape config."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNITS = ("quil-agent.service", "quil-coord-serve.service")
SANDBOX = ("NoNewPrivileges=true", "ProtectSystem=strict", "ProtectHome=true", "PrivateTmp=true", "UMask=0077")


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze is missing; .ci/run installs the systemd package")
        pytest.skip("systemd-analyze is not installed")
    return path


@pytest.mark.parametrize("unit", UNITS)
def test_unit_passes_systemd_analyze_verify(unit, tmp_path):
    analyze = _systemd_analyze()
    text = (DEPLOY / unit).read_text()
    # verify checks that ExecStart's program exists, so point it at this environment's scripts
    bin_dir = Path(sys.executable).parent
    text = text.replace("/usr/local/bin/", f"{bin_dir}/")
    (tmp_path / unit).write_text(text)
    result = subprocess.run([analyze, "verify", str(tmp_path / unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


@pytest.mark.parametrize("unit", UNITS)
def test_unit_is_sandboxed(unit):
    lines = (DEPLOY / unit).read_text().splitlines()
    for directive in SANDBOX:
        assert directive in lines, f"{unit} lacks {directive}"
    user = next(line for line in lines if line.startswith("User="))
    assert user not in ("User=root", "User=0")
    assert any(line.startswith("ReadWritePaths=/var/lib/") for line in lines)


def test_agent_unit_with_firewall_drop_in_verifies(tmp_path):
    analyze = _systemd_analyze()
    bin_dir = Path(sys.executable).parent
    unit = tmp_path / "quil-agent.service"
    text = (DEPLOY / "quil-agent.service").read_text().replace("/usr/local/bin/", f"{bin_dir}/")
    # A drop-in's [Service] lines merge into the unit's, so appending them checks the combination.
    unit.write_text(text + "\n" + (DEPLOY / "quil-agent-firewall.conf").read_text())
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_agent_unit_grants_no_capability_by_default():
    lines = (DEPLOY / "quil-agent.service").read_text().splitlines()
    assert "CapabilityBoundingSet=" in lines
    assert not any(line.startswith("AmbientCapabilities") for line in lines)
    drop_in = (DEPLOY / "quil-agent-firewall.conf").read_text().splitlines()
    assert "AmbientCapabilities=CAP_NET_ADMIN" in drop_in
    assert "CapabilityBoundingSet=CAP_NET_ADMIN" in drop_in


# -- Grafana dashboard and Prometheus example ----------------------------------------


def _dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "quil-cluster.json").read_text())


def _panels(dashboard: dict) -> list[dict]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def test_dashboard_identity():
    dashboard = _dashboard()
    assert (dashboard["uid"], dashboard["title"]) == ("quil-cluster", "quil-cluster")
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource", "instance"]


def test_dashboard_panel_ids_unique_and_on_grid():
    panels = _dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_dashboard_targets_use_datasource_variable():
    for panel in _panels(_dashboard()):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            assert target["expr"].strip(), panel["title"]


def test_dashboard_agent_panels_filter_by_host():
    for panel in _panels(_dashboard()):
        for target in panel["targets"]:
            if "quil_agent_" in target["expr"]:
                assert 'instance=~"$instance"' in target["expr"], panel["title"]


def test_prometheus_example_scrapes_default_ports():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert sorted(jobs) == ["quil-agent", "quil-coord"]
    for name, port in (("quil-agent", 9741), ("quil-coord", 9742)):
        assert jobs[name]["metrics_path"] == "/metrics"
        targets = [t for group in jobs[name]["static_configs"] for t in group["targets"]]
        assert targets and all(t.endswith(f":{port}") for t in targets), targets


def test_prometheus_example_timeouts_fit_intervals():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    interval = int(config["global"]["scrape_interval"].rstrip("s"))
    for job in config["scrape_configs"]:
        timeout = int(job.get("scrape_timeout", config["global"]["scrape_timeout"]).rstrip("s"))
        assert timeout <= int(job.get("scrape_interval", f"{interval}s").rstrip("s")), job["job_name"]
    # quil-coord caches its status pass for 15 s, so scraping it more often only repeats values.
    assert interval >= 15
