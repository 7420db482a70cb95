"""Audit log lines, token redaction, concurrent appends and the failure limiter with a fake clock."""

from __future__ import annotations

import json
import logging
import multiprocessing
import stat
from pathlib import Path

import pytest

from quil_cluster.common.errors import StateError
from quil_cluster.coordinator import audit, tokens
from quil_cluster.coordinator.audit import FailureLimiter
from quil_cluster.coordinator.home import Home

NOW = 1_767_225_600.0


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return Home(tmp_path / "home")


def _lines(home: Home) -> list[dict]:
    return [json.loads(line) for line in home.file("audit.log").read_text().splitlines()]


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- record -------------------------------------------------------------------


def test_record_writes_one_json_line(home):
    audit.record(
        home, "join", source="192.0.2.7", outcome="rejected", now=NOW, reason="expired", token_id="3f9a0c1e"
    )

    raw = home.file("audit.log").read_text()
    assert raw.count("\n") == 1
    assert raw.endswith("\n")
    [entry] = _lines(home)
    assert list(entry.items()) == [
        ("ts", NOW),
        ("event", "join"),
        ("source", "192.0.2.7"),
        ("outcome", "rejected"),
        ("reason", "expired"),
        ("token_id", "3f9a0c1e"),
    ]


def test_record_appends_in_order(home):
    audit.record(home, "token_create", source="cli", outcome="ok", now=NOW, token_id="00000001")
    audit.record(home, "join", source="192.0.2.7", outcome="accepted", now=NOW + 1, token_id="00000001")

    entries = _lines(home)

    assert [(e["ts"], e["event"], e["outcome"]) for e in entries] == [
        (NOW, "token_create", "ok"),
        (NOW + 1, "join", "accepted"),
    ]


def test_record_default_ts_is_wall_clock(home, monkeypatch):
    monkeypatch.setattr(audit.time, "time", lambda: 1234.5)

    audit.record(home, "join", source="192.0.2.7", outcome="accepted")

    assert _lines(home)[0]["ts"] == 1234.5


def test_record_file_mode_0600(home):
    audit.record(home, "join", source="192.0.2.7", outcome="accepted", now=NOW)

    assert stat.S_IMODE(home.file("audit.log").stat().st_mode) == 0o600


def test_record_narrows_wide_existing_file(home):
    home.path.mkdir()
    home.file("audit.log").write_text("")
    home.file("audit.log").chmod(0o644)

    audit.record(home, "join", source="192.0.2.7", outcome="accepted", now=NOW)

    assert stat.S_IMODE(home.file("audit.log").stat().st_mode) == 0o600
    assert len(_lines(home)) == 1


def test_record_non_json_value_as_str(home):
    audit.record(home, "join", source="192.0.2.7", outcome="accepted", now=NOW, path=Path("/tmp/x"))

    assert _lines(home)[0]["path"] == "/tmp/x"


def test_record_rejects_ts_field(home):
    with pytest.raises(TypeError) as caught:
        audit.record(home, "join", source="192.0.2.7", outcome="accepted", ts=1.0)

    assert str(caught.value) == "record() sets ts itself; pass now= to choose the time"
    assert not home.file("audit.log").exists()


def test_record_unwritable_raises_state_error(tmp_path):
    not_a_directory = tmp_path / "home"
    not_a_directory.write_text("")
    home = Home(not_a_directory)

    with pytest.raises(StateError) as caught:
        audit.record(home, "join", source="192.0.2.7", outcome="accepted", now=NOW)

    assert str(caught.value).startswith(f"{home.file('audit.log')}: cannot write the audit log (")


def test_record_redacts_token_text(home, caplog):
    token_text, record = tokens.create(home, now=NOW)
    secret = token_text.split(".", 1)[1]

    with caplog.at_level(logging.WARNING, logger=audit.__name__):
        audit.record(
            home,
            "join",
            source=token_text,
            outcome="rejected",
            now=NOW,
            token=token_text,
            message=f"bad token {token_text} from host",
            nested={"inner": [token_text]},
            token_id=record.id,
            note="qct_without_dot",
        )

    assert secret.encode() not in home.file("audit.log").read_bytes()
    [entry] = _lines(home)
    assert entry["source"] == "[redacted]"
    assert entry["token"] == "[redacted]"
    assert entry["message"] == "[redacted]"
    assert entry["nested"] == {"inner": ["[redacted]"]}
    assert entry["token_id"] == record.id
    assert entry["note"] == "qct_without_dot"
    assert [r.getMessage() for r in caplog.records] == [
        "audit field source looked like token text and was redacted",
        "audit field token looked like token text and was redacted",
        "audit field message looked like token text and was redacted",
        "audit field inner looked like token text and was redacted",
    ]


def test_record_redacts_token_in_str_of_object(home):
    class Carrier:
        def __str__(self) -> str:
            return "qct_0123abcd.secretpart"

    audit.record(home, "join", source="192.0.2.7", outcome="rejected", now=NOW, carrier=Carrier())

    assert b"secretpart" not in home.file("audit.log").read_bytes()
    assert _lines(home)[0]["carrier"] == "[redacted]"


def test_record_8_processes_lines_intact(home):
    # Lines of about 8 KB, so a writer that split a line into several writes would
    # interleave with the others and break the JSON.
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(8)
    padding = "x" * 8000
    with context.Pool(8, initializer=barrier.wait) as pool:
        pending = [
            pool.apply_async(
                audit.record,
                (home, "join"),
                {"source": f"192.0.2.{i % 8}", "outcome": "rejected", "seq": i, "pad": padding},
            )
            for i in range(400)
        ]
        for result in pending:
            result.get(timeout=120)
        pool.close()
        pool.join()

    entries = _lines(home)

    assert len(entries) == 400
    assert sorted(e["seq"] for e in entries) == list(range(400))
    assert {e["pad"] for e in entries} == {padding}


# -- FailureLimiter -------------------------------------------------------------


def test_limiter_rejects_after_max_failures():
    clock = FakeClock()
    limiter = FailureLimiter(max_failures=5, window_seconds=60.0, clock=clock)

    allowed = []
    for _ in range(5):
        allowed.append(limiter.allowed("192.0.2.7"))
        limiter.failed("192.0.2.7")

    assert allowed == [True] * 5
    assert limiter.allowed("192.0.2.7") is False
    assert limiter.allowed("192.0.2.8") is True


def test_limiter_window_slides():
    clock = FakeClock(0.0)
    limiter = FailureLimiter(max_failures=5, window_seconds=60.0, clock=clock)
    for second in range(5):
        clock.now = float(second)
        limiter.failed("192.0.2.7")

    clock.now = 59.999
    blocked_before = limiter.allowed("192.0.2.7")
    clock.now = 60.0
    allowed_at_window = limiter.allowed("192.0.2.7")
    limiter.failed("192.0.2.7")
    blocked_again = limiter.allowed("192.0.2.7")

    assert blocked_before is False
    assert allowed_at_window is True
    assert blocked_again is False


def test_limiter_retry_after():
    clock = FakeClock(0.0)
    limiter = FailureLimiter(max_failures=5, window_seconds=60.0, clock=clock)
    for second in range(10):
        clock.now = float(second)
        limiter.failed("192.0.2.7")

    # Only the newest 5 failures (at 5 s to 9 s) count, so the oldest leaves at 65 s.
    assert limiter.retry_after("192.0.2.7") == 56.0
    clock.now = 65.0
    assert limiter.retry_after("192.0.2.7") == 0.0
    assert limiter.allowed("192.0.2.7") is True
    assert limiter.retry_after("192.0.2.8") == 0.0


def test_limiter_drops_idle_source():
    clock = FakeClock(0.0)
    limiter = FailureLimiter(max_failures=5, window_seconds=60.0, clock=clock)
    limiter.failed("192.0.2.7")

    clock.now = 60.0
    allowed = limiter.allowed("192.0.2.7")

    assert allowed is True
    assert limiter.tracked_sources() == 0


def test_limiter_bounded_to_10000_sources():
    limiter = FailureLimiter(max_failures=1, window_seconds=60.0, clock=FakeClock())
    limiter.failed("source-0")
    limiter.failed("source-1")

    for i in range(2, 10001):
        limiter.failed(f"source-{i}")

    assert limiter.tracked_sources() == 10000
    assert limiter.allowed("source-0") is True
    assert limiter.allowed("source-1") is False
    assert limiter.allowed("source-10000") is False


def test_limiter_evicts_least_recent_failure():
    limiter = FailureLimiter(max_failures=1, window_seconds=60.0, clock=FakeClock(), max_sources=3)
    for source in ("a", "b", "c", "a", "d"):
        limiter.failed(source)

    assert limiter.tracked_sources() == 3
    assert limiter.allowed("b") is True
    assert limiter.allowed("a") is False
    assert limiter.allowed("c") is False
    assert limiter.allowed("d") is False


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"max_failures": 0}, "max_failures must be at least 1, not 0"),
        ({"window_seconds": 0.0}, "window_seconds must be above 0, not 0.0"),
        ({"window_seconds": float("nan")}, "window_seconds must be above 0, not nan"),
        ({"max_sources": 0}, "max_sources must be at least 1, not 0"),
    ],
)
def test_limiter_rejects_bad_settings(arguments, message):
    with pytest.raises(ValueError) as caught:
        FailureLimiter(**arguments)

    assert str(caught.value) == message
