"""A three-host cluster on loopback: real agents, real mutual TLS, the stand-in node.

The hosts follow the node runners' manual guide: control host A with 4 CPUs
and 1 reserved (3 workers), B with 4 workers, C with 10 workers.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
import yaml

from quil_cluster.coordinator.demo import LocalCluster

from helpers import DATA, free_port_range

pytestmark = pytest.mark.e2e

HOSTS = {"A": "127.0.0.2", "B": "127.0.0.3", "C": "127.0.0.4"}


def _json(capsys, cluster, *argv):
    capsys.readouterr()
    code = cluster.coord(*argv, "--json")
    return code, json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    local = LocalCluster(root)
    control_config = root / "config-1.4.21.yml"
    control_config.write_bytes((DATA / "config-1.4.21.yml").read_bytes())
    base = free_port_range(list(HOSTS.values()), 17)
    assert local.init(control_config, "--port-scheme", "global", "--base-port", str(base)) == 0
    assert local.add_host("A", HOSTS["A"], "--control", "--cpus", "4", "--reserve", "1") == 0
    assert local.add_host("B", HOSTS["B"], "--workers", "4") == 0
    assert local.add_host("C", HOSTS["C"], "--workers", "10") == 0
    local.base_port = base
    try:
        for name in HOSTS:
            local.start_agent(name)
        yield local
    finally:
        local.stop_all()


@pytest.fixture(scope="module")
def applied(cluster):
    assert cluster.coord("assign") == 0
    assert cluster.coord("apply") == 0
    return cluster


def _status(capsys, cluster):
    code, data = _json(capsys, cluster, "status")
    assert code == 0
    return {host["name"]: host for host in data["hosts"]}


def _wait_all_listening(capsys, cluster, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        hosts = _status(capsys, cluster)
        workers = [p for h in hosts.values() for p in h["processes"] if p["core"] != 0]
        if len(workers) == 17 and all(p["listening"] for p in workers):
            return hosts
        assert time.monotonic() < deadline, f"workers not listening: {hosts}"
        time.sleep(0.1)


def test_assign_json_lists_17_workers(capsys, cluster):
    code, plan = _json(capsys, cluster, "assign", "--dry-run")
    assert code == 0
    base = cluster.base_port
    expected = [(c, "A", f"/ip4/127.0.0.2/tcp/{base + c - 1}") for c in range(1, 4)]
    expected += [(c, "B", f"/ip4/127.0.0.3/tcp/{base + c - 1}") for c in range(4, 8)]
    expected += [(c, "C", f"/ip4/127.0.0.4/tcp/{base + c - 1}") for c in range(8, 18)]
    assert [(w["core"], w["host"], w["multiaddr"]) for w in plan["workers"]] == expected


def test_apply_runs_every_worker_on_its_entry(capsys, applied):
    hosts = _wait_all_listening(capsys, applied)
    base = applied.base_port
    for name, host in hosts.items():
        assert host["reachable"] is True
        for process in host["processes"]:
            if process["core"] == 0:
                continue
            expected = f"/ip4/{HOSTS[name]}/tcp/{base + process['core'] - 1}"
            assert process["listen_address"] == expected
            assert process["state"] == "running"
            listens = {(c.laddr.ip, c.laddr.port) for c in psutil.Process(process["pid"]).net_connections("tcp")
                       if c.status == psutil.CONN_LISTEN}
            assert listens == {(HOSTS[name], base + process["core"] - 1)}
    assert sorted(p["core"] for p in hosts["A"]["processes"]) == [0, 1, 2, 3]
    assert sorted(p["core"] for p in hosts["B"]["processes"]) == [4, 5, 6, 7]
    assert sorted(p["core"] for p in hosts["C"]["processes"]) == list(range(8, 18))
    control = next(p for p in hosts["A"]["processes"] if p["core"] == 0)
    assert control["state"] in ("starting", "running")


def test_pushed_config_differs_only_in_worker_list(applied):
    original = yaml.safe_load((DATA / "config-1.4.21.yml").read_text())
    for name in HOSTS:
        pushed_path = applied.root / "nodes" / name / ".config" / "config.yml"
        pushed = yaml.safe_load(pushed_path.read_text())
        workers = pushed["engine"].pop("dataWorkerMultiaddrs")
        original["engine"].pop("dataWorkerMultiaddrs", None)
        assert pushed == original
        assert len(workers) == 17
        assert workers[3] == f"/ip4/127.0.0.3/tcp/{applied.base_port + 3}"
        assert pushed_path.stat().st_mode & 0o777 == 0o600


def test_killed_worker_restarts_within_one_second(capsys, applied):
    before = _wait_all_listening(capsys, applied)
    victim = next(p for p in before["B"]["processes"] if p["core"] == 5)
    killed_at = time.time()
    os.kill(victim["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while True:
        entry = next(p for p in _status(capsys, applied)["B"]["processes"] if p["core"] == 5)
        if entry["pid"] not in (0, victim["pid"]) and entry["state"] in ("starting", "running"):
            break
        assert time.monotonic() < deadline, entry
        time.sleep(0.05)
    assert entry["restarts"] == 1
    assert entry["last_exit_status"] == -signal.SIGKILL
    started_at = time.time() - entry["uptime_seconds"]
    # uptime is rounded to 0.1 s, hence the margin
    assert started_at - killed_at < 1.0 + 0.1


def test_second_apply_changes_nothing(capsys, applied):
    _wait_all_listening(capsys, applied)
    code, report = _json(capsys, applied, "apply")
    assert code == 0
    assert [h["outcome"] for h in report["hosts"]] == ["unchanged", "unchanged", "unchanged"]
    assert all(not h["started"] and not h["stopped"] and not h["restarted"] for h in report["hosts"])
    assert [h["control"] for h in report["hosts"]] == ["none", "none", "none"]


def test_status_shows_stopped_agent_unreachable(capsys, applied):
    applied.stop_agent("C")
    try:
        capsys.readouterr()
        code = applied.coord("status", "--json")
        hosts = {h["name"]: h for h in json.loads(capsys.readouterr().out)["hosts"]}
        assert code == 5
        assert hosts["C"]["reachable"] is False
        assert hosts["C"]["processes"] == []
        assert hosts["C"]["error"].startswith("unavailable:")
        assert hosts["A"]["reachable"] is True
    finally:
        applied.start_agent("C")


def test_restarted_agent_restores_workers(capsys, applied):
    # runs after the agent of C was stopped and started again above
    hosts = _wait_all_listening(capsys, applied)
    assert sorted(p["core"] for p in hosts["C"]["processes"]) == list(range(8, 18))
    assert all(p["restarts"] == 0 for p in hosts["C"]["processes"])


def test_added_host_appends_cores_and_restarts_only_control(capsys, applied):
    before = _wait_all_listening(capsys, applied)
    pids = {p["core"]: p["pid"] for h in before.values() for p in h["processes"]}
    assert applied.add_host("D", "127.0.0.7", "--workers", "2") == 0
    applied.start_agent("D")
    code, plan = _json(capsys, applied, "assign")
    assert code == 0
    assert plan["added"] == [18, 19]
    assert plan["moved"] == []
    assert [w["multiaddr"] for w in plan["workers"][17:]] == [
        f"/ip4/127.0.0.7/tcp/{applied.base_port + 17}", f"/ip4/127.0.0.7/tcp/{applied.base_port + 18}"]
    code, report = _json(capsys, applied, "apply")
    assert code == 0
    outcome = {h["name"]: h for h in report["hosts"]}
    assert outcome["D"]["started"] == [18, 19]
    assert outcome["A"]["control"] == "restarted"
    assert all(outcome[name]["restarted"] == [] and outcome[name]["config_changed"] for name in HOSTS)
    after = _status(capsys, applied)
    assert {p["core"]: p["pid"] for name in HOSTS for p in after[name]["processes"] if p["core"]} == {
        core: pid for core, pid in pids.items() if core}
    assert next(p["pid"] for p in after["A"]["processes"] if p["core"] == 0) != pids[0]


def test_address_mismatch_stops_apply_before_any_change(capsys, applied):
    config_before = (applied.root / "nodes" / "A" / ".config" / "config.yml").read_bytes()
    assert applied.coord("host", "set", "B", "--address", "127.0.0.9") == 0
    assert applied.coord("assign") == 0
    capsys.readouterr()
    code = applied.coord("apply")
    lines = capsys.readouterr().out.splitlines()
    assert code == 4
    assert lines[1] == ("B: FAILED (the agent's worker_address is 127.0.0.3, the inventory says 127.0.0.9;"
                        " make them agree (edit agent.yaml on the host, or quil-coord host set B --address))")
    assert lines[0] == "A: SKIPPED (not applied: B failed the preflight)"
    assert (applied.root / "nodes" / "A" / ".config" / "config.yml").read_bytes() == config_before
    assert applied.coord("host", "set", "B", "--address", "127.0.0.3") == 0
    assert applied.coord("assign") == 0


def test_verify_on_local_cluster_checks_agent_ports(capsys, applied):
    capsys.readouterr()
    code = applied.coord("verify", "--json")
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["local"] is True
    assert report["probes"] == []
    assert report["violations"] == []
    assert set(report["agent_ports"].values()) == {"rejected"}
    assert sorted(report["agent_ports"]) == ["A", "B", "C", "D"]


def test_edited_config_shows_drift_until_apply(capsys, applied):
    path = applied.root / "nodes" / "C" / ".config" / "config.yml"
    path.write_text(path.read_text().replace("pendingCommitWorkers: 4", "pendingCommitWorkers: 9"))
    drifted = _status(capsys, applied)["C"]
    assert drifted["drifted"] is True
    assert drifted["drifted_keys"] == ["engine.pendingCommitWorkers"]
    assert applied.coord("assign") == 0
    code, report = _json(capsys, applied, "apply")
    assert code == 0
    assert next(h for h in report["hosts"] if h["name"] == "C")["config_changed"] is True
    assert _status(capsys, applied)["C"]["drifted"] is False


def test_apply_warns_about_ephemeral_ports(capsys, applied):
    code, report = _json(capsys, applied, "apply")
    low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    inside = low <= applied.base_port <= high
    assert code == 0
    assert all(bool(h["warnings"]) == inside for h in report["hosts"])


def test_config_show_and_diff_mask_secrets(capsys, applied):
    capsys.readouterr()
    assert applied.coord("config", "show", "--host", "B") == 0
    shown = capsys.readouterr().out
    assert 'peerPrivKey: "********"' in shown
    assert "peerPrivKey: REPLACE_WITH_ED448_PEER_PRIVKEY_HEX" not in shown
    path = applied.root / "nodes" / "B" / ".config" / "config.yml"
    assert applied.coord("config", "show", "--host", "B", "--diff") == 0
    assert capsys.readouterr().out == "B: config.yml is up to date\n"
    path.write_text(path.read_text().replace("peerPrivKey: REPLACE_WITH_ED448_PEER_PRIVKEY_HEX",
                                             "peerPrivKey: stolen").replace(
        "pendingCommitWorkers: 4", "pendingCommitWorkers: 5"))
    assert applied.coord("config", "show", "--host", "B", "--diff") == 0
    diff = capsys.readouterr().out
    assert "-  pendingCommitWorkers: 5\n+  pendingCommitWorkers: 4\n" in diff
    assert "stolen" not in diff
    assert "peerPrivKey: REPLACE_WITH_ED448" not in diff
