"""Expected exposure per port class, and the firewall policy derived from it."""

from __future__ import annotations

import pytest

from quil_cluster.common.errors import ConfigError
from quil_cluster.common.firewall import PortRule, render_ufw
from quil_cluster.coordinator import policy
from quil_cluster.coordinator.assign import Ports, assign
from quil_cluster.coordinator.home import Settings
from quil_cluster.coordinator.inventory import Host


def _cluster(generation: str, scheme: str = "global"):
    settings = Settings(name="quil", node_generation=generation, control_config="/x", port_scheme=scheme,
                        base_port=40000 if generation != "2.1" else 25000)
    hosts = [Host("A", "192.0.2.200", "192.0.2.200:7350", control=True, workers=3),
             Host("B", "192.0.2.201", "192.0.2.201:7350", workers=4),
             Host("out", "192.0.2.99", "192.0.2.99:7350", probe_only=True)]
    workers = [h for h in hosts if not h.probe_only]
    slots = assign(workers, {h.name: h.workers for h in workers}, [], settings.ports()).slots
    return settings, hosts, slots


def test_targets_1_4_are_private_worker_ports():
    settings, _, slots = _cluster("1.4")
    targets = policy.targets(settings, slots)
    assert [(t.host, t.core, t.port, t.port_class, t.exposure) for t in targets] == [
        ("A", 1, 40000, "worker", "private"), ("A", 2, 40001, "worker", "private"),
        ("A", 3, 40002, "worker", "private"), ("B", 4, 40003, "worker", "private"),
        ("B", 5, 40004, "worker", "private"), ("B", 6, 40005, "worker", "private"),
        ("B", 7, 40006, "worker", "private")]


def test_targets_2_1_p2p_public_stream_private():
    settings, _, slots = _cluster("2.1", "per-host")
    targets = [t for t in policy.targets(settings, slots) if t.core == 4]
    assert [(t.port_class, t.port, t.exposure) for t in targets] == [("p2p", 25000, "public"),
                                                                       ("stream", 32500, "private")]


def test_expected_grid_cells():
    settings, hosts, slots = _cluster("1.4")
    a, b, out = hosts
    target = next(t for t in policy.targets(settings, slots) if t.core == 4)
    assert policy.expected(target, a, a) == "open"
    assert policy.expected(target, out, a) == "blocked"
    assert policy.expected(target, b, a) is None
    own = next(t for t in policy.targets(settings, slots) if t.core == 1)
    assert policy.expected(own, b, a) == "blocked"


def test_exposure_override_and_bad_values():
    settings, _, slots = _cluster("2.1")
    settings.exposure = {"stream": "public"}
    assert {t.exposure for t in policy.targets(settings, slots)} == {"public"}
    settings.exposure = {"worker": "private"}
    with pytest.raises(ConfigError) as err:
        policy.targets(settings, slots)
    assert str(err.value) == "cluster.yaml: exposure for 'worker' does not exist in node 2.1; use p2p, stream"
    settings.exposure = {"p2p": "open"}
    with pytest.raises(ConfigError) as err:
        policy.targets(settings, slots)
    assert str(err.value) == "cluster.yaml: exposure 'open' for p2p; use public or private"


def test_host_policy_fixes_guide_example():
    # The guide's example allowed the worker's own address and wrote the range backwards.
    settings, hosts, slots = _cluster("1.4", "per-host")
    worker_policy = policy.host_policy(settings, hosts, slots, hosts[1])
    assert worker_policy.rules == (PortRule(ports=(40000, 40001, 40002, 40003), sources=("192.0.2.200",),
                                            purpose="1.4 worker ports"),)
    lines = render_ufw(worker_policy)
    assert "ufw allow from 192.0.2.200 to any port 40000:40003 proto tcp comment 'quil-cluster'" in lines
    assert not any("from 192.0.2.201" in line for line in lines)
    assert not any("40003:40000" in line for line in lines)


def test_host_policy_2_1_keeps_p2p_public():
    settings, hosts, slots = _cluster("2.1", "per-host")
    rules = policy.host_policy(settings, hosts, slots, hosts[1]).rules
    assert [(r.purpose, r.sources, r.ports) for r in rules] == [
        ("2.1 worker P2P ports", (), (25000, 25001, 25002, 25003)),
        ("2.1 worker stream ports", ("192.0.2.200",), (32500, 32501, 32502, 32503))]
