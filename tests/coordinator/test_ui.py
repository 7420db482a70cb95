"""coordinator/ui.py: which streams get rich output, and what the tables and the progress board print."""

from __future__ import annotations

import io
import re

import pytest
from helpers import DATA

from quil_cluster.coordinator import ui
from quil_cluster.coordinator.apply import ApplyReport, HostResult
from quil_cluster.coordinator.cli import main
from quil_cluster.coordinator.output import Listing, apply_lines, apply_listing

COLOUR_SGR = re.compile(r"\x1b\[(?:[0-9;]*;)?(?:3[0-7]|9[0-7]|38;[25];[0-9;]+)m")
LISTING = Listing(("HOST", "STATE"), [("A", "running"), ("B", "fatal")], before=["first"], after=["last"])


class FakeTerminal(io.StringIO):
    """A text stream that reports being a terminal, as a tty would."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def colour_terminal(monkeypatch):
    monkeypatch.setenv("TERM", "xterm-256color")
    for name in ("NO_COLOR", "FORCE_COLOR", "COLUMNS"):
        monkeypatch.delenv(name, raising=False)


def test_is_rich_false_for_pipe():
    assert ui.is_rich(io.StringIO()) is False


def test_is_rich_true_for_terminal():
    assert ui.is_rich(FakeTerminal()) is True


def test_is_rich_false_for_dumb_terminal(monkeypatch):
    monkeypatch.setenv("TERM", "dumb")
    assert ui.is_rich(FakeTerminal()) is False


def test_show_prints_plain_text_to_pipe():
    stream = io.StringIO()
    ui.show(LISTING, stream)
    assert stream.getvalue() == "first\nHOST  STATE\nA     running\nB     fatal\nlast\n"


def test_show_prints_coloured_table_to_terminal():
    stream = FakeTerminal()
    ui.show(LISTING, stream)
    text = stream.getvalue()
    assert "┃ HOST ┃ STATE   ┃" in re.sub(r"\x1b\[[0-9;]*m", "", text)
    assert COLOUR_SGR.search(text)


def test_show_without_colour_under_no_color(monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    stream = FakeTerminal()
    ui.show(LISTING, stream)
    text = stream.getvalue()
    assert "┃ HOST ┃ STATE   ┃" in re.sub(r"\x1b\[[0-9;]*m", "", text)
    assert not COLOUR_SGR.search(text)


def test_apply_listing_plain_form_is_apply_lines():
    report = ApplyReport(3, "", [HostResult("A", "changed", config_changed=True, started=[1, 2]),
                                 HostResult("B", "unreachable", error="unavailable: connection refused")], 0.5)
    listing = apply_listing(report)
    assert listing.plain() == apply_lines(report)
    assert listing.plain().splitlines()[:2] == ["A: changed (config written; started 1,2)",
                                                "B: UNREACHABLE (unavailable: connection refused)"]
    assert listing.rows == [("A", "changed", "config written; started 1,2"),
                            ("B", "UNREACHABLE", "unavailable: connection refused")]


def test_host_progress_is_none_off_terminal():
    with ui.host_progress("apply", io.StringIO()) as progress:
        assert progress is None


def test_host_progress_draws_each_host_step():
    stream = FakeTerminal()
    with ui.host_progress("apply", stream) as progress:
        assert progress is not None
        progress("A", "applying")
        progress("B", "unreachable")
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", stream.getvalue())
    assert re.search(r"A\s+applying\s+\d+\.\d", text)
    assert re.search(r"done\s+B\s+unreachable", text)


def test_host_progress_draws_nothing_without_steps():
    stream = FakeTerminal()
    with ui.host_progress("apply", stream):
        pass
    assert stream.getvalue() == ""


@pytest.mark.parametrize("value, message", [
    ("abc", "invalid interval 'abc': give seconds, like 2 or 0.5"),
    ("0", "interval 0 is too short: give at least 0.5 s"),
    ("nan", "invalid interval 'nan': give seconds from 0.5 to 3600"),
    ("inf", "invalid interval 'inf': give seconds from 0.5 to 3600"),
    ("3601", "invalid interval '3601': give seconds from 0.5 to 3600"),
])
def test_watch_interval_rejected(tmp_path, capsys, value, message):
    with pytest.raises(SystemExit) as exited:
        main(["--home", str(tmp_path), "status", "--watch", "--interval", value])
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (f"error: argument --interval: {message}; "
                                                        "see quil-coord status --help")


def test_interval_without_watch_rejected(tmp_path, capsys):
    control = tmp_path / "config.yml"
    control.write_bytes((DATA / "config-1.4.21.yml").read_bytes())
    home = tmp_path / "coord"
    assert main(["--home", str(home), "init", "--control-config", str(control)]) == 0
    capsys.readouterr()
    assert main(["--home", str(home), "status", "--interval", "5"]) == 3
    assert capsys.readouterr().err == ("error: --interval sets the refresh of --watch; run quil-coord status "
                                       "--watch --interval 5, or drop --interval\n")
