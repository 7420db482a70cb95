"""Soak one agent: many stand-in workers, SIGKILL restarts, concurrent GetStatus calls over mutual TLS.

Run: python bench/soak.py [--workers 200] [--cycles 1000] [--status-threads 4]

The agent runs inside this process (its descriptors, memory and threads are
this process's). Workers listen on 127.0.0.5. Prints the times, the kill
and restart counts, and descriptors, RSS and threads at the start and the
end, then one JSON line. Exits 1 if a worker did not come back, a status
call failed, or the restarts counted differ from the kills.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from soak_harness import run_soak  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=200, help="stand-in workers on the agent (default 200)")
    parser.add_argument("--cycles", type=int, default=1000, help="SIGKILLs of running workers (default 1000)")
    parser.add_argument("--status-threads", type=int, default=4, help="threads calling GetStatus (default 4)")
    parser.add_argument("--deadline", type=float, default=1800.0, help="seconds before the run fails (default 1800)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="quil-soak-") as tmp:
        result = run_soak(Path(tmp), args.workers, args.cycles, args.status_threads, args.deadline)
    print("\n".join(result.lines()))
    print(json.dumps(asdict(result)))
    healthy = not result.status_errors and result.restarts == result.kills == args.cycles
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
