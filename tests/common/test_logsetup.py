"""Log formats on stderr: text with or without journald, JSON, and the redaction backstop."""

from __future__ import annotations

import json
import logging
import os
import re

import pytest

from quil_cluster.common import logsetup

TOKEN = "qct_0123abcd.Zm9vYmFyYmF6cXV4cXV1eHh5enp5eHd2dXRzcnFwb25t"
KEY = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBx7\n-----END EC PRIVATE KEY-----"


@pytest.fixture
def stderr_file(tmp_path, monkeypatch):
    """A real file to log to (journald compares its inode), and the root logger restored afterwards."""
    path = tmp_path / "stderr"
    handle = open(path, "w+")
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield handle
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        handle.close()


def _journal(handle, monkeypatch) -> None:
    stat = os.fstat(handle.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino}")


def _lines(handle) -> list[str]:
    handle.flush()
    handle.seek(0)
    return handle.read().splitlines()


def test_text_without_journald_has_timestamp(stderr_file):
    logsetup.configure(stream=stderr_file)
    logging.getLogger("quil_cluster.test").warning("exited: worker core=%d", 3)
    [line] = _lines(stderr_file)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING quil_cluster.test: exited: worker core=3", line)


def test_text_under_journald_has_priority_prefix(stderr_file, monkeypatch):
    _journal(stderr_file, monkeypatch)
    logsetup.configure(logging.DEBUG, stream=stderr_file)
    log = logging.getLogger("quil_cluster.test")
    log.debug("detail")
    log.info("started")
    log.warning("retry")
    log.error("failed")
    log.critical("gone")
    assert _lines(stderr_file) == [
        "<7>DEBUG quil_cluster.test: detail", "<6>INFO quil_cluster.test: started",
        "<4>WARNING quil_cluster.test: retry", "<3>ERROR quil_cluster.test: failed",
        "<2>CRITICAL quil_cluster.test: gone",
    ]


def test_traceback_lines_each_get_priority(stderr_file, monkeypatch):
    _journal(stderr_file, monkeypatch)
    logsetup.configure(stream=stderr_file)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("quil_cluster.test").exception("unexpected")
    lines = _lines(stderr_file)
    assert lines[0] == "<3>ERROR quil_cluster.test: unexpected"
    assert lines[-1] == "<3>RuntimeError: boom"
    assert all(line.startswith("<3>") for line in lines)


def test_journal_stream_of_other_file_means_no_prefix(stderr_file, monkeypatch):
    monkeypatch.setenv("JOURNAL_STREAM", "8:1")
    logsetup.configure(stream=stderr_file)
    logging.getLogger("quil_cluster.test").info("started")
    assert _lines(stderr_file) == ["INFO quil_cluster.test: started"]


def test_json_lines(stderr_file):
    logsetup.configure(fmt="json", stream=stderr_file)
    logging.getLogger("quil_cluster.test").warning("exited: worker core=%d", 3)
    [line] = _lines(stderr_file)
    entry = json.loads(line)
    assert sorted(entry) == ["level", "logger", "msg", "ts"]
    assert (entry["level"], entry["logger"], entry["msg"]) == ("warning", "quil_cluster.test", "exited: worker core=3")


def test_json_under_journald_has_priority_prefix(stderr_file, monkeypatch):
    _journal(stderr_file, monkeypatch)
    logsetup.configure(fmt="json", stream=stderr_file)
    logging.getLogger("quil_cluster.test").error("failed")
    [line] = _lines(stderr_file)
    assert line.startswith("<3>{")
    assert json.loads(line[3:])["msg"] == "failed"


def test_json_exception_field(stderr_file):
    logsetup.configure(fmt="json", stream=stderr_file)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("quil_cluster.test").exception("unexpected")
    entry = json.loads(_lines(stderr_file)[0])
    assert entry["exc"].endswith("RuntimeError: boom")


@pytest.mark.parametrize("fmt", logsetup.FORMATS)
def test_token_and_key_are_masked(stderr_file, fmt):
    logsetup.configure(fmt=fmt, stream=stderr_file)
    log = logging.getLogger("quil_cluster.test")
    log.warning("join with %s failed", TOKEN)
    try:
        raise ValueError(f"bad key {KEY}")
    except ValueError:
        log.exception("install failed")
    text = "\n".join(_lines(stderr_file))
    assert TOKEN.split(".")[1] not in text
    assert "MHcCAQEEIBx7" not in text
    assert "qct_0123abcd.<redacted>" in text
    assert "<private key redacted>" in text


def test_redact_keeps_other_text():
    assert logsetup.redact("core=3 sha256:abc qct_list") == "core=3 sha256:abc qct_list"
    assert logsetup.redact(f"a {KEY} b") == "a <private key redacted> b"
    assert logsetup.redact("-----BEGIN PRIVATE KEY-----\nMIIE") == "<private key redacted>"


def test_unknown_format_raises():
    with pytest.raises(ValueError, match="log format 'xml' is not one of text, json"):
        logsetup.configure(fmt="xml")
