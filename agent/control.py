"""Start, stop and restart single node processes on request (quil-coord start, stop, restart).

A request runs in two parts. The action (hold or release, stop, spawn) runs
in its own thread under the reconciler lock, because a stop can take the
whole grace period and must not hold an RPC thread past the request's
wait_seconds. The RPC thread waits for the action and then for each process
to reach its target state, until wait_seconds end. An action still under way
at that point goes on, and its cores are reported as TIMEOUT with the state
reached so far.

  stop     hold the core (persisted), then stop it     target: not running
  start    release the hold, spawn unless running      target: RUNNING
  restart  release the hold, stop if running, spawn    target: RUNNING

A new spawn replaces the supervisor's record, so start and restart also end
a FATAL crash loop. A process that exits before it counts as started is
reported as spawn_failed; the supervisor keeps restarting it with backoff.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import grpc

from ..common.states import ALIVE_STATES, State
from .reconcile import CONTROL, MAX_CORES, Reconciler, RequestError
from .supervisor import Progress

log = logging.getLogger(__name__)

VERBS = ("start", "stop", "restart")
# Upper bound of wait_seconds; larger values are clamped to it.
MAX_WAIT_SECONDS = 120.0
# Cores in one request: a host's 4096 workers at most, and its control process. It keeps the
# reply, one result per core, within the coordinator's 4 MiB message limit.
MAX_REQUEST_CORES = 4097
# Control requests whose action may be queued or running at once. More are rejected,
# so a client cannot pile up threads that wait for the reconciler lock.
MAX_PENDING_ACTIONS = 4
# Seconds between checks of a process's state while waiting.
POLL_SECONDS = 0.05
# Seconds the action itself gets with wait 0, so the reply still reports already running, not running or
# spawned. The action needs only the lock and a fork.
NO_WAIT_ACTION_SECONDS = 1.0


@dataclass
class CoreResult:
    core: int
    # none, already_running, not_running, not_assigned, spawn_failed or timeout.
    error: str = "none"
    # None when the supervisor has no record of the core (it is stopped).
    state: State | None = None
    pid: int = 0
    detail: str = ""


@dataclass
class _Action:
    """The decisions and steps of one action thread; the waiting RPC thread reads them once `done` is set."""

    verb: str
    requested: list[int]
    done: threading.Event = field(default_factory=threading.Event)
    # Final results decided before acting (not assigned, already running, not running, spawn failed).
    final: dict[int, CoreResult] = field(default_factory=dict)
    # Cores acted on, in the order of the request or of the desired state.
    targets: list[int] = field(default_factory=list)
    notes: dict[int, str] = field(default_factory=dict)


class Controller:
    """Carries out Control requests against the reconciler's desired state and supervisor."""

    def __init__(self, reconciler: Reconciler, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.reconciler = reconciler
        self._clock = clock
        self._sleep = sleep
        self._pending = threading.BoundedSemaphore(MAX_PENDING_ACTIONS)

    def run(self, verb: str, cores: list[int], wait_seconds: float) -> list[CoreResult]:
        """Act on cores (empty: every process this host should run) and wait up to wait_seconds for the result.

        Raises RequestError for an invalid request or when too many actions are pending.
        """
        # 1. check the request, then the slot for its action
        wait = _check(verb, cores, wait_seconds)
        deadline = self._clock() + wait
        if not self._pending.acquire(blocking=False):
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{MAX_PENDING_ACTIONS} start, stop or restart requests are still in progress on this "
                               "agent; wait for them (quil-coord status) and retry")
        # 2. act in a thread of its own
        action = _Action(verb, list(cores))
        threading.Thread(target=self._act, args=(action,), name=f"control-{verb}", daemon=True).start()
        # 3. wait for the action, then for each process to reach its target state
        action.done.wait(NO_WAIT_ACTION_SECONDS if wait == 0 else max(0.0, deadline - self._clock()))
        if not action.done.is_set():
            # The action waits for the lock behind an apply or another request, or has not finished.
            if wait == 0:
                return [self._current(core, "none", f"{verb} queued behind another change; not waiting (wait 0)")
                        for core in (cores or self.reconciler.assigned())]
            return [self._timed_out(core, f"{verb} did not finish") for core in (cores or self.reconciler.assigned())]
        return self._await_targets(action, deadline, waiting=wait > 0)

    # -- the action thread ---------------------------------------------------------

    def _act(self, action: _Action) -> None:
        try:
            with self.reconciler.lock:
                if not self.reconciler.closed:
                    self._act_locked(action)
        except Exception:  # noqa: BLE001 - a bug must not end silently in a daemon thread
            log.exception("control %s failed unexpectedly on cores %s", action.verb, action.requested)
        finally:
            action.done.set()
            self._pending.release()

    def _act_locked(self, action: _Action) -> None:
        assigned = self.reconciler.assigned()
        states = self.reconciler.supervisor.states()
        for core in action.requested or assigned:
            if core not in assigned:
                action.final[core] = CoreResult(core, "not_assigned", detail=self._not_assigned(core))
            elif action.verb == "start" and states.get(core) in ALIVE_STATES:
                action.final[core] = self._current(core, "already_running", "already running; nothing done")
            else:
                action.targets.append(core)
        if action.verb == "stop":
            self._stop(action, states)
        else:
            self._start(action, states)

    def _stop(self, action: _Action, states: dict[int, State]) -> None:
        # Hold first: if the agent dies during the stop, its restart must not start the core again.
        self.reconciler.hold(action.targets)
        for core in action.targets:
            state = states.get(core)
            # BACKOFF counts as running: the supervisor would start the process again.
            if state not in ALIVE_STATES and state != State.BACKOFF:
                was = f" ({state.value})" if state is not None else ""
                action.final[core] = CoreResult(core, "not_running", State.STOPPED, 0, f"was not running{was}; "
                                                f"held stopped now: {self._start_hint(core)}")
        log.info("stopping: cores %s (quil-coord stop)", action.targets)
        # Also clears BACKOFF and FATAL records, so the supervisor retries nothing while the core is held.
        self.reconciler.supervisor.stop(action.targets)

    def _start(self, action: _Action, states: dict[int, State]) -> None:
        self.reconciler.release(action.targets)
        running = [core for core in action.targets if states.get(core) in ALIVE_STATES]
        if action.verb == "restart" and running:
            log.info("restarting: cores %s (quil-coord restart)", running)
            self.reconciler.supervisor.stop(running)
            action.notes.update({core: "restarted" for core in running})
        failed = self.reconciler.start_cores(action.targets)
        for core, reason in failed.items():
            action.final[core] = self._current(core, "spawn_failed", reason)
            log.warning("start failed: core=%d (%s)", core, reason)

    # -- waiting -------------------------------------------------------------------

    def _await_targets(self, action: _Action, deadline: float, waiting: bool = True) -> list[CoreResult]:
        results = dict(action.final)
        pending = [core for core in action.targets if core not in results]
        while True:
            for core in list(pending):
                result = self._settled(action.verb, core, action.notes.get(core, ""))
                if result is not None:
                    results[core] = result
                    pending.remove(core)
            if not pending or self._clock() >= deadline:
                break
            self._sleep(min(POLL_SECONDS, max(0.0, deadline - self._clock())))
        for core in pending:
            if waiting:
                results[core] = self._timed_out(core, f"{action.verb} did not finish")
            else:
                results[core] = self._current(core, "none", f"{action.verb} requested; not waiting (wait 0)")
                results[core].detail += f" (state {_state_name(results[core].state)})"
        order = action.requested or [*action.targets, *sorted(set(results) - set(action.targets))]
        return [results[core] for core in order if core in results]

    def _settled(self, verb: str, core: int, note: str) -> CoreResult | None:
        """Return the result of core once it reached its target state or failed, else None."""
        progress = self.reconciler.supervisor.progress(core)
        if verb == "stop":
            if progress is None or progress.state == State.STOPPED:
                return CoreResult(core, "none", State.STOPPED, 0, f"stopped and held: {self._start_hint(core)}")
            return None
        if progress is None:
            return CoreResult(core, "spawn_failed", None, 0, "the process is gone from the supervisor")
        if progress.restarts > 0 or progress.state in (State.BACKOFF, State.FATAL):
            return CoreResult(core, "spawn_failed", progress.state, progress.pid, self._exit_reason(core, progress))
        if progress.state == State.RUNNING:
            return CoreResult(core, "none", progress.state, progress.pid, note or "started")
        return None

    # -- messages ------------------------------------------------------------------

    def _current(self, core: int, error: str, detail: str) -> CoreResult:
        progress = self.reconciler.supervisor.progress(core)
        if progress is None:
            return CoreResult(core, error, None, 0, detail)
        return CoreResult(core, error, progress.state, progress.pid, detail)

    def _timed_out(self, core: int, reason: str) -> CoreResult:
        result = self._current(core, "timeout", "")
        state = _state_name(result.state)
        result.detail = f"{reason} within the wait time (state {state}); the agent carries on, check quil-coord status"
        return result

    def _exit_reason(self, core: int, progress: Progress) -> str:
        status = f"exit status {progress.last_exit}" if progress.last_exit is not None else progress.detail
        return (f"exited before it counted as started ({status}); the supervisor retries it with backoff; "
                f"see quil-coord logs {self.reconciler.host_name} --core {core}")

    def _start_hint(self, core: int) -> str:
        return f"quil-coord start {self.reconciler.host_name} --core {core} starts it"

    def _not_assigned(self, core: int) -> str:
        if core == CONTROL:
            return (f"this host does not run the control process; run quil-coord host set "
                    f"{self.reconciler.host_name} --control, then quil-coord assign and quil-coord apply")
        return (f"core {core} is not assigned to this host; assign it with quil-coord assign, "
                "then run quil-coord apply")


def _state_name(state: State | None) -> str:
    return state.value if state is not None else "stopped"


def _check(verb: str, cores: list[int], wait_seconds: float) -> float:
    """Validate a request; return wait_seconds clamped to [0, MAX_WAIT_SECONDS]."""
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    if verb not in VERBS:
        raise RequestError(invalid, f"verb {verb!r} is not valid; use start, stop or restart")
    if len(cores) > MAX_REQUEST_CORES:
        raise RequestError(invalid, f"{len(cores)} cores requested; the limit is {MAX_REQUEST_CORES}")
    for core in cores:
        if not 0 <= core <= MAX_CORES:
            raise RequestError(invalid, f"core {core} is out of range; core indices go from 0 (the control "
                                        f"process) to {MAX_CORES}")
    seen: set[int] = set()
    for core in cores:
        if core in seen:
            raise RequestError(invalid, f"core {core} is listed more than once")
        seen.add(core)
    if math.isnan(wait_seconds):
        raise RequestError(invalid, "wait_seconds is NaN; give a number of seconds from 0 to 120")
    return min(MAX_WAIT_SECONDS, max(0.0, wait_seconds))
