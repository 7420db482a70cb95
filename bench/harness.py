"""Pieces every benchmark shares: results, process clean-up, port checks and the light worker."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BUILD = BENCH / ".build"
# The agent reads the release from the binary's name, as with real node releases.
LIGHT_WORKER_NAME = "node-1.4.21-linux-amd64"
# Seconds to wait for workers to listen before a run counts as failed.
LISTEN_TIMEOUT = 180.0


@dataclass
class Result:
    """One row of the table: our times and the peer's, each a list of runs."""

    scenario: str
    ours: list[float]
    peer_name: str = ""
    peer: list[float] = field(default_factory=list)
    unit: str = "s"
    # Where the number comes from and what limits it.
    note: str = ""
    target: str = ""

    @property
    def ours_median(self) -> float | None:
        return statistics.median(self.ours) if self.ours else None

    @property
    def peer_median(self) -> float | None:
        return statistics.median(self.peer) if self.peer else None

    @property
    def ratio(self) -> float | None:
        """Our median over the peer's: below 1 means we are faster or smaller."""
        if self.ours_median is None or not self.peer_median:
            return None
        return self.ours_median / self.peer_median

    def as_dict(self) -> dict:
        return {
            "scenario": self.scenario, "unit": self.unit, "ours": self.ours, "ours_median": self.ours_median,
            "peer": self.peer_name, "peer_runs": self.peer, "peer_median": self.peer_median,
            "ratio": self.ratio, "target": self.target, "note": self.note,
        }


class Reaper:
    """Stops every process group the benchmarks start, also when they fail half-way."""

    def __init__(self) -> None:
        self.groups: list[subprocess.Popen] = []
        self.roots: list[Path] = []
        atexit.register(self.stop_all)

    def spawn(self, argv: list[str], **kwargs) -> subprocess.Popen:
        process = subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL, **kwargs)
        self.groups.append(process)
        return process

    def watch_root(self, root: Path) -> None:
        """Remember a directory whose path marks processes to kill (detached workers started by peers)."""
        self.roots.append(root)

    def stop(self, process: subprocess.Popen, sig: int = signal.SIGTERM, wait: float = 30.0) -> None:
        if process.poll() is None:
            _signal_group(process.pid, sig)
            try:
                process.wait(wait)
            except subprocess.TimeoutExpired:
                _signal_group(process.pid, signal.SIGKILL)
                process.wait(5)
        _signal_group(process.pid, signal.SIGKILL)  # children left in the group
        if process in self.groups:
            self.groups.remove(process)

    def stop_all(self) -> None:
        for process in list(self.groups):
            self.stop(process, wait=10.0)
        for root in self.roots:
            kill_under(root)
        self.roots.clear()


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_under(root: Path, passes: int = 5) -> int:
    """SIGKILL every process of ours whose command line names a path under root; return how many.

    NOTE: one scan of /proc once left some of 1400 detached workers alive
    (cause not found), so the scan repeats until it finds none.
    """
    marker = str(root)
    killed = 0
    for _ in range(passes):
        found = 0
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if proc.info["pid"] == os.getpid():
                continue
            if any(marker in part for part in proc.info["cmdline"] or ()):
                found += 1
                try:
                    proc.kill()
                    killed += 1
                except psutil.Error:
                    pass
        if not found:
            break
        time.sleep(0.2)
    return killed


def wait_listening(targets: list[tuple[str, int]], timeout: float = LISTEN_TIMEOUT, interval: float = 0.0) -> float:
    """Block until every (address, port) accepts TCP connections; return the monotonic time it did."""
    pending = list(targets)
    deadline = time.monotonic() + timeout
    while True:
        pending = [t for t in pending if not _accepts(t)]
        now = time.monotonic()
        if not pending:
            return now
        if now > deadline:
            raise RuntimeError(f"{len(pending)} of {len(targets)} workers never listened, e.g. {pending[0]}")
        time.sleep(interval or 0.01)


def _accepts(target: tuple[str, int]) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(target) == 0


def free_base(addresses: list[str], count: int, start: int) -> int:
    """First port p from start with p .. p+count-1 free on every address."""
    from quil_cluster.coordinator.demo import free_base_port

    return free_base_port(addresses, count, start)


def light_worker() -> Path:
    """Compile bench/lightworker.c once into bench/.build/bin and return the binary's path."""
    source = BENCH / "lightworker.c"
    binary = BUILD / "bin" / LIGHT_WORKER_NAME
    if binary.exists() and binary.stat().st_mtime >= source.stat().st_mtime:
        return binary
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc) found; install gcc to build bench/lightworker.c")
    binary.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([compiler, "-O2", "-o", str(binary), str(source)], check=True)
    return binary


def addresses(block: int, count: int) -> list[str]:
    """count loopback addresses 127.BLOCK.x.y, y from 1 to 200."""
    return [f"127.{block}.{i // 200}.{i % 200 + 1}" for i in range(count)]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
