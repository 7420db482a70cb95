"""A local demo cluster: three agents on 127.0.0.2-127.0.0.4 running the stand-in node.

LocalCluster is also what the end-to-end tests use, so the demo and the
tests exercise the same path: real agent processes, real gRPC over mutual
TLS, real stand-in node processes, driven through quil-coord's commands.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator

from ..common.errors import QuilClusterError, StateError
from ..common.exitcodes import ExitCode
from ..simnode import write_wrapper
from . import cli

DEMO_CONFIG = "demo-config-1.4.21.yml"
# (name, worker address, workers, control) of the demo's hosts.
DEMO_HOSTS = (("alpha", "127.0.0.2", 3, True), ("beta", "127.0.0.3", 4, False), ("gamma", "127.0.0.4", 4, False))
# Seconds to wait for an agent's port to accept connections.
AGENT_START_TIMEOUT = 20.0


@dataclass
class AgentProcess:
    name: str
    address: str
    config: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None


class LocalCluster:
    """Files, agents and commands of a cluster whose hosts are loopback addresses."""

    def __init__(self, root: Path, generation: str = "1.4", node_version: str = "1.4.21") -> None:
        self.root = Path(root)
        self.home = self.root / "coord"
        self.generation = generation
        self.node_binary = self._write_node_binary(node_version)
        self.agents: dict[str, AgentProcess] = {}

    def coord(self, *argv: str) -> int:
        """Run one quil-coord command in this process against this cluster's home."""
        return cli.main(["--home", str(self.home), *argv])

    def init(self, control_config: Path | None = None, *extra: str) -> int:
        if control_config is None:
            control_config = self.root / "control-config.yml"
            control_config.write_bytes(resources.files(__package__).joinpath("data", DEMO_CONFIG).read_bytes())
        # --local: every host of this cluster shares this machine's network
        return self.coord("init", "--control-config", str(control_config), "--generation", self.generation,
                          "--local", *extra)

    def add_host(self, name: str, address: str, *options: str, port: int | None = None) -> int:
        port = port or free_port(address)
        bundle = self.root / "hosts" / name
        node_dir = self.root / "nodes" / name / ".config"
        code = self.coord("host", "add", name, "--address", address, "--agent", f"{address}:{port}",
                          "--node-binary", str(self.node_binary), "--node-config-dir", str(node_dir),
                          "--state-dir", str(self.root / "hosts" / name / "state"), "--bundle", str(bundle),
                          *options)
        if code == ExitCode.OK:
            self.agents[name] = AgentProcess(name, address, bundle / "agent.yaml", bundle / "agent.log")
        return code

    def start_agent(self, name: str) -> AgentProcess:
        agent = self.agents[name]
        with open(agent.log, "ab") as log:
            # cwd outside any source checkout, so -m finds the installed package
            agent.process = subprocess.Popen(
                [sys.executable, "-m", "quil_cluster.agent", "run", "--config", str(agent.config)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.root,
            )
        _wait_port(agent.config, agent.process)
        return agent

    def stop_agent(self, name: str, sig: int = signal.SIGTERM) -> None:
        agent = self.agents[name]
        if agent.process is None or agent.process.poll() is not None:
            return
        agent.process.send_signal(sig)
        try:
            agent.process.wait(30)
        except subprocess.TimeoutExpired:
            agent.process.kill()
            agent.process.wait(5)

    def stop_all(self) -> None:
        for name in self.agents:
            self.stop_agent(name)

    def _write_node_binary(self, version: str) -> Path:
        """A wrapper named like a release binary, so the stand-in imitates that version."""
        return write_wrapper(self.root / "bin", version)


def free_port(address: str) -> int:
    """Return a TCP port that is free on address right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((address, 0))
        return probe.getsockname()[1]


def _wait_port(config: Path, process: subprocess.Popen[bytes]) -> None:
    from ..agent.config import load, split_host_port

    host, port = split_host_port(load(config).listen, str(config))
    deadline = time.monotonic() + AGENT_START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DemoError(f"agent {config} exited with status {process.returncode}; see its agent.log")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise DemoError(f"agent {config} did not listen on {host}:{port} within {AGENT_START_TIMEOUT:.0f} s")


@contextlib.contextmanager
def demo_cluster(root: Path) -> Iterator[LocalCluster]:
    cluster = LocalCluster(root)
    # Other programs on this machine may hold ports near 40000 on these addresses.
    base = free_base_port([address for _, address, _, _ in DEMO_HOSTS], max(w for _, _, w, _ in DEMO_HOSTS))
    try:
        _check(cluster.init(None, "--base-port", str(base)), "init")
        for name, address, workers, control in DEMO_HOSTS:
            extra = ["--workers", str(workers)] + (["--control"] if control else [])
            _check(cluster.add_host(name, address, *extra), f"host add {name}")
        for name in cluster.agents:
            cluster.start_agent(name)
        yield cluster
    finally:
        cluster.stop_all()


def run_demo(directory: Path | None, keep: bool) -> int:
    """Bring up the demo cluster, show assign, apply, status and a crash restart, then stop it."""
    root = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="quil-demo-"))
    if directory and (root / "coord").exists():
        raise StateError(f"{root} already contains a demo; pass an empty --dir or none")
    root.mkdir(parents=True, exist_ok=True)
    # SIGTERM ends the demo like Ctrl-C, so the agents and workers are stopped too.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    print(f"demo files in {root}")
    with demo_cluster(root) as cluster:
        for step in (("assign",), ("apply",), ("status",)):
            print(f"\n$ quil-coord {' '.join(step)}")
            _check(cluster.coord(*step), step[0])
        _show_crash_restart(cluster)
        if keep:
            # From here on Ctrl-C or SIGTERM is the normal end, also while the line is printed.
            with contextlib.suppress(KeyboardInterrupt):
                print(f"\ncluster running; try: QUIL_COORD_HOME={cluster.home} quil-coord status   "
                      "(Ctrl-C stops it)", flush=True)
                signal.pause()
    if not directory and not keep:
        shutil.rmtree(root, ignore_errors=True)
    print("\ndemo stopped")
    return ExitCode.OK


def _show_crash_restart(cluster: LocalCluster) -> None:
    from .home import Home
    from .status import collect

    hosts = collect(Home(cluster.home))
    victim = next(p for h in hosts for p in h.processes if p["core"] == 5)
    print(f"\n$ kill -9 {victim['pid']}   # worker core=5")
    os.kill(victim["pid"], signal.SIGKILL)
    time.sleep(1.5)
    print("$ quil-coord status --json   # core 5 only")
    after = collect(Home(cluster.home))
    entry = next(p for h in after for p in h.processes if p["core"] == 5)
    print(json.dumps({k: entry[k] for k in ("core", "pid", "state", "restarts", "listening")}))


def _check(code: int, step: str) -> None:
    if code != ExitCode.OK:
        raise DemoError(f"demo step '{step}' failed with exit status {code}; see the output above")


class DemoError(QuilClusterError):
    """Raised when a step of the demo fails."""


def free_base_port(addresses: list[str], count: int, start: int = 40000) -> int:
    """Return the first port p from start such that p .. p+count-1 are free on every address."""
    for base in range(start, 65535 - count, count):
        if all(_port_free(address, port) for address in addresses for port in range(base, base + count)):
            return base
    raise DemoError(f"no {count} free consecutive ports on {', '.join(addresses)}")


def _port_free(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((address, port))
        except OSError:
            return False
    return True
