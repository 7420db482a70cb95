"""quil-coord verify across real network namespaces: a control host, two worker hosts, an outsider."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from netns_cluster import BedCluster


@pytest.fixture
def cluster_1_4(netbed, tmp_path):
    bed = netbed(["ctl", "w1", "w2", "out"])
    cluster = BedCluster(bed, tmp_path)
    cluster.init("--port-scheme", "per-host")
    cluster.add("ctl", "--control", "--workers", "2")
    cluster.add("w1", "--workers", "2")
    cluster.add("w2", "--workers", "2")
    cluster.add("out", "--probe-only")
    for name in ("ctl", "w1", "w2", "out"):
        cluster.start_agent(name)
    assert cluster.coord("assign").returncode == 0
    applied = cluster.coord("apply", "--no-verify")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    for name in ("ctl", "w1", "w2"):
        for port in (40000, 40001):
            cluster.wait_open(name, bed.host(name).address, port)
    return cluster


def _cells(report, source, host):
    return sorted((p["port"], p["observed"], p["ok"]) for p in report["probes"]
                  if p["from"] == source and p["host"] == host)


def test_verify_without_firewall_reports_exposed_worker_ports(cluster_1_4):
    code, report = cluster_1_4.coord_json("verify")
    assert code == 7
    assert report["ok"] is False
    assert _cells(report, "ctl", "w1") == [(40000, "open", True), (40001, "open", True)]
    assert _cells(report, "out", "w1") == [(40000, "open", False), (40001, "open", False)]
    assert _cells(report, "w2", "w1") == [(40000, "open", False), (40001, "open", False)]
    expected_line = ("out -> w1 core 3 198.18.0.2:40000 (worker, private): open, expected blocked; allow only "
                     "198.18.0.1 to port 40000 on w1: quil-coord host set w1 --firewall nftables, or the rules "
                     "from quil-coord firewall show --host w1")
    assert expected_line in report["violations"]
    # every source but the control host reaches every other host's 2 ports: ctl's from w1, w2 and out,
    # w1's from w2 and out, w2's from w1 and out
    assert len([v for v in report["violations"] if "expected blocked" in v]) == 2 * 3 + 2 * 2 + 2 * 2
    assert set(report["agent_ports"].values()) == {"rejected"}


def test_verify_reports_filtered_port_from_control(cluster_1_4):
    # An operator's own drop rule on w1 that also blocks the control host.
    rule = "add table inet opsblock; add chain inet opsblock in { type filter hook input priority 0; }; " \
           "add rule inet opsblock in tcp dport 40001 drop"
    assert cluster_1_4.bed.run("w1", ["nft", rule]).returncode == 0
    code, report = cluster_1_4.coord_json("verify")
    assert code == 7
    assert _cells(report, "ctl", "w1") == [(40000, "open", True), (40001, "timeout", False)]
    assert any(v.startswith("ctl -> w1 core 4 198.18.0.2:40001 (worker, private): timeout, expected open")
               for v in report["violations"])


def test_managed_nftables_passes_verify(cluster_1_4):
    bed = cluster_1_4.bed
    for name in ("ctl", "w1", "w2"):
        assert cluster_1_4.local("host", "set", name, "--firewall", "nftables") == 0
    assert cluster_1_4.coord("assign").returncode == 0
    applied = cluster_1_4.coord("apply")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert "firewall updated" in applied.stdout
    code, report = cluster_1_4.coord_json("verify")
    assert (code, report["violations"], report["ok"]) == (0, [], True)
    w1 = bed.host("w1").address
    assert bed.connect("out", w1, 40000, timeout=1.0) == "timeout"
    assert bed.connect("w2", w1, 40001, timeout=1.0) == "timeout"
    assert all(bed.connect("ctl", bed.host(h).address, p) == "open" for h in ("w1", "w2") for p in (40000, 40001))
    assert set(report["agent_ports"].values()) == {"rejected"}
    table = bed.run("w1", ["nft", "list", "table", "inet", "quil_cluster"])
    assert table.returncode == 0
    assert "198.18.0.1" in table.stdout
    again = cluster_1_4.coord("apply", "--json")
    assert [h["firewall_changed"] for h in __import__("json").loads(again.stdout)["hosts"]] == [False] * 3


def test_firewall_off_removes_table(cluster_1_4):
    bed = cluster_1_4.bed
    assert cluster_1_4.local("host", "set", "w1", "--firewall", "nftables") == 0
    assert cluster_1_4.coord("assign").returncode == 0
    assert cluster_1_4.coord("apply", "--no-verify").returncode == 0
    assert bed.connect("out", bed.host("w1").address, 40000, timeout=1.0) == "timeout"
    assert cluster_1_4.local("host", "set", "w1", "--firewall", "off") == 0
    assert cluster_1_4.coord("assign").returncode == 0
    assert cluster_1_4.coord("apply", "--no-verify").returncode == 0
    assert bed.run("w1", ["nft", "list", "table", "inet", "quil_cluster"]).returncode != 0
    assert bed.connect("out", bed.host("w1").address, 40000, timeout=1.0) == "open"


def test_generation_2_1_expects_public_p2p(netbed, tmp_path):
    bed = netbed(["ctl", "w1", "out"])
    cluster = BedCluster(bed, tmp_path, generation="2.1")
    cluster.init("--port-scheme", "per-host")
    cluster.add("ctl", "--control", "--workers", "1", "--firewall", "nftables")
    cluster.add("w1", "--workers", "1", "--firewall", "nftables")
    cluster.add("out", "--probe-only")
    for name in ("ctl", "w1", "out"):
        cluster.start_agent(name)
    assert cluster.coord("assign").returncode == 0
    assert cluster.coord("apply", "--no-verify").returncode == 0
    w1 = bed.host("w1").address
    cluster.wait_open("ctl", w1, 25000)
    cluster.wait_open("ctl", w1, 32500)
    code, report = cluster.coord_json("verify")
    assert (code, report["violations"]) == (0, [])
    from_out = sorted((p["port"], p["class"], p["observed"]) for p in report["probes"]
                      if p["from"] == "out" and p["host"] == "w1")
    assert from_out == [(25000, "p2p", "open"), (32500, "stream", "timeout")]
    # An operator's rule that blocks the P2P port: the worker could not pass the node's reachability test.
    rule = "add table inet opsblock; add chain inet opsblock in { type filter hook input priority 0; }; " \
           "add rule inet opsblock in ip saddr 198.18.0.3 tcp dport 25000 drop"
    assert bed.run("w1", ["nft", rule]).returncode == 0
    code, report = cluster.coord_json("verify")
    assert code == 7
    assert report["violations"] == [
        "out -> w1 core 2 198.18.0.2:25000 (p2p, public): timeout, expected open; check that the worker runs "
        "and that no firewall on w1 drops out"]


def test_joined_host_gets_firewall_and_verify_passes(netbed, tmp_path):
    bed = netbed(["ctl", "w1", "w2", "out"])
    cluster = BedCluster(bed, tmp_path)
    cluster.init("--port-scheme", "per-host", "--firewall", "nftables")
    cluster.add("ctl", "--control", "--workers", "1", "--firewall", "nftables")
    cluster.add("w1", "--workers", "1", "--firewall", "nftables")
    cluster.add("out", "--probe-only")
    for name in ("ctl", "w1", "out"):
        cluster.start_agent(name)
    assert cluster.coord("assign").returncode == 0
    assert cluster.coord("apply").returncode == 0
    ctl = bed.host("ctl").address
    bed.popen("ctl", [sys.executable, "-m", "quil_cluster.coordinator", "--home", str(cluster.home), "serve",
                      "--listen", f"{ctl}:7351"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cluster.wait_open("w2", ctl, 7351)
    created = cluster.coord("token", "create", "--workers", "2", "--host-name", "w2")
    join = created.stdout.splitlines()[-1].split()
    assert join[:3] == ["quil-agent", "join", f"{ctl}:7351"]
    directory = tmp_path / "joined"
    bed.popen("w2", [sys.executable, "-m", "quil_cluster.agent", *join[1:], "--dir", str(directory),
                     "--node-binary", str(cluster.node_binary), "--node-config-dir", str(directory / "node" / ".config"),
                     "--state-dir", str(directory / "state"), "--run"],
              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    w2 = bed.host("w2").address
    cluster.wait_open("ctl", w2, 40001, timeout=60)
    deadline = time.monotonic() + 30
    while bed.run("w2", ["nft", "list", "table", "inet", "quil_cluster"]).returncode != 0:
        assert time.monotonic() < deadline, "the joined host never got its firewall table"
        time.sleep(0.2)
    code, report = cluster.coord_json("verify")
    assert (code, report["violations"]) == (0, [])
    assert _cells(report, "ctl", "w2") == [(40000, "open", True), (40001, "open", True)]
    assert _cells(report, "out", "w2") == [(40000, "timeout", True), (40001, "timeout", True)]
