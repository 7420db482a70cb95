"""The enrollment audit log and the per-source limit on failed join attempts.

``audit.log`` in the state directory has one JSON object per line, for example
``{"ts": 1767225600.0, "event": "join", "source": "192.0.2.7", "outcome": "rejected",
"reason": "expired", "token_id": "3f9a0c1e"}``. Callers pass a token's public id, never
its text, and record() replaces any value that looks like token text.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from ..common.errors import StateError

if TYPE_CHECKING:
    from .home import Home

log = logging.getLogger(__name__)

LOG_NAME = "audit.log"
# Replaces a field value that looks like token text.
REDACTED = "[redacted]"
# Failed join attempts one source may make within the window before it is rejected.
DEFAULT_MAX_FAILURES = 5
DEFAULT_WINDOW_SECONDS = 60.0
# Maximum number of sources the limiter tracks. A flood from many addresses evicts the oldest.
DEFAULT_MAX_SOURCES = 10000

# Token text is qct_<id>.<secret>, so a value that contains this pattern may contain a secret.
_TOKEN_TEXT = re.compile(r"qct_\S*\.")


def record(home: Home, event: str, *, source: str, outcome: str, now: float | None = None, **fields: Any) -> None:
    """Append one event to the audit log as a JSON line.

    ``source`` is the peer the request came from and ``outcome`` what happened to it.
    Extra fields follow in the order given, and values that are not JSON types are
    written as str(). Raises StateError when the log cannot be written.
    """
    if "ts" in fields:
        raise TypeError("record() sets ts itself; pass now= to choose the time")
    entry: dict[str, Any] = {
        "ts": time.time() if now is None else now,
        "event": event,
        "source": source,
        "outcome": outcome,
        **fields,
    }
    line = json.dumps(_redact(entry), default=_to_json) + "\n"
    _append(home, line.encode())


def _redact(value: Any, key: str = "") -> Any:
    """Return value with every string that contains token text replaced by REDACTED."""
    if isinstance(value, str):
        if _TOKEN_TEXT.search(value):
            log.warning("audit field %s looked like token text and was redacted", key or "?")
            return REDACTED
        return value
    if isinstance(value, dict):
        return {k: _redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact(v, key) for v in value]
    return value


def _to_json(value: Any) -> str:
    # str() of an unknown type may contain token text too.
    return _redact(str(value))


def _append(home: Home, data: bytes) -> None:
    # One write() to an O_APPEND file. On a local Linux file system each write to a
    # regular file is appended as a whole, so lines from concurrent writers never
    # interleave. NFS gives no such guarantee.
    path = home.file(LOG_NAME)
    try:
        home.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            # The umask can only narrow the create mode; this also fixes a file made wider by hand.
            if os.fstat(fd).st_mode & 0o777 != 0o600:
                os.fchmod(fd, 0o600)
            written = os.write(fd, data)
            # NOTE: a short write happens when the disk or a quota fills. The rest is
            # written by a second call, and another writer's line can come between.
            if written < len(data):
                os.write(fd, data[written:])
        finally:
            os.close(fd)
    except OSError as err:
        raise StateError(f"{path}: cannot write the audit log ({err})") from err


class FailureLimiter:
    """Per-source failure counts in a sliding window, used to reject a source that has too many.

    Pass the peer's address without its port as the source, because each new connection
    has a new port. Safe to call from several threads.
    """

    def __init__(
        self,
        max_failures: int = DEFAULT_MAX_FAILURES,
        window_seconds: float = DEFAULT_WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        max_sources: int = DEFAULT_MAX_SOURCES,
    ) -> None:
        if max_failures < 1:
            raise ValueError(f"max_failures must be at least 1, not {max_failures}")
        if not window_seconds > 0:
            raise ValueError(f"window_seconds must be above 0, not {window_seconds}")
        if max_sources < 1:
            raise ValueError(f"max_sources must be at least 1, not {max_sources}")
        self.max_failures = max_failures
        self.window_seconds = window_seconds
        self.max_sources = max_sources
        self._clock = clock
        self._lock = threading.Lock()
        # Source -> times of its latest failures, oldest first. Only the newest
        # max_failures matter, so each deque is bounded to that length. The dict is
        # ordered by each source's latest failure, so the first entry is evicted first.
        self._failures: collections.OrderedDict[str, collections.deque[float]] = collections.OrderedDict()

    def allowed(self, source: str) -> bool:
        """Return False while the source has max_failures failures within the window."""
        with self._lock:
            return len(self._recent(source)) < self.max_failures

    def retry_after(self, source: str) -> float:
        """Return the seconds until allowed(source) becomes True again, or 0.0 if it is True."""
        with self._lock:
            times = self._recent(source)
            if len(times) < self.max_failures:
                return 0.0
            return times[0] + self.window_seconds - self._clock()

    def failed(self, source: str) -> None:
        """Count one failure of the source at the current clock time."""
        with self._lock:
            times = self._failures.pop(source, None)
            if times is None:
                times = collections.deque(maxlen=self.max_failures)
            times.append(self._clock())
            self._failures[source] = times
            while len(self._failures) > self.max_sources:
                self._failures.popitem(last=False)

    def tracked_sources(self) -> int:
        """Return how many sources have failures in memory, for tests and metrics."""
        with self._lock:
            return len(self._failures)

    def _recent(self, source: str) -> collections.deque[float]:
        # Drops failures that left the window and removes a source with none left.
        times = self._failures.get(source)
        if times is None:
            return collections.deque()
        cutoff = self._clock() - self.window_seconds
        while times and times[0] <= cutoff:
            times.popleft()
        if not times:
            del self._failures[source]
        return times
