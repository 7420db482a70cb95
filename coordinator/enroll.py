"""The enrollment endpoint (quil-coord serve): join tokens traded for agent certificates.

A join, in order:
  1. the source address must not have too many recent failures
  2. the token is consumed (before anything else is checked, so a token
     raced by two hosts is accepted once)
  3. the request is checked: signing request, worker address, agent port
  4. the coordinator picks the host name (from the token, else from the token
     id), signs the request's key for that name and records the host
  5. auto-apply: once the new agent responds, assign and apply run.
Every failed token check gets the same message and an audit log line.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import logging
import os
import threading
import time
from concurrent import futures

import grpc

from ..common import pki
from ..common.errors import InventoryError, QuilClusterError, TLSError
from ..common.files import write_atomic
from ..proto import agent_pb2 as pb
from ..proto import enroll_pb2 as epb
from ..proto import enroll_pb2_grpc as epb_grpc
from . import audit, inventory, tokens
from .bundle import sign_agent_csr
from .client import CALL_TIMEOUT, Credentials
from .home import Home
from .inventory import Host

log = logging.getLogger(__name__)

# Seconds the auto-apply waits for a joined host's agent to respond.
AGENT_WAIT_SECONDS = 60.0
DEFAULT_ENROLL_PORT = 7351


def enroll_host(home: Home, token: tokens.TokenRecord, request: epb.JoinRequest) -> epb.JoinResponse:
    """Check the request, sign its key for the host the token allows, and record the host."""
    with home.locked():
        settings = home.load_settings()
        hosts = home.load_hosts()
        address = check_worker_address(request.worker_address, settings.local, hosts)
        if not 1 <= request.agent_port <= 65535:
            raise InventoryError(f"invalid agent port {request.agent_port}: use 1 to 65535")
        if token.workers is None and request.logical_cpus < 1:
            raise InventoryError("the join request reports no CPUs; create a token with --workers N")
        # Each use of a multi-use token gets its own name: host-ID, host-ID-2, host-ID-3 ...
        use = token.uses_total - token.uses_left
        name = token.host_name or (f"host-{token.id}" if use <= 1 else f"host-{token.id}-{use}")
        if any(h.name == name for h in hosts):
            raise InventoryError(f"host name {name} is already in the inventory; create a token with another --host-name")
        endpoint = f"[{address}]:{request.agent_port}" if ":" in address else f"{address}:{request.agent_port}"
        host = Host(name=name, address=address, agent=endpoint, workers=token.workers,
                    cpus=request.logical_cpus or None, firewall=settings.firewall)
        cert_pem = sign_agent_csr(home, settings.name, host, request.csr_pem, settings.agent_cert_days)
        host.serial, host.cert_not_after = pki.serial_hex(cert_pem), pki.not_after(cert_pem)
        inventory.check_unique(hosts + [host])
        home.save_hosts(hosts + [host])
    return epb.JoinResponse(cert_pem=cert_pem, ca_pem=home.trust_bundle(), cluster=settings.name,
                            host_name=name, worker_address=address, agent_listen=endpoint)


def check_worker_address(proposed: str, local: bool, hosts: list[Host]) -> str:
    """Validate the address a joining host proposes for its workers."""
    try:
        address = ipaddress.ip_address(proposed)
    except ValueError as err:
        raise InventoryError(f"proposed worker address '{proposed}' is not an IP address; pass --address") from err
    if address.is_unspecified or address.is_multicast:
        raise InventoryError(f"proposed worker address {address} is not a host address; pass --address")
    if address.is_loopback and not local:
        raise InventoryError(
            f"proposed worker address {address} is loopback, which other hosts cannot reach; pass --address"
        )
    for host in hosts:
        if host.address == str(address):
            raise InventoryError(f"worker address {address} is already used by host {host.name}; pass --address")
    return str(address)


class EnrollmentService(epb_grpc.EnrollmentServicer):
    def __init__(self, home: Home, limiter: audit.FailureLimiter, on_joined) -> None:
        self.home = home
        self.limiter = limiter
        self.on_joined = on_joined

    def Join(self, request: epb.JoinRequest, context: grpc.ServicerContext) -> epb.JoinResponse:
        source = _source_address(context.peer())
        if not self.limiter.allowed(source):
            audit.record(self.home, "join", source=source, outcome="rate_limited")
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many failed joins from this address; wait a minute")
        try:
            token = tokens.consume(self.home, request.token)
        except tokens.JoinRejected as err:
            self.limiter.failed(source)
            audit.record(self.home, "join", source=source, outcome="rejected", reason=err.reason)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(err))
        try:
            response = enroll_host(self.home, token, request)
        except (InventoryError, TLSError) as err:
            self.limiter.failed(source)
            audit.record(self.home, "join", source=source, outcome="invalid", token_id=token.id, reason=str(err))
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        audit.record(self.home, "join", source=source, outcome="joined", token_id=token.id,
                     host=response.host_name, address=response.worker_address)
        log.info("joined: host %s (%s) with token %s", response.host_name, response.worker_address, token.id)
        self.on_joined(response.host_name)
        return response


def _source_address(peer: str) -> str:
    """Turn gRPC's peer string (ipv4:1.2.3.4:5678, ipv6:[::1]:5678) into the address alone."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rpartition(":")[0].strip("[]")
    return peer


class AutoApply:
    """Assign and apply after joins, one run at a time, once every joined agent responds."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self._pending: set[str] = set()
        self._wake = threading.Condition()
        self._closing = False
        self.runs = 0
        self.last_error = ""
        self._thread = threading.Thread(target=self._loop, name="auto-apply", daemon=True)

    def begin(self) -> None:
        self._thread.start()

    def notify(self, host_name: str) -> None:
        with self._wake:
            self._pending.add(host_name)
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(5.0)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._closing:
                    self._wake.wait()
                if self._closing:
                    return
            time.sleep(0.2)  # joins that arrive together are applied together
            with self._wake:
                names, self._pending = self._pending, set()
            self._run(names)

    def _run(self, names: set[str]) -> None:
        from .apply import apply
        from .cluster import run_assign
        from .facts import host_facts

        try:
            if not self.home.load_settings().auto_apply:
                return
            self._wait_for_agents(names)
            run_assign(self.home, lambda hosts, required: host_facts(self.home, hosts, required), dry_run=False)
            report = apply(self.home, wait=True)
            self.runs += 1
            self.last_error = ""
            log.info("auto-apply after joins of %s: %s", ", ".join(sorted(names)),
                     ", ".join(f"{h.name} {h.outcome}" for h in report.hosts))
        except QuilClusterError as err:
            self.last_error = str(err)
            log.error("auto-apply after joins of %s failed: %s; run quil-coord apply", ", ".join(sorted(names)), err)

    def _wait_for_agents(self, names: set[str]) -> None:
        credentials = Credentials(self.home)
        deadline = time.monotonic() + AGENT_WAIT_SECONDS
        waiting = [h for h in self.home.load_hosts() if h.name in names]
        while waiting:
            # A host removed meanwhile is no longer waited for.
            current = {h.name for h in self.home.load_hosts()}
            waiting = [h for h in waiting if h.name in current and not _answers(credentials, h)]
            if waiting and time.monotonic() > deadline:
                raise InventoryError(f"joined hosts {', '.join(h.name for h in waiting)} did not respond within "
                                     f"{AGENT_WAIT_SECONDS:.0f} s; start quil-agent run on them")
            time.sleep(0.1 if waiting else 0)


def _answers(credentials: Credentials, host: Host) -> bool:
    channel, stub = credentials.stub(host)
    try:
        stub.GetHostFacts(pb.GetHostFactsRequest(), timeout=min(CALL_TIMEOUT, 2.0))
        return True
    except grpc.RpcError:
        return False
    finally:
        channel.close()


class Renewer:
    """Renew agent certificates that are due, every interval seconds."""

    def __init__(self, home: Home, interval: float = 60.0) -> None:
        self.home = home
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="renewer", daemon=True)

    def begin(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _loop(self) -> None:
        from .renew import renew_due

        while not self._stop.wait(self.interval):
            try:
                renew_due(self.home)
            except QuilClusterError as err:
                log.error("certificate renewal round failed: %s; retrying in %.0f s", err, self.interval)


class EnrollmentServer:
    def __init__(self, server: grpc.Server, port: int, auto_apply: AutoApply, renewer: Renewer, lock) -> None:
        self.server = server
        self.port = port
        self.auto_apply = auto_apply
        self.renewer = renewer
        self._lock = lock

    def stop(self) -> None:
        self.server.stop(grace=2.0).wait(5.0)
        self.auto_apply.close()
        self.renewer.close()
        self._lock.close()


def _hold_serve_lock(home: Home):
    """Hold serve.lock for the life of this process, so a second serve on the same state fails fast."""
    handle = open(home.file("serve.lock"), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise InventoryError(f"quil-coord serve is already running for {home.path} ({holder}); stop it first") from None
    handle.truncate(0)
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    return handle


def build_server(home: Home, listen: str, advertise: str) -> EnrollmentServer:
    """Assemble and start the enrollment endpoint, in order:

    1. issue the endpoint's TLS certificate for the advertised address
    2. start the auto-apply and certificate renewal threads
    3. serve Enrollment over TLS; the chain includes the CA so joining
       hosts can check it against their pinned hash
    4. record the address in serve.json for quil-coord token create
    """
    settings = home.load_settings()
    lock = _hold_serve_lock(home)
    # 1. certificate
    host = advertise.rpartition(":")[0].strip("[]")
    try:
        ips, dns = [str(ipaddress.ip_address(host))], []
    except ValueError:
        ips, dns = [], [host]
    ca_key, ca_cert = home.signing_ca()
    key, cert = pki.issue(ca_key, ca_cert, pki.Identity(settings.name, "coordinator", "coordinator"),
                          ip_addresses=ips, dns_names=dns)
    # 2. auto-apply and certificate renewal
    auto_apply = AutoApply(home)
    auto_apply.begin()
    renewer = Renewer(home)
    renewer.begin()
    # 3. server
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="join"),
                         options=[("grpc.max_receive_message_length", 64 * 1024), ("grpc.so_reuseport", 0)],
                         maximum_concurrent_rpcs=64)
    limiter = audit.FailureLimiter()
    epb_grpc.add_EnrollmentServicer_to_server(EnrollmentService(home, limiter, auto_apply.notify), server)
    credentials = grpc.ssl_server_credentials([(key, cert + ca_cert)], root_certificates=None,
                                              require_client_auth=False)
    try:
        port = server.add_secure_port(listen, credentials)
    except RuntimeError as err:
        auto_apply.close()
        renewer.close()
        lock.close()
        raise InventoryError(f"cannot listen on {listen} ({err}); is quil-coord serve already running?") from err
    server.start()
    # 4. serve.json
    advertised = advertise if not advertise.endswith(":0") else f"{advertise.rpartition(':')[0]}:{port}"
    write_atomic(home.file("serve.json"), json.dumps({"address": advertised, "pid": os.getpid()}).encode(),
                 mode=0o600)
    log.info("listening: enrollment on %s (advertised as %s)", listen, advertised)
    return EnrollmentServer(server, port, auto_apply, renewer, lock)


def advertised_address(home: Home) -> str | None:
    """Return the address quil-coord serve recorded, or None when it never ran."""
    try:
        return json.loads(home.file("serve.json").read_text())["address"]
    except (OSError, ValueError, KeyError):
        return None
