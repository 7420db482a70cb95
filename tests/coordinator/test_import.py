"""Import of hand-made clusters: the node runners' guide examples keep their core indices and ports."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers import DATA

from quil_cluster.coordinator.cli import main


def _guide_config(tmp_path, entries: list[str]):
    text = (DATA / "config-1.4.21.yml").read_text().replace(
        "  dataWorkerMultiaddrs: []\n", "  dataWorkerMultiaddrs:\n" + "".join(f"  - {e}\n" for e in entries))
    path = tmp_path / "config.yml"
    path.write_text(text)
    return path


def _run(home, *argv):
    return main(["--home", str(home), *argv])


# The two-machine example of the reference config: cores 1-3 on the master, 4-7 on the worker,
# each machine counting its ports from 40000.
TWO_MACHINES = [f"/ip4/192.168.0.200/tcp/{40000 + i}" for i in range(3)] + [
    f"/ip4/192.168.0.201/tcp/{40000 + i}" for i in range(4)]
# The three-machine example of the cluster guide: ports count up across the cluster.
THREE_MACHINES = ([f"/ip4/192.168.0.200/tcp/{40000 + i}" for i in range(3)]
                  + [f"/ip4/192.168.0.201/tcp/{40003 + i}" for i in range(4)]
                  + [f"/ip4/192.168.0.202/tcp/{40007 + i}" for i in range(10)])


@pytest.mark.parametrize("entries, scheme", [(TWO_MACHINES, "per-host"), (THREE_MACHINES, "global")])
def test_import_keeps_cores_and_ports(tmp_path, capsys, entries, scheme):
    home = tmp_path / "coord"
    control = _guide_config(tmp_path, entries)
    assert _run(home, "init", "--control-config", str(control)) == 0
    assert _run(home, "import") == 0
    capsys.readouterr()
    assert _run(home, "assign", "--json") == 0
    plan = json.loads(capsys.readouterr().out)
    assert [w["multiaddr"] for w in plan["workers"]] == entries
    assert plan["added"] == plan["moved"] == plan["removed"] == []
    assert yaml.safe_load((home / "cluster.yaml").read_text())["port_scheme"] == scheme
    hosts = yaml.safe_load((home / "hosts.yaml").read_text())["hosts"]
    assert [(h["name"], h.get("control", False), h["workers"]) for h in hosts][:2] == [
        ("h-192-168-0-200", True, 3), ("h-192-168-0-201", False, 4)]
    capsys.readouterr()
    assert _run(home, "config", "show") == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["engine"]["dataWorkerMultiaddrs"] == entries


def test_import_without_worker_list_is_rejected(tmp_path, capsys):
    home = tmp_path / "coord"
    assert _run(home, "init", "--control-config", str(DATA / "config-1.4.21.yml")) == 0
    capsys.readouterr()
    assert _run(home, "import") == 3
    assert capsys.readouterr().err.strip() == (
        f"error: {DATA / 'config-1.4.21.yml'}: no worker list to import; it runs local workers only")


def test_imported_host_gets_bundle(tmp_path, capsys):
    home = tmp_path / "coord"
    assert _run(home, "init", "--control-config", str(_guide_config(tmp_path, TWO_MACHINES))) == 0
    assert _run(home, "import") == 0
    assert _run(home, "host", "bundle", "h-192-168-0-201", "--bundle", str(tmp_path / "b")) == 0
    agent = yaml.safe_load((tmp_path / "b" / "agent.yaml").read_text())
    assert (agent["listen"], agent["worker_address"]) == ("192.168.0.201:7350", "192.168.0.201")
    assert (tmp_path / "b" / "agent.key").stat().st_mode & 0o777 == 0o600
