"""Every documented exit status of quil-coord, each reached through the installed console script.

Status 1 (a bug) has no input that reaches it on purpose, so its test runs main()
in-process with a command that raises an unexpected exception.
"""

from __future__ import annotations

import fcntl
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from quil_cluster.common import pki
from quil_cluster.coordinator import cli
from quil_cluster.coordinator.demo import LocalCluster, free_port

pytestmark = pytest.mark.e2e

QUIL_COORD = str(Path(sys.executable).parent / "quil-coord")


def _coord(home: Path, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([QUIL_COORD, "--home", str(home), *argv], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _last_error(result: subprocess.CompletedProcess[str]) -> str:
    return result.stderr.strip().splitlines()[-1]


@pytest.fixture
def one_host(tmp_path: Path) -> LocalCluster:
    """An initialized local cluster with control host A (1 worker) whose agent is not started."""
    cluster = LocalCluster(tmp_path)
    assert cluster.init() == 0
    assert cluster.add_host("A", "127.0.0.2", "--control", "--workers", "1") == 0
    yield cluster
    cluster.stop_all()


def test_exit_0_on_success(one_host):
    result = _coord(one_host.home, "host", "list")
    assert result.returncode == 0
    assert result.stdout.splitlines()[0].split() == ["NAME", "ADDRESS", "AGENT", "CONTROL", "WORKERS", "RESERVE",
                                                     "CPUS"]
    assert result.stderr == ""


def test_exit_1_on_unexpected_failure(one_host, capsys, monkeypatch):
    def broken(args):
        raise RuntimeError("simulated bug")

    monkeypatch.setitem(cli.COMMANDS, "status", broken)
    code = cli.main(["--home", str(one_host.home), "status"])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback (most recent call last)" in err
    assert "RuntimeError: simulated bug" in err
    assert err.strip().splitlines()[-1] == ("error: unexpected failure (a bug in quil-coord); rerun with --debug "
                                            "and report the traceback above")


def test_exit_2_on_usage_error(one_host):
    result = _coord(one_host.home, "status", "--interval", "0.1")
    assert result.returncode == 2
    assert result.stderr.startswith("usage: quil-coord status")
    assert _last_error(result) == ("error: argument --interval: interval 0.1 is too short: give at least 0.5 s; "
                                   "see quil-coord status --help")


def test_exit_2_on_unknown_command(tmp_path):
    result = _coord(tmp_path, "stauts")
    assert result.returncode == 2
    assert _last_error(result).startswith("error: argument command: invalid choice: 'stauts' (choose from ")
    assert _last_error(result).endswith("; see quil-coord --help")


def test_exit_3_on_missing_state_directory(tmp_path):
    missing = tmp_path / "nothing-here"
    result = _coord(missing, "status")
    assert result.returncode == 3
    assert _last_error(result) == f"error: {missing}: not a quil-coord state directory; run quil-coord init first"
    assert result.stdout == ""


def test_exit_4_when_assigned_core_is_missing(one_host):
    one_host.start_agent("A")
    assert _coord(one_host.home, "assign").returncode == 0
    # Assigned but never applied: the agent runs no worker for core 1.
    result = _coord(one_host.home, "status")
    assert result.returncode == 4
    missing = [line.split() for line in result.stdout.splitlines() if line.startswith("A ")]
    assert missing == [["A", "1", "missing", "assigned", "but", "not", "running;", "run", "apply"]]


def test_exit_5_when_agent_is_unreachable(one_host):
    result = _coord(one_host.home, "status")
    assert result.returncode == 5
    row = result.stdout.splitlines()[1]
    assert row.split()[:2] == ["A", "unreachable"]


def test_exit_6_when_coordinator_key_is_missing(one_host):
    key = one_host.home / "coordinator.key"
    key.unlink()
    result = _coord(one_host.home, "status")
    assert result.returncode == 6
    assert _last_error(result) == f"error: failed to read {key}: No such file or directory"


def _serve_tls_without_client_auth(home: Path, address: str, port: int, stop: threading.Event) -> None:
    """Accept TLS handshakes that offer no client certificate, as a misconfigured agent port would."""
    ca_key, ca_cert = (home / "ca.key").read_bytes(), (home / "ca.crt").read_bytes()
    key, cert = pki.issue(ca_key, ca_cert, pki.Identity("quil", "agent", "A"), ip_addresses=[address])
    directory = home.parent / "fake-agent"
    directory.mkdir()
    pki.write_private(directory / "agent.key", key)
    pki.write_public(directory / "agent.crt", cert)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "agent.crt", directory / "agent.key")
    context.set_alpn_protocols(["h2"])
    with socket.create_server((address, port)) as server:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                raw, _ = server.accept()
            except TimeoutError:
                continue
            try:
                with context.wrap_socket(raw, server_side=True) as conn:
                    conn.recv(64)
                    conn.sendall(b"not an agent")
            except (ssl.SSLError, OSError):
                continue


def test_exit_7_when_verify_finds_violation(tmp_path):
    cluster = LocalCluster(tmp_path)
    assert cluster.init() == 0
    port = free_port("127.0.0.2")
    assert cluster.add_host("A", "127.0.0.2", "--control", "--workers", "1", port=port) == 0
    stop = threading.Event()
    server = threading.Thread(target=_serve_tls_without_client_auth,
                              args=(cluster.home, "127.0.0.2", port, stop), daemon=True)
    server.start()
    try:
        result = _coord(cluster.home, "verify")
    finally:
        stop.set()
        server.join(5)
    assert result.returncode == 7
    assert (f"violation: A: agent port 127.0.0.2:{port} accepted a TLS handshake without a client certificate; "
            "run the agent from a bundle of this cluster") in result.stdout.splitlines()


def test_exit_130_on_ctrl_c(one_host):
    lock = one_host.home / "apply.lock"
    with open(lock, "a+") as handle:
        # Hold the apply lock, so apply --wait blocks until it is interrupted.
        fcntl.flock(handle, fcntl.LOCK_EX)
        process = subprocess.Popen([QUIL_COORD, "--home", str(one_host.home), "apply", "--wait"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   stdin=subprocess.DEVNULL)
        try:
            _wait_until_open(process.pid, lock)
            time.sleep(0.2)
            process.send_signal(signal.SIGINT)
            out, err = process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert process.returncode == 130
    assert err == "interrupted\n"
    assert out == ""


def _wait_until_open(pid: int, path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while str(path) not in {f.path for f in psutil.Process(pid).open_files()}:
        assert time.monotonic() < deadline, f"quil-coord (pid {pid}) never opened {path}"
        time.sleep(0.05)
