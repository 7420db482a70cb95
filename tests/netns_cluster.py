"""A quil-cluster on a namespace bed: one agent per namespace, the coordinator run inside ctl."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from helpers import DATA
from netbed import NetBed

from quil_cluster.coordinator.cli import main as coord_main
from quil_cluster.simnode import write_wrapper

AGENT_PORT = 7350


class BedCluster:
    def __init__(self, bed: NetBed, root: Path, generation: str = "1.4") -> None:
        self.bed = bed
        self.root = root
        self.home = root / "coord"
        self.generation = generation
        version = {"1.4": "1.4.21", "2.0": "2.0.6", "2.1": "2.1.0.25"}[generation]
        self.node_binary = write_wrapper(root / "bin", version)

    def init(self, *extra: str) -> None:
        name = "config-2.1.0.25.yml" if self.generation == "2.1" else "config-1.4.21.yml"
        control = self.root / name
        control.write_bytes((DATA / name).read_bytes())
        (self.root / "keys.yml").write_bytes((DATA / "keys.yml").read_bytes())
        assert self.local("init", "--control-config", str(control), "--generation", self.generation, *extra) == 0

    def local(self, *argv: str) -> int:
        """Run a quil-coord command that touches only files, in this process."""
        return coord_main(["--home", str(self.home), *argv])

    def add(self, name: str, *options: str) -> None:
        address = self.bed.host(name).address
        code = self.local("host", "add", name, "--address", address, "--agent", f"{address}:{AGENT_PORT}",
                          "--node-binary", str(self.node_binary),
                          "--node-config-dir", str(self.root / "nodes" / name / ".config"),
                          "--state-dir", str(self.root / "hosts" / name / "state"),
                          "--bundle", str(self.root / "hosts" / name), *options)
        assert code == 0

    def start_agent(self, name: str, config: Path | None = None) -> None:
        config = config or self.root / "hosts" / name / "agent.yaml"
        log = open(self.root / f"agent-{name}.log", "ab")
        with log:
            self.bed.popen(name, [sys.executable, "-m", "quil_cluster.agent", "run", "--config", str(config)],
                           stdout=log, stderr=subprocess.STDOUT, cwd=self.root)
        self.wait_open("ctl", self.bed.host(name).address, AGENT_PORT)

    def wait_open(self, source: str, address: str, port: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.bed.connect(source, address, port, timeout=0.5) != "open":
            assert time.monotonic() < deadline, f"{address}:{port} never opened from {source}"
            time.sleep(0.1)

    def coord(self, *argv: str) -> subprocess.CompletedProcess:
        """Run quil-coord inside the control host's namespace, as on the real control machine."""
        command = [sys.executable, "-m", "quil_cluster.coordinator", "--home", str(self.home), *argv]
        return self.bed.run("ctl", command, cwd=self.root, timeout=120)

    def coord_json(self, *argv: str) -> tuple[int, dict]:
        result = self.coord(*argv, "--json")
        return result.returncode, json.loads(result.stdout)
