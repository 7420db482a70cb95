"""Tests for quil-simnode, the stand-in node binary.

Most tests run it as a real subprocess with a config.yml written into tmp_path,
and every listener and connection stays on loopback (127.0.0.0/8).
"""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from quil_cluster import simnode

REFERENCE_CONFIG = Path(__file__).parent / "data" / "config-1.4.21.yml"
CONSOLE_SCRIPT = Path(sys.executable).parent / "quil-simnode"
# Generous, because a loaded CI machine can be slow to start Python. No test needs it tight.
WAIT_SECONDS = 20.0


def free_port(host: str) -> int:
    """Return a TCP port that was free on host a moment ago."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def write_config(directory: Path, engine: dict, base: Path | None = None) -> Path:
    """Write directory/config.yml with `engine` merged into the engine section of `base`."""
    document = yaml.safe_load(base.read_text()) if base else {}
    document["engine"] = {**(document.get("engine") or {}), **engine}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.yml").write_text(yaml.safe_dump(document))
    return directory


def node_environment(**overrides: str) -> dict[str, str]:
    """Return this process's environment without stand-in settings, plus overrides."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("QUIL_SIMNODE_")}
    environment.update(overrides)
    return environment


def log_records(text: str) -> list[dict]:
    """Return the JSON log records among the lines of text."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def records_with(text: str, message: str) -> list[dict]:
    return [record for record in log_records(text) if record["msg"] == message]


def connects(host: str, port: int) -> bool:
    """Return whether a TCP connect to host:port succeeds."""
    try:
        with socket.create_connection((host, port), timeout=2.0):
            return True
    except ConnectionRefusedError:
        return False


class Node:
    """A quil-simnode subprocess whose stdout and stderr go to files that tests poll."""

    def __init__(self, tmp_path: Path, args: list[str], environment: dict[str, str],
                 command: list[str]) -> None:
        name = f"node-{time.monotonic_ns()}"
        self.stdout_path = tmp_path / f"{name}.stdout"
        self.stderr_path = tmp_path / f"{name}.stderr"
        with open(self.stdout_path, "wb") as stdout, open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen([*command, *args], cwd=tmp_path, env=environment,
                                            stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr)

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait_for(self, message: str, count: int = 1) -> None:
        """Wait until `count` log records have `message`, and fail if the process exits first."""
        deadline = time.monotonic() + WAIT_SECONDS
        while len(records_with(self.stdout + self.stderr, message)) < count:
            assert self.process.poll() is None, (
                f"exited with {self.process.returncode} before logging {message!r}:\n"
                f"{self.stdout}{self.stderr}")
            assert time.monotonic() < deadline, f"no {message!r} within {WAIT_SECONDS} s"
            time.sleep(0.05)

    def wait(self) -> int:
        return self.process.wait(timeout=WAIT_SECONDS)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def start_node(tmp_path):
    """Return a function that starts quil-simnode and kill every node it started afterwards."""
    nodes: list[Node] = []

    def start(*args: str, command: list[str] | None = None, **environment: str) -> Node:
        command = command or [sys.executable, "-m", "quil_cluster.simnode"]
        node = Node(tmp_path, list(args), node_environment(**environment), command)
        nodes.append(node)
        return node

    try:
        yield start
    finally:
        for node in nodes:
            node.kill()


def run_node(tmp_path: Path, *args: str, command: list[str] | None = None,
             **environment: str) -> subprocess.CompletedProcess:
    """Run quil-simnode to completion. subprocess.run kills it if it outlives WAIT_SECONDS."""
    command = command or [sys.executable, "-m", "quil_cluster.simnode"]
    return subprocess.run([*command, *args], cwd=tmp_path, env=node_environment(**environment),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=WAIT_SECONDS)


@pytest.fixture
def parent_process():
    """Start a `sleep` process to pass as --parent-process, and kill it afterwards."""
    process = subprocess.Popen(["sleep", "120"])
    try:
        yield process
    finally:
        process.kill()
        process.wait()


# --- data worker, 1.4/2.0 -----------------------------------------------------------------

def test_worker_binds_list_entry_for_core(tmp_path, start_node):
    first = f"/ip4/127.0.0.2/tcp/{free_port('127.0.0.2')}"
    second_port = free_port("127.0.0.3")
    second = f"/ip4/127.0.0.3/tcp/{second_port}"
    config = write_config(tmp_path / "cfg", {"dataWorkerMultiaddrs": [first, second]},
                          base=REFERENCE_CONFIG)

    node = start_node("--config", str(config), "--core", "2", "--parent-process", str(os.getpid()))
    node.wait_for("data worker listening")

    [listening] = records_with(node.stderr, "data worker listening")
    assert listening["address"] == second
    assert listening["level"] == "info"
    assert connects("127.0.0.3", second_port)
    assert not connects("127.0.0.2", int(first.rsplit("/", 1)[1]))
    assert records_with(node.stderr, "no parent process id specified, running in detached"
                                     " worker mode") == []


def test_worker_closes_accepted_connection(tmp_path, start_node):
    port = free_port("127.0.0.2")
    address = f"/ip4/127.0.0.2/tcp/{port}"
    config = write_config(tmp_path / "cfg", {"dataWorkerMultiaddrs": [address]})

    node = start_node("--config", str(config), "--core", "1", "--parent-process", str(os.getpid()))
    node.wait_for("data worker listening")

    with socket.create_connection(("127.0.0.2", port), timeout=5.0) as connection:
        connection.settimeout(5.0)
        assert connection.recv(1) == b""


def test_worker_with_list_and_no_parent_runs_detached(tmp_path, start_node):
    address = f"/ip4/127.0.0.2/tcp/{free_port('127.0.0.2')}"
    config = write_config(tmp_path / "cfg", {"dataWorkerMultiaddrs": [address]})

    node = start_node("--config", str(config), "--core", "1")
    node.wait_for("no parent process id specified, running in detached worker mode")

    assert node.process.poll() is None


def test_worker_base_pattern_when_list_empty(tmp_path, start_node):
    port = free_port("127.0.0.4")
    config = write_config(tmp_path / "cfg", {
        "dataWorkerMultiaddrs": [],
        "dataWorkerBaseListenMultiaddr": "/ip4/127.0.0.4/tcp/%d",
        "dataWorkerBaseListenPort": port - 2,
    })

    node = start_node("--config", str(config), "--core", "3", "--parent-process", str(os.getpid()))
    node.wait_for("data worker listening")

    [listening] = records_with(node.stderr, "data worker listening")
    assert listening["address"] == f"/ip4/127.0.0.4/tcp/{port}"
    assert connects("127.0.0.4", port)


def test_worker_empty_pattern_means_loopback_default(tmp_path, start_node):
    # The reference config writes dataWorkerBaseListenMultiaddr: "" like the real generator.
    port = free_port("127.0.0.1")
    config = write_config(tmp_path / "cfg", {"dataWorkerBaseListenPort": port},
                          base=REFERENCE_CONFIG)

    node = start_node("--config", str(config), "--core", "1", "--parent-process", str(os.getpid()))
    node.wait_for("data worker listening")

    [listening] = records_with(node.stderr, "data worker listening")
    assert listening["address"] == f"/ip4/127.0.0.1/tcp/{port}"


@pytest.mark.parametrize(("generation", "engine", "core", "expected"), [
    ("1.4", {}, 3, ["/ip4/127.0.0.1/tcp/40002"]),
    ("2.0", {"dataWorkerBaseListenPort": 50000}, 1, ["/ip4/127.0.0.1/tcp/50000"]),
    ("2.1", {}, 3, ["/ip4/0.0.0.0/tcp/25002", "/ip4/127.0.0.1/tcp/32502"]),
    # 2.1 replaces the 1.4/2.0 default pattern with its own wildcard pattern.
    ("2.1", {"dataWorkerBaseListenMultiaddr": "/ip4/127.0.0.1/tcp/%d"}, 1,
     ["/ip4/0.0.0.0/tcp/25000", "/ip4/127.0.0.1/tcp/32500"]),
    ("2.1", {"dataWorkerBaseP2PPort": 7000, "dataWorkerBaseStreamPort": 8000}, 2,
     ["/ip4/0.0.0.0/tcp/7001", "/ip4/127.0.0.1/tcp/8001"]),
    ("2.1", {"dataWorkerP2PMultiaddrs": ["/ip6/::/tcp/1"],
             "dataWorkerStreamMultiaddrs": ["/ip6/::/udp/2/quic-v1"]}, 1,
     ["/ip6/::/tcp/1", "/ip6/::1/tcp/2"]),
])
def test_plan_worker_addresses(generation, engine, core, expected):
    config = simnode.EngineConfig("config.yml", engine)
    log = simnode.ZapLog(io.StringIO())

    assert simnode.plan_worker(config, generation, core, 4711, log) == expected


@pytest.mark.parametrize("generation", ["1.4", "2.0"])
def test_worker_without_parent_or_list_panics(tmp_path, generation):
    config = write_config(tmp_path / "cfg", {"dataWorkerMultiaddrs": []})

    result = run_node(tmp_path, "--config", str(config), "--core", "1",
                      "--generation", generation)

    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == "panic: parent process pid not specified"


def test_21_worker_without_parent_or_list_is_fatal(tmp_path):
    config = write_config(tmp_path / "cfg", {"dataWorkerP2PMultiaddrs": [],
                                             "dataWorkerStreamMultiaddrs": []})

    result = run_node(tmp_path, "--config", str(config), "--core", "1", "--generation", "2.1")

    assert result.returncode == 1
    [fatal] = log_records(result.stdout)
    assert fatal["level"] == "fatal"
    assert fatal["msg"] == "parent process pid not specified"


def test_worker_core_beyond_list_panics(tmp_path):
    config = write_config(tmp_path / "cfg", {"dataWorkerMultiaddrs": [
        "/ip4/127.0.0.2/tcp/40000", "/ip4/127.0.0.2/tcp/40001"]})

    result = run_node(tmp_path, "--config", str(config), "--core", "3")

    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == (
        "panic: runtime error: index out of range [2] with length 2")


@pytest.mark.parametrize("address", [
    "/ip4/127.0.0.300/tcp/40000",
    "/ip4/127.0.0.2/tcp/0",
    "/ip4/127.0.0.2/tcp/70000",
    "/ip4/127.0.0.2/udp/40000",
    "/dns4/localhost/tcp/40000",
    "/ip6/127.0.0.2/tcp/40000",
    "127.0.0.2:40000",
])
def test_worker_invalid_multiaddr_panics(tmp_path, address):
    config = write_config(tmp_path / "cfg", {"dataWorkerMultiaddrs": [address]})

    result = run_node(tmp_path, "--config", str(config), "--core", "1")

    assert result.returncode == 2
    assert result.stderr.startswith(f'panic: failed to parse multiaddr "{address}": ')


def test_worker_address_in_use_panics(tmp_path):
    with socket.socket() as occupant:
        occupant.bind(("127.0.0.5", 0))
        occupant.listen()
        port = occupant.getsockname()[1]
        config = write_config(tmp_path / "cfg", {"dataWorkerMultiaddrs": [
            f"/ip4/127.0.0.5/tcp/{port}"]})

        result = run_node(tmp_path, "--config", str(config), "--core", "1")

    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == (
        f"panic: start: listen tcp4 127.0.0.5:{port}: bind: address already in use")


@pytest.mark.parametrize(("generation", "expected_status"), [("1.4", 1), ("2.0", 1), ("2.1", 0)])
def test_worker_exits_when_parent_is_gone(tmp_path, start_node, parent_process, generation,
                                          expected_status):
    p2p = f"/ip4/127.0.0.2/tcp/{free_port('127.0.0.2')}"
    stream = f"/ip4/127.0.0.3/tcp/{free_port('127.0.0.3')}"
    config = write_config(tmp_path / "cfg", {"dataWorkerMultiaddrs": [stream],
                                             "dataWorkerP2PMultiaddrs": [p2p],
                                             "dataWorkerStreamMultiaddrs": [stream]})
    node = start_node("--config", str(config), "--core", "1", "--generation", generation,
                      "--parent-process", str(parent_process.pid))
    node.wait_for("data worker listening")

    parent_process.kill()
    # Signal 0 still reaches a zombie, so the parent must be reaped for the worker to notice.
    parent_process.wait()

    assert node.wait() == expected_status
    output = node.stdout + node.stderr
    assert len(records_with(output, "parent process not found, terminating")) == 1


def test_process_exists_for_live_and_reaped_pid():
    process = subprocess.Popen(["sleep", "120"])
    try:
        assert simnode.process_exists(process.pid)
    finally:
        process.kill()
        process.wait()

    assert not simnode.process_exists(process.pid)


def test_14_worker_dies_of_sigterm(tmp_path, start_node):
    address = f"/ip4/127.0.0.2/tcp/{free_port('127.0.0.2')}"
    config = write_config(tmp_path / "cfg", {"dataWorkerMultiaddrs": [address]})
    node = start_node("--config", str(config), "--core", "1")
    node.wait_for("data worker listening")

    node.process.terminate()

    assert node.wait() == -signal.SIGTERM


# --- test modes ------------------------------------------------------------------------


@pytest.mark.parametrize("generation", ["1.4", "2.1"])
def test_fail_cores_worker_exits_before_binding(tmp_path, generation):
    port = free_port("127.0.0.2")
    address = f"/ip4/127.0.0.2/tcp/{port}"
    engine = ({"dataWorkerMultiaddrs": [address, address]} if generation == "1.4"
              else {"dataWorkerP2PMultiaddrs": [address, address], "dataWorkerStreamMultiaddrs": [address, address]})
    config = write_config(tmp_path / "cfg", engine)

    result = run_node(tmp_path, "--config", str(config), "--core", "2", "--generation", generation,
                      QUIL_SIMNODE_FAIL_CORES="1, 2")

    assert result.returncode == 1
    fatal = [record["msg"] for record in log_records(result.stdout + result.stderr) if record["level"] == "fatal"]
    assert fatal == ["stand-in test mode: core 2 fails at start (QUIL_SIMNODE_FAIL_CORES)"]
    assert records_with(result.stdout + result.stderr, "data worker listening") == []


def test_fail_cores_other_core_runs(tmp_path, start_node):
    address = f"/ip4/127.0.0.2/tcp/{free_port('127.0.0.2')}"
    config = write_config(tmp_path / "cfg", {"dataWorkerMultiaddrs": [address]})
    node = start_node("--config", str(config), "--core", "1", QUIL_SIMNODE_FAIL_CORES="2")
    node.wait_for("data worker listening")


@pytest.mark.parametrize("value", ["two", "1;2", "-1", "1,,2"])
def test_fail_cores_invalid_list_exits_2(tmp_path, value):
    config = write_config(tmp_path / "cfg", {"dataWorkerMultiaddrs": []})

    result = run_node(tmp_path, "--config", str(config), "--core", "1", QUIL_SIMNODE_FAIL_CORES=value)

    assert result.returncode == 2
    assert result.stderr == (f"quil-simnode: invalid QUIL_SIMNODE_FAIL_CORES {value!r};"
                             " set comma-separated core indices such as 3,5\n")


@pytest.mark.parametrize("generation", ["1.4", "2.1"])
def test_ignore_sigterm_worker_survives_sigterm(tmp_path, start_node, generation):
    address = f"/ip4/127.0.0.2/tcp/{free_port('127.0.0.2')}"
    stream = f"/ip4/127.0.0.3/tcp/{free_port('127.0.0.3')}"
    engine = ({"dataWorkerMultiaddrs": [address]} if generation == "1.4"
              else {"dataWorkerP2PMultiaddrs": [address], "dataWorkerStreamMultiaddrs": [stream]})
    config = write_config(tmp_path / "cfg", engine)
    node = start_node("--config", str(config), "--core", "1", "--generation", generation,
                      QUIL_SIMNODE_IGNORE_SIGTERM="1")
    node.wait_for("data worker listening")

    node.process.terminate()
    time.sleep(0.5)

    assert node.process.poll() is None
    node.process.kill()
    assert node.wait() == -signal.SIGKILL


# --- data worker, 2.1 ---------------------------------------------------------------------

def test_21_worker_binds_p2p_and_loopback_stream(tmp_path, start_node):
    p2p_port = free_port("127.0.0.6")
    stream_port = free_port("127.0.0.1")
    config = write_config(tmp_path / "cfg", {
        "dataWorkerP2PMultiaddrs": [f"/ip4/127.0.0.6/tcp/{p2p_port}"],
        "dataWorkerStreamMultiaddrs": [f"/ip4/0.0.0.0/tcp/{stream_port}"],
    })

    node = start_node("--config", str(config), "--core", "1", "--generation", "2.1",
                      "--parent-process", str(os.getpid()))
    node.wait_for("data worker listening")

    [listening] = records_with(node.stdout, "data worker listening")
    assert listening["address"] == f"/ip4/127.0.0.1/tcp/{stream_port}"
    [p2p_listening] = records_with(node.stdout, "data worker p2p listening")
    assert p2p_listening["address"] == f"/ip4/127.0.0.6/tcp/{p2p_port}"
    assert connects("127.0.0.6", p2p_port)
    assert connects("127.0.0.1", stream_port)
    # Refused on another loopback address, so the stream listener is not on 0.0.0.0.
    assert not connects("127.0.0.7", stream_port)


def test_21_worker_stops_cleanly_on_sigterm(tmp_path, start_node):
    config = write_config(tmp_path / "cfg", {
        "dataWorkerP2PMultiaddrs": [f"/ip4/127.0.0.6/tcp/{free_port('127.0.0.6')}"],
        "dataWorkerStreamMultiaddrs": [f"/ip4/127.0.0.6/tcp/{free_port('127.0.0.6')}"],
    })
    node = start_node("--config", str(config), "--core", "1", "--generation", "2.1")
    node.wait_for("data worker listening")

    node.process.terminate()

    assert node.wait() == 0


@pytest.mark.parametrize("core", ["0", "1"])
def test_21_unequal_lists_are_fatal(tmp_path, core):
    config = write_config(tmp_path / "cfg", {
        "dataWorkerP2PMultiaddrs": ["/ip4/127.0.0.2/tcp/25000", "/ip4/127.0.0.2/tcp/25001"],
        "dataWorkerStreamMultiaddrs": ["/ip4/127.0.0.2/tcp/32500"],
    })

    result = run_node(tmp_path, "--config", str(config), "--core", core, "--generation", "2.1")

    assert result.returncode == 1
    [fatal] = log_records(result.stdout)
    assert fatal["level"] == "fatal"
    assert fatal["msg"] == "mismatch of worker count for p2p and stream multiaddrs"


# --- control process ----------------------------------------------------------------------

def test_control_process_logs_only_unreachable_worker(tmp_path, start_node):
    listening = f"/ip4/127.0.0.8/tcp/{free_port('127.0.0.8')}"
    unreachable = f"/ip4/127.0.0.9/tcp/{free_port('127.0.0.9')}"
    config = write_config(tmp_path / "cfg", {"dataWorkerMultiaddrs": [listening, unreachable]})
    worker = start_node("--config", str(config), "--core", "1",
                        "--parent-process", str(os.getpid()))
    worker.wait_for("data worker listening")

    master = start_node("--config", str(config), QUIL_SIMNODE_DIAL_INTERVAL="0.2")
    master.wait_for("dialed data workers", count=3)

    assert master.stdout.splitlines()[0] == (
        "Data workers configured by multiaddr, be sure these are running...")
    failures = records_with(master.stderr, "could not dial")
    assert len(failures) >= 3
    assert {(record["core"], record["multiaddr"]) for record in failures} == {(2, unreachable)}
    rounds = records_with(master.stderr, "dialed data workers")
    assert {(record["reachable"], record["unreachable"]) for record in rounds} == {(1, 1)}

    master.process.terminate()
    assert master.wait() == 0


def test_21_control_process_dials_loopback_stream_address(tmp_path, start_node):
    stream_port = free_port("127.0.0.1")
    config = write_config(tmp_path / "cfg", {
        "dataWorkerP2PMultiaddrs": ["/ip4/127.0.0.2/tcp/25000"],
        "dataWorkerStreamMultiaddrs": [f"/ip4/0.0.0.0/tcp/{stream_port}"],
    })

    master = start_node("--config", str(config), "--generation", "2.1",
                        QUIL_SIMNODE_DIAL_INTERVAL="0.2")
    master.wait_for("could not dial")

    records = log_records(master.stdout)
    assert records[0]["msg"] == "data workers configured by multiaddr, be sure these are running..."
    assert records_with(master.stdout, "could not dial")[0]["multiaddr"] == (
        f"/ip4/127.0.0.1/tcp/{stream_port}")


def test_control_process_with_empty_list_keeps_running(tmp_path, start_node):
    config = write_config(tmp_path / "cfg", {"dataWorkerMultiaddrs": []})

    master = start_node("--config", str(config), "--core", "0")
    master.wait_for("worker list is empty; the real control process would spawn local data"
                    " workers, and the stand-in spawns none")

    assert master.process.poll() is None
    assert records_with(master.stderr, "dialed data workers") == []
    master.process.send_signal(signal.SIGINT)
    assert master.wait() == 0


def test_control_process_rejects_invalid_dial_interval(tmp_path):
    config = write_config(tmp_path / "cfg", {"dataWorkerMultiaddrs": []})

    result = run_node(tmp_path, "--config", str(config), QUIL_SIMNODE_DIAL_INTERVAL="soon")

    assert result.returncode == 2
    assert result.stderr == ("quil-simnode: invalid QUIL_SIMNODE_DIAL_INTERVAL 'soon';"
                             " set a positive number of seconds\n")


# --- command line -------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--bogus", "-bogus", "--bogus=1", "-bogus=1"])
def test_unknown_flag_exits_2_with_usage(tmp_path, flag):
    result = run_node(tmp_path, flag)

    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines[0] == "flag provided but not defined: -bogus"
    assert lines[1].startswith("Usage of ")
    assert "  -parent-process int" in lines


def test_flag_forms_reach_worker(tmp_path, start_node):
    port = free_port("127.0.0.2")
    address = f"/ip4/127.0.0.2/tcp/{port}"
    config = write_config(tmp_path / "cfg", {"dataWorkerMultiaddrs": [address]})

    # Single and double dash, "=value" and "value", and a repeated --core where the last wins.
    node = start_node(f"-config={config}", "-core", "9", "--core=1",
                      "-parent-process", str(os.getpid()), "-signature-check=false",
                      "--debug", "--network=0")
    node.wait_for("data worker listening")

    assert records_with(node.stderr, "data worker listening")[0]["address"] == address


@pytest.mark.parametrize(("args", "name", "expected"), [
    (["--core", "3"], "core", 3),
    (["-core=3"], "core", 3),
    (["--core=3", "-core", "4"], "core", 4),
    (["--core", "-1"], "core", -1),
    (["--core", "0x10"], "core", 16),
    (["--core", "010"], "core", 8),
    (["--debug"], "debug", True),
    (["--debug=false"], "debug", False),
    (["-signature-check=0"], "signature-check", False),
    (["--network", "1"], "network", 1),
    (["--config", "/tmp/x"], "config", "/tmp/x"),
    # Go stops at the first non-flag argument: "false" is not --debug's value.
    (["--debug", "false", "--core", "3"], "core", 0),
    (["--", "--core", "3"], "core", 0),
    ([], "signature-check", True),
])
def test_parse_flags_go_forms(args, name, expected):
    assert simnode.parse_flags(args, "quil-simnode")[name] == expected


@pytest.mark.parametrize(("args", "first_line"), [
    (["--core", "abc"], 'invalid value "abc" for flag -core: parse error'),
    (["--core", "9223372036854775808"],
     'invalid value "9223372036854775808" for flag -core: value out of range'),
    (["--network", "-1"], 'invalid value "-1" for flag -network: parse error'),
    (["--core"], "flag needs an argument: -core"),
    (["--debug=maybe"], 'invalid boolean value "maybe" for -debug: parse error'),
    (["---core=1"], "bad flag syntax: ---core=1"),
    (["-=1"], "bad flag syntax: -=1"),
])
def test_parse_flags_errors(args, first_line):
    with pytest.raises(simnode.NodeExit) as raised:
        simnode.parse_flags(args, "quil-simnode")

    assert raised.value.status == 2
    assert raised.value.text.splitlines()[0] == first_line
    assert raised.value.text.splitlines()[1] == "Usage of quil-simnode:"


def test_help_flag_prints_usage_and_exits_0(capsys):
    assert simnode.main(["quil-simnode", "-help"]) == 0

    assert capsys.readouterr().err.splitlines()[0] == "Usage of quil-simnode:"


def test_main_returns_2_for_unknown_flag(capsys):
    assert simnode.main(["quil-simnode", "--cores", "4"]) == 2

    assert capsys.readouterr().err.splitlines()[0] == "flag provided but not defined: -cores"


# --- generation ---------------------------------------------------------------------------

@pytest.mark.parametrize(("flag", "environment", "program", "expected"), [
    ("", {}, "quil-simnode", "1.4"),
    ("", {}, "/opt/node/node-2.1.0.25-linux-amd64", "2.1"),
    ("", {}, "node-2.0.6.3-darwin-arm64", "2.0"),
    ("", {}, "./node-1.4.21-linux-amd64", "1.4"),
    ("", {"QUIL_SIMNODE_GENERATION": "2.0"}, "node-2.1.0.25-linux-amd64", "2.0"),
    ("2.1", {"QUIL_SIMNODE_GENERATION": "2.0"}, "node-1.4.21-linux-amd64", "2.1"),
])
def test_resolve_generation_precedence(flag, environment, program, expected):
    assert simnode.resolve_generation(flag, environment, program) == expected


@pytest.mark.parametrize(("flag", "environment", "program", "source"), [
    ("2.2", {}, "quil-simnode", "--generation"),
    ("", {"QUIL_SIMNODE_GENERATION": "1"}, "quil-simnode", "$QUIL_SIMNODE_GENERATION"),
    ("", {}, "node-1.5.0-linux-amd64", "file name node-1.5.0-linux-amd64"),
])
def test_resolve_generation_rejects_unknown(flag, environment, program, source):
    with pytest.raises(simnode.NodeExit) as raised:
        simnode.resolve_generation(flag, environment, program)

    assert raised.value.status == 2
    assert f"from {source}; use one of 1.4, 2.0, 2.1" in raised.value.text


def test_unknown_generation_flag_exits_2(tmp_path):
    result = run_node(tmp_path, "--generation", "2.2")

    assert result.returncode == 2
    assert result.stderr == ('quil-simnode: unknown generation "2.2" from --generation;'
                             " use one of 1.4, 2.0, 2.1\n")


@pytest.mark.parametrize(("file_name", "expected_status"), [
    ("node-2.1.0.25-linux-amd64", 1),
    ("node-1.4.21-linux-amd64", 2),
])
def test_generation_from_file_name(tmp_path, file_name, expected_status):
    assert CONSOLE_SCRIPT.exists(), "install the package so the quil-simnode script exists"
    binary = tmp_path / file_name
    binary.symlink_to(CONSOLE_SCRIPT)
    config = write_config(tmp_path / "cfg", {})

    # Without a parent pid or list, 2.1 ends in zap's Fatal (status 1), 1.4 in a panic (2).
    result = run_node(tmp_path, "--config", str(config), "--core", "1", command=[str(binary)])

    assert result.returncode == expected_status


def test_generation_environment_overrides_file_name(tmp_path):
    binary = tmp_path / "node-2.1.0.25-linux-amd64"
    binary.symlink_to(CONSOLE_SCRIPT)
    config = write_config(tmp_path / "cfg", {})

    result = run_node(tmp_path, "--config", str(config), "--core", "1", command=[str(binary)],
                      QUIL_SIMNODE_GENERATION="1.4")

    assert result.returncode == 2
    assert result.stderr.startswith("panic: parent process pid not specified\n")


# --- config.yml ---------------------------------------------------------------------------

def test_missing_config_creates_identity(tmp_path):
    config_dir = tmp_path / "fresh"

    result = run_node(tmp_path, "--config", "fresh", "--core", "1")

    # The new config has no worker list, so a worker without a parent pid then panics.
    assert result.returncode == 2
    assert "new identity" in result.stderr.splitlines()[0]
    assert config_dir.stat().st_mode & 0o777 == 0o700
    document = yaml.safe_load((config_dir / "config.yml").read_text())
    assert document["p2p"]["peerPrivKey"].startswith("SIMNODE-PLACEHOLDER-")
    assert document["engine"] == {"dataWorkerMultiaddrs": []}
    assert document["key"]["keyManagerFile"]["path"] == "fresh/keys.yml"
    assert (config_dir / "config.yml").stat().st_mode & 0o777 == 0o600
    assert (config_dir / "keys.yml").read_text() == "null:\n"

    second = run_node(tmp_path, "--config", "fresh", "--core", "1")

    assert "new identity" not in second.stderr
    assert yaml.safe_load((config_dir / "config.yml").read_text()) == document


def test_missing_21_config_has_both_worker_lists(tmp_path):
    run_node(tmp_path, "--config", "fresh", "--core", "1", "--generation", "2.1")

    document = yaml.safe_load((tmp_path / "fresh" / "config.yml").read_text())
    assert document["engine"] == {"dataWorkerP2PMultiaddrs": [], "dataWorkerStreamMultiaddrs": []}


def test_invalid_yaml_panics_with_path(tmp_path):
    config_dir = tmp_path / "cfg"
    config_dir.mkdir()
    (config_dir / "config.yml").write_text("engine: [unclosed\n")

    result = run_node(tmp_path, "--config", str(config_dir), "--core", "1")

    assert result.returncode == 2
    assert result.stderr.startswith(f"panic: {config_dir / 'config.yml'}: invalid YAML: ")


def test_wrong_list_type_panics_with_key(tmp_path):
    config = write_config(tmp_path / "cfg", {"dataWorkerMultiaddrs": "/ip4/127.0.0.2/tcp/1"})

    result = run_node(tmp_path, "--config", str(config), "--core", "1")

    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == (
        f"panic: {config / 'config.yml'}: engine.dataWorkerMultiaddrs must be a list of"
        " multiaddrs, not '/ip4/127.0.0.2/tcp/1'")
