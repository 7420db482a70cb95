"""Membership and identity changes on a running loopback cluster: renewal and host removal."""

from __future__ import annotations

import json
import socket
import ssl
import threading

import grpc
import pytest
import yaml
from cryptography import x509
from helpers import DATA, free_port_range

from quil_cluster.common import tls
from quil_cluster.coordinator.demo import LocalCluster
from quil_cluster.coordinator.home import Home
from quil_cluster.proto import agent_pb2 as pb
from quil_cluster.proto import agent_pb2_grpc as pb_grpc

pytestmark = pytest.mark.e2e

HOSTS = {"A": ("127.0.0.2", "2"), "B": ("127.0.0.3", "3"), "C": ("127.0.0.4", "4")}


@pytest.fixture
def cluster(tmp_path):
    local = LocalCluster(tmp_path)
    control = tmp_path / "config-1.4.21.yml"
    control.write_bytes((DATA / "config-1.4.21.yml").read_bytes())
    base = free_port_range([a for a, _ in HOSTS.values()], 9)
    assert local.init(control, "--port-scheme", "global", "--base-port", str(base)) == 0
    for name, (address, workers) in HOSTS.items():
        extra = ["--control"] if name == "A" else []
        assert local.add_host(name, address, "--workers", workers, *extra) == 0
    try:
        for name in HOSTS:
            local.start_agent(name)
        assert local.coord("assign") == 0
        assert local.coord("apply") == 0
        yield local
    finally:
        local.stop_all()


def _served_serial(target: str) -> str:
    """Serial of the certificate the agent presents on a new connection, read without trusting it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    host, port = target.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw, context.wrap_socket(raw) as wrapped:
        der = wrapped.getpeercert(binary_form=True)
    return format(x509.load_der_x509_certificate(der).serial_number, "x")


def test_renewal_swaps_certificate_while_status_works(cluster, capsys):
    home = Home(cluster.home)
    before = {h.name: h for h in home.load_hosts()}["B"]
    assert _served_serial(before.agent) == before.serial
    failures: list[int] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            code = cluster.coord("status", "--json")
            if code != 0:
                failures.append(code)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        for _ in range(3):
            assert cluster.coord("host", "renew", "B") == 0
    finally:
        stop.set()
        poller.join()
    after = {h.name: h for h in home.load_hosts()}["B"]
    assert failures == []
    assert after.serial != before.serial
    assert _served_serial(after.agent) == after.serial
    on_disk = x509.load_pem_x509_certificate((cluster.root / "hosts" / "B" / "agent.crt").read_bytes())
    assert format(on_disk.serial_number, "x") == after.serial
    assert before.serial in home.load_revoked()


def test_status_shows_certificate_days(cluster, capsys):
    capsys.readouterr()
    assert cluster.coord("status", "--json") == 0
    hosts = json.loads(capsys.readouterr().out)["hosts"]
    assert all(6.9 < h["cert_expires_in_days"] <= 7.0 for h in hosts)


def test_remove_middle_host_moves_fewest_cores(cluster, capsys):
    capsys.readouterr()
    assert cluster.coord("host", "remove", "B") == 0
    out = capsys.readouterr().out
    assert "3 new" not in out
    assert "6 workers, 0 new, 3 moved, 3 removed" in out
    lists = {}
    for name in ("A", "C"):
        config = yaml.safe_load((cluster.root / "nodes" / name / ".config" / "config.yml").read_text())
        lists[name] = config["engine"]["dataWorkerMultiaddrs"]
    assert lists["A"] == lists["C"]
    assert len(lists["A"]) == 6
    assert [entry.split("/")[2] for entry in lists["A"]] == ["127.0.0.2"] * 2 + ["127.0.0.4"] * 4
    capsys.readouterr()
    assert cluster.coord("status", "--json") == 0
    hosts = {h["name"]: h for h in json.loads(capsys.readouterr().out)["hosts"]}
    assert sorted(p["core"] for p in hosts["C"]["processes"]) == [3, 4, 5, 6]


def test_removed_host_certificate_is_refused(cluster):
    bundle = cluster.root / "hosts" / "B"
    key, cert, ca = ((bundle / n).read_bytes() for n in ("agent.key", "agent.crt", "ca.crt"))
    assert cluster.coord("host", "remove", "B") == 0
    target = next(h.agent for h in Home(cluster.home).load_hosts() if h.name == "A")
    stub = pb_grpc.AgentStub(tls.secure_channel(target, tls.channel_credentials(key, cert, ca)))
    with pytest.raises(grpc.RpcError) as err:
        stub.GetStatus(pb.GetStatusRequest(), timeout=5)
    serial = format(x509.load_pem_x509_certificate(cert).serial_number, "x")
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert err.value.details() == f"client certificate {serial} has been revoked"


def test_ca_rotation_keeps_cluster_managed(cluster, capsys):
    home = Home(cluster.home)
    old_ca = (cluster.home / "ca.crt").read_bytes()
    assert cluster.coord("ca", "rotate") == 0
    assert home.rotating()
    assert cluster.coord("status") == 0
    bundle = (cluster.root / "hosts" / "C" / "ca.crt").read_bytes()
    assert bundle.count(b"BEGIN CERTIFICATE") == 2
    assert cluster.coord("ca", "finish") == 0
    assert not home.rotating()
    new_ca = (cluster.home / "ca.crt").read_bytes()
    assert new_ca != old_ca
    assert (cluster.root / "hosts" / "C" / "ca.crt").read_bytes() == new_ca
    capsys.readouterr()
    assert cluster.coord("apply", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert [h["outcome"] for h in report["hosts"]] == ["unchanged"] * 3


def test_coordinator_cert_rotation_revokes_old(cluster):
    old = x509.load_pem_x509_certificate((cluster.home / "coordinator.crt").read_bytes())
    assert cluster.coord("cert", "rotate") == 0
    assert cluster.coord("apply") == 0
    assert format(old.serial_number, "x") in Home(cluster.home).load_revoked()
    assert cluster.coord("status") == 0


def test_agent_with_revoked_certificate_is_refused(cluster, capsys):
    home = Home(cluster.home)
    victim = {h.name: h for h in home.load_hosts()}["C"]
    with home.locked():
        home.revoke(victim.serial)
    capsys.readouterr()
    code = cluster.coord("status", "--json")
    hosts = {h["name"]: h for h in json.loads(capsys.readouterr().out)["hosts"]}
    assert code == 6
    assert hosts["C"]["reachable"] is False
    assert hosts["C"]["error"] == (
        f"unauthenticated: the agent presents revoked certificate {victim.serial}; enroll the host again")
    assert hosts["A"]["reachable"] is True


def test_ca_finish_refuses_until_rotate_moved_every_host(cluster, capsys):
    cluster.stop_agent("C")
    before = (cluster.root / "hosts" / "A" / "ca.crt").read_bytes()
    capsys.readouterr()
    assert cluster.coord("ca", "rotate") == 4
    assert (cluster.root / "hosts" / "A" / "ca.crt").read_bytes().count(b"BEGIN CERTIFICATE") == 2
    moved = (cluster.root / "hosts" / "A" / "ca.crt").read_bytes()
    capsys.readouterr()
    assert cluster.coord("ca", "finish") == 3
    assert capsys.readouterr().err.strip() == (
        "error: ca rotate has not moved every host yet; run quil-coord ca rotate until no host fails, "
        "then ca finish")
    assert (cluster.root / "hosts" / "A" / "ca.crt").read_bytes() == moved != before
    cluster.start_agent("C")
    assert cluster.coord("ca", "rotate") == 0
    assert cluster.coord("ca", "finish") == 0
    assert cluster.coord("status") == 0


def test_verify_with_stopped_agent_is_an_error_not_a_violation(cluster, capsys):
    cluster.stop_agent("B")
    capsys.readouterr()
    assert cluster.coord("verify", "--json") == 5
    report = json.loads(capsys.readouterr().out)
    assert report["violations"] == []
    assert report["errors"]["B"].startswith("unavailable:")
    assert report["agent_ports"]["B"] == "unreachable"


def test_revocation_check_once_per_agent(cluster, capsys, monkeypatch):
    from quil_cluster.coordinator import client

    home = Home(cluster.home)
    with home.locked():
        home.revoke("abcdef")  # a serial no agent has, so that every call is checked
    checked: list[str] = []
    real_open = client.open_agent_tls

    def counting_open(host, context):
        checked.append(host.name)
        return real_open(host, context)

    monkeypatch.setattr(client, "open_agent_tls", counting_open)
    capsys.readouterr()
    # The preflight and the Apply open two channels per host; the check runs before the first.
    assert cluster.coord("apply", "--no-verify") == 0
    assert sorted(checked) == ["A", "B", "C"]
