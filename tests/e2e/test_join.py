"""Enrollment end to end: real quil-agent join processes against quil-coord serve, over TLS."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from helpers import DATA, free_port_range

from quil_cluster.common import pki
from quil_cluster.coordinator import enroll, tokens
from quil_cluster.coordinator.demo import LocalCluster
from quil_cluster.coordinator.home import Home
from quil_cluster.proto import enroll_pb2 as epb
from quil_cluster.proto import enroll_pb2_grpc as epb_grpc

pytestmark = pytest.mark.e2e

GENERIC = "join rejected: the token is invalid, expired or already used; create a new one with quil-coord token create"


def _join_argv(cluster: LocalCluster, coordinator: str, token: str, ca_hash: str, name: str, address: str,
               port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "quil_cluster.agent", "join", coordinator, "--token", token, "--ca-hash", ca_hash,
            "--address", address, "--agent-port", str(port), "--dir", str(cluster.root / "joined" / name),
            "--node-binary", str(cluster.node_binary),
            "--node-config-dir", str(cluster.root / "joined" / name / "node" / ".config"),
            "--state-dir", str(cluster.root / "joined" / name / "state"), *extra]


def _create_token(cluster: LocalCluster, capsys, *options: str) -> tuple[str, str, str]:
    capsys.readouterr()
    assert cluster.coord("token", "create", *options) == 0
    command = capsys.readouterr().out.splitlines()[-1]
    match = re.fullmatch(r"quil-agent join (\S+) --token (\S+) --ca-hash (sha256:[0-9a-f]{64})", command)
    assert match, command
    return match.group(1), match.group(2), match.group(3)


@pytest.fixture
def served(tmp_path):
    cluster = LocalCluster(tmp_path)
    control = tmp_path / "config-1.4.21.yml"
    control.write_bytes((DATA / "config-1.4.21.yml").read_bytes())
    assert cluster.init(control, "--local") == 0
    assert cluster.add_host("A", "127.0.0.2", "--control", "--workers", "2") == 0
    server = enroll.build_server(Home(cluster.home), "127.0.0.1:0", "127.0.0.1:0")
    joined: list[subprocess.Popen] = []
    cluster.joined = joined
    try:
        cluster.start_agent("A")
        assert cluster.coord("assign") == 0
        assert cluster.coord("apply") == 0
        yield cluster, server
    finally:
        server.stop()
        for process in joined:
            process.terminate()
        for process in joined:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        cluster.stop_all()


def _status(cluster, capsys):
    capsys.readouterr()
    cluster.coord("status", "--json")
    return {h["name"]: h for h in json.loads(capsys.readouterr().out)["hosts"]}


def test_join_runs_new_workers_and_extends_list(served, capsys):
    cluster, _ = served
    coordinator, token, ca_hash = _create_token(cluster, capsys, "--workers", "3", "--host-name", "newbie")
    port = free_port_range(["127.0.0.8"], 1, start=47100)
    started = time.monotonic()
    argv = _join_argv(cluster, coordinator, token, ca_hash, "newbie", "127.0.0.8", port, "--run")
    with open(cluster.root / "join.log", "wb") as log:
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log)
    cluster.joined.append(process)
    deadline = time.monotonic() + 60
    while True:
        hosts = _status(cluster, capsys)
        newbie = hosts.get("newbie", {})
        running = [p for p in newbie.get("processes", []) if p["state"] == "running" and p["listening"]]
        if len(running) == 3:
            break
        assert time.monotonic() < deadline, hosts
        time.sleep(0.1)
    print(f"join to 3 workers running: {time.monotonic() - started:.2f} s")
    assert sorted(p["core"] for p in newbie["processes"]) == [3, 4, 5]
    key = cluster.root / "joined" / "newbie" / "agent.key"
    assert key.stat().st_mode & 0o777 == 0o600
    control_config = yaml.safe_load((cluster.root / "nodes" / "A" / ".config" / "config.yml").read_text())
    assert len(control_config["engine"]["dataWorkerMultiaddrs"]) == 5
    assert control_config["engine"]["dataWorkerMultiaddrs"][2] == "/ip4/127.0.0.8/tcp/40000"
    identity = pki.identity_from_cert_pem((cluster.root / "joined" / "newbie" / "agent.crt").read_bytes())
    assert identity == pki.Identity("quil", "agent", "newbie")


def _stub(cluster: LocalCluster, server) -> epb_grpc.EnrollmentStub:
    ca_pem = (cluster.home / "ca.crt").read_bytes()
    channel = grpc.secure_channel(f"127.0.0.1:{server.port}", grpc.ssl_channel_credentials(root_certificates=ca_pem))
    return epb_grpc.EnrollmentStub(channel)


def _request(token: str, address: str = "127.0.0.9") -> epb.JoinRequest:
    _, csr = pki.make_csr("test")
    return epb.JoinRequest(token=token, csr_pem=csr, hostname="h", logical_cpus=2, worker_address=address,
                           agent_port=7350)


def _rejected(stub, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        stub.Join(request, timeout=10)
    return err.value


def test_join_rejections_share_one_message(served, capsys):
    cluster, server = served
    home = Home(cluster.home)
    stub = _stub(cluster, server)
    expired, _ = tokens.create(home, ttl_seconds=60, now=time.time() - 3600)
    used, _ = tokens.create(home)
    stub.Join(_request(used, "127.0.0.10"), timeout=10)
    revoked, record = tokens.create(home)
    tokens.revoke(home, record.id)
    unknown = "qct_00000000." + "A" * 43
    for token in (expired, used, revoked, unknown):
        err = _rejected(stub, _request(token))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert err.details() == GENERIC
    lines = [json.loads(line) for line in (cluster.home / "audit.log").read_text().splitlines()]
    assert [line["outcome"] for line in lines] == ["joined", "rejected", "rejected", "rejected", "rejected"]
    assert all(line["source"] == "127.0.0.1" for line in lines)
    assert "qct_" not in (cluster.home / "audit.log").read_text()


def test_join_failures_are_rate_limited(served):
    cluster, server = served
    stub = _stub(cluster, server)
    codes = [_rejected(stub, _request("qct_00000000." + "B" * 43)).code() for _ in range(6)]
    assert codes == [grpc.StatusCode.PERMISSION_DENIED] * 5 + [grpc.StatusCode.RESOURCE_EXHAUSTED]


def test_join_loopback_address_needs_local_cluster(served):
    cluster, server = served
    home = Home(cluster.home)
    settings = home.load_settings()
    settings.local = False
    home.save_settings(settings)
    token, _ = tokens.create(home)
    err = _rejected(_stub(cluster, server), _request(token, "127.0.0.11"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == (
        "proposed worker address 127.0.0.11 is loopback, which other hosts cannot reach; pass --address")


def test_join_with_wrong_ca_hash_never_sends_token(served, capsys):
    cluster, _ = served
    coordinator, token, _ = _create_token(cluster, capsys)
    other_ca = pki.spki_sha256(pki.create_ca("other")[1])
    result = subprocess.run(_join_argv(cluster, coordinator, token, other_ca, "x", "127.0.0.12", 7350),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 6
    assert f"could not verify the coordinator at {coordinator}" in result.stderr
    listed = tokens.list_tokens(Home(cluster.home))
    assert [r.uses_left for r in listed] == [1]


def test_plaintext_join_is_rejected(served):
    cluster, server = served
    stub = epb_grpc.EnrollmentStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
    assert _rejected(stub, _request("x")).code() == grpc.StatusCode.UNAVAILABLE


def test_twenty_concurrent_joins_get_disjoint_cores(served, capsys):
    cluster, _ = served
    home = Home(cluster.home)
    settings = home.load_settings()
    settings.auto_apply = False
    home.save_settings(settings)
    created = [_create_token(cluster, capsys, "--workers", "2") for _ in range(20)]
    argv = [_join_argv(cluster, c, t, h, f"j{i}", f"127.0.1.{i + 1}", 7350) for i, (c, t, h) in enumerate(created)]
    with futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda a: subprocess.run(a, capture_output=True, text=True, timeout=120), argv))
    assert [r.returncode for r in results] == [0] * 20, [r.stderr for r in results if r.returncode]
    hosts = home.load_hosts()
    assert len(hosts) == 21
    assert len({h.address for h in hosts}) == 21
    capsys.readouterr()
    assert cluster.coord("assign", "--json") == 0
    workers = json.loads(capsys.readouterr().out)["workers"]
    assert [w["core"] for w in workers] == list(range(1, 43))
    per_host: dict[str, list[int]] = {}
    for worker in workers:
        per_host.setdefault(worker["host"], []).append(worker["core"])
    assert sorted(len(cores) for cores in per_host.values()) == [2] * 21
    assert all(cores == list(range(cores[0], cores[0] + len(cores))) for cores in per_host.values())


def test_multi_use_token_names_each_host(served):
    cluster, server = served
    home = Home(cluster.home)
    token, _ = tokens.create(home, uses=2, workers=1)
    stub = _stub(cluster, server)
    first = stub.Join(_request(token, "127.0.0.13"), timeout=10)
    second = stub.Join(_request(token, "127.0.0.14"), timeout=10)
    token_id = token[4:12]
    assert (first.host_name, second.host_name) == (f"host-{token_id}", f"host-{token_id}-2")


def test_second_serve_on_same_state_is_rejected(served):
    cluster, _ = served
    with pytest.raises(Exception) as err:
        enroll.build_server(Home(cluster.home), "127.0.0.1:0", "127.0.0.1:0")
    assert str(err.value) == (f"quil-coord serve is already running for {cluster.home} (pid {os.getpid()}); "
                              "stop it first")
