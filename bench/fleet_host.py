"""Host many real agents in one process: one gRPC server, supervisor and state directory each.

Run: python bench/fleet_host.py AGENT_YAML...

Each agent is what `quil-agent run` builds (build_server), so the API, mutual
TLS, the supervisor and the worker processes are real; only the Python
process is shared. Prints "ready N" on stdout once every server listens, and
stops every agent and its workers on SIGTERM or SIGINT.
"""

from __future__ import annotations

import logging
import resource
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path

from quil_cluster.agent import config as agent_config
from quil_cluster.agent.service import build_server


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    # Each worker holds a pidfd in its agent; many agents in one process need more than 1024.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with futures.ThreadPoolExecutor(8) as pool:
        agents = list(pool.map(lambda path: build_server(agent_config.load(Path(path))), argv))
    print(f"ready {len(agents)}", flush=True)
    stop.wait()
    with futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda agent: agent.stop(stop_processes=True), agents))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
