"""quil-coord in-process: exit statuses, exact error lines, and nothing changed on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import DATA

from quil_cluster.coordinator.cli import main


@pytest.fixture
def home(tmp_path: Path) -> Path:
    control = tmp_path / "config.yml"
    control.write_bytes((DATA / "config-1.4.21.yml").read_bytes())
    home = tmp_path / "coord"
    assert main(["--home", str(home), "init", "--control-config", str(control)]) == 0
    return home


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _run(home: Path, capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["--home", str(home), *argv])
    return code, capsys.readouterr().err.strip()


def _add(home: Path, tmp_path: Path, name: str, address: str, port: int, *extra: str) -> int:
    return main(["--home", str(home), "host", "add", name, "--address", address, "--agent", f"{address}:{port}",
                 "--bundle", str(tmp_path / "bundles" / name), *extra])


def test_init_detects_generation_and_writes_private_ca(home):
    settings = (home / "cluster.yaml").read_text()
    assert "node_generation: '1.4'" in settings
    assert (home / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (home / "coordinator.key").stat().st_mode & 0o777 == 0o600


def test_init_twice_is_rejected(home, capsys, tmp_path):
    before = _snapshot(home)
    code, err = _run(home, capsys, "init", "--control-config", str(tmp_path / "config.yml"))
    assert code == 3
    assert err == f"error: {home} is already initialized; use another --home for a new cluster"
    assert _snapshot(home) == before


def test_init_with_unreadable_config_is_rejected(tmp_path, capsys):
    home = tmp_path / "coord"
    missing = tmp_path / "missing.yml"
    code, err = _run(home, capsys, "init", "--control-config", str(missing))
    assert code == 3
    assert err == (f"error: {missing}: cannot read the control host's node config (No such file or directory);"
                   " fix the path with quil-coord init --control-config or restore the file")
    assert not (home / "cluster.yaml").exists()


def test_host_add_writes_complete_bundle(home, tmp_path):
    assert _add(home, tmp_path, "A", "192.0.2.10", 7350, "--control", "--workers", "3") == 0
    bundle = tmp_path / "bundles" / "A"
    assert sorted(p.name for p in bundle.iterdir()) == ["agent.crt", "agent.key", "agent.yaml", "ca.crt"]
    assert (bundle / "agent.key").stat().st_mode & 0o777 == 0o600
    from quil_cluster.agent import config as agent_config

    loaded = agent_config.load(bundle / "agent.yaml")
    assert (loaded.listen, loaded.worker_address, loaded.cluster) == ("192.0.2.10:7350", "192.0.2.10", "quil")


def test_host_remove_unknown_host_is_rejected(home, capsys, tmp_path):
    _add(home, tmp_path, "A", "192.0.2.10", 7350, "--control", "--workers", "3")
    before = _snapshot(home)
    code, err = _run(home, capsys, "host", "remove", "nosuch")
    assert code == 3
    assert err == "error: unknown host 'nosuch'; known hosts: A"
    assert _snapshot(home) == before


def test_host_add_duplicate_address_is_rejected(home, capsys, tmp_path):
    _add(home, tmp_path, "A", "192.0.2.10", 7350, "--control", "--workers", "3")
    before = _snapshot(home)
    code, err = _run(home, capsys, "host", "add", "B", "--address", "192.0.2.10", "--agent", "192.0.2.11:7350",
                     "--workers", "2", "--bundle", str(tmp_path / "bundles" / "B"))
    assert code == 3
    assert err == "error: address 192.0.2.10 is already used by host A; give host B its own"
    assert _snapshot(home) == before
    assert not (tmp_path / "bundles" / "B").exists()


def test_host_add_duplicate_agent_endpoint_is_rejected(home, capsys, tmp_path):
    _add(home, tmp_path, "A", "192.0.2.10", 7350, "--control", "--workers", "3")
    code, err = _run(home, capsys, "host", "add", "B", "--address", "192.0.2.11", "--agent", "192.0.2.10:7350",
                     "--workers", "2", "--bundle", str(tmp_path / "bundles" / "B"))
    assert code == 3
    assert err == "error: agent 192.0.2.10:7350 is already used by host A; give host B its own"


@pytest.mark.parametrize("count", ["0", "-1", "5000"])
def test_host_add_bad_worker_count_is_rejected(home, capsys, tmp_path, count):
    before = _snapshot(home)
    code, err = _run(home, capsys, "host", "add", "A", "--address", "192.0.2.10", "--agent", "192.0.2.10:7350",
                     "--workers", count, "--bundle", str(tmp_path / "bundles" / "A"))
    assert code == 3
    assert err == f"error: invalid worker count {count}: use 1 to 4096"
    assert _snapshot(home) == before


@pytest.mark.parametrize("agent", ["192.0.2.10", "192.0.2.10:0", "192.0.2.10:70000", ":7350"])
def test_host_add_bad_agent_endpoint_is_rejected(home, capsys, tmp_path, agent):
    code, err = _run(home, capsys, "host", "add", "A", "--address", "192.0.2.10", "--agent", agent,
                     "--workers", "1", "--bundle", str(tmp_path / "bundles" / "A"))
    assert code == 3
    assert err == f"error: invalid --agent '{agent}': use HOST:PORT with a port from 1 to 65535"


@pytest.mark.parametrize("address", ["not-an-ip", "0.0.0.0", "::"])
def test_host_add_bad_address_is_rejected(home, capsys, tmp_path, address):
    code, err = _run(home, capsys, "host", "add", "A", "--address", address, "--agent", "192.0.2.10:7350",
                     "--workers", "1", "--bundle", str(tmp_path / "bundles" / "A"))
    assert code == 3
    assert err.startswith(f"error: invalid --address '{address}':")


def test_second_control_host_is_rejected(home, capsys, tmp_path):
    _add(home, tmp_path, "A", "192.0.2.10", 7350, "--control", "--workers", "3")
    code, err = _run(home, capsys, "host", "add", "B", "--address", "192.0.2.11", "--agent", "192.0.2.11:7350",
                     "--workers", "2", "--control", "--bundle", str(tmp_path / "bundles" / "B"))
    assert code == 3
    assert err == "error: hosts A and B are both marked control; a cluster has one control process"


def test_assign_without_control_host_is_rejected(home, capsys, tmp_path):
    _add(home, tmp_path, "B", "192.0.2.11", 7350, "--workers", "2")
    before = _snapshot(home)
    code, err = _run(home, capsys, "assign")
    assert code == 3
    assert err == "error: no control host; mark one with quil-coord host set NAME --control"
    assert _snapshot(home) == before


def test_assign_json_guide_topology(home, capsys, tmp_path):
    main(["--home", str(home), "host", "set", "A"]) if False else None
    assert _add(home, tmp_path, "A", "192.0.2.10", 7350, "--control", "--cpus", "4", "--reserve", "1") == 0
    assert _add(home, tmp_path, "B", "192.0.2.11", 7350, "--workers", "4") == 0
    capsys.readouterr()
    assert main(["--home", str(home), "assign", "--json"]) == 0
    workers = json.loads(capsys.readouterr().out)["workers"]
    assert [(w["core"], w["host"], w["multiaddr"]) for w in workers] == (
        [(c, "A", f"/ip4/192.0.2.10/tcp/{40000 + c - 1}") for c in (1, 2, 3)]
        + [(c, "B", f"/ip4/192.0.2.11/tcp/{40000 + c - 4}") for c in (4, 5, 6, 7)]
    )


def test_apply_without_assignment_is_rejected(home, capsys, tmp_path):
    _add(home, tmp_path, "A", "192.0.2.10", 7350, "--control", "--workers", "1")
    code, err = _run(home, capsys, "apply")
    assert code == 3
    assert err == "error: no assignment recorded; run quil-coord assign first"


def test_apply_after_inventory_change_asks_for_assign(home, capsys, tmp_path):
    _add(home, tmp_path, "A", "192.0.2.10", 7350, "--control", "--workers", "1")
    assert main(["--home", str(home), "assign"]) == 0
    _add(home, tmp_path, "B", "192.0.2.11", 7350, "--workers", "1")
    code, err = _run(home, capsys, "apply")
    assert code == 3
    assert err == "error: the inventory changed since the last assign; run quil-coord assign, then apply"


def test_apply_with_unreadable_control_config_is_rejected(home, capsys, tmp_path):
    _add(home, tmp_path, "A", "192.0.2.10", 7350, "--control", "--workers", "1")
    assert main(["--home", str(home), "assign"]) == 0
    control = tmp_path / "config.yml"
    control.unlink()
    before = _snapshot(home)
    code, err = _run(home, capsys, "apply")
    assert code == 3
    assert err == (f"error: {control}: cannot read the control host's node config (No such file or directory);"
                   " fix the path with quil-coord init --control-config or restore the file")
    assert _snapshot(home) == before


def test_apply_with_broken_control_config_is_rejected(home, capsys, tmp_path):
    _add(home, tmp_path, "A", "192.0.2.10", 7350, "--control", "--workers", "1")
    assert main(["--home", str(home), "assign"]) == 0
    control = tmp_path / "config.yml"
    control.write_text("engine:\n  filter: a\nengine:\n  filter: b\n")
    code, err = _run(home, capsys, "apply")
    assert code == 3
    assert err.startswith(f"error: {control}:3: duplicate key 'engine' (first at line 1)")


def test_command_without_home_is_rejected(capsys, monkeypatch):
    monkeypatch.delenv("QUIL_COORD_HOME", raising=False)
    capsys.readouterr()
    assert main(["status"]) == 3
    assert capsys.readouterr().err.strip() == "error: no state directory: pass --home DIR or set QUIL_COORD_HOME"


def test_status_of_uninitialized_home_is_rejected(tmp_path, capsys):
    code, err = _run(tmp_path / "empty", capsys, "status")
    assert code == 3
    assert err == f"error: {tmp_path / 'empty'}: not a quil-coord state directory; run quil-coord init first"


def test_unreachable_agent_is_reported(home, capsys, tmp_path):
    _add(home, tmp_path, "A", "127.0.0.9", 9, "--control", "--workers", "1")
    assert main(["--home", str(home), "assign"]) == 0
    capsys.readouterr()
    code = main(["--home", str(home), "apply"])
    out = capsys.readouterr().out
    assert code == 5
    assert out.splitlines()[0].startswith("A: UNREACHABLE (unavailable:")


def test_host_set_workers_replaces_reserve(home, tmp_path):
    _add(home, tmp_path, "A", "192.0.2.10", 7350, "--control", "--cpus", "8", "--reserve", "2")
    assert main(["--home", str(home), "host", "set", "A", "--workers", "3"]) == 0
    from quil_cluster.coordinator.home import Home

    host = Home(home).load_hosts()[0]
    assert (host.workers, host.reserve) == (3, None)
    assert main(["--home", str(home), "host", "set", "A", "--reserve", "1"]) == 0
    host = Home(home).load_hosts()[0]
    assert (host.workers, host.reserve) == (None, 1)


def test_host_set_worker_count_zero_is_rejected(home, capsys, tmp_path):
    _add(home, tmp_path, "A", "192.0.2.10", 7350, "--control", "--workers", "3")
    code, err = _run(home, capsys, "host", "set", "A", "--workers", "0")
    assert code == 3
    assert err == "error: invalid worker count 0: use 1 to 4096"


@pytest.mark.parametrize("row, message", [
    ("address: not-an-ip", "host entry 1: invalid --address 'not-an-ip': not an IP address"),
    ("agent: nope", "host entry 1: invalid --agent 'nope': use HOST:PORT with a port from 1 to 65535"),
    ("workers: true", "host entry 1: 'workers' must be a whole number"),
    ("workers: many", "host entry 1: 'workers' must be a whole number"),
    ("control: 'false'", "host entry 1: 'control' must be true or false"),
    ("wrokers: 2", "host entry 1: unknown key 'wrokers'; did you mean 'workers'?"),
])
def test_hand_edited_hosts_yaml_is_checked(home, capsys, tmp_path, row, message):
    _add(home, tmp_path, "A", "192.0.2.10", 7350, "--control", "--workers", "3")
    hosts = home / "hosts.yaml"
    lines = hosts.read_text().splitlines()
    key = row.split(":")[0]
    lines = [line for line in lines if not line.strip().startswith(f"{key}:")] + [f"  {row}"]
    hosts.write_text("\n".join(lines) + "\n")
    before = _snapshot(home)
    code, err = _run(home, capsys, "assign")
    assert code == 3
    assert err.startswith(f"error: {hosts}: {message}")
    assert _snapshot(home) == before


def test_corrupt_assignment_json_is_rejected(home, capsys, tmp_path):
    _add(home, tmp_path, "A", "192.0.2.10", 7350, "--control", "--workers", "2")
    assert main(["--home", str(home), "assign"]) == 0
    path = home / "assignment.json"
    path.write_text(path.read_text().replace('"core": 1', '"core": "one"'))
    code, err = _run(home, capsys, "apply")
    assert code == 3
    assert err == (f"error: {path}: invalid assignment (worker entry Slot(core='one', host='A', "
                   "address='192.0.2.10', offset=0) has fields of the wrong type); "
                   "run quil-coord assign to record a new one")


@pytest.mark.parametrize("agent, message", [
    ("0.0.0.0:7350", "the coordinator must dial a concrete address"),
    ("::1:7350", "write an IPv6 address in brackets, [ADDR]:PORT"),
    ("bad host:7350", "'bad host' is neither an IP address nor a DNS name"),
])
def test_host_add_bad_agent_host_is_rejected(home, capsys, tmp_path, agent, message):
    code, err = _run(home, capsys, "host", "add", "A", "--address", "192.0.2.10", "--agent", agent,
                     "--workers", "1", "--bundle", str(tmp_path / "bundles" / "A"))
    assert code == 3
    assert err == f"error: invalid --agent '{agent}': {message}"
    assert not (tmp_path / "bundles" / "A").exists()


def test_home_that_is_a_file_is_rejected(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    code, err = _run(target, capsys, "init", "--control-config", str(DATA / "config-1.4.21.yml"))
    assert code == 3
    assert err == f"error: {target}: cannot use as state directory (File exists)"


def test_unquoted_generation_in_cluster_yaml_loads(home):
    path = home / "cluster.yaml"
    path.write_text(path.read_text().replace("node_generation: '1.4'", "node_generation: 1.4"))
    from quil_cluster.coordinator.home import Home

    assert Home(home).load_settings().node_generation == "1.4"


def test_init_rejects_base_port_zero(tmp_path, capsys):
    code, err = _run(tmp_path / "c", capsys, "init", "--control-config", str(DATA / "config-1.4.21.yml"),
                     "--base-port", "0")
    assert code == 3
    assert err == "error: init: base_port 0 is not a port from 1 to 65535"


def test_init_with_non_mapping_engine_is_rejected(tmp_path, capsys):
    control = tmp_path / "config.yml"
    control.write_text("engine: 5\n")
    code, err = _run(tmp_path / "c", capsys, "init", "--control-config", str(control))
    assert code == 3
    assert err == f"error: {control}:1: engine must be a mapping of settings, not an integer ('5')"
    assert not (tmp_path / "c" / "cluster.yaml").exists()


def test_firewall_show_corrects_guide_example(home, capsys, tmp_path):
    # The node runners' guide allows the worker host itself and writes the range backwards
    # (ufw allow from 192.168.0.201 to any port 40003:40000); the right rule allows the control host.
    _add(home, tmp_path, "A", "192.168.0.200", 7350, "--control", "--workers", "3")
    _add(home, tmp_path, "B", "192.168.0.201", 7350, "--workers", "4")
    assert main(["--home", str(home), "assign"]) == 0
    capsys.readouterr()
    assert main(["--home", str(home), "firewall", "show", "--host", "B"]) == 0
    out = capsys.readouterr().out
    assert "ufw allow from 192.168.0.200 to any port 40000:40003 proto tcp comment 'quil-cluster'" in out
    assert "ufw deny proto tcp to any port 40000:40003 comment 'quil-cluster'" in out
    assert "from 192.168.0.201" not in out
    assert "40003:40000" not in out
    assert "ip saddr { 192.168.0.200, 192.168.0.201 } tcp dport { 40000-40003 } accept" in out
    assert "tcp dport { 40000-40003 } drop" in out


def test_firewall_show_unknown_host_is_rejected(home, capsys, tmp_path):
    _add(home, tmp_path, "A", "192.168.0.200", 7350, "--control", "--workers", "3")
    code, err = _run(home, capsys, "firewall", "show", "--host", "Z")
    assert code == 3
    assert err == "error: unknown host 'Z'; known hosts: A"


def test_apply_with_misspelt_key_writes_nothing(home, capsys, tmp_path):
    _add(home, tmp_path, "A", "192.0.2.10", 7350, "--control", "--workers", "1")
    assert main(["--home", str(home), "assign"]) == 0
    control = tmp_path / "config.yml"
    control.write_text(control.read_text().replace("  dataWorkerMultiaddrs: []", "  dataWorkersMultiaddrs: []"))
    before = _snapshot(home)
    code, err = _run(home, capsys, "apply")
    assert code == 3
    assert err == (f"error: {control}:98: unknown key 'engine.dataWorkersMultiaddrs' for node 1.4; did you mean "
                   "'dataWorkerMultiaddrs'? The node ignores unknown keys, so fix or remove it")
    assert _snapshot(home) == before


def test_init_with_misspelt_key_is_rejected(tmp_path, capsys):
    control = tmp_path / "config.yml"
    control.write_text((DATA / "config-1.4.21.yml").read_text().replace("  filter:", "  filtre:"))
    code, err = _run(tmp_path / "c", capsys, "init", "--control-config", str(control))
    assert code == 3
    assert err.startswith(f"error: {control}:")
    assert "unknown key 'engine.filtre' for node 1.4; did you mean 'filter'?" in err
    assert not (tmp_path / "c" / "cluster.yaml").exists()


def test_verify_without_control_host_is_rejected(home, capsys, tmp_path):
    _add(home, tmp_path, "B", "192.0.2.11", 7350, "--workers", "1")
    code, err = _run(home, capsys, "verify")
    assert code == 3
    assert err == ("error: no control host, so there is no authorized source to verify against; "
                   "mark one with quil-coord host set NAME --control")


def test_firewall_show_without_control_host_is_rejected(home, capsys, tmp_path):
    _add(home, tmp_path, "B", "192.0.2.11", 7350, "--workers", "1")
    code, err = _run(home, capsys, "firewall", "show")
    assert code == 3
    assert err == ("error: no control host, so no host may reach private worker ports; "
                   "mark one with quil-coord host set NAME --control")


def test_host_renew_unknown_host_is_rejected(home, capsys):
    code, err = _run(home, capsys, "host", "renew", "nosuch")
    assert code == 3
    assert err == "error: unknown host 'nosuch'; see quil-coord host list"


@pytest.mark.parametrize("argv", [("stop", "h1", "--core", "1"), ("logs", "h1", "--core", "1")])
def test_process_commands_with_unreachable_agent_exit_5(home, tmp_path, capsys, argv):
    from helpers import free_port_range

    port = free_port_range(["127.0.0.9"], 1)
    assert _add(home, tmp_path, "h1", "127.0.0.9", port, "--workers", "1", "--cpus", "1") == 0
    code, err = _run(home, capsys, *argv)
    assert code == 5
    assert err.startswith("error: h1: unavailable: ")


def test_process_command_with_unknown_host_exits_3(home, capsys):
    code, err = _run(home, capsys, "restart", "nowhere")
    assert code == 3
    assert err == "error: unknown host 'nowhere'; known hosts: none (add one with quil-coord host add)"
