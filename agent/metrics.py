"""The agent's Prometheus metrics, computed when Prometheus scrapes them.

There is no polling thread: each scrape takes one supervisor snapshot (the
same one GetStatus takes) and reads the desired state and the certificate's
expiry. The control process (core 0) appears with core="0" and
role="control"; data workers have role="worker".

Metric names follow the Prometheus conventions: base units as suffixes,
_total for counters, _info for metrics whose labels carry the value.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import psutil
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from .. import __version__
from ..common import metricsserver
from ..common.errors import ConfigError
from ..common.states import ALIVE_STATES, State
from . import hostinfo
from .supervisor import ProcessInfo, Supervisor

if TYPE_CHECKING:
    from .identity import AgentIdentity
    from .reconcile import Reconciler

log = logging.getLogger(__name__)

# Default of agent.yaml's metrics_address: loopback, so only this host can scrape.
DEFAULT_ADDRESS = "127.0.0.1:9741"
# Maximum seconds between a process's recorded start and its kernel create time.
# A larger gap means the pid now belongs to another process.
_SAME_PROCESS_SECONDS = 2.0
_PROCESS_LABELS = ["core", "role"]


class AgentCollector(Collector):
    """Builds every quil_agent_* metric from the agent's live objects on each scrape."""

    def __init__(self, supervisor: Supervisor, reconciler: Reconciler, identity: AgentIdentity,
                 node_binary: Path) -> None:
        self._supervisor = supervisor
        self._reconciler = reconciler
        self._identity = identity
        self._node_binary = node_binary

    def collect(self) -> Iterator:
        yield from _process_families(self._supervisor.snapshot())
        desired = self._reconciler.desired
        yield GaugeMetricFamily("quil_agent_config_generation",
                                "Config generation of the last applied config.yml (0: none applied).",
                                value=desired.config_generation)
        info = InfoMetricFamily("quil_agent_config", "SHA-256 of the last applied config.yml.", labels=[])
        if desired.config_sha256:
            info.add_metric([], {"sha256": desired.config_sha256})
        yield info
        yield GaugeMetricFamily("quil_agent_certificate_expiry_timestamp_seconds",
                                "Unix time at which the agent's TLS certificate expires (its notAfter).",
                                value=self._identity.not_after)
        yield InfoMetricFamily("quil_agent_build", "Version of quil-agent.", value={"version": __version__})
        node = InfoMetricFamily("quil_agent_node", "Node release in the node binary's file name.", labels=[])
        version = hostinfo.node_version(self._node_binary)
        if version:
            node.add_metric([], {"version": version})
        yield node


def _process_families(infos: list[ProcessInfo]) -> list:
    up = GaugeMetricFamily("quil_agent_worker_up", "1 when the process is running, else 0.",
                           labels=_PROCESS_LABELS)
    state = GaugeMetricFamily("quil_agent_worker_state", "1 for the process's current supervisor state.",
                              labels=[*_PROCESS_LABELS, "state"])
    restarts = CounterMetricFamily("quil_agent_worker_restarts",
                                   "Restarts after unexpected exits since the core was last started by apply.",
                                   labels=_PROCESS_LABELS)
    cpu = CounterMetricFamily("quil_agent_worker_cpu_seconds", "User and system CPU time of the live process.",
                              labels=_PROCESS_LABELS)
    rss = GaugeMetricFamily("quil_agent_worker_resident_memory_bytes", "Resident memory of the live process.",
                            labels=_PROCESS_LABELS)
    for info in infos:
        labels = [str(info.core), "control" if info.core == 0 else "worker"]
        up.add_metric(labels, 1 if info.state == State.RUNNING else 0)
        for candidate in State:
            state.add_metric([*labels, candidate.value], 1 if info.state == candidate else 0)
        restarts.add_metric(labels, info.restarts)
        if info.state in ALIVE_STATES and info.pid:
            seconds = _cpu_seconds(info)
            if seconds is not None:
                cpu.add_metric(labels, seconds)
            rss.add_metric(labels, info.rss_bytes)
    return [up, state, restarts, cpu, rss]


def _cpu_seconds(info: ProcessInfo) -> float | None:
    """Return the process's user plus system CPU seconds, or None when it is gone or the pid was reused."""
    try:
        process = psutil.Process(info.pid)
        with process.oneshot():
            if abs(process.create_time() - info.start_time) > _SAME_PROCESS_SECONDS:
                return None
            times = process.cpu_times()
    except psutil.Error:
        return None
    return times.user + times.system


def make_registry(collector: AgentCollector) -> CollectorRegistry:
    """Return a registry with the agent's metrics and the standard process_* metrics of the agent itself."""
    from prometheus_client import ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)
    return registry


def start_server(address_setting: str, collector: AgentCollector) -> metricsserver.MetricsServer | None:
    """Serve the metrics at agent.yaml's metrics_address; return None when it is off or cannot bind.

    A failed bind is logged as an error, not raised, so a taken metrics port
    never stops the agent from supervising the node.
    """
    address = metricsserver.parse_address(address_setting, "metrics_address")
    if address is None:
        log.info("metrics: off (metrics_address is '%s')", address_setting)
        return None
    try:
        return metricsserver.start(address, make_registry(collector), "metrics_address")
    except ConfigError as err:
        log.error("metrics: not served: %s", err)
        return None
