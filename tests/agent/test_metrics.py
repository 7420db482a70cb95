"""The agent's /metrics endpoint, scraped from an agent with real stand-in workers."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import socket
import time
import urllib.error
import urllib.request

import pytest
from agent_harness import ADDRESS, CLUSTER, RunningAgent, write_agent_files
from helpers import DATA, free_port_range
from prometheus_client.parser import text_string_to_metric_families

from quil_cluster import __version__
from quil_cluster.agent import config as agent_config
from quil_cluster.agent.service import build_server
from quil_cluster.common import nodeconfig, pki
from quil_cluster.common.states import State
from quil_cluster.proto import agent_pb2 as pb

TIMEOUT = 30


def _config(count: int) -> bytes:
    base = free_port_range([ADDRESS], count)
    entries = [f"/ip4/{ADDRESS}/tcp/{base + i}" for i in range(count)]
    return nodeconfig.render(nodeconfig.load((DATA / "config-1.4.21.yml").read_text()), "1.4", entries).encode()


def _request(config: bytes, cores: list[int], run_control: bool = False, generation: int = 1) -> pb.ApplyRequest:
    return pb.ApplyRequest(config_yaml=config, config_sha256=hashlib.sha256(config).hexdigest(),
                           config_generation=generation, node_generation=pb.NODE_GENERATION_1_4, cores=cores,
                           run_control=run_control)


def _start_agent(root, **overrides) -> RunningAgent:
    ca_key, ca_cert = pki.create_ca(CLUSTER)
    path = write_agent_files(root, ca_key, ca_cert, free_port_range([ADDRESS], 1), **overrides)
    config = agent_config.load(path)
    agent = build_server(config)
    return RunningAgent(agent, config, f"{ADDRESS}:{agent.port}", ca_key, ca_cert)


@pytest.fixture
def metrics_agent(tmp_path):
    running = _start_agent(tmp_path / "agent", metrics_address=f"{ADDRESS}:0")
    try:
        yield running
    finally:
        running.agent.stop(stop_processes=True)


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Return every sample of the endpoint as {(name, sorted labels): value}."""
    with urllib.request.urlopen(url, timeout=TIMEOUT) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _sample(samples, name, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def _wait_running(url: str, cores: list[int], restarts: int = 0) -> dict:
    deadline = time.monotonic() + TIMEOUT
    while True:
        samples = scrape(url)
        up = {core: samples.get(("quil_agent_worker_up", (("core", str(core)), ("role", "worker")))) for core in cores}
        counts = {core: samples.get(("quil_agent_worker_restarts_total", (("core", str(core)), ("role", "worker"))))
                  for core in cores}
        if all(v == 1 for v in up.values()) and all(v == restarts for v in counts.values()):
            return samples
        assert time.monotonic() < deadline, f"up {up}, restarts {counts}"
        time.sleep(0.1)


def test_metrics_of_running_workers(metrics_agent):
    stub, url = metrics_agent.client(), metrics_agent.agent.metrics.url
    config = _config(2)
    request = _request(config, [1, 2], generation=7)
    stub.Apply(request, timeout=TIMEOUT)
    samples = _wait_running(url, [1, 2])

    for core in ("1", "2"):
        labels = {"core": core, "role": "worker"}
        assert _sample(samples, "quil_agent_worker_up", **labels) == 1
        assert _sample(samples, "quil_agent_worker_state", state="running", **labels) == 1
        for state in State:
            if state != State.RUNNING:
                assert _sample(samples, "quil_agent_worker_state", state=state.value, **labels) == 0
        assert _sample(samples, "quil_agent_worker_restarts_total", **labels) == 0
        assert _sample(samples, "quil_agent_worker_resident_memory_bytes", **labels) > 1024 * 1024
        assert _sample(samples, "quil_agent_worker_cpu_seconds_total", **labels) > 0
    assert _sample(samples, "quil_agent_config_generation") == 7
    assert _sample(samples, "quil_agent_config_info", sha256=request.config_sha256) == 1
    assert _sample(samples, "quil_agent_build_info", version=__version__) == 1
    assert _sample(samples, "quil_agent_node_info", version="1.4.21") == 1
    not_after = pki.not_after(metrics_agent.config.tls.cert.read_bytes())
    assert _sample(samples, "quil_agent_certificate_expiry_timestamp_seconds") == not_after
    # The standard metrics of the agent's own process.
    assert _sample(samples, "process_resident_memory_bytes") > 0


def test_metrics_restart_counter_after_kill(metrics_agent):
    stub, url = metrics_agent.client(), metrics_agent.agent.metrics.url
    stub.Apply(_request(_config(2), [1, 2]), timeout=TIMEOUT)
    _wait_running(url, [1, 2])
    status = stub.GetStatus(pb.GetStatusRequest(), timeout=TIMEOUT)
    victim = next(p for p in status.processes if p.core == 2)

    os.kill(victim.pid, signal.SIGKILL)

    samples = _wait_running(url, [2], restarts=1)
    assert _sample(samples, "quil_agent_worker_restarts_total", core="2", role="worker") == 1
    assert _sample(samples, "quil_agent_worker_restarts_total", core="1", role="worker") == 0


def test_metrics_control_process_has_role_control(metrics_agent):
    stub, url = metrics_agent.client(), metrics_agent.agent.metrics.url
    stub.Apply(_request(_config(1), [1], run_control=True), timeout=TIMEOUT)
    deadline = time.monotonic() + TIMEOUT
    while (samples := scrape(url)).get(("quil_agent_worker_up", (("core", "0"), ("role", "control")))) != 1:
        assert time.monotonic() < deadline, samples
        time.sleep(0.1)
    assert _sample(samples, "quil_agent_worker_state", core="0", role="control", state="running") == 1
    assert ("quil_agent_worker_up", (("core", "0"), ("role", "worker"))) not in samples


def test_metrics_scrape_time_with_eight_workers(metrics_agent):
    stub, url = metrics_agent.client(), metrics_agent.agent.metrics.url
    stub.Apply(_request(_config(8), list(range(1, 9))), timeout=TIMEOUT)
    _wait_running(url, list(range(1, 9)))
    supervisor = metrics_agent.agent.supervisor
    started = time.perf_counter()
    for _ in range(10):
        supervisor.snapshot()
    snapshot = (time.perf_counter() - started) / 10
    started = time.perf_counter()
    for _ in range(10):
        scrape(url)
    whole = (time.perf_counter() - started) / 10
    # The snapshot is the only part of a scrape that holds the supervisor's lock.
    print(f"8 workers: snapshot {snapshot * 1000:.1f} ms, whole scrape {whole * 1000:.1f} ms")
    # Generous bounds: the test machine may be shared and heavily loaded.
    assert snapshot < 10.0
    assert whole < 20.0


def test_metrics_without_workers(metrics_agent):
    samples = scrape(metrics_agent.agent.metrics.url)
    assert _sample(samples, "quil_agent_config_generation") == 0
    assert not [key for key in samples if key[0] in ("quil_agent_worker_up", "quil_agent_config_info")]


def test_metrics_after_stop_all_list_no_process(metrics_agent):
    stub, url = metrics_agent.client(), metrics_agent.agent.metrics.url
    config = _config(1)
    stub.Apply(_request(config, [1]), timeout=TIMEOUT)
    _wait_running(url, [1])
    stub.StopAll(pb.StopAllRequest(), timeout=TIMEOUT)
    samples = scrape(url)
    assert not [key for key in samples if key[0].startswith("quil_agent_worker_")]


def test_metrics_other_path_is_not_found(metrics_agent):
    url = metrics_agent.agent.metrics.url.replace("/metrics", "/")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url, timeout=TIMEOUT)
    body = err.value.read()
    err.value.close()
    assert err.value.code == 404
    assert body == b"not found; metrics are at /metrics\n"


def test_metrics_listen_on_configured_address(metrics_agent):
    assert metrics_agent.agent.metrics.host == ADDRESS
    assert metrics_agent.agent.metrics.port > 0


def test_metrics_off_serves_nothing(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="quil_cluster.agent.metrics")
    running = _start_agent(tmp_path / "agent", metrics_address="off")
    try:
        assert running.agent.metrics is None
        assert "metrics: off (metrics_address is 'off')" in caplog.messages
    finally:
        running.agent.stop()


def test_metrics_port_taken_logs_error_and_agent_runs(tmp_path, caplog):
    with socket.socket() as taken:
        taken.bind((ADDRESS, 0))
        taken.listen()
        port = taken.getsockname()[1]
        running = _start_agent(tmp_path / "agent", metrics_address=f"{ADDRESS}:{port}")
        try:
            assert running.agent.metrics is None
            assert (f"metrics: not served: metrics_address: cannot listen on {ADDRESS}:{port} for metrics "
                    "(Address already in use); choose a free address, or 'off'") in caplog.messages
            reply = running.client().GetStatus(pb.GetStatusRequest(), timeout=TIMEOUT)
            assert list(reply.processes) == []
        finally:
            running.agent.stop()
