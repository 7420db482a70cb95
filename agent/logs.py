"""Read a supervised process's log file for ReadLog: its last lines, then new data as it is written.

The file is the one the supervisor writes for the core: control.log or
worker-N.log in the agent's log directory. Its path is built from the core
number alone. Every stream is bounded: chunks of at most MAX_CHUNK_BYTES, an
initial tail of at most MAX_TAIL_BYTES, and MAX_RATE_BYTES per second. When
the process writes faster than that, the stream skips ahead to the newest
data and marks the next chunk truncated.

Following survives both kinds of rotation the supervisor does: a live log is
copied to NAME.1 and truncated in place, and a log of a stopped process is
renamed to NAME.1 before the next spawn.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

# Size bound of one LogChunk message.
MAX_CHUNK_BYTES = 64 * 1024
# Bytes of the initial tail at most, however many lines were requested.
MAX_TAIL_BYTES = 1024 * 1024
# Bytes per second one stream sends at most; also its burst.
MAX_RATE_BYTES = 1024 * 1024
# Lines of the initial tail: requests are clamped to MAX_LINES, and 0 means DEFAULT_LINES.
MAX_LINES = 10_000
DEFAULT_LINES = 100
# Log streams open at once on one agent; each keeps an RPC thread busy.
MAX_STREAMS = 4
# A follow stream ends after this many seconds even when the call has no deadline.
MAX_FOLLOW_SECONDS = 3600.0
# Seconds between checks for new data while following.
FOLLOW_POLL_SECONDS = 0.2


@dataclass(frozen=True)
class Chunk:
    data: bytes
    # Set on the first chunk after data was skipped to stay within a bound.
    truncated: bool = False


def log_file(log_dir: Path, core: int) -> Path:
    """Return the log file the supervisor writes for core."""
    return log_dir / ("control.log" if core == 0 else f"worker-{core}.log")


def clamp_lines(lines: int) -> int:
    return DEFAULT_LINES if lines == 0 else min(lines, MAX_LINES)


class RateBudget:
    """A token bucket: `rate` bytes per second, at most `rate` bytes saved up."""

    def __init__(self, rate: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate
        self._clock = clock
        self._tokens = float(rate)
        self._last = clock()

    def available(self) -> int:
        now = self._clock()
        self._tokens = min(float(self._rate), self._tokens + (now - self._last) * self._rate)
        self._last = now
        return int(self._tokens)

    def spend(self, count: int) -> None:
        self._tokens -= count


def stream(path: Path, lines: int, follow: bool, keep_going: Callable[[], bool],
           clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep
           ) -> Iterator[Chunk]:
    """Yield the last `lines` lines of path, then, with follow, new data until keep_going() is false."""
    budget = RateBudget(MAX_RATE_BYTES, clock)
    reader = LogReader(path)
    try:
        data, truncated = reader.tail(lines)
        budget.spend(len(data))
        yield from _chunks(data, truncated)
        while follow and keep_going():
            allowed = budget.available()
            data, truncated = reader.read_new(allowed) if allowed > 0 else (b"", False)
            budget.spend(len(data))
            yield from _chunks(data, truncated)
            if not data:
                sleep(FOLLOW_POLL_SECONDS)
    finally:
        reader.close()


def _chunks(data: bytes, truncated: bool) -> Iterator[Chunk]:
    for start in range(0, len(data), MAX_CHUNK_BYTES):
        yield Chunk(data[start:start + MAX_CHUNK_BYTES], truncated and start == 0)
    if truncated and not data:
        yield Chunk(b"", True)


class LogReader:
    """An open log file and the offset up to which it was sent."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: BinaryIO | None = None
        self._offset = 0
        # mtime of the live file when it was last read, to recognize the rotated copy made after it.
        self._mtime_ns = 0

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def tail(self, lines: int) -> tuple[bytes, bool]:
        """Return the last `lines` lines (at most MAX_TAIL_BYTES) and whether that bound cut them."""
        if not self._open():
            return b"", False
        assert self._handle is not None
        stat = os.fstat(self._handle.fileno())
        start = max(0, stat.st_size - MAX_TAIL_BYTES)
        self._handle.seek(start)
        window = self._handle.read(stat.st_size - start)
        self._offset, self._mtime_ns = start + len(window), stat.st_mtime_ns
        first = _start_of_last_lines(window, lines)
        if first is None:
            # Fewer newlines than lines: all of the window, which misses the file's start when it was cut.
            return window, start > 0
        return window[first:], False

    def read_new(self, limit: int) -> tuple[bytes, bool]:
        """Return data written since the last read, at most limit bytes, and whether older new data was skipped."""
        segments = self._pending_segments()
        total = sum(end - begin for _, begin, end in segments)
        skip = max(0, total - limit)
        parts = []
        for handle, begin, end in segments:
            dropped = min(skip, end - begin)
            begin, skip = begin + dropped, skip - dropped
            if end > begin:
                handle.seek(begin)
                parts.append(handle.read(end - begin))
        for handle, _, _ in segments:
            if handle is not self._handle:
                handle.close()
        data = b"".join(parts)
        if total <= limit:
            return data, False
        # Start at a line boundary when the kept part has one, so no half line leads the chunk.
        newline = data.find(b"\n")
        return (data[newline + 1:] if 0 <= newline < len(data) - 1 else data), True

    def _open(self) -> bool:
        try:
            self._handle = open(self.path, "rb")
        except FileNotFoundError:
            return False
        self._offset = 0
        return True

    def _pending_segments(self) -> list[tuple[BinaryIO, int, int]]:
        """Return (file, start, end) ranges of unsent data in order, and move the offset past them."""
        if self._handle is None:
            return self._fresh_file()
        current = os.fstat(self._handle.fileno())
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            named = None
        if named is None or named.st_ino != current.st_ino:
            # Renamed away before a spawn: finish the old file, then go on with the new one.
            segments = [(self._handle, self._offset, current.st_size)] if current.st_size > self._offset else []
            self._handle = None
            return segments + self._fresh_file()
        # NOTE: a file truncated and then grown past the offset between two checks looks unchanged,
        # so its data before the offset is never sent. The supervisor rotates at most every 10 s.
        if current.st_size < self._offset:
            segments = self._rotated_copy()
            self._offset = 0
        else:
            segments = []
        segments.append((self._handle, self._offset, current.st_size))
        self._offset, self._mtime_ns = current.st_size, current.st_mtime_ns
        return segments

    def _fresh_file(self) -> list[tuple[BinaryIO, int, int]]:
        if not self._open():
            return []
        assert self._handle is not None
        stat = os.fstat(self._handle.fileno())
        self._offset, self._mtime_ns = stat.st_size, stat.st_mtime_ns
        return [(self._handle, 0, stat.st_size)]

    def _rotated_copy(self) -> list[tuple[BinaryIO, int, int]]:
        """Return the rest of the truncated file from its copy NAME.1, when that copy was made after the last read.

        NOTE: a file truncated by anyone but the supervisor has no such copy; its unsent end is lost.
        """
        copy = self.path.with_name(self.path.name + ".1")
        try:
            handle = open(copy, "rb")
        except FileNotFoundError:
            return []
        stat = os.fstat(handle.fileno())
        if stat.st_size <= self._offset or stat.st_mtime_ns < self._mtime_ns:
            handle.close()
            return []
        return [(handle, self._offset, stat.st_size)]


def _start_of_last_lines(window: bytes, lines: int) -> int | None:
    """Return the index where the last `lines` lines of window begin, or None if window contains fewer lines.

    A final line without a newline counts as a line.
    """
    position = len(window) - 1 if window.endswith(b"\n") else len(window)
    for _ in range(lines):
        newline = window.rfind(b"\n", 0, position)
        if newline < 0:
            return None
        position = newline
    return position + 1
