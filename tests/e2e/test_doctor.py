"""quil-coord doctor against real agents: a sound cluster passes, and each fault made on it is found.

The clock check is covered by unit tests only: the agents here share this
machine's clock, and no agent setting fakes one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from quil_cluster.agent.hostinfo import ephemeral_range
from quil_cluster.coordinator.demo import AgentProcess, LocalCluster, free_port
from quil_cluster.simnode import write_wrapper

from helpers import DATA, free_port_range

pytestmark = pytest.mark.e2e

HOSTS = {"a": "127.0.0.2", "b": "127.0.0.3"}
# Small enough that two workers fit on any test machine.
WORKER_MEMORY = 256 * 1024**2


def _control_config(root: Path, worker_memory: int) -> Path:
    path = root / "config-1.4.21.yml"
    text = (DATA / "config-1.4.21.yml").read_text()
    path.write_text(text.replace("dataWorkerMemoryLimit: 0", f"dataWorkerMemoryLimit: {worker_memory}"))
    return path


def _sign(binary: Path) -> None:
    (binary.parent / f"{binary.name}.dgst").write_text("digest\n")
    (binary.parent / f"{binary.name}.dgst.sig.1").write_text("signature\n")


def _doctor(capsys, cluster) -> tuple[int, dict]:
    capsys.readouterr()
    code = cluster.coord("doctor", "--json")
    return code, json.loads(capsys.readouterr().out)


def _found(report: dict) -> set[tuple[str, str]]:
    return {(f["host"], f["check"]) for f in report["findings"]}


def _edit_agent(cluster, name: str, **changes) -> dict:
    """Change keys of a host's agent.yaml and restart its agent; return the previous values."""
    path = cluster.agents[name].config
    values = yaml.safe_load(path.read_text())
    previous = {key: values.get(key) for key in changes}
    values.update({k: v for k, v in changes.items() if v is not None})
    for key in [k for k, v in changes.items() if v is None]:
        values.pop(key, None)
    path.write_text(yaml.safe_dump(values))
    cluster.stop_agent(name)
    cluster.start_agent(name)
    return previous


@pytest.fixture(scope="module")
def sound(tmp_path_factory):
    """Two hosts with ports below the ephemeral range, signed binaries and room for their workers."""
    root = tmp_path_factory.mktemp("doctor")
    cluster = LocalCluster(root)
    _sign(cluster.node_binary)
    low = (ephemeral_range() or (32768, 60999))[0]
    base = free_port_range(list(HOSTS.values()), 2, start=max(1024, low - 4000))
    assert base + 1 < low
    assert cluster.init(_control_config(root, WORKER_MEMORY), "--base-port", str(base)) == 0
    assert cluster.add_host("a", HOSTS["a"], "--control", "--workers", "2") == 0
    assert cluster.add_host("b", HOSTS["b"], "--workers", "2") == 0
    try:
        for name in HOSTS:
            cluster.start_agent(name)
        assert cluster.coord("assign") == 0
        assert cluster.coord("apply", "--no-verify") == 0
        yield cluster
    finally:
        cluster.stop_all()


def test_doctor_passes_sound_cluster(capsys, sound):
    code, report = _doctor(capsys, sound)
    assert report["findings"] == []
    assert (code, report["ok"], report["hosts"], report["unreachable"]) == (0, True, ["a", "b"], {})


def test_doctor_text_summary_when_clean(capsys, sound):
    capsys.readouterr()
    assert sound.coord("doctor") == 0
    assert capsys.readouterr().out == "2 hosts checked, 0 problems, 0 unreachable; ok\n"


def test_doctor_finds_edited_config(capsys, sound):
    config = sound.root / "nodes" / "b" / ".config" / "config.yml"
    original = config.read_bytes()
    config.write_bytes(original + b"# edited by hand\n")
    try:
        code, report = _doctor(capsys, sound)
        assert (code, _found(report)) == (4, {("b", "config-drift")})
        assert report["findings"][0]["problem"].startswith("config.yml was edited on the host after the last apply")
    finally:
        config.write_bytes(original)


def test_doctor_finds_missing_signature_files(capsys, sound):
    signature = sound.node_binary.parent / f"{sound.node_binary.name}.dgst.sig.1"
    signature.unlink()
    try:
        code, report = _doctor(capsys, sound)
        assert (code, _found(report)) == (4, {("a", "signature-files"), ("b", "signature-files")})
    finally:
        _sign(sound.node_binary)


def test_doctor_finds_version_and_gomaxprocs(capsys, sound):
    older = write_wrapper(sound.root / "bin-old", "1.4.20")
    _sign(older)
    previous = _edit_agent(sound, "b", node_binary=str(older), node_env={"GOMAXPROCS": "100000"})
    try:
        code, report = _doctor(capsys, sound)
        assert (code, _found(report)) == (4, {("b", "node-version"), ("b", "gomaxprocs")})
        by_check = {f["check"]: f for f in report["findings"]}
        assert by_check["node-version"]["problem"].startswith(
            "the host runs node release 1.4.20, the control host runs 1.4.21;")
    finally:
        _edit_agent(sound, "b", **previous)


def test_doctor_finds_memory_too_small(capsys, sound):
    settings = yaml.safe_load((sound.home / "cluster.yaml").read_text())
    path = Path(settings["control_config"])
    original = path.read_text()
    # 64 TiB per worker fits on no machine; the pushed config would change too, so drift shows as well.
    path.write_text(original.replace(f"dataWorkerMemoryLimit: {WORKER_MEMORY}", "dataWorkerMemoryLimit: 70368744177664"))
    try:
        code, report = _doctor(capsys, sound)
        assert (code, _found(report)) == (4, {("a", "memory"), ("b", "memory"), ("a", "config-drift"),
                                              ("b", "config-drift")})
    finally:
        path.write_text(original)


def test_doctor_finds_broken_control_config(capsys, sound):
    settings = yaml.safe_load((sound.home / "cluster.yaml").read_text())
    path = Path(settings["control_config"])
    original = path.read_text()
    path.write_text(original + "engine: [\n")
    try:
        code, report = _doctor(capsys, sound)
        assert (code, _found(report)) == (4, {("a", "control-config")})
        finding = report["findings"][0]
        assert finding["problem"].startswith(f"the control host's node config cannot be used ({path}:")
        assert "invalid YAML" in finding["problem"]
        assert finding["fix"] == (f"correct {path} where the error points, check it with quil-coord config show, "
                                  "then run quil-coord apply")
    finally:
        path.write_text(original)


def test_doctor_finds_crash_looping_cores(capsys, sound):
    """Every worker on b exits at start; doctor reports each core in backoff, then in fatal."""
    previous = _edit_agent(sound, "b", node_env={"QUIL_SIMNODE_FAIL_CORES": "1,2,3,4"}, crash_limit=3,
                           crash_window_seconds=60)
    try:
        deadline = time.monotonic() + 60
        while True:
            code, report = _doctor(capsys, sound)
            states = [f for f in report["findings"] if f["check"] == "process-state"]
            if len(states) == 2 and all(" is fatal" in f["problem"] for f in states):
                break
            assert time.monotonic() < deadline, report["findings"]
            time.sleep(0.5)
        assert (code, _found(report)) == (4, {("b", "process-state")})
        cores = [int(f["fix"].rsplit(" ", 1)[1]) for f in states]
        for finding, core in zip(states, cores):
            assert finding["problem"] == (
                f"worker core {core} is fatal, so the agent no longer restarts it: 3 failures in 60 s, last: "
                "exit status 1; fix the cause, then run quil-coord restart for this core (or apply again)")
            assert finding["fix"] == (f"quil-coord logs b --core {core} shows its output; fix the cause, then run "
                                      f"quil-coord restart b --core {core}")
    finally:
        _edit_agent(sound, "b", **previous)


def test_doctor_reports_unreachable_host(capsys, sound):
    sound.stop_agent("b")
    try:
        capsys.readouterr()
        assert sound.coord("doctor") == 5
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].startswith("b: agent: the agent at 127.0.0.3:")
        assert lines[-1] == "2 hosts checked, 0 problems, 1 unreachable"
    finally:
        sound.start_agent("b")


def test_doctor_finds_ephemeral_ports_and_missing_address(capsys, tmp_path):
    """One host's ports lie in the ephemeral range; another's planned address is on no interface."""
    low, high = ephemeral_range() or (0, 0)
    if not low:
        pytest.fail("this test needs /proc/sys/net/ipv4/ip_local_port_range")

    cluster = LocalCluster(tmp_path)
    _sign(cluster.node_binary)
    base = free_port_range(["127.0.0.2", "127.0.0.4"], 1, start=low + 100)
    assert base <= high
    assert cluster.init(_control_config(tmp_path, WORKER_MEMORY), "--base-port", str(base)) == 0
    assert cluster.add_host("a", "127.0.0.2", "--control", "--workers", "1") == 0
    # Documentation address: on no interface of this machine, like a VPN address before the VPN is up.
    agent = f"127.0.0.4:{free_port('127.0.0.4')}"
    bundle = tmp_path / "hosts" / "vpn"
    assert cluster.coord("host", "add", "vpn", "--address", "192.0.2.55", "--agent", agent, "--workers", "1",
                         "--node-binary", str(cluster.node_binary), "--node-config-dir",
                         str(tmp_path / "nodes" / "vpn" / ".config"), "--state-dir", str(bundle / "state"),
                         "--bundle", str(bundle)) == 0
    cluster.agents["vpn"] = AgentProcess("vpn", "127.0.0.4", bundle / "agent.yaml", bundle / "agent.log")

    try:
        for name in cluster.agents:
            cluster.start_agent(name)
        assert cluster.coord("assign") == 0

        code, report = _doctor(capsys, cluster)
        assert code == 4
        assert _found(report) == {("a", "ephemeral-ports"), ("vpn", "ephemeral-ports"), ("vpn", "worker-address"),
                                  ("a", "config-drift"), ("vpn", "config-drift")}
        by_key = {(f["host"], f["check"]): f for f in report["findings"]}
        assert by_key[("a", "ephemeral-ports")]["problem"].startswith(
            f"worker ports {base} are inside the ephemeral port range {low}-{high},")
        assert by_key[("vpn", "worker-address")]["problem"].startswith(
            "the planned worker address 192.0.2.55 is on no interface of the host")
        assert by_key[("a", "config-drift")]["problem"] == "the host has no config.yml yet"
    finally:
        cluster.stop_all()
