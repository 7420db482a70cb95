"""The soak run shared by tests/soak/test_soak.py (short) and bench/soak.py (long).

One agent runs inside this process, so its descriptors, memory and threads
are this process's. Workers are stand-in nodes. The run kills running
workers with SIGKILL, spreading the kills evenly, while threads call
GetStatus over mutual TLS. Every wait is bounded, so a deadlock fails the
run with a timeout instead of hanging it.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
from agent_harness import ADDRESS, write_agent_files
from helpers import free_port_range
from supervision_harness import all_running, apply_request, coordinator_stub, wait_status, worker_entries

from quil_cluster.agent import config as agent_config
from quil_cluster.agent.service import build_server
from quil_cluster.common import pki
from quil_cluster.proto import agent_pb2 as pb

# Loopback address of the soak's workers, used by no other test file.
SOAK_ADDRESS = "127.0.0.67"
# Seconds between two GetStatus calls of one status thread.
STATUS_INTERVAL = 0.1


@dataclass
class Sample:
    """Resource use of this process (the agent) at one moment."""

    fds: int
    rss_bytes: int
    threads: int

    @classmethod
    def take(cls) -> "Sample":
        process = psutil.Process()
        return cls(fds=process.num_fds(), rss_bytes=process.memory_info().rss, threads=process.num_threads())

    def __str__(self) -> str:
        return f"fds {self.fds}, RSS {self.rss_bytes / 2**20:.1f} MiB, threads {self.threads}"


@dataclass
class SoakResult:
    workers: int
    kills: int
    start: Sample
    end: Sample
    status_calls: int
    status_errors: list[str] = field(default_factory=list)
    restarts: int = 0
    seconds_to_all_running: float = 0.0
    churn_seconds: float = 0.0
    recovery_seconds: float = 0.0
    max_kills_per_worker: int = 0
    stop_seconds: float = 0.0

    def lines(self) -> list[str]:
        return [
            f"workers {self.workers}: all running {self.seconds_to_all_running:.1f} s after Apply",
            f"kills {self.kills} (at most {self.max_kills_per_worker} per worker) in {self.churn_seconds:.1f} s;"
            f" all running again {self.recovery_seconds:.1f} s later; restarts counted {self.restarts}",
            f"GetStatus calls {self.status_calls}, errors {len(self.status_errors)};"
            f" stopping all workers took {self.stop_seconds:.2f} s",
            f"start: {self.start}",
            f"end:   {self.end}",
            f"delta: fds {self.end.fds - self.start.fds:+d}, RSS {(self.end.rss_bytes - self.start.rss_bytes) / 2**20:+.1f}"
            f" MiB, threads {self.end.threads - self.start.threads:+d}",
        ]


class _StatusCallers:
    """Threads that call GetStatus over mutual TLS until stopped."""

    def __init__(self, target: str, ca: tuple[bytes, bytes], count: int) -> None:
        self._stop = threading.Event()
        self._stubs = [coordinator_stub(target, ca) for _ in range(count)]
        # One call each opens the connections now, so that they are in the baseline sample.
        for stub in self._stubs:
            stub.GetStatus(pb.GetStatusRequest(), timeout=30.0)
        self.calls = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(stub,), name=f"status-{index}", daemon=True)
                         for index, stub in enumerate(self._stubs)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float) -> list[str]:
        """Stop the threads; return the names of those still running after timeout seconds."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [thread.name for thread in self._threads if thread.is_alive()]

    def _run(self, stub) -> None:
        while not self._stop.is_set():
            try:
                stub.GetStatus(pb.GetStatusRequest(), timeout=10.0)
                with self._lock:
                    self.calls += 1
            except grpc.RpcError as err:
                with self._lock:
                    self.errors.append(f"{err.code()}: {err.details()}")
            self._stop.wait(STATUS_INTERVAL)


def _kill_running(supervisor, cycles: int, deadline: float, rng: random.Random) -> Counter:
    """SIGKILL running workers until cycles kills are done, the least-killed first."""
    kills: Counter = Counter()
    killed_pids: set[int] = set()
    while sum(kills.values()) < cycles:
        assert time.monotonic() < deadline, f"only {sum(kills.values())} of {cycles} kills before the deadline"
        # A killed process stays RUNNING in the table until the loop thread handles its exit.
        running = {core: pid for core, pid in supervisor.running_pids().items() if pid not in killed_pids}
        if not running:
            time.sleep(0.02)
            continue
        fewest = min(kills[core] for core in running)
        core = rng.choice(sorted(core for core in running if kills[core] == fewest))
        try:
            os.kill(running[core], signal.SIGKILL)
        except ProcessLookupError:
            continue  # exited on its own since the table was read
        kills[core] += 1
        killed_pids.add(running[core])
        time.sleep(0.01)
    return kills


def run_soak(root: Path, workers: int, cycles: int, status_threads: int, deadline_seconds: float,
             seed: int = 7) -> SoakResult:
    """Start an agent with `workers` workers, kill `cycles` of them under status load, and measure."""
    deadline = time.monotonic() + deadline_seconds
    ca = pki.create_ca("test")
    port = free_port_range([ADDRESS], 1, start=47700)
    config = agent_config.load(write_agent_files(root / "agent", ca[0], ca[1], port, worker_address=SOAK_ADDRESS))
    agent = build_server(config)
    target = f"{ADDRESS}:{agent.port}"
    cores = list(range(1, workers + 1))
    stopped = False
    try:
        # 1. All workers running, and the status callers connected: the baseline.
        stub = coordinator_stub(target, ca)
        applied = time.monotonic()
        # One Apply spawns every worker; on a loaded host that takes longer than a usual call.
        stub.Apply(apply_request(worker_entries(workers, address=SOAK_ADDRESS, start=42000), cores), timeout=deadline - time.monotonic())
        wait_status(stub, all_running(cores), f"{workers} workers running", timeout=deadline - time.monotonic(),
                    interval=0.2)
        to_all_running = time.monotonic() - applied
        callers = _StatusCallers(target, ca, status_threads)
        start = Sample.take()
        callers.start()

        # 2. Kills under status load.
        churn_started = time.monotonic()
        kills = _kill_running(agent.supervisor, cycles, deadline, random.Random(seed))
        churned = time.monotonic()

        # 3. Every worker back, the callers stopped, and the end sample.
        table = wait_status(stub, all_running(cores), "every worker running after the kills",
                            timeout=max(1.0, deadline - time.monotonic()), interval=0.2)
        recovered = time.monotonic()
        stuck = callers.stop(timeout=15.0)
        assert not stuck, f"status threads still running after 15 s: {stuck}"
        time.sleep(0.5)
        end = Sample.take()
        stopping = time.monotonic()
        agent.stop(stop_processes=True)
        stopped = True
        return SoakResult(
            workers=workers, kills=sum(kills.values()), start=start, end=end, status_calls=callers.calls,
            status_errors=callers.errors, restarts=sum(process.restarts for process in table.values()),
            seconds_to_all_running=to_all_running, churn_seconds=churned - churn_started,
            recovery_seconds=recovered - churned, max_kills_per_worker=max(kills.values(), default=0),
            stop_seconds=time.monotonic() - stopping,
        )
    finally:
        if not stopped:
            agent.stop(stop_processes=True)
