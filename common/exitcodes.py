"""Exit statuses of quil-agent and quil-coord; docs/cli.md lists the same table."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    # An unexpected error (a bug): the traceback is printed.
    ERROR = 1
    # Invalid command line.
    USAGE = 2
    # Invalid config file, inventory, state directory or argument value.
    CONFIG = 3
    # At least one agent rejected or failed the request.
    HOST_FAILED = 4
    # At least one agent could not be reached.
    UNREACHABLE = 5
    # A certificate is missing, expired or not trusted, or a call was not authorized.
    TLS = 6
    # quil-coord verify measured a port reachable that must not be, or the reverse.
    VIOLATION = 7
    # Interrupted by Ctrl-C (128 + SIGINT).
    INTERRUPTED = 130
