"""Fleet simulator: many agents on distinct loopback addresses, driven by a real coordinator home.

Each simulated host has its own address (127.B.x.y), agent bundle, state
directory, node config directory and workers. Agents run either one process
each (`quil-agent run`, mode "process") or many per process
(bench/fleet_host.py, mode "shared"), because a few hundred Python agents at
about 40 MB each do not fit on a small machine next to other work.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

from quil_cluster.coordinator import cli

from harness import BENCH, Reaper, addresses, free_base, log, wait_listening

# Agents per fleet_host.py process in shared mode.
AGENTS_PER_PROCESS = 25
# Fleets up to this size run one process per agent when the mode is "auto".
PROCESS_MODE_MAX = 50


class Fleet:
    def __init__(self, root: Path, count: int, workers: int, binary: Path, reaper: Reaper, block: int = 77,
                 mode: str = "auto") -> None:
        self.root = root
        self.home = root / "coord"
        self.count = count
        self.workers = workers
        self.binary = binary
        self.reaper = reaper
        self.addresses = addresses(block, count)
        self.names = [f"h{i:03d}" for i in range(count)]
        if mode == "auto":
            mode = "process" if count <= PROCESS_MODE_MAX else "shared"
        self.mode = mode
        self.processes: list[subprocess.Popen] = []
        self.agent_port = 0
        self.base_port = 0
        # Agents started by quil-agent join, stopped with the fleet.
        self.joined: list[subprocess.Popen] = []

    # Set-up

    def create(self, max_workers: int) -> None:
        """Write the coordinator home and every host's bundle; ports are checked free on every address."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.agent_port = free_base(self.addresses, 1, 47350)
        self.base_port = free_base(self.addresses, max_workers, 42000)
        control = self.root / "control-config.yml"
        control.write_bytes(resources.files("quil_cluster.coordinator").joinpath(
            "data", "demo-config-1.4.21.yml").read_bytes())
        self.coord("init", "--control-config", str(control), "--generation", "1.4", "--local",
                   "--base-port", str(self.base_port))
        for index, (name, address) in enumerate(zip(self.names, self.addresses)):
            self.add_host(name, address, control=index == 0)

    def add_host(self, name: str, address: str, control: bool = False) -> None:
        host_dir = self.root / "hosts" / name
        self.coord("host", "add", name, "--address", address, "--agent", f"{address}:{self.agent_port}",
                   "--node-binary", str(self.binary), "--node-config-dir", str(host_dir / "node" / ".config"),
                   "--state-dir", str(host_dir / "state"), "--bundle", str(host_dir),
                   "--workers", str(self.workers), *(["--control"] if control else []))

    def start_agents(self) -> None:
        configs = [str(self.root / "hosts" / name / "agent.yaml") for name in self.names]
        python = sys.executable
        if self.mode == "process":
            for config in configs:
                with open(Path(config).parent / "agent.log", "ab") as output:
                    self.processes.append(self.reaper.spawn(
                        [python, "-m", "quil_cluster.agent", "run", "--config", config],
                        stdout=subprocess.DEVNULL, stderr=output, cwd=self.root))
            wait_listening([(a, self.agent_port) for a in self.addresses], timeout=300)
            return
        for first in range(0, len(configs), AGENTS_PER_PROCESS):
            chunk = configs[first:first + AGENTS_PER_PROCESS]
            with open(self.root / f"fleet-{first}.log", "ab") as errors:
                self.processes.append(self.reaper.spawn(
                    [python, str(BENCH / "fleet_host.py"), *chunk], stdout=subprocess.PIPE, stderr=errors,
                    cwd=self.root))
        for process in self.processes:
            line = process.stdout.readline().decode()
            if not line.startswith("ready"):
                raise RuntimeError(f"fleet_host.py exited before its agents were ready; see {self.root}/fleet-*.log")

    def stop(self) -> None:
        for process in self.joined + self.processes:
            self.reaper.stop(process, wait=60.0)
        self.processes.clear()
        self.joined.clear()

    # Commands

    def coord(self, *argv: str) -> None:
        """Run quil-coord in this process, output hidden; raise on a non-zero exit status."""
        self.coord_output(*argv)

    def coord_output(self, *argv: str) -> str:
        """Run quil-coord in this process and return its output; raise on a non-zero exit status."""
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = cli.main(["--home", str(self.home), *argv])
        if code != 0:
            raise RuntimeError(f"quil-coord {' '.join(argv)} exited with {code}: {out.getvalue()[-2000:]}")
        return out.getvalue()

    def timed(self, *argv: str) -> float:
        """Run quil-coord as its own process, as a person would, and return its wall-clock seconds."""
        command = [sys.executable, "-m", "quil_cluster.coordinator", "--home", str(self.home), *argv]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=self.root)
        elapsed = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"quil-coord {' '.join(argv)} exited with {done.returncode}: "
                               f"{(done.stdout + done.stderr)[-2000:]}")
        return elapsed

    def set_workers(self, workers: int) -> None:
        """Give every host `workers` workers and record the new assignment (cores are appended)."""
        for name in self.names:
            self.coord("host", "set", name, "--workers", str(workers))
        self.coord("assign")
        self.workers = workers

    def worker_targets(self) -> list[tuple[str, int]]:
        return [(a, self.base_port + w) for a in self.addresses for w in range(self.workers)]


def bring_up(root: Path, count: int, workers: int, binary: Path, reaper: Reaper, max_workers: int,
             mode: str = "auto") -> Fleet:
    """Create a fleet, start its agents, apply once and wait until every worker listens."""
    fleet = Fleet(root, count, workers, binary, reaper, mode=mode)
    started = time.monotonic()
    fleet.create(max_workers)
    fleet.start_agents()
    fleet.coord("assign")
    fleet.coord("apply", "--no-verify")
    wait_listening(fleet.worker_targets())
    log(f"fleet of {count} hosts x {workers} workers up in {time.monotonic() - started:.0f} s ({fleet.mode} mode)")
    return fleet
