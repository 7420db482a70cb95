"""2.1 clusters: removing a middle host moves exactly its number of cores from the tail, and apply needs confirmation first."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers import DATA, free_port_range

from quil_cluster.coordinator.demo import LocalCluster

pytestmark = pytest.mark.e2e

HOSTS = {"A": ("127.0.0.2", "2"), "B": ("127.0.0.3", "2"), "C": ("127.0.0.4", "3"), "D": ("127.0.0.5", "2")}


def test_remove_middle_host_of_2_1_cluster(tmp_path, capsys):
    cluster = LocalCluster(tmp_path, generation="2.1", node_version="2.1.0.25")
    control = tmp_path / "config-2.1.0.25.yml"
    control.write_bytes((DATA / "config-2.1.0.25.yml").read_bytes())
    (tmp_path / "keys.yml").write_bytes((DATA / "keys.yml").read_bytes())
    addresses = [a for a, _ in HOSTS.values()]
    p2p, stream = free_port_range(addresses, 4, start=26300), free_port_range(addresses, 4, start=33900)
    assert cluster.init(control, "--base-port", str(p2p), "--stream-base-port", str(stream)) == 0
    for name, (address, workers) in HOSTS.items():
        assert cluster.add_host(name, address, "--workers", workers, *(["--control"] if name == "A" else [])) == 0
    try:
        for name in HOSTS:
            cluster.start_agent(name)
        assert cluster.coord("assign") == 0
        assert cluster.coord("apply") == 0
        # A 1-2, B 3-4, C 5-7, D 8-9: removing B refills 3-4 from the tail (D's 8-9)
        capsys.readouterr()
        code = cluster.coord("host", "remove", "B")
        captured = capsys.readouterr()
        assert code == 3
        assert captured.err.strip() == (
            "error: 2 cores move to another host (core 3: B -> D; core 4: B -> D); each resyncs its shard "
            "state there, so confirm with quil-coord apply --yes")
        assert "7 workers, 0 new, 2 moved, 2 removed" in captured.out
        capsys.readouterr()
        assert cluster.coord("apply", "--yes", "--json") == 0
        report = json.loads(capsys.readouterr().out)
        d = next(h for h in report["hosts"] if h["name"] == "D")
        assert (d["started"], d["stopped"]) == ([3, 4], [8, 9])
        config = yaml.safe_load((tmp_path / "nodes" / "C" / ".config" / "config.yml").read_text())
        engine = config["engine"]
        assert engine["dataWorkerCount"] == 7
        assert engine["dataWorkerP2PMultiaddrs"][2:4] == [f"/ip4/127.0.0.5/tcp/{p2p}", f"/ip4/127.0.0.5/tcp/{p2p + 1}"]
        assert engine["dataWorkerStreamMultiaddrs"][4:7] == [
            f"/ip4/127.0.0.4/tcp/{stream + i}" for i in range(3)]
        # worker hosts get the control host's keys and its stream address; the control host keeps its own
        keys = tmp_path / "nodes" / "C" / ".config" / "keys.yml"
        assert keys.read_bytes() == (DATA / "keys.yml").read_bytes()
        assert keys.stat().st_mode & 0o777 == 0o600
        assert config["p2p"]["streamListenMultiaddr"] == "/ip4/127.0.0.2/tcp/8340"
        control_config = yaml.safe_load((tmp_path / "nodes" / "A" / ".config" / "config.yml").read_text())
        assert control_config["p2p"]["streamListenMultiaddr"] == ""
        assert not (tmp_path / "nodes" / "A" / ".config" / "keys.yml").exists()
        # a second apply has nothing to confirm
        assert cluster.coord("apply") == 0
    finally:
        cluster.stop_all()
