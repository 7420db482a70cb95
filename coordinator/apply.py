"""Drive every agent to the recorded assignment.

  0. renew agent certificates that are due
  1. render the canonical config from the control host's config.yml
  2. preflight: every reachable agent must bind the address the inventory
     records, else nothing is applied anywhere; read each host's config.yml hash
  3. phase one, all hosts in parallel (one at a time with max_failures): write
     the config, converge the workers, hold the control process
  4. if the control process must (re)start: wait until every worker listens
  5. phase two, control host only: start or restart the control process
A second run right after a successful one changes and restarts nothing.

Every Apply carries the config.yml hash read in step 2, and the agent changes
nothing when its file no longer has it, so an edit made between the preflight
and the push is never overwritten. A coordinator killed at any step leaves each
host on its old or its new config.yml (agents replace it atomically), and the
next apply reads the hashes afresh and finishes the job.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import grpc

from ..common.errors import InventoryError
from ..common.exitcodes import ExitCode
from ..proto import agent_pb2 as pb
from .client import (APPLY_TIMEOUT, CALL_TIMEOUT, CallError, Credentials, apply_request, call_error,
                     call_with_retries, firewall_message, for_each_host)
from .policy import host_policy
from .cluster import check_assignment_current
from .home import Home
from .metrics import record_apply
from .inventory import Host
from .render import read_keys, render_for_host, render_with_warnings

log = logging.getLogger(__name__)

# Seconds to wait for the workers to listen before the control process starts.
WORKERS_READY_TIMEOUT = 30.0

_CONTROL_NAMES = {
    pb.CONTROL_ACTION_NONE: "none", pb.CONTROL_ACTION_STARTED: "started",
    pb.CONTROL_ACTION_RESTARTED: "restarted", pb.CONTROL_ACTION_STOPPED: "stopped",
    pb.CONTROL_ACTION_HELD: "held",
}
# Outcomes of a host that did not converge.
NOT_CONVERGED = ("failed", "unreachable", "skipped")


@dataclass
class HostResult:
    name: str
    outcome: str  # unchanged, changed, failed, unreachable, skipped
    config_changed: bool = False
    started: list[int] = field(default_factory=list)
    stopped: list[int] = field(default_factory=list)
    restarted: list[int] = field(default_factory=list)
    control: str = "none"
    firewall_changed: bool = False
    warnings: list[str] = field(default_factory=list)
    error: str = ""
    exit_code: ExitCode = ExitCode.OK


@dataclass
class ApplyReport:
    config_generation: int
    config_sha256: str
    hosts: list[HostResult]
    seconds: float
    # Host name -> "renewed" or the renewal error, for certificates that were due.
    renewals: dict[str, str] = field(default_factory=dict)
    # What the render changed beyond the worker lists, with the fix.
    warnings: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> ExitCode:
        codes = [h.exit_code for h in self.hosts if h.exit_code != ExitCode.OK]
        return max(codes) if codes else ExitCode.OK


@contextlib.contextmanager
def apply_lock(home: Home, wait: bool) -> Iterator[None]:
    """Hold the cluster's apply lock; without wait, fail at once naming the holder."""
    home.require()
    with open(home.file("apply.lock"), "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown process"
            raise InventoryError(f"another apply is running ({holder}); wait for it, or pass --wait") from None
        handle.truncate(0)
        handle.write(_holder())
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)
            handle.flush()
            fcntl.flock(handle, fcntl.LOCK_UN)


def _holder() -> str:
    """Describe this process for the apply lock file, which a blocked apply prints."""
    command = shlex.join([os.path.basename(sys.argv[0]), *sys.argv[1:]]) if sys.argv else "?"
    return f"pid {os.getpid()}, command '{command}', started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"


def apply(home: Home, wait: bool = False, confirm_moves: Callable[[list[str]], bool] | None = None,
          progress: Callable[[str, str], None] | None = None, max_failures: int | None = None) -> ApplyReport:
    """Run one apply while holding the apply lock (see the module docstring for the steps).

    In 2.1 a core's index keys the worker's store and shard state, so cores that
    move to another host since the last apply need confirm_moves(lines) to
    return True; without it such an apply raises InventoryError.
    progress(host, step) is called from worker threads as each host moves on;
    its last step for a host is the host's outcome.

    max_failures None applies every host in parallel whatever fails. A number N
    applies the hosts one at a time in inventory order and stops after failure
    N + 1; the hosts after that are reported skipped.
    """
    if max_failures is not None and max_failures < 0:
        raise InventoryError(f"invalid --max-failures {max_failures}: use 0 or more")
    with apply_lock(home, wait):
        _check_moves(home, confirm_moves)
        report = _apply(home, progress or _no_progress, max_failures)
        if report.exit_code == ExitCode.OK:
            _record_applied(home)
        return report


def _check_moves(home: Home, confirm: Callable[[list[str]], bool] | None) -> None:
    settings = home.load_settings()
    assignment = home.load_assignment()
    if settings.node_generation != "2.1" or assignment is None:
        return
    before = {s.core: s.host for s in home.load_applied()}
    moves = [f"core {s.core}: {before[s.core]} -> {s.host}" for s in assignment.slots
             if s.core in before and before[s.core] != s.host]
    if not moves or (confirm is not None and confirm(moves)):
        return
    raise InventoryError(f"{len(moves)} cores move to another host ({'; '.join(moves)}); each resyncs its "
                         "shard state there, so confirm with quil-coord apply --yes")


def _record_applied(home: Home) -> None:
    assignment = home.load_assignment()
    if assignment is not None:
        with home.locked():
            home.save_applied(assignment.slots)


def _no_progress(host: str, step: str) -> None:
    pass


@record_apply
def _apply(home: Home, progress: Callable[[str, str], None], max_failures: int | None) -> ApplyReport:
    from .renew import renew_due

    started = time.monotonic()
    # 0. renew agent certificates that are due, over the same channels
    renewals = renew_due(home)
    with home.locked():
        settings = home.load_settings()
        everyone = home.load_hosts()
        assignment = check_assignment_current(home, home.load_assignment(), everyone)
        revoked = home.load_revoked()
    # Probe-only hosts run no node processes and get no config.
    hosts = [h for h in everyone if not h.probe_only]
    # 1. render
    text, warnings = render_with_warnings(settings, assignment.slots)
    cores = {h.name: sorted(s.core for s in assignment.slots if s.host == h.name) for h in hosts}
    credentials = Credentials(home)

    firewalls = {h.name: firewall_message(h.firewall, host_policy(settings, hosts, assignment.slots, h))
                 for h in hosts}
    control_host = next(h for h in hosts if h.control)
    texts = {h.name: render_for_host(settings, text, h.control, control_host.address) for h in hosts}
    keys = read_keys(settings) if settings.node_generation == "2.1" and len(hosts) > 1 else b""

    def request(host: Host, hold: bool) -> pb.ApplyRequest:
        message = apply_request(texts[host.name], settings.node_generation, assignment.config_generation,
                                cores[host.name], host.control, hold, revoked, firewalls[host.name])
        if keys and not host.control:
            message.keys_yaml = keys
            message.keys_sha256 = hashlib.sha256(keys).hexdigest()
        return message

    # 2. preflight: an agent whose agent.yaml disagrees with the inventory would reject its
    #    cores after other hosts had already changed, so stop before anyone changes
    for host in hosts:
        progress(host.name, "preflight")
    failed, bases = _preflight(credentials, hosts, settings.node_generation)
    mismatched = {name: r for name, r in failed.items() if r.outcome == "failed"}
    if mismatched:
        results = {h.name: failed.get(h.name) or HostResult(
            h.name, "skipped", error=f"not applied: {', '.join(sorted(mismatched))} failed the preflight")
            for h in hosts}
        for result in results.values():
            progress(result.name, result.outcome)
        return ApplyReport(assignment.config_generation, "", [results[h.name] for h in hosts],
                           time.monotonic() - started, renewals)
    for name, result in failed.items():
        progress(name, result.outcome)
    # 3. phase one, planned against the config.yml hashes the preflight read
    results = _roll_out(hosts, failed, lambda h: _call_apply(credentials, h, request(h, hold=True), bases[h.name],
                                                             progress), max_failures)
    control = next(h for h in hosts if h.control)
    if results[control.name].control == "held":
        _release_control(credentials, hosts, control, results, lambda h: request(h, hold=False), cores, progress)
    progress(control.name, results[control.name].outcome)
    report = ApplyReport(assignment.config_generation, request(control, True).config_sha256,
                         [results[h.name] for h in hosts], time.monotonic() - started, renewals, warnings)
    log.info("apply finished in %.2f s", report.seconds)
    return report


def _roll_out(hosts: list[Host], failed: dict[str, HostResult], work: Callable[[Host], HostResult],
              max_failures: int | None) -> dict[str, HostResult]:
    """Run work(host) for every host that passed the preflight; return the results by host name.

    Without max_failures the hosts run in parallel. With it they run one at a
    time, and once more than max_failures hosts failed (a preflight failure
    counts at the host's position in the inventory), the rest are skipped.
    """
    if max_failures is None:
        return failed | for_each_host([h for h in hosts if h.name not in failed], work)
    results: dict[str, HostResult] = {}
    failures = 0
    for host in hosts:
        if failures > max_failures:
            results[host.name] = HostResult(host.name, "skipped", error=(
                f"not applied: the rollout stopped after {failures} failed hosts (--max-failures {max_failures})"))
            continue
        results[host.name] = failed.get(host.name) or work(host)
        if results[host.name].outcome in NOT_CONVERGED:
            failures += 1
    if failures > max_failures:
        log.warning("rollout stopped after %d failed hosts (max failures %d)", failures, max_failures)
    return results


def _release_control(credentials: Credentials, hosts: list[Host], control: Host, results: dict[str, HostResult],
                     make_request, cores: dict[str, list[int]], progress: Callable[[str, str], None]) -> None:
    failed = [name for name, r in results.items() if r.outcome in NOT_CONVERGED]
    result = results[control.name]
    if failed:
        result.error = f"control process not started: hosts {', '.join(failed)} did not apply"
        return
    # 4. wait for the workers
    progress(control.name, "waiting for workers to listen")
    pending = _wait_workers_listening(credentials, hosts, cores)
    if pending:
        log.warning("starting the control process although cores %s do not listen yet", pending)
    # 5. phase two, planned against the config.yml phase one wrote
    progress(control.name, "starting control process")
    message = make_request(control)
    second = _call_apply(credentials, control, message, message.config_sha256)
    if second.outcome in NOT_CONVERGED:
        results[control.name] = second
        return
    result.control = second.control
    result.outcome = "changed"


def _preflight(credentials: Credentials, hosts: list[Host], generation: str
               ) -> tuple[dict[str, HostResult], dict[str, str]]:
    """Read every host's facts and config.yml hash.

    Returns a result for every host that failed: unreachable, or reachable but
    disagreeing with the inventory (outcome "failed"). It disagrees when it
    binds another address than recorded, or when its node binary's file name
    carries another release than the cluster's generation. Also returns the
    SHA-256 of config.yml on each other host ("" when it has none).
    """

    def check(host: Host) -> HostResult | str:
        channel, stub = credentials.stub(host)
        try:
            facts = call_with_retries(lambda: stub.GetHostFacts(pb.GetHostFactsRequest(), timeout=CALL_TIMEOUT),
                                      f"GetHostFacts on {host.name}")
            status = call_with_retries(lambda: stub.GetStatus(pb.GetStatusRequest(), timeout=CALL_TIMEOUT),
                                       f"GetStatus on {host.name}")
        except grpc.RpcError as err:
            return _failed(host, call_error(err))
        finally:
            channel.close()
        message = _disagreement(host, facts, generation)
        if message is not None:
            return HostResult(host.name, "failed", error=message, exit_code=ExitCode.HOST_FAILED)
        return status.config_file_sha256

    found = for_each_host(hosts, check)
    failed = {name: r for name, r in found.items() if isinstance(r, HostResult)}
    bases = {name: r for name, r in found.items() if isinstance(r, str)}
    return failed, bases


def _disagreement(host: Host, facts: pb.HostFacts, generation: str) -> str | None:
    if facts.worker_address != host.address:
        return (f"the agent's worker_address is {facts.worker_address}, the inventory says {host.address};"
                f" make them agree (edit agent.yaml on the host, or quil-coord host set {host.name} --address)")
    release = ".".join(facts.node_version.split(".")[:2])
    if facts.node_version and release != generation:
        return (f"the node binary {facts.node_binary_path} is release {facts.node_version}, but the cluster "
                f"renders configs for node {generation}; install a {generation} binary, or create the cluster "
                f"with quil-coord init --generation {release}")
    return None


def _call_apply(credentials: Credentials, host: Host, request: pb.ApplyRequest, base: str,
                progress: Callable[[str, str], None] = _no_progress) -> HostResult:
    """Send Apply planned against config.yml hash base; retry while the agent cannot be reached."""
    progress(host.name, "applying")
    request.check_base_config = True
    request.base_config_file_sha256 = base
    channel, stub = credentials.stub(host)
    attempts = 0

    def send() -> pb.ApplyResponse:
        nonlocal attempts
        attempts += 1
        if attempts > 1:
            _rebase(stub, request, base)
        return stub.Apply(request, timeout=APPLY_TIMEOUT)

    try:
        reply = call_with_retries(send, f"Apply on {host.name}")
    except grpc.RpcError as err:
        result = _failed(host, call_error(err))
        progress(host.name, result.outcome)
        return result
    finally:
        channel.close()
    control = _CONTROL_NAMES.get(reply.control, "none")
    result = HostResult(
        name=host.name, outcome="changed" if reply.changed else "unchanged", config_changed=reply.config_changed,
        started=list(reply.started), stopped=list(reply.stopped), restarted=list(reply.restarted), control=control,
        firewall_changed=reply.firewall_changed, warnings=list(reply.warnings),
    )
    # The control host's phase one ends with its control process held; its outcome comes after phase two.
    progress(host.name, "control process held" if result.control == "held" else result.outcome)
    return result


def _rebase(stub, request: pb.ApplyRequest, planned: str) -> None:
    """Before a retry, accept the config.yml an earlier attempt of this request may have written.

    A timed-out or cut call may still have reached the agent, whose file then
    contains the requested content. That is no edit by someone else, so the
    retry is planned against it. Any other content keeps the planned hash,
    and the agent rejects the stale plan.
    """
    status = stub.GetStatus(pb.GetStatusRequest(), timeout=CALL_TIMEOUT)
    on_disk = status.config_file_sha256
    request.base_config_file_sha256 = on_disk if on_disk == request.config_sha256 else planned
    # NOTE: an earlier attempt that is still running on the agent can write after this read;
    # the retry then waits for the agent's apply lock and is rejected as a stale plan.


def _failed(host: Host, error: CallError) -> HostResult:
    return HostResult(name=host.name, outcome=error.outcome, error=error.reason, exit_code=error.exit_code)


def _wait_workers_listening(credentials: Credentials, hosts: list[Host], cores: dict[str, list[int]]) -> list[int]:
    """Poll the hosts' status until all assigned cores listen; return the cores that never did.

    A host whose cores all listened is not polled again, so each round costs
    only as many status calls as hosts still starting workers.
    """
    deadline = time.monotonic() + WORKERS_READY_TIMEOUT
    waiting = [h for h in hosts if cores[h.name]]
    pending: list[int] = []
    while time.monotonic() < deadline:
        listening = for_each_host(waiting, lambda h: _listening_cores(credentials, h))
        waiting = [h for h in waiting if not set(cores[h.name]) <= listening[h.name]]
        pending = sorted(c for h in waiting for c in cores[h.name] if c not in listening[h.name])
        if not pending:
            return []
        time.sleep(0.1)
    return pending


def _listening_cores(credentials: Credentials, host: Host) -> set[int]:
    channel, stub = credentials.stub(host)
    try:
        status = stub.GetStatus(pb.GetStatusRequest(), timeout=CALL_TIMEOUT)
    except grpc.RpcError:
        return set()
    finally:
        channel.close()
    return {p.core for p in status.processes if p.listening}
