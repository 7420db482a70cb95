"""Terminal output of quil-coord: rich tables, live status and per-host progress on a terminal.

A stream gets rich output only when it is a terminal and TERM is not "dumb";
anything else (a pipe, a file, TERM=dumb) gets the plain text of output.py,
which scripts and tests parse. NO_COLOR keeps the tables and the live
display but drops colour (rich reads the variable itself). rich is imported
only on the rich path, so piped runs and --help do not load it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import IO, Callable, Iterator

from .output import Listing

# Cell texts that get a colour in rich tables; every other cell is left unstyled.
CELL_STYLES = {
    "running": "green", "starting": "cyan", "changed": "green", "unchanged": "dim", "open": "green",
    "backoff": "yellow", "stopping": "yellow", "missing": "yellow", "refused": "cyan", "filtered": "cyan",
    "stopped": "dim", "exited": "red", "fatal": "bold red", "unreachable": "bold red",
    "FAILED": "bold red", "UNREACHABLE": "bold red", "SKIPPED": "yellow", "failed": "bold red",
    "skipped": "yellow",
}
# Progress steps that end a host's run; the rest show a spinner.
FINAL_STEPS = frozenset({"changed", "unchanged", "failed", "unreachable", "skipped", "done"})

Progress = Callable[[str, str], None]


def is_rich(stream: IO[str]) -> bool:
    """Return whether stream is a terminal that can take tables, colour and cursor movement."""
    if os.environ.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty())


def console(stream: IO[str]):
    from rich.console import Console

    # highlight=False: rich would colour numbers and addresses in every cell by guesswork.
    return Console(file=stream, highlight=False)


def show(listing: Listing, stream: IO[str] | None = None) -> None:
    """Print a listing: a bordered table on a terminal, output.py's plain text anywhere else."""
    stream = stream or sys.stdout
    if not is_rich(stream):
        print(listing.plain(), file=stream)
        return
    console(stream).print(render(listing))


def render(listing: Listing):
    """Return the rich renderable of a listing: its lines before, the table, its lines after."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts: list[object] = [Text(line) for line in listing.before]
    if listing.headers:
        table = Table(*listing.headers, header_style="bold")
        for row in listing.rows:
            table.add_row(*(_cell(value) for value in row))
        parts.append(table)
    parts += [Text(line, style=_line_style(line)) for line in listing.after]
    return Group(*parts)


def _cell(value: object):
    from rich.text import Text

    text = "-" if value is None else str(value)
    # verify marks a cell that differs from the policy with a trailing "!".
    return Text(text, style="bold red" if text.endswith("!") else CELL_STYLES.get(text, ""))


def _line_style(line: str) -> str:
    if line.startswith(("violation:", "error:")):
        return "red"
    return "yellow" if line.startswith("warning:") or ": warning:" in line else ""


@contextmanager
def host_progress(title: str, stream: IO[str] | None = None) -> Iterator[Progress | None]:
    """Yield a progress(host, step) callback that shows each host's step live, or None off a terminal.

    The display goes to stderr, so it also shows when stdout is piped or is
    JSON, and it disappears when the run ends, leaving the result alone.
    """
    stream = stream or sys.stderr
    if not is_rich(stream):
        yield None
        return
    board = _ProgressBoard(title, stream)
    try:
        yield board.update
    finally:
        board.close()


class _ProgressBoard:
    """Each host's current step and how long it has taken, redrawn by a rich Live from any thread."""

    def __init__(self, title: str, stream: IO[str]) -> None:
        self.title = title
        self.stream = stream
        self.steps: dict[str, tuple[str, float]] = {}
        # Two locks because rendering reads the steps: stopping the display renders a last
        # frame, which must not wait for a lock that the stopping thread holds.
        self.steps_lock = threading.Lock()
        self.live_lock = threading.Lock()
        self.live = None

    def update(self, host: str, step: str) -> None:
        with self.steps_lock:
            self.steps[host] = (step, time.monotonic())
        # The display starts on the first step, not before, so a question that the
        # command prints before any host work (apply's move confirmation) is not redrawn over.
        with self.live_lock:
            if self.live is None:
                from rich.live import Live

                self.live = Live(self, console=console(self.stream), transient=True, refresh_per_second=8)
                self.live.start()

    def close(self) -> None:
        with self.live_lock:
            if self.live is not None:
                self.live.stop()

    def __rich__(self):
        from rich.spinner import Spinner
        from rich.table import Table
        from rich.text import Text

        now = time.monotonic()
        table = Table(title=self.title, title_justify="left", show_edge=False, box=None, pad_edge=False)
        for column in ("", "HOST", "STEP", "SECONDS"):
            table.add_column(column)
        with self.steps_lock:
            steps = sorted(self.steps.items())
        for host, (step, since) in steps:
            mark = Text("done", style="green") if step in FINAL_STEPS else Spinner("dots")
            table.add_row(mark, host, _cell(step), f"{now - since:.1f}")
        return table


@contextmanager
def live_view(stream: IO[str] | None = None) -> Iterator[Callable[[object], None]]:
    """Yield update(renderable) for a display redrawn in place; only called on a terminal."""
    from rich.live import Live

    with Live(console=console(stream or sys.stdout), auto_refresh=False) as live:
        yield lambda renderable: live.update(renderable, refresh=True)
