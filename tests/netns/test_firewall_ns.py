"""Apply the nftables rules in network namespaces and send real TCP traffic.

Three namespaces act as a worker host, its control host and another host.
The worker host has a veth pair to each of the others:

    control 198.18.1.2 <-> 198.18.1.1 worker 198.18.2.1 <-> 198.18.2.2 other

Every nft command runs inside the worker namespace, so the root namespace's
firewall is never touched. The tests need root, nft and ip; they are skipped
without them, except when CI=true, where a skip would hide a gap.
"""

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest

from quil_cluster.common.firewall import (
    FirewallError,
    HostPolicy,
    PortRule,
    apply_nft,
    remove_nft,
    render_nft,
)

WORKER_TO_CONTROL = "198.18.1.1"
CONTROL = "198.18.1.2"
WORKER_TO_OTHER = "198.18.2.1"
OTHER = "198.18.2.2"
WORKER_PORT = 40001
OTHER_PORT = 8000

# Seconds a client waits for a connection. A dropped SYN shows up as "timeout".
CONNECT_TIMEOUT = 1.0
# Seconds an accepted connection may take, generous for a loaded test machine.
ALLOWED_TIMEOUT = 5.0

WORKER_PORTS = PortRule((40000, 40001, 40002, 40003), (CONTROL,), "1.4 worker ports")
POLICY = HostPolicy("worker-ns", WORKER_TO_CONTROL, (WORKER_PORTS,))

# Listens on 0.0.0.0:PORT, prints "ready", then accepts and closes connections until killed.
LISTENER = """
import socket, sys
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", int(sys.argv[1])))
server.listen(16)
print("ready", flush=True)
while True:
    connection, _ = server.accept()
    connection.close()
"""

# Connects to HOST PORT within TIMEOUT seconds, from local port BIND_PORT if not 0,
# and prints "connected", "timeout" or "refused".
CLIENT = """
import socket, sys
host, port, timeout, bind_port = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
client = socket.socket()
client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if bind_port:
    client.bind(("0.0.0.0", bind_port))
client.settimeout(timeout)
try:
    client.connect((host, port))
except socket.timeout:
    print("timeout")
except ConnectionRefusedError:
    print("refused")
else:
    print("connected")
"""


def missing_requirement():
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"'{tool}' is not installed"
    return None


@dataclass
class Bed:
    """The three namespace names, by role."""

    worker: str
    control: str
    other: str


def run(argv, stdin=None):
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, check=True, timeout=30)


def in_namespace(namespace):
    """A runner for apply_nft and remove_nft that runs the command inside namespace."""

    def runner(argv, **options):
        return subprocess.run(["ip", "netns", "exec", namespace, *argv], **options)

    return runner


def nft(namespace, *args, stdin=None):
    return run(["ip", "netns", "exec", namespace, "nft", *args], stdin=stdin)


def connect(namespace, host, port, timeout=ALLOWED_TIMEOUT, bind_port=0):
    argv = [sys.executable, "-c", CLIENT, host, str(port), str(timeout), str(bind_port)]
    return run(["ip", "netns", "exec", namespace, *argv]).stdout.strip()


def list_our_table(namespace):
    """Run `nft list table inet quil_cluster` without raising when the table is absent."""
    return subprocess.run(
        ["ip", "netns", "exec", namespace, "nft", "list", "table", "inet", "quil_cluster"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )


def our_tables(namespace):
    lines = nft(namespace, "list", "tables").stdout.splitlines()
    return [line for line in lines if line.strip() == "table inet quil_cluster"]


@pytest.fixture
def bed():
    reason = missing_requirement()
    if reason is not None and os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI=true requires the namespace tests to run")
    if reason is not None:
        pytest.skip(reason)

    sweep_stale_namespaces()
    prefix = f"qfw{os.getpid()}"
    names = Bed(worker=f"{prefix}w", control=f"{prefix}c", other=f"{prefix}o")
    created = []
    try:
        for name in (names.worker, names.control, names.other):
            run(["ip", "netns", "add", name])
            created.append(name)
            run(["ip", "-n", name, "link", "set", "lo", "up"])
        join(names.worker, "toc", WORKER_TO_CONTROL, names.control, CONTROL)
        join(names.worker, "too", WORKER_TO_OTHER, names.other, OTHER)
        yield names
    finally:
        for name in created:
            subprocess.run(["ip", "netns", "del", name], check=False, timeout=30)


def sweep_stale_namespaces():
    """Delete namespaces that a killed run of this file left behind, named qfw<pid>w|c|o with pid gone."""
    listing = run(["ip", "netns", "list"]).stdout
    for line in listing.splitlines():
        name = line.split(" ", 1)[0]
        match = re.fullmatch(r"qfw([0-9]+)[wco]", name)
        if match and not pid_alive(int(match.group(1))):
            subprocess.run(["ip", "netns", "del", name], check=False, timeout=30)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def join(worker, worker_link, worker_address, peer, peer_address):
    """Connect worker and peer with a veth pair on a /24, creating both links inside the namespaces."""
    run(["ip", "-n", worker, "link", "add", worker_link, "type", "veth", "peer", "name", "tow", "netns", peer])
    run(["ip", "-n", worker, "addr", "add", f"{worker_address}/24", "dev", worker_link])
    run(["ip", "-n", peer, "addr", "add", f"{peer_address}/24", "dev", "tow"])
    run(["ip", "-n", worker, "link", "set", worker_link, "up"])
    run(["ip", "-n", peer, "link", "set", "tow", "up"])


@pytest.fixture
def worker_listener(bed):
    yield from listen(bed.worker, WORKER_PORT)


@pytest.fixture
def other_listener(bed):
    yield from listen(bed.other, OTHER_PORT)


def listen(namespace, port):
    argv = ["ip", "netns", "exec", namespace, sys.executable, "-c", LISTENER, str(port)]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        try:
            ready = process.stdout.readline().strip()
            assert ready == "ready", f"listener in {namespace} failed: {process.stderr.read()}"
            yield
        finally:
            process.kill()
            process.wait(timeout=10)


def test_nft_allows_only_listed_source(bed, worker_listener):
    assert connect(bed.other, WORKER_TO_OTHER, WORKER_PORT) == "connected", "no path before the rules"

    apply_nft(POLICY, runner=in_namespace(bed.worker))

    assert connect(bed.control, WORKER_TO_CONTROL, WORKER_PORT) == "connected"
    assert connect(bed.other, WORKER_TO_OTHER, WORKER_PORT, timeout=CONNECT_TIMEOUT) == "timeout"
    listing = nft(bed.worker, "list", "table", "inet", "quil_cluster").stdout
    assert "ip saddr { 198.18.1.1, 198.18.1.2 } tcp dport 40000-40003 accept" in listing
    assert "tcp dport 40000-40003 drop" in listing


def test_nft_allows_loopback_and_own_address(bed, worker_listener):
    apply_nft(POLICY, runner=in_namespace(bed.worker))

    assert connect(bed.worker, "127.0.0.1", WORKER_PORT) == "connected"
    assert connect(bed.worker, WORKER_TO_CONTROL, WORKER_PORT) == "connected"
    assert connect(bed.worker, WORKER_TO_OTHER, WORKER_PORT) == "connected"


def test_nft_allows_replies_from_worker_port(bed, other_listener):
    # The worker host's own outgoing connection uses local port 40002, so the
    # other host's reply is addressed to a protected port.
    apply_nft(POLICY, runner=in_namespace(bed.worker))

    assert connect(bed.worker, OTHER, OTHER_PORT, bind_port=40002) == "connected"


def test_nft_apply_twice_keeps_one_table(bed, worker_listener):
    apply_nft(POLICY, runner=in_namespace(bed.worker))
    first = nft(bed.worker, "list", "table", "inet", "quil_cluster").stdout

    apply_nft(POLICY, runner=in_namespace(bed.worker))

    assert nft(bed.worker, "list", "table", "inet", "quil_cluster").stdout == first
    assert our_tables(bed.worker) == ["table inet quil_cluster"]
    assert connect(bed.control, WORKER_TO_CONTROL, WORKER_PORT) == "connected"
    assert connect(bed.other, WORKER_TO_OTHER, WORKER_PORT, timeout=CONNECT_TIMEOUT) == "timeout"


def test_nft_apply_replaces_rules(bed, worker_listener):
    apply_nft(POLICY, runner=in_namespace(bed.worker))
    swapped = HostPolicy("worker-ns", WORKER_TO_CONTROL, (PortRule(WORKER_PORTS.ports, (OTHER,), "1.4 worker ports"),))

    apply_nft(swapped, runner=in_namespace(bed.worker))

    assert connect(bed.other, WORKER_TO_OTHER, WORKER_PORT) == "connected"
    assert connect(bed.control, WORKER_TO_CONTROL, WORKER_PORT, timeout=CONNECT_TIMEOUT) == "timeout"
    assert our_tables(bed.worker) == ["table inet quil_cluster"]


def test_nft_failed_batch_keeps_old_table(bed, worker_listener):
    apply_nft(POLICY, runner=in_namespace(bed.worker))
    before = nft(bed.worker, "list", "table", "inet", "quil_cluster").stdout
    swapped = HostPolicy("worker-ns", WORKER_TO_CONTROL, (PortRule(WORKER_PORTS.ports, (OTHER,), "1.4 worker ports"),))
    # The kernel rejects the jump after the delete and the new table are queued
    # in the same batch, so the whole batch must be rolled back.
    broken = render_nft(swapped).replace("\t}\n}\n", "\t\tjump missing_chain\n\t}\n}\n")

    result = subprocess.run(
        ["ip", "netns", "exec", bed.worker, "nft", "-f", "-"],
        input=broken,
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )

    assert result.returncode != 0
    assert "Could not process rule" in result.stderr
    assert nft(bed.worker, "list", "table", "inet", "quil_cluster").stdout == before
    assert connect(bed.control, WORKER_TO_CONTROL, WORKER_PORT) == "connected"


def test_nft_removal_reopens_ports(bed, worker_listener):
    apply_nft(POLICY, runner=in_namespace(bed.worker))
    assert connect(bed.other, WORKER_TO_OTHER, WORKER_PORT, timeout=CONNECT_TIMEOUT) == "timeout"

    remove_nft(runner=in_namespace(bed.worker))

    assert connect(bed.other, WORKER_TO_OTHER, WORKER_PORT) == "connected"
    assert list_our_table(bed.worker).returncode != 0
    assert our_tables(bed.worker) == []


def test_nft_removal_when_absent(bed):
    remove_nft(runner=in_namespace(bed.worker))

    assert our_tables(bed.worker) == []


def test_nft_loads_ipv6_sources(bed):
    policy = HostPolicy(
        "worker-ns",
        WORKER_TO_CONTROL,
        (PortRule(WORKER_PORTS.ports, (CONTROL, "2001:db8::200"), "1.4 worker ports"),),
    )

    apply_nft(policy, runner=in_namespace(bed.worker))

    listing = nft(bed.worker, "list", "table", "inet", "quil_cluster").stdout
    assert "ip6 saddr 2001:db8::200 tcp dport 40000-40003 accept" in listing


def test_apply_nft_reports_real_stderr(bed):
    with pytest.raises(FirewallError) as caught:
        apply_nft(POLICY, nft="/nonexistent/nft", runner=in_namespace(bed.worker))

    message = str(caught.value)
    assert message.startswith("replacing table inet quil_cluster failed: /nonexistent/nft -f - exited with status 1: ")
    assert "No such file or directory" in message
