"""Mutual-TLS clients for the agents, and the one table from gRPC status to outcome."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import socket
import ssl
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

import grpc
from cryptography import x509

from ..common import pki, tls
from ..common.firewall import HostPolicy
from ..common.errors import TLSError
from ..common.exitcodes import ExitCode
from ..proto import agent_pb2 as pb
from ..proto import agent_pb2_grpc as pb_grpc
from .home import Home
from .inventory import Host

T = TypeVar("T")

log = logging.getLogger(__name__)

# Seconds allowed for one quick call (facts, status) and for one Apply.
CALL_TIMEOUT = 10.0
APPLY_TIMEOUT = 120.0
# Hosts contacted at the same time.
MAX_PARALLEL = 64

# Status codes after which a call is sent again: the agent was not reached, or the call timed out.
RETRY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# Attempts per call, the first one included.
RETRY_ATTEMPTS = 3
# Seconds before the first retry; each further retry doubles it, up to RETRY_MAX_DELAY.
RETRY_BASE_DELAY = 0.5
RETRY_MAX_DELAY = 4.0

GENERATION_ENUM = {"1.4": pb.NODE_GENERATION_1_4, "2.0": pb.NODE_GENERATION_2_0, "2.1": pb.NODE_GENERATION_2_1}

# gRPC status -> (outcome shown per host, exit status of the command).
OUTCOMES: dict[grpc.StatusCode, tuple[str, ExitCode]] = {
    grpc.StatusCode.UNAVAILABLE: ("unreachable", ExitCode.UNREACHABLE),
    grpc.StatusCode.DEADLINE_EXCEEDED: ("unreachable", ExitCode.UNREACHABLE),
    grpc.StatusCode.UNAUTHENTICATED: ("failed", ExitCode.TLS),
    grpc.StatusCode.PERMISSION_DENIED: ("failed", ExitCode.TLS),
}
DEFAULT_OUTCOME = ("failed", ExitCode.HOST_FAILED)


@dataclass
class CallError:
    """A failed call to one agent, already mapped to an outcome."""

    outcome: str
    exit_code: ExitCode
    reason: str


def call_error(err: grpc.RpcError) -> CallError:
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    outcome, exit_code = OUTCOMES.get(code, DEFAULT_OUTCOME)
    details = (err.details() if hasattr(err, "details") else "") or code.name
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        details = "timed out"
    elif code == grpc.StatusCode.UNAVAILABLE and "Socket closed" in details:
        # A rejected TLS handshake looks like this to the client; the agent's log has the reason.
        details += "; if the agent is running, check that its certificates come from this cluster's CA"
    return CallError(outcome, exit_code, f"{code.name.lower()}: {details}")


def retry_delay(retry: int, rng: random.Random) -> float:
    """Return the seconds to wait before retry number retry (1 for the first).

    The nominal delay doubles from RETRY_BASE_DELAY up to RETRY_MAX_DELAY; the
    result is drawn uniformly from its upper half, so hosts that failed
    together do not retry in lockstep.
    """
    nominal = min(RETRY_MAX_DELAY, RETRY_BASE_DELAY * 2 ** (retry - 1))
    return rng.uniform(nominal / 2, nominal)


def call_with_retries(call: Callable[[], T], what: str, *, attempts: int = RETRY_ATTEMPTS,
                      rng: random.Random | None = None, sleep: Callable[[float], None] | None = None) -> T:
    """Return call(), sending it again after a status in RETRY_CODES, at most attempts times in all.

    Any other error, and the last retryable one, is raised to the caller.
    """
    rng = rng or random.Random()
    # Looked up per call, so a test can replace time.sleep.
    sleep = sleep or time.sleep
    for attempt in range(1, attempts):
        try:
            return call()
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
            if code not in RETRY_CODES:
                raise
            delay = retry_delay(attempt, rng)
            log.warning("retry: %s failed (%s); attempt %d of %d in %.2f s", what, code.name.lower(),
                        attempt + 1, attempts, delay)
            sleep(delay)
    return call()


class Credentials:
    """The coordinator's client credentials, loaded once per command."""

    def __init__(self, home: Home) -> None:
        home.require()
        paths = {name: home.file(name) for name in ("coordinator.key", "coordinator.crt", "ca.crt")}
        try:
            key, cert = paths["coordinator.key"].read_bytes(), paths["coordinator.crt"].read_bytes()
            bundle = home.trust_bundle()
        except OSError as err:
            raise TLSError(f"failed to read {err.filename}: {err.strerror}") from err
        # During a CA rotation the bundle contains both CAs, and agents may serve either.
        pki.check_pair(key, cert, bundle, key_path=paths["coordinator.key"], cert_path=paths["coordinator.crt"],
                       ca_path=paths["ca.crt"])
        self.channel_credentials = tls.channel_credentials(key, cert, bundle)
        self.revoked = frozenset(home.load_revoked())
        self._paths, self._bundle = paths, bundle
        self._context: ssl.SSLContext | None = None
        # Agent addresses whose certificate passed the revocation check during this command.
        self._checked: set[str] = set()
        self._checked_lock = threading.Lock()

    def stub(self, host: Host) -> tuple[grpc.Channel, pb_grpc.AgentStub]:
        channel = tls.secure_channel(host.agent, self.channel_credentials)
        stub = pb_grpc.AgentStub(channel)
        if self.revoked:
            return channel, _CheckedStub(stub, lambda: self._check_server(host))  # type: ignore[return-value]
        return channel, stub

    def _check_server(self, host: Host) -> None:
        """Raise RevokedPeer when the agent at host.agent presents a revoked certificate.

        gRPC's Python client exposes no hook to see the server's certificate, so
        this opens one extra mutual-TLS connection before the first call to
        each address in this command; later channels to a checked address skip
        it. NOTE: it checks that connection, not the ones gRPC then opens to
        the same address.
        """
        with self._checked_lock:
            if host.agent in self._checked:
                return
        try:
            with open_agent_tls(host, self._client_context()) as wrapped:
                der = wrapped.getpeercert(binary_form=True)
        except (OSError, ssl.SSLError):
            return  # the gRPC call reports the connection failure itself
        serial = format(x509.load_der_x509_certificate(der).serial_number, "x")
        if serial in self.revoked:
            raise RevokedPeer(host.name, serial)
        with self._checked_lock:
            self._checked.add(host.agent)

    def _client_context(self) -> ssl.SSLContext:
        """Return the TLS context of the revocation checks, built on first use (an SSLContext is thread-safe)."""
        with self._checked_lock:
            if self._context is None:
                context = agent_tls_context(self._bundle)
                context.load_cert_chain(self._paths["coordinator.crt"], self._paths["coordinator.key"])
                self._context = context
            return self._context


def agent_tls_context(bundle: bytes) -> ssl.SSLContext:
    """Build a TLS client context that trusts the cluster's CAs and leaves name checks to gRPC.

    It serves raw checks of an agent's port, which read what the handshake shows.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata=bundle.decode())
    context.set_alpn_protocols(["h2"])
    return context


@contextlib.contextmanager
def open_agent_tls(host: Host, context: ssl.SSLContext) -> Iterator[ssl.SSLSocket]:
    """Open a TLS connection to the host's agent port; raises OSError or ssl.SSLError."""
    address, _, port = host.agent.rpartition(":")
    with socket.create_connection((address.strip("[]"), int(port)), timeout=CALL_TIMEOUT) as raw:
        with context.wrap_socket(raw) as wrapped:
            yield wrapped


class RevokedPeer(grpc.RpcError):
    """Raised instead of a call when the agent presents a revoked certificate."""

    def __init__(self, host: str, serial: str) -> None:
        super().__init__(f"{host}: agent certificate {serial} has been revoked")
        self.serial = serial

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAUTHENTICATED

    def details(self) -> str:
        return f"the agent presents revoked certificate {self.serial}; enroll the host again"


class _CheckedStub:
    """An AgentStub whose calls first check the agent's certificate against the revocation list."""

    def __init__(self, stub: pb_grpc.AgentStub, check: Callable[[], None]) -> None:
        self._stub = stub
        self._check = check
        self._checked = False

    def __getattr__(self, name: str) -> Callable[..., object]:
        method = getattr(self._stub, name)

        def call(*args: object, **kwargs: object) -> object:
            if not self._checked:
                self._check()
                self._checked = True
            return method(*args, **kwargs)

        return call


def for_each_host(hosts: Iterable[Host], work: Callable[[Host], T]) -> dict[str, T]:
    """Run work(host) for every host in parallel; returns results by host name."""
    hosts = list(hosts)
    if not hosts:
        return {}
    with futures.ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(hosts))) as pool:
        results = pool.map(work, hosts)
        return {host.name: result for host, result in zip(hosts, results)}


def firewall_message(mode: str, policy: HostPolicy) -> pb.Firewall:
    rules = [pb.FirewallRule(ports=list(r.ports), sources=list(r.sources), purpose=r.purpose) for r in policy.rules]
    return pb.Firewall(mode=mode, host=policy.host, address=policy.address, rules=rules)


def apply_request(config_text: str, generation: str, config_generation: int, cores: list[int],
                  run_control: bool, hold_control: bool, revoked: list[str],
                  firewall: pb.Firewall | None = None) -> pb.ApplyRequest:
    data = config_text.encode("utf-8")
    return pb.ApplyRequest(
        config_yaml=data, config_sha256=hashlib.sha256(data).hexdigest(), config_generation=config_generation,
        node_generation=GENERATION_ENUM[generation], cores=cores, run_control=run_control,
        hold_control=hold_control, revoked_serials=revoked, firewall=firewall,
    )
