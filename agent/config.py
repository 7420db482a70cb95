"""The agent's local config file (agent.yaml).

Everything that decides what the agent may run or write is here and only
here: no RPC can change the node binary, its arguments or the directories.
Relative paths are resolved against the directory of agent.yaml, so a
bundle written by `quil-coord host add` works wherever it is copied.
"""

from __future__ import annotations

import ipaddress
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..common import metricsserver
from ..common.errors import ConfigError
from ..common.yamlio import read_mapping, reject_unknown_keys
from . import runas
from .supervisor import Policy, min_crash_window

DEFAULT_CONFIG_PATH = Path("/etc/quil-agent/agent.yaml")
# Port of the Prometheus endpoint when agent.yaml has no metrics_address.
METRICS_PORT = 9741


@dataclass(frozen=True)
class TLSFiles:
    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True)
class AgentConfig:
    # Cluster name the agent's certificates belong to; peers of other clusters are rejected.
    cluster: str
    # HOST:PORT the gRPC API listens on.
    listen: str
    # IP address this host's data workers bind (their worker list entries use it).
    worker_address: str
    # The node binary; the only program the agent ever starts.
    node_binary: Path
    # Directory passed as --config; the only place config.yml is written.
    node_config_dir: Path
    # Working directory of node processes (relative paths in config.yml resolve here).
    work_dir: Path
    # Agent's own state: desired state, process table, logs.
    state_dir: Path
    tls: TLSFiles
    # Extra arguments for every node process, e.g. --signature-check=false for source builds.
    node_args: tuple[str, ...] = ()
    # Seconds between SIGTERM and SIGKILL when stopping a process.
    stop_grace_seconds: float = 10.0
    # Seconds a process must stay up (or listen) to count as started.
    start_seconds: float = 1.0
    # Per-process log file size before rotation, and rotated copies kept.
    log_max_bytes: int = 10 * 1024 * 1024
    log_backups: int = 3
    # Extra environment for node processes (not secrets: it is visible in /proc).
    node_env: dict[str, str] = field(default_factory=dict)
    # HOST:PORT of the plain-HTTP Prometheus endpoint; "off" disables it. It has no
    # authentication, so keep it on loopback or firewall it.
    metrics_address: str = f"127.0.0.1:{METRICS_PORT}"
    # User the node processes run as; empty: the agent's own user. Another user needs root.
    node_user: str = ""
    # This many failures within crash_window_seconds end in FATAL (the crash-loop guard).
    crash_limit: int = Policy.crash_limit
    crash_window_seconds: float = Policy.crash_window

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    def supervisor_policy(self) -> Policy:
        return Policy(
            start_seconds=self.start_seconds, stop_grace_seconds=self.stop_grace_seconds,
            crash_limit=self.crash_limit, crash_window=self.crash_window_seconds,
            log_max_bytes=self.log_max_bytes, log_backups=self.log_backups,
        )


# Bounds of the crash-loop guard settings. A limit above 100 or a window above
# a day would keep a crash-looping worker restarting for hours.
MIN_CRASH_LIMIT = 2
MAX_CRASH_LIMIT = 100
MAX_CRASH_WINDOW = 86400.0

_PATH_KEYS = ("node_binary", "node_config_dir", "work_dir", "state_dir")
_REQUIRED = ("cluster", "listen", "worker_address", "node_binary", "node_config_dir", "state_dir", "tls")


def load(path: Path) -> AgentConfig:
    """Read and validate agent.yaml; every error names the file and the key."""
    path = Path(path)
    data = read_mapping(path)
    source = str(path)
    reject_unknown_keys(data, [f.name for f in fields(AgentConfig)], source)
    for key in _REQUIRED:
        if key not in data:
            raise ConfigError(f"{source}: missing key '{key}'")
    base = path.resolve().parent
    values: dict[str, Any] = dict(data)
    for key in _PATH_KEYS:
        if key in values:
            values[key] = _resolve(base, values[key], key, source)
    values.setdefault("work_dir", values["node_config_dir"].parent)
    values["tls"] = _load_tls(data["tls"], base, source)
    values["node_args"] = tuple(_string_list(data.get("node_args", []), "node_args", source))
    values["node_env"] = _string_map(data.get("node_env", {}), "node_env", source)
    if values.get("metrics_address") is False:
        values["metrics_address"] = "off"  # YAML reads an unquoted off as false
    values.setdefault("metrics_address", default_metrics_address(values.get("worker_address")))
    config = AgentConfig(**values)
    _validate(config, source)
    return config


def default_metrics_address(worker_address: Any) -> str:
    """Return the metrics address used when agent.yaml sets none.

    That is 127.0.0.1, unless the workers bind another loopback address
    (several agents on one machine, as in quil-coord demo). Then the agent
    serves metrics on that address, so the agents do not compete for one port.
    """
    if isinstance(worker_address, str) and worker_address.startswith("127.") and worker_address != "127.0.0.1":
        return f"{worker_address}:{METRICS_PORT}"
    return f"127.0.0.1:{METRICS_PORT}"


def _resolve(base: Path, value: Any, key: str, source: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{source}: '{key}' must be a non-empty path string")
    if key == "node_binary":
        # Absolute, but symlinks kept: the release is read from the binary's file name, so a link
        # named node-2.1.0.25-linux-amd64 must stay that name, and a replaced link target takes
        # effect at the next start of a process without an agent restart.
        return Path(os.path.normpath(base / value))
    return (base / value).resolve()


def _load_tls(value: Any, base: Path, source: str) -> TLSFiles:
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: 'tls' must be a mapping with cert, key and ca")
    reject_unknown_keys(value, ["cert", "key", "ca"], f"{source}: tls")
    missing = [k for k in ("cert", "key", "ca") if k not in value]
    if missing:
        raise ConfigError(f"{source}: tls is missing {', '.join(missing)}")
    return TLSFiles(**{k: _resolve(base, value[k], f"tls.{k}", source) for k in ("cert", "key", "ca")})


def _string_list(value: Any, key: str, source: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{source}: '{key}' must be a list of strings")
    return value


def _string_map(value: Any, key: str, source: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ConfigError(f"{source}: '{key}' must be a mapping of strings to strings")
    return value


def _validate(config: AgentConfig, source: str) -> None:
    if not isinstance(config.cluster, str) or not config.cluster:
        raise ConfigError(f"{source}: 'cluster' must be a non-empty string")
    split_host_port(config.listen, f"{source}: listen")
    # ip_address() also accepts an integer, which YAML makes of an unquoted number.
    if not isinstance(config.worker_address, str):
        raise ConfigError(f"{source}: worker_address '{config.worker_address}' is not an IP address")
    try:
        address = ipaddress.ip_address(config.worker_address)
    except ValueError as err:
        raise ConfigError(f"{source}: worker_address '{config.worker_address}' is not an IP address") from err
    if address.is_unspecified:
        raise ConfigError(
            f"{source}: worker_address '{address}' is a wildcard; set the concrete address the workers bind"
        )
    for number_key in ("stop_grace_seconds", "start_seconds"):
        number = getattr(config, number_key)
        # bool is a subclass of int, but `true` is no number of seconds.
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not 0 < number <= 3600:
            raise ConfigError(f"{source}: '{number_key}' must be a number of seconds between 0 and 3600")
    if not isinstance(config.log_max_bytes, int) or config.log_max_bytes < 4096:
        raise ConfigError(f"{source}: 'log_max_bytes' must be an integer of at least 4096")
    metricsserver.parse_address(config.metrics_address, f"{source}: metrics_address")
    if isinstance(config.log_backups, bool) or not isinstance(config.log_backups, int) or config.log_backups < 1:
        raise ConfigError(f"{source}: 'log_backups' must be an integer of at least 1")
    _validate_crash_guard(config, source)
    if not isinstance(config.node_user, str):
        raise ConfigError(f"{source}: 'node_user' must be a user name, not {config.node_user!r}")
    runas.resolve(config.node_user, source)


def _validate_crash_guard(config: AgentConfig, source: str) -> None:
    """Reject crash-loop settings that are out of range or would keep the guard from ever tripping."""
    limit, window = config.crash_limit, config.crash_window_seconds
    if isinstance(limit, bool) or not isinstance(limit, int) or not MIN_CRASH_LIMIT <= limit <= MAX_CRASH_LIMIT:
        raise ConfigError(
            f"{source}: 'crash_limit' must be an integer from {MIN_CRASH_LIMIT} to {MAX_CRASH_LIMIT}, not {limit!r}"
        )
    if isinstance(window, bool) or not isinstance(window, (int, float)) or not 0 < window <= MAX_CRASH_WINDOW:
        raise ConfigError(
            f"{source}: 'crash_window_seconds' must be a number of seconds up to {MAX_CRASH_WINDOW:.0f},"
            f" not {window!r}"
        )
    needed = min_crash_window(limit, Policy())
    if window < needed:
        raise ConfigError(
            f"{source}: 'crash_window_seconds' {window} is shorter than the {needed:.1f} s a process that exits"
            f" at once needs to fail crash_limit ({limit}) times, so the crash-loop guard could never trip;"
            f" set at least {math.ceil(needed)}"
        )


def split_host_port(value: Any, what: str) -> tuple[str, int]:
    """Split 'HOST:PORT' or '[IPv6]:PORT'; raise ConfigError naming what on bad input."""
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError(f"{what}: '{value}' is not HOST:PORT")
    host, _, port_text = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    # isdigit() alone also accepts non-ASCII digits such as '²', which int() rejects.
    if not host or not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise ConfigError(f"{what}: '{value}' is not HOST:PORT with a port from 1 to 65535")
    return host, int(port_text)


def sample(cluster: str = "quil") -> str:
    """Return an annotated agent.yaml with the default values."""
    return f"""\
# quil-agent configuration. Relative paths are relative to this file.
cluster: {cluster}                 # cluster name in the certificates
listen: 0.0.0.0:7350           # gRPC API, mutual TLS only
worker_address: 192.0.2.10     # IP this host's data workers bind
node_binary: /opt/quilibrium/node/node   # the only program the agent starts
node_config_dir: /var/lib/quil-agent/node/.config   # passed as --config
work_dir: /var/lib/quil-agent/node       # working directory of node processes
state_dir: /var/lib/quil-agent/state     # desired state, process table, logs
tls:
  cert: agent.crt
  key: agent.key
  ca: ca.crt
node_args: []                  # e.g. ["--signature-check=false"] for source builds
stop_grace_seconds: 10         # SIGTERM, then SIGKILL after this many seconds
start_seconds: 1               # up this long (or listening) counts as started
log_max_bytes: 10485760        # rotate a process log at this size
log_backups: 3                 # rotated copies kept
metrics_address: 127.0.0.1:9741   # Prometheus metrics over plain HTTP; "off" disables
crash_limit: 10                # this many failures within the window end in FATAL
crash_window_seconds: 180      # at least what a process that exits at once needs to fail crash_limit times
# node_user: quilnode          # run node processes as this user (needs the agent to run as root)
"""
