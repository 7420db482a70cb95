"""The same four-host cluster rendered for 1.4, 2.0 and 2.1 from the reference configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import DATA

from quil_cluster.coordinator.assign import assign
from quil_cluster.coordinator.home import Settings
from quil_cluster.coordinator.inventory import Host
from quil_cluster.coordinator.render import render_for_host, render_with_warnings

HOSTS = [Host("A", "192.0.2.10", "192.0.2.10:7350", control=True, workers=2),
         Host("B", "192.0.2.11", "192.0.2.11:7350", workers=2),
         Host("C", "192.0.2.12", "192.0.2.12:7350", workers=1),
         Host("D", "192.0.2.13", "192.0.2.13:7350", workers=3)]
ADDRESSES = ["192.0.2.10"] * 2 + ["192.0.2.11"] * 2 + ["192.0.2.12"] + ["192.0.2.13"] * 3
OFFSETS = [0, 1, 0, 1, 0, 0, 1, 2]


def _render(tmp_path: Path, generation: str, text: str) -> tuple[dict[str, dict], list[str]]:
    control = tmp_path / "config.yml"
    control.write_text(text)
    base = 25000 if generation == "2.1" else 40000
    settings = Settings(name="quil", node_generation=generation, control_config=str(control), base_port=base)
    slots = assign(HOSTS, {h.name: h.workers for h in HOSTS}, [], settings.ports()).slots
    canonical, warnings = render_with_warnings(settings, slots)
    rendered = {h.name: yaml.safe_load(render_for_host(settings, canonical, h.control, "192.0.2.10"))
                for h in HOSTS}
    return rendered, warnings


@pytest.mark.parametrize("generation", ["1.4", "2.0"])
def test_render_single_list_generations(tmp_path, generation):
    rendered, warnings = _render(tmp_path, generation, (DATA / "config-1.4.21.yml").read_text())
    expected = [f"/ip4/{a}/tcp/{40000 + o}" for a, o in zip(ADDRESSES, OFFSETS)]
    assert warnings == []
    for config in rendered.values():
        assert config["engine"]["dataWorkerMultiaddrs"] == expected
        assert "dataWorkerP2PMultiaddrs" not in config["engine"]
    # 1.4 and 2.0 need no per-host fields: every host gets the same file
    assert len({yaml.safe_dump(c) for c in rendered.values()}) == 1


def test_render_2_1_lists_and_per_host_fields(tmp_path):
    rendered, warnings = _render(tmp_path, "2.1", (DATA / "config-2.1.0.25.yml").read_text())
    assert warnings == []
    for name, config in rendered.items():
        engine = config["engine"]
        assert engine["dataWorkerP2PMultiaddrs"] == [f"/ip4/{a}/tcp/{25000 + o}" for a, o in zip(ADDRESSES, OFFSETS)]
        assert engine["dataWorkerStreamMultiaddrs"] == [
            f"/ip4/{a}/tcp/{32500 + o}" for a, o in zip(ADDRESSES, OFFSETS)]
        assert engine["dataWorkerCount"] == 8
        expected_stream = "" if name == "A" else "/ip4/192.0.2.10/tcp/8340"
        assert config["p2p"]["streamListenMultiaddr"] == expected_stream


def test_render_2_1_removes_legacy_keys_with_warning(tmp_path):
    text = (DATA / "config-2.1.0.25.yml").read_text().replace(
        "  dataWorkerMemoryLimit: 0\n",
        "  dataWorkerMemoryLimit: 0\n  dataWorkerBaseListenPort: 40000\n  dataWorkerMultiaddrs:\n"
        "  - /ip4/192.0.2.10/tcp/40000\n")
    rendered, warnings = _render(tmp_path, "2.1", text)
    for config in rendered.values():
        assert "dataWorkerMultiaddrs" not in config["engine"]
        assert "dataWorkerBaseListenPort" not in config["engine"]
    assert [w.split(":")[0] for w in warnings] == ["removed engine.dataWorkerMultiaddrs from the pushed config",
                                                    "removed engine.dataWorkerBaseListenPort from the pushed config"]
    assert warnings[0].endswith(f"remove it from {tmp_path / 'config.yml'} too")
