"""Logging set-up shared by the agent and the coordinator.

Logs go to stderr in one of two formats:

- text (the default): `LEVEL logger: message`, with a timestamp in front
  unless JOURNAL_STREAM is set (journald adds its own). When stderr is the
  journal stream that JOURNAL_STREAM names, every line also starts with a
  syslog priority such as `<4>`, which journald turns into the entry's
  priority and strips, so `journalctl -p warning` works.
- json: one JSON object per line with ts, level, logger, msg and, for an
  exception, exc.

Both formats pass the final text through redact(), a backstop that masks
join tokens and PEM private keys should a caller ever log one. The rule
stays that no secret is passed to a log call at all.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from typing import TextIO

FORMATS = ("text", "json")

# Syslog priorities of the sd-daemon(3) line prefixes, by logging level.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
_DEBUG_PRIORITY = 7

# A join token is qct_<8 hex id>.<secret>; the id is public and stays readable.
_TOKEN = re.compile(r"\b(qct_[0-9a-f]{8}\.)[A-Za-z0-9_-]+")
_PRIVATE_KEY = re.compile(r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*?(-----END \1PRIVATE KEY-----|\Z)", re.S)


def redact(text: str) -> str:
    """Mask join token secrets and PEM private key blocks in text."""
    text = _TOKEN.sub(r"\1<redacted>", text)
    return _PRIVATE_KEY.sub("<private key redacted>", text)


def syslog_priority(level: int) -> int:
    return next((priority for threshold, priority in _PRIORITIES if level >= threshold), _DEBUG_PRIORITY)


class _TextFormatter(logging.Formatter):
    def __init__(self, timestamps: bool, priorities: bool) -> None:
        prefix = "%(asctime)s " if timestamps else ""
        super().__init__(prefix + "%(levelname)s %(name)s: %(message)s")
        self._priorities = priorities

    def format(self, record: logging.LogRecord) -> str:
        text = redact(super().format(record))
        if not self._priorities:
            return text
        # journald reads the prefix per line, so each line of a traceback gets it too.
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in text.split("\n"))


class _JSONFormatter(logging.Formatter):
    def __init__(self, priorities: bool) -> None:
        super().__init__()
        self._priorities = priorities

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                 "logger": record.name, "msg": redact(record.getMessage())}
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        line = json.dumps(entry)
        return f"<{syslog_priority(record.levelno)}>{line}" if self._priorities else line


def stderr_is_journal(stream: TextIO, environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Tell whether stream is the journal connection systemd named in JOURNAL_STREAM ('DEVICE:INODE')."""
    value = environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        stat = os.fstat(stream.fileno())
        return (stat.st_dev, stat.st_ino) == (int(device), int(inode))
    except (OSError, ValueError, AttributeError):
        # No descriptor (a test's captured stream), or a malformed variable.
        return False


def configure(level: int = logging.INFO, fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send the root logger's records to stream (default stderr) in fmt ('text' or 'json') at level."""
    if fmt not in FORMATS:
        raise ValueError(f"log format '{fmt}' is not one of {', '.join(FORMATS)}")
    stream = stream or sys.stderr
    priorities = stderr_is_journal(stream)
    handler = logging.StreamHandler(stream)
    if fmt == "json":
        handler.setFormatter(_JSONFormatter(priorities))
    else:
        handler.setFormatter(_TextFormatter(timestamps=not os.environ.get("JOURNAL_STREAM"), priorities=priorities))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
