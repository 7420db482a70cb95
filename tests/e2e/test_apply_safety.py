"""Apply under failure on five loopback hosts: a killed coordinator, stale plans, unreachable hosts.

Each test leaves the cluster converged for the next. Between rounds host B
toggles between one and two workers, which changes every host's config.yml
(the worker list) and needs a restart of the control process on host A.
"""

from __future__ import annotations

import hashlib
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import grpc
import pytest
from helpers import DATA, free_port_range

from quil_cluster.coordinator import apply as apply_module
from quil_cluster.coordinator.client import Credentials
from quil_cluster.coordinator.demo import LocalCluster
from quil_cluster.coordinator.home import Home
from quil_cluster.coordinator.status import collect
from quil_cluster.proto import agent_pb2 as pb

pytestmark = pytest.mark.e2e

HOSTS = {"A": "127.0.0.2", "B": "127.0.0.3", "C": "127.0.0.4", "D": "127.0.0.5", "E": "127.0.0.6"}
# Seconds a killed or stuck apply may take before the test gives up.
DEADLINE = 60.0
LINE = re.compile(r"(?P<host>[A-E]): (?P<outcome>[a-zA-Z]+)(?: \((?P<detail>.*)\))?")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    local = LocalCluster(root)
    control_config = root / "config-1.4.21.yml"
    control_config.write_bytes((DATA / "config-1.4.21.yml").read_bytes())
    base = free_port_range(list(HOSTS.values()), 6)
    assert local.init(control_config, "--port-scheme", "global", "--base-port", str(base)) == 0
    for name, address in HOSTS.items():
        assert local.add_host(name, address, "--workers", "1", *(["--control"] if name == "A" else [])) == 0
    try:
        for name in HOSTS:
            local.start_agent(name)
        assert local.coord("assign") == 0
        assert local.coord("apply", "--no-verify") == 0
        yield local
    finally:
        local.stop_all()


# -- helpers -------------------------------------------------------------------


def _config_path(cluster: LocalCluster, name: str) -> Path:
    return cluster.root / "nodes" / name / ".config" / "config.yml"


def _configs(cluster: LocalCluster) -> dict[str, bytes]:
    return {name: _config_path(cluster, name).read_bytes() for name in HOSTS}


def _pids(cluster: LocalCluster) -> dict[tuple[str, int], int]:
    """(host, core) -> pid of every process; core 0 is the control process."""
    return {(h.name, p["core"]): p["pid"] for h in collect(Home(cluster.home)) for p in h.processes}


def _wait_converged(cluster: LocalCluster) -> dict[tuple[str, int], int]:
    """Wait until every assigned worker listens and the control process runs; return the pids."""
    deadline = time.monotonic() + DEADLINE
    while True:
        hosts = collect(Home(cluster.home))
        processes = [p for h in hosts for p in h.processes]
        workers = [p for p in processes if p["core"] != 0]
        expected = sum(len(h.expected_cores) for h in hosts)
        control = [p for p in processes if p["core"] == 0 and p["state"] in ("starting", "running")]
        if len(workers) == expected and all(p["listening"] for p in workers) and control:
            return {(h.name, p["core"]): p["pid"] for h in hosts for p in h.processes}
        assert time.monotonic() < deadline, f"cluster did not converge: {hosts}"
        time.sleep(0.1)


def _toggle_workers(cluster: LocalCluster) -> int:
    """Give host B one worker more or less, and record the new assignment; return B's new count."""
    hosts = {h.name: h for h in Home(cluster.home).load_hosts()}
    count = 2 if hosts["B"].workers == 1 else 1
    assert cluster.coord("host", "set", "B", "--workers", str(count)) == 0
    assert cluster.coord("assign") == 0
    return count


def _coord_argv(cluster: LocalCluster, *argv: str) -> list[str]:
    script = Path(sys.executable).with_name("quil-coord")
    return [str(script), "--home", str(cluster.home), *argv]


def _run_apply(cluster: LocalCluster, *argv: str) -> tuple[int, list[str]]:
    done = subprocess.run(_coord_argv(cluster, "apply", "--no-verify", *argv), capture_output=True, text=True,
                          timeout=DEADLINE)
    print(done.stdout, done.stderr)
    return done.returncode, done.stdout.splitlines()


def _apply_killed_when(cluster: LocalCluster, ready: Callable[[], bool], *argv: str) -> None:
    """Start quil-coord apply as a process and SIGKILL it as soon as ready() turns true."""
    process = subprocess.Popen(_coord_argv(cluster, "apply", "--no-verify", *argv), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + DEADLINE
        while not ready():
            assert process.poll() is None, "apply finished before the kill point was observed"
            assert time.monotonic() < deadline, "kill point not reached"
            time.sleep(0.002)
        process.send_signal(signal.SIGKILL)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(DEADLINE)
    assert process.returncode == -signal.SIGKILL


def _wait_agents_idle(cluster: LocalCluster) -> None:
    """Return once no Apply is running on any agent.

    An agent finishes an Apply whose caller died. This request waits for the
    agent's apply lock, then fails the stale-plan check without changing anything.
    """
    home = Home(cluster.home)
    credentials = Credentials(home)
    probe = pb.ApplyRequest(node_generation=pb.NODE_GENERATION_1_4, check_base_config=True,
                            base_config_file_sha256="0" * 64)
    for host in home.load_hosts():
        channel, stub = credentials.stub(host)
        try:
            with pytest.raises(grpc.RpcError) as caught:
                stub.Apply(probe, timeout=DEADLINE)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        finally:
            channel.close()


def _temporary_files(cluster: LocalCluster) -> list[Path]:
    folders = [cluster.home] + [cluster.root / "nodes" / n / ".config" for n in HOSTS]
    folders += [cluster.root / "hosts" / n / "state" for n in HOSTS]
    return [p for folder in folders for p in folder.glob(".*.tmp")]


def _outcomes(lines: list[str]) -> dict[str, tuple[str, str]]:
    """Host -> (outcome, detail) from the per-host lines of quil-coord apply."""
    found = {}
    for line in lines:
        match = LINE.fullmatch(line)
        if match:
            found[match["host"]] = (match["outcome"], match["detail"] or "")
    return found


def _changed_count(cluster: LocalCluster, old: dict[str, bytes], count: int) -> Callable[[], bool]:
    """A kill point: at least count hosts' config.yml differ from old."""

    def ready() -> bool:
        return sum(1 for name, data in _configs(cluster).items() if data != old[name]) >= count

    return ready


# -- SIGKILL of the coordinator ------------------------------------------------------


# (kill point, changed config files to observe before the kill, extra apply options)
KILL_POINTS = [
    ("right after start", 0, ()),
    ("after the first host's config.yml changed", 1, ("--max-failures", "5")),
    ("after three hosts' config.yml changed", 3, ("--max-failures", "5")),
    ("after all workers changed, before the control phase", 5, ()),
]


def test_killed_apply_converges_on_next_apply(cluster):
    for point, count, options in KILL_POINTS:
        before = _wait_converged(cluster)
        old = _configs(cluster)
        _toggle_workers(cluster)

        # 1. kill the coordinator at the observed point
        _apply_killed_when(cluster, _changed_count(cluster, old, count), *options)
        _wait_agents_idle(cluster)
        at_kill = _configs(cluster)
        control_pending = _pids(cluster).get(("A", 0)) == before[("A", 0)]
        stale = sorted(name for name in HOSTS if at_kill[name] == old[name])
        print(f"killed {point}: config.yml still old on {stale}, control restart pending: {control_pending}")
        assert _temporary_files(cluster) == []

        # 2. the next apply converges and names what it fixed
        code, lines = _run_apply(cluster)
        assert code == 0, point
        new = _configs(cluster)
        for name in HOSTS:
            assert new[name] != old[name], (point, name)
            assert at_kill[name] in (old[name], new[name]), (point, name)
        outcomes = _outcomes(lines)
        expected_changed = set(stale) | ({"A"} if control_pending else set())
        assert {name for name, (outcome, _) in outcomes.items() if outcome == "changed"} == expected_changed, point
        for name in HOSTS:
            assert ("config written" in outcomes[name][1]) == (name in stale), (point, name)
        assert ("control process restarted" in outcomes["A"][1]) == control_pending, point

        # 3. a third apply finds nothing to do
        _wait_converged(cluster)
        code, lines = _run_apply(cluster)
        assert code == 0, point
        assert {outcome for outcome, _ in _outcomes(lines).values()} == {"unchanged"}, point
        assert lines[-1].startswith("5 unchanged, 0 changed, 0 failed, 0 unreachable, 0 skipped;"), point


# -- stale plan ------------------------------------------------------------------


def _stale_message(path: Path, on_disk: str, planned: str) -> str:
    return (f"{path} changed underneath since the plan: sha256 on disk {on_disk[:12]}, planned against "
            f"{planned[:12]}; nothing was changed; review the edit with quil-coord config show --diff, then run "
            "quil-coord apply again")


def test_stale_base_hash_leaves_host_untouched(cluster):
    before = _wait_converged(cluster)
    path = _config_path(cluster, "C")
    data = path.read_bytes()
    home = Home(cluster.home)
    host = next(h for h in home.load_hosts() if h.name == "C")
    # A request that would stop C's worker and replace its config, planned against another file.
    other = data + b"# another config\n"
    planned = hashlib.sha256(b"the file the plan saw").hexdigest()
    request = pb.ApplyRequest(config_yaml=other, config_sha256=hashlib.sha256(other).hexdigest(),
                              node_generation=pb.NODE_GENERATION_1_4, config_generation=99, cores=[],
                              check_base_config=True, base_config_file_sha256=planned)
    channel, stub = Credentials(home).stub(host)
    try:
        with pytest.raises(grpc.RpcError) as caught:
            stub.Apply(request, timeout=DEADLINE)
    finally:
        channel.close()

    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.details() == _stale_message(path, hashlib.sha256(data).hexdigest(), planned)
    assert path.read_bytes() == data
    assert _pids(cluster) == before


def test_config_edited_after_preflight_is_reported(cluster, capsys, monkeypatch):
    before = _wait_converged(cluster)
    path = _config_path(cluster, "C")
    planned = path.read_bytes()
    edited = planned + b"# edited on the host\n"
    preflight = apply_module._preflight

    def preflight_then_edit(*args, **kwargs):
        # The edit lands after the coordinator read the hashes and before it pushes.
        result = preflight(*args, **kwargs)
        path.write_bytes(edited)
        return result

    monkeypatch.setattr(apply_module, "_preflight", preflight_then_edit)
    _toggle_workers(cluster)
    capsys.readouterr()
    code = cluster.coord("apply", "--no-verify")
    lines = capsys.readouterr().out.splitlines()
    monkeypatch.undo()

    assert code == 4
    message = _stale_message(path, hashlib.sha256(edited).hexdigest(), hashlib.sha256(planned).hexdigest())
    assert f"C: FAILED (failed_precondition: {message})" in lines
    assert lines[-1] == "not converged: C"
    assert path.read_bytes() == edited
    assert _pids(cluster)[("C", 3)] == before[("C", 3)]
    outcomes = _outcomes(lines)
    assert outcomes["A"][1] == "config written; control process not started: hosts C did not apply"
    assert [outcomes[name][0] for name in "ABDE"] == ["changed"] * 4

    # The next apply plans against the edited file and replaces it.
    capsys.readouterr()
    assert cluster.coord("apply", "--no-verify") == 0
    outcomes = _outcomes(capsys.readouterr().out.splitlines())
    assert outcomes["C"] == ("changed", "config written")
    assert "control process restarted" in outcomes["A"][1]
    assert path.read_bytes() == _config_path(cluster, "D").read_bytes()


# -- unreachable hosts and --max-failures ------------------------------------------------


def test_max_failures_skips_rest_of_rollout(cluster):
    _wait_converged(cluster)
    old = _configs(cluster)
    cluster.stop_agent("C")
    cluster.stop_agent("D")
    try:
        _toggle_workers(cluster)
        code, lines = _run_apply(cluster, "--max-failures", "1")
        assert code == 5
        outcomes = _outcomes(lines)
        assert [outcomes[name][0] for name in HOSTS] == ["changed", "changed", "UNREACHABLE", "UNREACHABLE",
                                                        "SKIPPED"]
        assert outcomes["C"][1].startswith("unavailable: ")
        assert outcomes["E"][1] == "not applied: the rollout stopped after 2 failed hosts (--max-failures 1)"
        assert outcomes["A"][1] == "config written; control process not started: hosts C, D, E did not apply"
        assert lines[-2].startswith("0 unchanged, 2 changed, 0 failed, 2 unreachable, 1 skipped;")
        assert lines[-1] == "not converged: C, D, E"
        assert _config_path(cluster, "E").read_bytes() == old["E"]

        # Without a limit every reachable host converges and the summary names the others.
        code, lines = _run_apply(cluster)
        assert code == 5
        outcomes = _outcomes(lines)
        assert [outcomes[name][0] for name in HOSTS] == ["unchanged", "unchanged", "UNREACHABLE", "UNREACHABLE",
                                                        "changed"]
        assert outcomes["E"][1] == "config written"
        assert lines[-2].startswith("2 unchanged, 1 changed, 0 failed, 2 unreachable, 0 skipped;")
        assert lines[-1] == "not converged: C, D"
    finally:
        cluster.start_agent("C")
        cluster.start_agent("D")
    code, lines = _run_apply(cluster)
    assert code == 0
    outcomes = _outcomes(lines)
    assert outcomes["C"][0] == outcomes["D"][0] == "changed"
    assert "control process restarted" in outcomes["A"][1]
