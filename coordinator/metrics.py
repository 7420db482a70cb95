"""Cluster-level Prometheus metrics of the coordinator.

They come from three places:

- the state directory: the inventory and the recorded assignment;
- last-apply.json and last-verify.json in the state directory, which
  record_apply() and record_verify() write atomically when an apply or a
  verify ends, whichever command or `serve` ran it;
- a status pass over the agents (GetStatus to every host in parallel, each
  call bounded by STATUS_TIMEOUT), cached for STATUS_INTERVAL so frequent
  scrapes do not turn into frequent calls to every agent.

`quil-coord serve --metrics-address` serves them over HTTP, and
`quil-coord metrics` prints them once for node_exporter's textfile collector.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, TypeVar

import grpc
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..common.errors import QuilClusterError
from ..common.exitcodes import ExitCode
from ..common.files import write_atomic
from ..common.states import State
from ..proto import agent_pb2 as pb
from .client import Credentials, for_each_host
from .home import Home
from .inventory import Host

log = logging.getLogger(__name__)

# Seconds a status pass over the agents is reused before the next scrape starts a new one.
STATUS_INTERVAL = 15.0
# Seconds one GetStatus call of the status pass may take.
STATUS_TIMEOUT = 5.0
LAST_APPLY_FILE = "last-apply.json"
LAST_VERIFY_FILE = "last-verify.json"

_RUNNING = pb.ProcessState.Value(f"PROCESS_STATE_{State.RUNNING.name}")
F = TypeVar("F", bound=Callable[..., Any])


# -- recording the last apply and verify ------------------------------------


def record_apply(run: F) -> F:
    """Decorate the function that runs one apply, run(home, ...) -> ApplyReport, to record its outcome.

    An apply that raises was rejected before it changed anything (invalid
    input or state, printed as one error line), so it leaves the record as it
    was, the same as every other file in the state directory.
    """

    @functools.wraps(run)
    def wrapper(home: Home, *args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        report = run(home, *args, **kwargs)
        _write_record(home, LAST_APPLY_FILE, {"success": report.exit_code == ExitCode.OK,
                                               "duration_seconds": time.monotonic() - started,
                                               "timestamp_seconds": time.time()})
        return report

    return wrapper  # type: ignore[return-value]


def record_verify(run: F) -> F:
    """Decorate verify(home) -> VerifyReport to record its violations and unreachable hosts."""

    @functools.wraps(run)
    def wrapper(home: Home, *args: Any, **kwargs: Any) -> Any:
        report = run(home, *args, **kwargs)
        _write_record(home, LAST_VERIFY_FILE, {"violations": len(report.violations), "errors": len(report.errors),
                                                "timestamp_seconds": time.time()})
        return report

    return wrapper  # type: ignore[return-value]


def _write_record(home: Home, name: str, record: dict[str, Any]) -> None:
    # A metrics record must never fail the apply or verify it describes, so a write error is only logged.
    try:
        write_atomic(home.file(name), json.dumps(record).encode(), mode=0o600)
    except OSError as err:
        log.warning("metrics record not written: %s (%s); the cluster metrics keep the previous one",
                    home.file(name), err.strerror or err)


def _read_record(home: Home, name: str) -> dict[str, Any] | None:
    try:
        record = json.loads(home.file(name).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.warning("metrics record unreadable: %s (%s); leaving its metrics out", home.file(name), err)
        return None
    return record if isinstance(record, dict) else None


# -- the status pass ---------------------------------------------------------


@dataclass
class StatusPass:
    # Unix time the pass ended.
    timestamp: float
    # Host name -> cores whose process is running there; None when the GetStatus call failed.
    running: dict[str, set[int] | None] = field(default_factory=dict)


def status_pass(home: Home, hosts: list[Host]) -> StatusPass:
    """Ask every host's agent for its processes, in parallel, each call bounded by STATUS_TIMEOUT."""
    credentials = Credentials(home)

    def running_cores(host: Host) -> set[int] | None:
        channel, stub = credentials.stub(host)
        try:
            reply = stub.GetStatus(pb.GetStatusRequest(), timeout=STATUS_TIMEOUT)
        except (grpc.RpcError, QuilClusterError) as err:
            log.debug("metrics status pass: %s did not answer (%s)", host.name, err)
            return None
        finally:
            channel.close()
        return {p.core for p in reply.processes if p.state == _RUNNING}

    return StatusPass(time.time(), for_each_host(hosts, running_cores))


class CachedStatus:
    """The last status pass, renewed when older than interval; one pass runs at a time."""

    def __init__(self, home: Home, interval: float = STATUS_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._home = home
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._value: StatusPass | None = None
        self._taken_at = 0.0

    def get(self, hosts: list[Host]) -> StatusPass:
        # Scrapes that arrive during a pass wait for it rather than start their own.
        with self._lock:
            if self._value is None or self._clock() - self._taken_at >= self._interval:
                self._value = status_pass(self._home, hosts)
                self._taken_at = self._clock()
            return self._value


# -- the collector -------------------------------------------------------------


class ClusterCollector(Collector):
    """Builds every quil_cluster_* metric on each scrape."""

    def __init__(self, home: Home, status: CachedStatus | None = None) -> None:
        self._home = home
        self._status = status or CachedStatus(home)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._home.locked():
            hosts = self._home.load_hosts()
            assignment = self._home.load_assignment()
        slots = assignment.slots if assignment else []
        yield GaugeMetricFamily("quil_cluster_hosts", "Hosts in the inventory, probe-only ones included.",
                                value=len(hosts))
        yield GaugeMetricFamily("quil_cluster_workers_desired", "Data workers in the recorded assignment.",
                                value=len(slots))
        status = self._status.get(hosts)
        yield from _status_families(status, {h.name: {s.core for s in slots if s.host == h.name} for h in hosts})
        yield from _apply_families(_read_record(self._home, LAST_APPLY_FILE))
        yield from _verify_families(_read_record(self._home, LAST_VERIFY_FILE))


def _status_families(status: StatusPass, assigned: dict[str, set[int]]) -> Iterator[GaugeMetricFamily]:
    up = GaugeMetricFamily("quil_cluster_host_up", "1 when the host's agent answered the last status pass.",
                           labels=["host"])
    running = 0
    for host, cores in sorted(status.running.items()):
        up.add_metric([host], 0 if cores is None else 1)
        running += len((cores or set()) & assigned.get(host, set()))
    yield up
    yield GaugeMetricFamily("quil_cluster_workers_running",
                            "Assigned data workers running on their host at the last status pass.", value=running)
    yield GaugeMetricFamily("quil_cluster_status_timestamp_seconds", "Unix time of the last status pass.",
                            value=status.timestamp)


def _apply_families(record: dict[str, Any] | None) -> Iterator[GaugeMetricFamily]:
    if record is None:
        return
    yield GaugeMetricFamily("quil_cluster_last_apply_success", "1 when the last apply succeeded on every host.",
                            value=1 if record.get("success") else 0)
    yield GaugeMetricFamily("quil_cluster_last_apply_duration_seconds", "Duration of the last apply.",
                            value=float(record.get("duration_seconds", 0.0)))
    yield GaugeMetricFamily("quil_cluster_last_apply_timestamp_seconds", "Unix time the last apply ended.",
                            value=float(record.get("timestamp_seconds", 0.0)))


def _verify_families(record: dict[str, Any] | None) -> Iterator[GaugeMetricFamily]:
    if record is None:
        return
    yield GaugeMetricFamily("quil_cluster_verify_violations", "Exposure violations the last verify found.",
                            value=int(record.get("violations", 0)))
    yield GaugeMetricFamily("quil_cluster_verify_unreachable_hosts",
                            "Hosts whose agent the last verify could not ask.", value=int(record.get("errors", 0)))
    yield GaugeMetricFamily("quil_cluster_last_verify_timestamp_seconds", "Unix time the last verify ended.",
                            value=float(record.get("timestamp_seconds", 0.0)))


def make_registry(home: Home, status: CachedStatus | None = None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ClusterCollector(home, status))
    return registry


def exposition(home: Home) -> bytes:
    """Return the cluster metrics once in the Prometheus text format, after a fresh status pass."""
    return generate_latest(make_registry(home))
