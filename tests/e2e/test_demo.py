"""quil-coord demo --keep: SIGTERM, as a service manager or `timeout` sends it, stops everything the demo started."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil
import pytest

pytestmark = pytest.mark.e2e


def test_sigterm_stops_kept_demo_and_its_processes(tmp_path):
    demo = subprocess.Popen([sys.executable, "-m", "quil_cluster.coordinator", "demo", "--keep", "--dir",
                             str(tmp_path / "demo")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in demo.stdout:
            lines.append(line)
            if line.startswith("cluster running"):
                break
        assert lines[-1].startswith("cluster running"), "".join(lines)
        started = psutil.Process(demo.pid).children(recursive=True)
        agents = [p for p in started if "quil_cluster.agent" in " ".join(p.cmdline())]
        assert len(agents) == 3
        demo.send_signal(signal.SIGTERM)
        rest = demo.stdout.read()
        assert demo.wait(60) == 0
        assert rest.rstrip().endswith("demo stopped")
        gone, alive = psutil.wait_procs(started, timeout=30)
        assert [p.pid for p in alive] == []
        assert len(gone) == len(started)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(10)
        demo.stdout.close()
