"""A short soak of one agent: 40 workers, 150 kill -9 restarts, 4 threads calling GetStatus over mutual TLS.

bench/soak.py runs the long version. The numbers are printed (pytest -s).
"""

from __future__ import annotations

import pytest
from soak_harness import run_soak

pytestmark = pytest.mark.soak

WORKERS = 40
CYCLES = 150
STATUS_THREADS = 4
# Bound on the whole run; it fails with a timeout message past this, so a deadlock cannot hang the suite.
DEADLINE_SECONDS = 120.0
# Generous bounds: descriptors may differ by a few gRPC internals, memory by allocator caching.
MAX_FD_DELTA = 8
MAX_RSS_GROWTH = 64 * 2**20


def test_soak_short(tmp_path):
    result = run_soak(tmp_path, WORKERS, CYCLES, STATUS_THREADS, DEADLINE_SECONDS)
    print("\n" + "\n".join(result.lines()))
    assert result.kills == CYCLES
    # Each kill of a running worker is one restart, and nothing else restarted a worker.
    assert result.restarts == CYCLES
    assert result.status_errors == []
    assert result.status_calls > 0
    assert abs(result.end.fds - result.start.fds) <= MAX_FD_DELTA
    assert result.end.rss_bytes - result.start.rss_bytes <= MAX_RSS_GROWTH
