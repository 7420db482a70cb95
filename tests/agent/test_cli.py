"""quil-agent run: exit statuses and exact error lines in-process, and the log of the real program."""

from __future__ import annotations

import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from agent_harness import ADDRESS, CLUSTER, write_agent_files
from helpers import free_port_range

from quil_cluster.agent.cli import main
from quil_cluster.common import pki

# Seconds to wait for the agent to start or stop; both take well under one on an idle host.
DEADLINE = 30.0


@pytest.fixture
def plain_log_lines(monkeypatch: pytest.MonkeyPatch):
    """Make main() log lines without a timestamp, and give the root logger back its handlers afterwards."""
    # With JOURNAL_STREAM set, logsetup leaves the time to journald.
    monkeypatch.setenv("JOURNAL_STREAM", "8:1")
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def _agent_yaml(tmp_path: Path, **overrides) -> tuple[Path, int]:
    ca_key, ca_cert = pki.create_ca(CLUSTER)
    port = free_port_range([ADDRESS], 1)
    return write_agent_files(tmp_path / "agent", ca_key, ca_cert, port, **overrides), port


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((ADDRESS, port))
        except OSError:
            return False
    return True


def test_run_state_dir_is_file_exits_3(tmp_path, capsys, plain_log_lines):
    state_dir = tmp_path / "state"
    state_dir.write_text("not a directory\n")
    path, port = _agent_yaml(tmp_path, state_dir=str(state_dir))
    capsys.readouterr()
    assert main(["run", "--config", str(path)]) == 3
    assert capsys.readouterr().err == (
        f"ERROR quil_cluster.agent.cli: {state_dir}: cannot create the agent's state directory"
        " (it exists and is not a directory); set state_dir in agent.yaml to a directory the agent can create"
        " and write\n"
    )
    assert _port_is_free(port)


def test_run_state_dir_under_file_exits_3(tmp_path, capsys, plain_log_lines):
    (tmp_path / "file").write_text("")
    state_dir = tmp_path / "file" / "state"
    path, _ = _agent_yaml(tmp_path, state_dir=str(state_dir))
    capsys.readouterr()
    assert main(["run", "--config", str(path)]) == 3
    assert capsys.readouterr().err == (
        f"ERROR quil_cluster.agent.cli: {state_dir}: cannot create the agent's state directory"
        " (Not a directory); set state_dir in agent.yaml to a directory the agent can create and write\n"
    )


def test_run_log_dir_is_file_exits_3(tmp_path, capsys, plain_log_lines):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "logs").write_text("")
    path, _ = _agent_yaml(tmp_path, state_dir=str(state_dir))
    capsys.readouterr()
    assert main(["run", "--config", str(path)]) == 3
    assert capsys.readouterr().err == (
        f"ERROR quil_cluster.agent.cli: {state_dir / 'logs'}: cannot create the agent's log directory"
        " (it exists and is not a directory); set state_dir in agent.yaml to a directory the agent can create"
        " and write\n"
    )


def _wait_for_text(path: Path, text: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while text not in path.read_text():
        assert time.monotonic() < deadline, f"no {text!r} in {path} after {DEADLINE} s"
        time.sleep(0.05)


def _handshake_without_certificate(port: int, ca_cert: bytes) -> None:
    context = ssl.create_default_context(cadata=ca_cert.decode())
    context.check_hostname = False
    with socket.create_connection((ADDRESS, port), timeout=DEADLINE) as raw:
        try:
            with context.wrap_socket(raw) as tls_socket:
                # With TLS 1.3 the server rejects the missing certificate after the client's handshake ends.
                tls_socket.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                assert tls_socket.recv(64) == b""
        except (ssl.SSLError, ConnectionResetError):
            pass


def test_run_does_not_log_failed_handshakes(tmp_path):
    ca_key, ca_cert = pki.create_ca(CLUSTER)
    port = free_port_range([ADDRESS], 1)
    path = write_agent_files(tmp_path / "agent", ca_key, ca_cert, port)
    stderr_path = tmp_path / "agent.err"
    # The default verbosity is under test, so none may come from the environment.
    env = {key: value for key, value in os.environ.items() if not key.startswith("GRPC_")}
    with open(stderr_path, "wb") as stderr:
        agent = subprocess.Popen([sys.executable, "-m", "quil_cluster.agent", "run", "--config", str(path)],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    try:
        _wait_for_text(stderr_path, "listening: agent API")
        for _ in range(20):
            _handshake_without_certificate(port, ca_cert)
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(DEADLINE) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(DEADLINE)
    lines = stderr_path.read_text().splitlines()
    assert [line for line in lines if "Handshake failed" in line] == []
    assert lines[-1].endswith("INFO quil_cluster.agent.cli: stopping: agent (signal SIGTERM); stopping node processes")
