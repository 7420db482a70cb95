"""Time to start N stand-in workers until all listen: quil-agent against the guide's shell loop.

Run: python bench/start_workers.py [--workers 64] [--runs 3]

Both sides start the same stand-in node (quil-simnode) with the same
config.yml on 127.0.0.6, and the clock stops when every worker port accepts
TCP connections. The shell loop is the node runners' guide's way of
starting workers by hand: `node --core $i --parent-process $$ &` in a loop.
Prints one table row per side (median of the runs) and the ratio.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from agent_harness import node_wrapper, write_agent_files  # noqa: E402
from helpers import DATA, free_port_range  # noqa: E402

from quil_cluster.agent import config as agent_config  # noqa: E402
from quil_cluster.agent.service import build_server  # noqa: E402
from quil_cluster.common import nodeconfig, pki, tls  # noqa: E402
from quil_cluster.proto import agent_pb2 as pb  # noqa: E402
from quil_cluster.proto import agent_pb2_grpc as pb_grpc  # noqa: E402

ADDRESS = "127.0.0.5"


def wait_listening(ports: list[int], timeout: float = 120.0) -> None:
    pending = set(ports)
    deadline = time.monotonic() + timeout
    while pending:
        for port in list(pending):
            with socket.socket() as probe:
                probe.settimeout(0.2)
                if probe.connect_ex((ADDRESS, port)) == 0:
                    pending.discard(port)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(pending)} workers never listened")


def write_node_config(directory: Path, ports: list[int]) -> Path:
    config_dir = directory / ".config"
    config_dir.mkdir(parents=True, exist_ok=True)
    base = nodeconfig.load((DATA / "config-1.4.21.yml").read_text())
    entries = [f"/ip4/{ADDRESS}/tcp/{p}" for p in ports]
    (config_dir / "config.yml").write_text(nodeconfig.render(base, "1.4", entries))
    return config_dir


def run_shell_loop(work: Path, ports: list[int]) -> float:
    binary = node_wrapper(work)
    config_dir = write_node_config(work / "shell", ports)
    script = (f'for i in $(seq 1 {len(ports)}); do "{binary}" --config "{config_dir}" --core $i '
              f'--parent-process $$ >/dev/null 2>&1 & done; wait')
    started = time.perf_counter()
    shell = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    wait_listening(ports)
    elapsed = time.perf_counter() - started
    os.killpg(shell.pid, signal.SIGTERM)
    shell.wait(30)
    return elapsed


def run_agent(work: Path, ports: list[int]) -> float:
    ca_key, ca_cert = pki.create_ca("test")
    agent_port = free_port_range([ADDRESS], 1, start=47000)
    config = agent_config.load(write_agent_files(work / "agent", ca_key, ca_cert, agent_port))
    agent = build_server(config)
    try:
        key, cert = pki.issue(ca_key, ca_cert, pki.Identity("test", "coordinator", "bench"))
        stub = pb_grpc.AgentStub(tls.secure_channel(f"{ADDRESS}:{agent.port}",
                                                    tls.channel_credentials(key, cert, ca_cert)))
        text = (write_node_config(work / "rendered", ports) / "config.yml").read_bytes()
        request = pb.ApplyRequest(config_yaml=text, config_sha256=hashlib.sha256(text).hexdigest(),
                                  config_generation=1, node_generation=pb.NODE_GENERATION_1_4,
                                  cores=list(range(1, len(ports) + 1)))
        started = time.perf_counter()
        stub.Apply(request, timeout=120)
        wait_listening(ports)
        return time.perf_counter() - started
    finally:
        agent.stop(stop_processes=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    results: dict[str, list[float]] = {"quil-agent": [], "shell loop": []}
    for run in range(args.runs):
        first = free_port_range([ADDRESS], args.workers, start=42000)
        ports = list(range(first, first + args.workers))
        with tempfile.TemporaryDirectory() as tmp:
            results["shell loop"].append(run_shell_loop(Path(tmp), ports))
        time.sleep(1.5)  # let the shell loop's workers notice their parent is gone
        with tempfile.TemporaryDirectory() as tmp:
            results["quil-agent"].append(run_agent(Path(tmp), ports))
    ours, peer = (statistics.median(results[k]) for k in ("quil-agent", "shell loop"))
    print(f"start {args.workers} workers until all listen ({args.runs} runs, median seconds)")
    print(f"{'side':<12} {'median':>8}  runs")
    for side, times in results.items():
        print(f"{side:<12} {statistics.median(times):8.3f}  {', '.join(f'{t:.3f}' for t in times)}")
    print(f"ratio quil-agent / shell loop: {ours / peer:.2f}")
    print(json.dumps({"workers": args.workers, "runs": results, "ratio": ours / peer}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
