"""An agent run as its own process (so a test can SIGKILL it), with a coordinator client over mutual TLS.

Shared by tests/e2e/test_supervision.py, tests/soak and bench/soak.py.
"""

from __future__ import annotations

import functools
import hashlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc
import psutil
import pytest
from agent_harness import ADDRESS, CLUSTER, write_agent_files
from helpers import DATA, free_port_range

from quil_cluster.agent import config as agent_config
from quil_cluster.common import nodeconfig, pki, tls
from quil_cluster.proto import agent_pb2 as pb
from quil_cluster.proto import agent_pb2_grpc as pb_grpc

# Seconds one RPC may take; far above what any call needs on an idle host.
RPC_TIMEOUT = 30.0
# Loopback address the workers of these agents bind; other test files use other 127.0.0.x addresses,
# so that a port picked as free here is not taken by another test's worker before it binds.
WORKER_ADDRESS = "127.0.0.66"


def require(condition: bool, reason: str) -> None:
    """Skip the test when condition is false, but fail it in CI (CI=true), where it must run."""
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true, so this test must run)")
    pytest.skip(reason)


def worker_entries(count: int, address: str = WORKER_ADDRESS, start: int = 41000) -> list[str]:
    base = free_port_range([address], count, start)
    return [f"/ip4/{address}/tcp/{base + i}" for i in range(count)]


def apply_request(entries: list[str], cores: list[int]) -> pb.ApplyRequest:
    """Build the Apply request of a 1.4 cluster whose worker list is entries."""
    base = nodeconfig.load((DATA / "config-1.4.21.yml").read_text())
    text = nodeconfig.render(base, "1.4", entries).encode()
    return pb.ApplyRequest(config_yaml=text, config_sha256=hashlib.sha256(text).hexdigest(), config_generation=1,
                           node_generation=pb.NODE_GENERATION_1_4, cores=cores)


@dataclass
class AgentProcess:
    """`python -m quil_cluster.agent run` as a child process, its stderr in a file."""

    config_path: Path
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0

    @functools.cached_property
    def config(self) -> agent_config.AgentConfig:
        return agent_config.load(self.config_path)

    def start(self) -> None:
        """Start the agent and wait until its API port accepts connections."""
        host, port = agent_config.split_host_port(self.config.listen, "listen")
        self.started_at = time.monotonic()
        with open(self.log_path, "ab") as output:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "quil_cluster.agent", "run", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
            )
        wait_for(lambda: _port_open(host, port) or self.popen.poll() is not None, "agent API port", 30.0)
        assert self.popen.poll() is None, f"agent exited with {self.popen.returncode}:\n{self.log_text()}"

    def kill(self) -> None:
        """SIGKILL the agent, as a crash or the OOM killer would, and reap it."""
        assert self.popen is not None
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(10)

    def terminate(self) -> int:
        """SIGTERM the agent (it stops its node processes first) and return its exit status."""
        assert self.popen is not None
        if self.popen.poll() is None:
            self.popen.terminate()
        return self.popen.wait(60)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid


def _port_open(host: str, port: int) -> bool:
    import socket

    with socket.socket() as probe:
        probe.settimeout(0.2)
        return probe.connect_ex((host, port)) == 0


def make_agent(root: Path, ca: tuple[bytes, bytes], **overrides) -> AgentProcess:
    """Write an agent bundle under root (API port free on the loopback ADDRESS) and return it, not started."""
    port = free_port_range([ADDRESS], 1, start=47500)
    config_path = write_agent_files(root / "agent", ca[0], ca[1], port, **{"worker_address": WORKER_ADDRESS, **overrides})
    return AgentProcess(config_path=config_path, log_path=root / "agent.log")


def coordinator_stub(target: str, ca: tuple[bytes, bytes]) -> pb_grpc.AgentStub:
    key, cert = pki.issue(ca[0], ca[1], pki.Identity(CLUSTER, "coordinator", "test"))
    return pb_grpc.AgentStub(tls.secure_channel(target, tls.channel_credentials(key, cert, ca[1])))


def wait_for(condition: Callable[[], bool], description: str, timeout: float = 30.0, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {description}"
        time.sleep(interval)


def status(stub: pb_grpc.AgentStub) -> dict[int, pb.ProcessStatus]:
    response = stub.GetStatus(pb.GetStatusRequest(), timeout=RPC_TIMEOUT)
    return {process.core: process for process in response.processes}


def wait_status(stub: pb_grpc.AgentStub, condition: Callable[[dict[int, pb.ProcessStatus]], bool],
                description: str, timeout: float = 30.0, interval: float = 0.05) -> dict[int, pb.ProcessStatus]:
    """Poll GetStatus until condition holds for the table of processes; return that table."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            table = status(stub)
        except grpc.RpcError:
            table = {}  # the agent is still starting
        if condition(table):
            return table
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {description}: {table}"
        time.sleep(interval)


def all_running(cores: list[int]) -> Callable[[dict[int, pb.ProcessStatus]], bool]:
    def check(table: dict[int, pb.ProcessStatus]) -> bool:
        return all(core in table and table[core].state == pb.PROCESS_STATE_RUNNING and table[core].listening
                   for core in cores)
    return check


def node_processes(config_dir: Path) -> dict[int, list[int]]:
    """Return the pids of every live node process started with --config config_dir, by --core index."""
    found: dict[int, list[int]] = {}
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        argv = proc.info["cmdline"] or []
        if proc.info["status"] == psutil.STATUS_ZOMBIE or str(config_dir) not in argv:
            continue
        for index, item in enumerate(argv[:-1]):
            if item == "--core":
                found.setdefault(int(argv[index + 1]), []).append(proc.info["pid"])
    return found


def kill_node_processes(config_dir: Path) -> None:
    """SIGKILL every node process of config_dir, so none outlives a test that failed."""
    for pids in node_processes(config_dir).values():
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
