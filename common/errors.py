"""One exception tree for every failure a user can cause or fix.

Front ends catch QuilClusterError and print its message as one line; any
other exception is a bug and is shown with its traceback.
"""

from __future__ import annotations


class QuilClusterError(Exception):
    """Base class of every expected failure."""


class ConfigError(QuilClusterError, ValueError):
    """Raised when a config file or a setting is invalid."""


class MultiaddrError(ConfigError):
    """Raised when a multiaddr cannot be used as a worker address."""


class InventoryError(QuilClusterError, ValueError):
    """Raised when the host inventory or an assignment request is invalid."""


class StateError(QuilClusterError):
    """Raised when a state directory is missing, unreadable or inconsistent."""


class TLSError(QuilClusterError):
    """Raised when a certificate or key is missing, invalid or not trusted."""


class HostError(QuilClusterError):
    """Raised when an agent rejects a request or cannot be reached."""

    def __init__(self, host: str, message: str) -> None:
        super().__init__(f"{host}: {message}")
        self.host = host


class UnreachableError(HostError):
    """Raised when an agent cannot be reached at all."""
