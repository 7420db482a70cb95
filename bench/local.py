"""One-host benchmarks: quil-agent against supervisord and the node runners' shell loop.

Every side runs the same stand-in worker (quil-simnode through its release-named
wrapper) with the same config.yml, each on its own loopback address:

  crash_restart   kill -9 of a worker until its replacement listens
  start_workers   start N workers until all listen
  footprint       RSS and CPU time of the supervising process, idle with N workers

The agent is a real `quil-agent run` process reached over mutual TLS; supervisord
runs from a config file in a temporary directory with its own unix socket.
"""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from quil_cluster.common import nodeconfig, pki, tls
from quil_cluster.common.yamlio import dump
from quil_cluster.coordinator.demo import DEMO_CONFIG
from quil_cluster.proto import agent_pb2 as pb
from quil_cluster.proto import agent_pb2_grpc as pb_grpc
from quil_cluster.simnode import write_wrapper

from harness import Reaper, free_base, wait_listening

CLUSTER = "bench"
AGENT_ADDRESS = "127.79.0.1"
SUPERVISOR_ADDRESS = "127.79.0.2"
SHELL_ADDRESS = "127.79.0.3"

SUPERVISORD_CONF = """\
[unix_http_server]
file={root}/supervisor.sock

[supervisord]
logfile={root}/supervisord.log
pidfile={root}/supervisord.pid
childlogdir={root}/logs
nodaemon=true

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{root}/supervisor.sock

[program:worker]
command={binary} --config {config_dir} --core %(process_num)d --parent-process 0
process_name=worker-%(process_num)d
numprocs={count}
numprocs_start=1
autostart={autostart}
autorestart=true
startsecs=1
stopasgroup=true
killasgroup=true
stdout_logfile={root}/logs/worker-%(process_num)d.log
redirect_stderr=true
"""


def node_config(directory: Path, address: str, base_port: int, count: int) -> Path:
    """Write DIR/.config/config.yml listing count workers on address; return the config directory."""
    config_dir = directory / ".config"
    config_dir.mkdir(parents=True, exist_ok=True)
    base = nodeconfig.load((Path(nodeconfig.__file__).parent.parent / "coordinator" / "data" / DEMO_CONFIG)
                           .read_text())
    entries = [f"/ip4/{address}/tcp/{base_port + i}" for i in range(count)]
    (config_dir / "config.yml").write_text(nodeconfig.render(base, "1.4", entries))
    return config_dir


class LocalAgent:
    """A `quil-agent run` process with its own CA, and a coordinator stub for it."""

    def __init__(self, root: Path, reaper: Reaper, base_port: int, count: int) -> None:
        self.root = root
        self.reaper = reaper
        self.base_port = base_port
        self.count = count
        self.ca_key, self.ca_cert = pki.create_ca(CLUSTER)
        self.port = free_base([AGENT_ADDRESS], 1, 47400)
        self.process: subprocess.Popen | None = None
        self.stub: pb_grpc.AgentStub | None = None

    def start(self) -> None:
        key, cert = pki.issue(self.ca_key, self.ca_cert, pki.Identity(CLUSTER, "agent", "local"),
                              ip_addresses=[AGENT_ADDRESS])
        pki.write_private(self.root / "agent.key", key)
        pki.write_public(self.root / "agent.crt", cert)
        pki.write_public(self.root / "ca.crt", self.ca_cert)
        values = {
            "cluster": CLUSTER, "listen": f"{AGENT_ADDRESS}:{self.port}", "worker_address": AGENT_ADDRESS,
            "node_binary": str(write_wrapper(self.root / "bin", "1.4.21")),
            "node_config_dir": str(self.root / "node" / ".config"), "state_dir": str(self.root / "state"),
            "tls": {"cert": "agent.crt", "key": "agent.key", "ca": "ca.crt"}, "stop_grace_seconds": 2,
        }
        (self.root / "agent.yaml").write_bytes(dump(values))
        with open(self.root / "agent.log", "ab") as output:
            self.process = self.reaper.spawn(
                [sys.executable, "-m", "quil_cluster.agent", "run", "--config", str(self.root / "agent.yaml")],
                stdout=output, stderr=output, cwd=self.root)
        wait_listening([(AGENT_ADDRESS, self.port)], timeout=60)
        key, cert = pki.issue(self.ca_key, self.ca_cert, pki.Identity(CLUSTER, "coordinator", "bench"))
        channel = tls.secure_channel(f"{AGENT_ADDRESS}:{self.port}", tls.channel_credentials(key, cert, self.ca_cert))
        self.stub = pb_grpc.AgentStub(channel)
        self.stub.GetHostFacts(pb.GetHostFactsRequest(), timeout=30)  # TLS handshake done before any clock runs

    def apply(self) -> None:
        """Send Apply with every worker; returns when the agent has started them (not when they listen)."""
        text = (node_config(self.root / "rendered", AGENT_ADDRESS, self.base_port, self.count) / "config.yml"
                ).read_bytes()
        request = pb.ApplyRequest(config_yaml=text, config_sha256=hashlib.sha256(text).hexdigest(),
                                  config_generation=1, node_generation=pb.NODE_GENERATION_1_4,
                                  cores=list(range(1, self.count + 1)))
        self.stub.Apply(request, timeout=300)

    def stop(self) -> None:
        if self.process is not None:
            self.reaper.stop(self.process, wait=60.0)


class Supervisord:
    """supervisord from a config in root, its workers started by hand (autostart=false) or at once."""

    def __init__(self, root: Path, reaper: Reaper, peers_bin: Path, base_port: int, count: int,
                 autostart: bool) -> None:
        self.root = root
        self.reaper = reaper
        self.peers_bin = peers_bin
        self.base_port = base_port
        self.count = count
        (root / "logs").mkdir(parents=True, exist_ok=True)
        config_dir = node_config(root / "node", SUPERVISOR_ADDRESS, base_port, count)
        binary = write_wrapper(root / "bin", "1.4.21")
        (root / "supervisord.conf").write_text(SUPERVISORD_CONF.format(
            root=root, binary=binary, config_dir=config_dir, count=count, autostart=str(autostart).lower()))
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.root / "supervisord.out", "ab") as output:
            self.process = self.reaper.spawn([str(self.peers_bin / "supervisord"), "-c", str(self.root / "supervisord.conf")],
                                             stdout=output, stderr=output, cwd=self.root)
        deadline = time.monotonic() + 30
        while not (self.root / "supervisor.sock").exists():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"supervisord did not start; see {self.root}/supervisord.log")
            time.sleep(0.05)

    def ctl(self, *argv: str) -> None:
        subprocess.run([str(self.peers_bin / "supervisorctl"), "-c", str(self.root / "supervisord.conf"), *argv],
                       capture_output=True, check=False, timeout=600)

    def stop(self) -> None:
        if self.process is not None:
            self.reaper.stop(self.process, wait=60.0)


def worker_pid(parent: int, core: int) -> int:
    """pid of the child of parent that runs --core core."""
    for child in psutil.Process(parent).children():
        cmdline = child.cmdline()
        if "--core" in cmdline and cmdline[cmdline.index("--core") + 1] == str(core):
            return child.pid
    raise RuntimeError(f"no worker core={core} under pid {parent}")


def time_crash_restart(parent: int, address: str, port: int, core: int) -> float:
    """Kill -9 the worker on core, return seconds until a process listens on its port again."""
    pid = worker_pid(parent, core)
    target = (address, port)
    started = time.perf_counter()
    psutil.Process(pid).kill()
    # The old socket closes only when the kernel has torn the process down; wait for that first.
    while _accepts(target):
        time.sleep(0.0005)
    while not _accepts(target):
        time.sleep(0.001)
        if time.perf_counter() - started > 60:
            raise RuntimeError(f"no replacement for core {core} listened within 60 s")
    return time.perf_counter() - started


def _accepts(target: tuple[str, int]) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(target) == 0


def targets(address: str, base_port: int, count: int) -> list[tuple[str, int]]:
    return [(address, base_port + i) for i in range(count)]


def run_shell_loop(root: Path, reaper: Reaper, base_port: int, count: int) -> float:
    """The guide's loop: start `node --core $i --parent-process $$ &` for every core, then wait."""
    binary = write_wrapper(root / "bin", "1.4.21")
    config_dir = node_config(root / "node", SHELL_ADDRESS, base_port, count)
    script = (f'for i in $(seq 1 {count}); do "{binary}" --config "{config_dir}" --core $i '
              f'--parent-process $$ >/dev/null 2>&1 & done; wait')
    started = time.monotonic()
    shell = reaper.spawn(["sh", "-c", script])
    finished = wait_listening(targets(SHELL_ADDRESS, base_port, count), interval=0.005)
    reaper.stop(shell)
    return finished - started


class Footprint:
    """CPU seconds and RSS of one process over an idle window."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.cpu_start = _cpu(self.process)
        self.wall_start = time.monotonic()

    def sample(self) -> tuple[float, float]:
        """Return (CPU % of one core since the last sample, RSS in MiB), and start the next window."""
        cpu = _cpu(self.process)
        wall = time.monotonic()
        percent = 100.0 * (cpu - self.cpu_start) / (wall - self.wall_start)
        self.cpu_start, self.wall_start = cpu, wall
        return percent, self.process.memory_info().rss / 2**20


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system
