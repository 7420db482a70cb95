"""The agent's gRPC service and the one place that assembles the server."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from concurrent import futures
from pathlib import Path
from typing import Iterator

import grpc
import psutil

from .. import __version__
from ..common import tls
from ..common.firewall import HostPolicy, PortRule
from ..common.errors import ConfigError
from ..common.states import HELD_DETAIL, State
from ..proto import agent_pb2 as pb
from ..proto import agent_pb2_grpc as pb_grpc
from ..common.metricsserver import MetricsServer
from .config import AgentConfig
from . import hostinfo, logs, statelock
from . import metrics as agent_metrics
from .control import Controller, CoreResult
from .identity import AgentIdentity, InstallError
from .probe import ProbeError, probe_all
from .reconcile import CONTROL, MAX_CORES, Reconciler, RequestError, generation_name
from .supervisor import ProcessInfo, Supervisor, stop_leftovers

log = logging.getLogger(__name__)

_SERVICE = "/quil_cluster.agent.v1.Agent/"
_READERS = frozenset({"coordinator", "observer"})
_WRITERS = frozenset({"coordinator"})
# Roles allowed per method; a method missing here is denied to everyone.
POLICY = {
    _SERVICE + "GetHostFacts": _READERS,
    _SERVICE + "GetStatus": _READERS,
    _SERVICE + "WatchStatus": _READERS,
    _SERVICE + "Apply": _WRITERS,
    _SERVICE + "StopAll": _WRITERS,
    _SERVICE + "CreateCSR": _WRITERS,
    _SERVICE + "InstallCertificate": _WRITERS,
    _SERVICE + "Probe": _WRITERS,
    # Only the coordinator: the file carries the node's private keys.
    _SERVICE + "GetConfig": _WRITERS,
    _SERVICE + "Control": _WRITERS,
    # Node logs name peers and addresses: only the coordinator reads them.
    _SERVICE + "ReadLog": _WRITERS,
}

# Bounds on what one client can make the server hold. An Apply for 200 hosts of 64 workers carries
# a config.yml of 383 KB (node 1.4) or 762 KB (2.1, two worker lists), both measured.
MAX_RECEIVE_BYTES = 2 * 1024 * 1024
MAX_SEND_BYTES = 16 * 1024 * 1024
MAX_CONCURRENT_RPCS = 64
# Threads that run RPC handlers; further calls wait for a free one, up to MAX_CONCURRENT_RPCS in all.
RPC_THREADS = 16
# Status watches each role may hold at once. A watch keeps one RPC thread busy
# while it runs, so the pools together leave half the threads for other calls.
# Each role has its own pool, so observers cannot lock the coordinator out.
WATCH_SLOTS = {"coordinator": 4, "observer": 4}
# Maximum seconds one WatchStatus stream runs; the client then opens a new one.
MAX_WATCH_SECONDS = 600.0

_STATE_ENUM = {state: pb.ProcessState.Value(f"PROCESS_STATE_{state.name}") for state in State}
_PROBE_ENUM = {
    "open": pb.PROBE_OUTCOME_OPEN, "refused": pb.PROBE_OUTCOME_REFUSED, "timeout": pb.PROBE_OUTCOME_TIMEOUT,
    "error": pb.PROBE_OUTCOME_ERROR,
}
_CONTROL_ENUM = {
    "none": pb.CONTROL_ACTION_NONE, "started": pb.CONTROL_ACTION_STARTED,
    "restarted": pb.CONTROL_ACTION_RESTARTED, "stopped": pb.CONTROL_ACTION_STOPPED,
    "held": pb.CONTROL_ACTION_HELD,
}
_VERB_NAMES = {pb.CONTROL_VERB_START: "start", pb.CONTROL_VERB_STOP: "stop", pb.CONTROL_VERB_RESTART: "restart"}
_CONTROL_ERROR_ENUM = {
    "none": pb.CONTROL_ERROR_NONE, "already_running": pb.CONTROL_ERROR_ALREADY_RUNNING,
    "not_running": pb.CONTROL_ERROR_NOT_RUNNING, "not_assigned": pb.CONTROL_ERROR_NOT_ASSIGNED,
    "spawn_failed": pb.CONTROL_ERROR_SPAWN_FAILED, "timeout": pb.CONTROL_ERROR_TIMEOUT,
}


class AgentService(pb_grpc.AgentServicer):
    def __init__(self, config: AgentConfig, reconciler: Reconciler, identity: AgentIdentity) -> None:
        self.config = config
        self.reconciler = reconciler
        self.identity = identity
        self._watch_slots = {role: threading.BoundedSemaphore(count) for role, count in WATCH_SLOTS.items()}
        self._binary_hash: tuple[tuple[int, int], str] | None = None
        self._controller = Controller(reconciler)
        self._log_slots = threading.BoundedSemaphore(logs.MAX_STREAMS)

    def GetHostFacts(self, request: pb.GetHostFactsRequest, context: grpc.ServicerContext) -> pb.HostFacts:
        memory = psutil.virtual_memory()
        low, high = hostinfo.ephemeral_range() or (0, 0)
        facts = pb.HostFacts(
            hostname=socket.gethostname(),
            logical_cpus=psutil.cpu_count() or 0,
            physical_cpus=psutil.cpu_count(logical=False) or 0,
            memory_bytes=memory.total,
            agent_version=__version__,
            node_binary_path=str(self.config.node_binary),
            node_binary_sha256=self._node_binary_sha256(),
            worker_address=self.config.worker_address,
            node_config_dir=str(self.config.node_config_dir),
            node_version=hostinfo.node_version(self.config.node_binary),
            interface_addresses=hostinfo.interface_addresses(),
            ephemeral_port_low=low,
            ephemeral_port_high=high,
            ephemeral_reserved_ports=hostinfo.reserved_ports(),
            signature_files=hostinfo.signature_files(self.config.node_binary),
            signature_check_disabled=hostinfo.signature_check_disabled(self.config.node_args, self.config.node_env),
            worker_gomaxprocs=self.config.node_env.get("GOMAXPROCS", ""),
            memory_available_bytes=memory.available,
        )
        # Read last, after the binary's hash, so the coordinator compares its clock with the time of the reply.
        facts.unix_time = time.time()
        return facts

    def Apply(self, request: pb.ApplyRequest, context: grpc.ServicerContext) -> pb.ApplyResponse:
        timeout = context.time_remaining()
        if not self.reconciler.lock.acquire(timeout=max(0.0, (timeout or 30.0) - 1.0)):
            context.abort(grpc.StatusCode.ABORTED, "another apply is still running on this agent; retry")
        try:
            result = self.reconciler.apply(
                bytes(request.config_yaml), request.config_sha256, request.config_generation,
                generation_name(request.node_generation), list(request.cores), request.run_control,
                request.hold_control, list(request.revoked_serials), _firewall_of(request),
                (bytes(request.keys_yaml), request.keys_sha256),
                request.base_config_file_sha256 if request.check_base_config else None,
            )
        except RequestError as err:
            log.warning("apply rejected: %s (from %s)", err.message, context.peer())
            context.abort(err.code, err.message)
        finally:
            self.reconciler.lock.release()
        return pb.ApplyResponse(
            changed=result.changed, config_changed=result.config_changed, started=result.started,
            stopped=result.stopped, restarted=result.restarted, control=_CONTROL_ENUM[result.control],
            firewall_changed=result.firewall_changed, warnings=result.warnings,
        )

    def StopAll(self, request: pb.StopAllRequest, context: grpc.ServicerContext) -> pb.StopAllResponse:
        with self.reconciler.lock:
            return pb.StopAllResponse(stopped=self.reconciler.stop_all())

    def GetStatus(self, request: pb.GetStatusRequest, context: grpc.ServicerContext) -> pb.StatusResponse:
        return self._status()

    def WatchStatus(self, request: pb.WatchStatusRequest,
                    context: grpc.ServicerContext) -> Iterator[pb.StatusResponse]:
        identity = tls.peer_identity(context)
        role = identity.role if identity is not None else ""
        slots = self._watch_slots.get(role)
        if slots is None:
            # AuthorizationInterceptor lets only roles in POLICY call WatchStatus.
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"role '{role}' has no status watch slots")
        if not slots.acquire(blocking=False):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"at most {WATCH_SLOTS[role]} status watches at once for role '{role}'; close one and retry",
            )
        try:
            interval = min(60.0, max(0.2, request.interval_seconds or 1.0))
            end = time.monotonic() + MAX_WATCH_SECONDS
            while context.is_active() and time.monotonic() < end:
                yield self._status()
                time.sleep(interval)
        finally:
            slots.release()

    def CreateCSR(self, request: pb.CreateCSRRequest, context: grpc.ServicerContext) -> pb.CreateCSRResponse:
        return pb.CreateCSRResponse(csr_pem=self.identity.create_csr())

    def InstallCertificate(self, request: pb.InstallCertificateRequest,
                           context: grpc.ServicerContext) -> pb.InstallCertificateResponse:
        try:
            not_after, serial = self.identity.install(bytes(request.cert_pem), bytes(request.ca_bundle_pem))
        except InstallError as err:
            log.warning("certificate install rejected: %s (from %s)", err, context.peer())
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        return pb.InstallCertificateResponse(not_after=not_after, serial=serial)

    def Probe(self, request: pb.ProbeRequest, context: grpc.ServicerContext) -> pb.ProbeResponse:
        targets = [(t.address, t.port) for t in request.targets]
        try:
            outcomes = probe_all(targets, request.timeout_seconds)
        except ProbeError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        return pb.ProbeResponse(results=[
            pb.ProbeResult(target=target, outcome=_PROBE_ENUM[outcome], detail=detail)
            for target, (outcome, detail) in zip(request.targets, outcomes)
        ])

    def GetConfig(self, request: pb.GetConfigRequest, context: grpc.ServicerContext) -> pb.GetConfigResponse:
        try:
            return pb.GetConfigResponse(config_yaml=self.reconciler.config_path.read_bytes(), exists=True)
        except FileNotFoundError:
            return pb.GetConfigResponse(exists=False)

    def Control(self, request: pb.ControlRequest, context: grpc.ServicerContext) -> pb.ControlResponse:
        verb = _VERB_NAMES.get(request.verb)
        if verb is None:
            name = pb.ControlVerb.Name(request.verb) if request.verb in pb.ControlVerb.values() else "unknown"
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"verb {request.verb} ({name}) is not valid; use START, STOP or RESTART")
        # Leave a second of the call's deadline for the response to travel back.
        remaining = context.time_remaining()
        wait = request.wait_seconds if remaining is None else min(request.wait_seconds, max(0.0, remaining - 1.0))
        try:
            results = self._controller.run(verb, list(request.cores), wait)
        except RequestError as err:
            log.warning("control rejected: %s (from %s)", err.message, context.peer())
            context.abort(err.code, err.message)
        return pb.ControlResponse(results=[_control_result(result) for result in results])

    def ReadLog(self, request: pb.ReadLogRequest, context: grpc.ServicerContext) -> Iterator[pb.LogChunk]:
        path = self._log_path(request.core, context)
        if not self._log_slots.acquire(blocking=False):
            log.warning("log stream rejected: core=%d, all %d slots in use (from %s)", request.core,
                        logs.MAX_STREAMS, context.peer())
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"at most {logs.MAX_STREAMS} log streams at once; close one and retry")
        try:
            end = time.monotonic() + logs.MAX_FOLLOW_SECONDS

            def keep_going() -> bool:
                return context.is_active() and time.monotonic() < end

            for chunk in logs.stream(path, logs.clamp_lines(request.lines), request.follow, keep_going):
                yield pb.LogChunk(data=chunk.data, truncated=chunk.truncated)
        finally:
            self._log_slots.release()

    def _log_path(self, core: int, context: grpc.ServicerContext) -> Path:
        """Return the log file of core, which must be assigned to this host or have a log file."""
        if core > MAX_CORES:
            log.warning("log stream rejected: core=%d is out of range (from %s)", core, context.peer())
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"core {core} is out of range; core indices go "
                                                            f"from 0 (the control process) to {MAX_CORES}")
        path = logs.log_file(self.config.log_dir, core)
        if core not in self.reconciler.assigned() and not path.exists():
            log.warning("log stream rejected: core=%d is unknown here (from %s)", core, context.peer())
            context.abort(grpc.StatusCode.NOT_FOUND, f"core {core} is not assigned to this host and has no log "
                                                     "file here; check the core with quil-coord status")
        return path

    def _status(self) -> pb.StatusResponse:
        desired = self.reconciler.desired
        return pb.StatusResponse(
            hostname=socket.gethostname(), config_generation=desired.config_generation,
            config_sha256=desired.config_sha256,
            processes=self._processes(),
            cert_not_after=self.identity.not_after,
            node_version=hostinfo.node_version(self.config.node_binary),
            config_file_sha256=hostinfo.file_sha256(self.reconciler.config_path),
        )

    def _processes(self) -> list[pb.ProcessStatus]:
        """Return the supervised processes, and a STOPPED entry for each held core the supervisor does not run."""
        processes = [_process_status(info) for info in self.reconciler.supervisor.snapshot()]
        running = {p.core for p in processes}
        host = self.reconciler.host_name
        processes += [pb.ProcessStatus(core=core, state=pb.PROCESS_STATE_STOPPED,
                                       detail=f"{HELD_DETAIL}; quil-coord start {host} --core {core} starts it")
                      for core in self.reconciler.desired.held if core not in running]
        for process in processes:
            process.held = process.core in self.reconciler.desired.held
        return sorted(processes, key=lambda p: p.core)

    def _node_binary_sha256(self) -> str:
        path = self.config.node_binary
        try:
            stat = path.stat()
        except OSError:
            return ""
        key = (stat.st_mtime_ns, stat.st_size)
        if self._binary_hash is None or self._binary_hash[0] != key:
            self._binary_hash = (key, _file_sha256(path))
        return self._binary_hash[1]


def _firewall_of(request: pb.ApplyRequest) -> tuple[str, HostPolicy | None]:
    spec = request.firewall
    if not spec.mode or spec.mode == "off":
        return "off", None
    rules = tuple(PortRule(ports=tuple(r.ports), sources=tuple(r.sources), purpose=r.purpose) for r in spec.rules)
    return spec.mode, HostPolicy(host=spec.host, address=spec.address, rules=rules)


def _process_status(info: ProcessInfo) -> pb.ProcessStatus:
    return pb.ProcessStatus(
        core=info.core, pid=info.pid, state=_STATE_ENUM[info.state], start_time=info.start_time,
        restarts=info.restarts, has_last_exit=info.last_exit is not None,
        last_exit_status=info.last_exit or 0, cpu_percent=info.cpu_percent, rss_bytes=info.rss_bytes,
        listen_address=info.listen_address, listening=info.listening, detail=info.detail,
        listen_sockets=info.listen_sockets,
    )


def _control_result(result: CoreResult) -> pb.ControlResult:
    state = pb.PROCESS_STATE_STOPPED if result.state is None else _STATE_ENUM[result.state]
    return pb.ControlResult(core=result.core, error=_CONTROL_ERROR_ENUM[result.error], state=state, pid=result.pid,
                            detail=result.detail)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Agent:
    """A running agent: supervisor, reconciler and gRPC server."""

    def __init__(self, server: grpc.Server, supervisor: Supervisor, reconciler: Reconciler, port: int,
                 metrics: MetricsServer | None = None, state_lock: statelock.StateLock | None = None) -> None:
        self.server = server
        self.state_lock = state_lock
        self.supervisor = supervisor
        self.reconciler = reconciler
        self.port = port
        # The Prometheus endpoint, or None when metrics_address is off or could not be bound.
        self.metrics = metrics

    def stop(self, stop_processes: bool = True) -> None:
        if self.metrics is not None:
            self.metrics.stop()
        self.server.stop(grace=2.0).wait(5.0)
        with self.reconciler.lock:
            self.reconciler.closed = True
        if stop_processes:
            with self.reconciler.lock:
                self.supervisor.stop(sorted(c for c in self.supervisor.specs() if c != CONTROL))
                self.supervisor.stop([CONTROL])
        self.supervisor.close()
        if self.state_lock is not None:
            self.state_lock.release()


def _make_directories(config: AgentConfig) -> None:
    """Create the state and log directories (owner only); raise ConfigError naming a path that fails."""
    for directory, what in ((config.state_dir, "state directory"), (config.log_dir, "log directory")):
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as err:
            reason = "it exists and is not a directory" if isinstance(err, FileExistsError) else err.strerror or str(err)
            raise ConfigError(
                f"{directory}: cannot create the agent's {what} ({reason}); "
                "set state_dir in agent.yaml to a directory the agent can create and write"
            ) from err


def build_server(config: AgentConfig) -> Agent:
    """Assemble and start the agent, in order:

    1. check the TLS files, create the state and log directories (owner
       only) and lock the state directory, so a bad setup or a second agent
       on the same state_dir fails before any node process starts
    2. bind the API port, after the checks of step 1, because gRPC
       releases a bound port only once the server has started and stopped
    3. stop processes an earlier run of this agent left behind
    4. start the supervisor loop and restore the persisted desired state
    5. serve the Agent API over mutual TLS with per-method authorization
    6. serve the Prometheus metrics on plain HTTP at metrics_address, unless off
    """
    # 1. TLS files and directories
    identity = AgentIdentity(config)
    _make_directories(config)
    state_lock = statelock.acquire(config.state_dir)
    try:
        return _build(config, identity, state_lock)
    except BaseException:
        state_lock.release()
        raise


def _build(config: AgentConfig, identity: AgentIdentity, state_lock: statelock.StateLock) -> Agent:
    # 2. port
    reconciler_ref: list[Reconciler] = []

    def revoked() -> frozenset[str]:
        return reconciler_ref[0].revoked if reconciler_ref else frozenset()

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=RPC_THREADS, thread_name_prefix="rpc"),
        interceptors=[tls.AuthorizationInterceptor(config.cluster, POLICY, revoked=revoked)],
        options=[
            ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
            ("grpc.max_send_message_length", MAX_SEND_BYTES),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
    )
    try:
        port = server.add_secure_port(config.listen, identity.server_credentials())
    except RuntimeError as err:
        raise ConfigError(f"cannot listen on {config.listen} ({err}); is another agent running there?") from err

    # 3. leftovers
    policy = config.supervisor_policy()
    table = config.state_dir / "processes.json"
    stopped = stop_leftovers(table, policy.stop_grace_seconds)
    if stopped:
        log.info("stopped %d processes left by an earlier run: cores %s", len(stopped), stopped)

    # 4. supervisor and desired state
    supervisor = Supervisor(table, policy, instance_id=f"{os.getpid()}-{uuid.uuid4().hex[:12]}")
    supervisor.begin()
    reconciler = Reconciler(config, supervisor)
    # The coordinator issues the agent certificate for the host's inventory name.
    reconciler.host_name = identity.identity.name
    reconciler_ref.append(reconciler)
    with reconciler.lock:
        reconciler.restore()

    # 5. serve
    pb_grpc.add_AgentServicer_to_server(AgentService(config, reconciler, identity), server)
    server.start()
    log.info("listening: agent API on %s (mutual TLS, cluster %s)", config.listen, config.cluster)

    # 6. metrics
    metrics = agent_metrics.start_server(
        config.metrics_address, agent_metrics.AgentCollector(supervisor, reconciler, identity, config.node_binary))
    return Agent(server, supervisor, reconciler, port, metrics, state_lock)
