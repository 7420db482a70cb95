"""Start, watch, restart and stop the node's processes on one host.

One thread owns the event loop: it waits on a pidfd per live process, so an
exit is noticed at once without polling, and it runs the timers (backoff,
start confirmation, log rotation). RPC threads call start() and stop(); they
change the table under the lock and wake the loop through a pipe.

Processes are created by fork+exec only (subprocess with close_fds and no
preexec_fn, which CPython 3.11 runs through vfork; the process group is set
in C by _posixsubprocess), so no Python code and no gRPC state runs in the
child between fork and exec. Only the loop thread spawns: start() hands the
spawn to it and waits. That keeps the parent-death signal of processes run
as another user (runas.py) tied to a thread that lives as long as the
supervisor. Each process gets its own process group, and stopping signals
the whole group: SIGTERM, the grace period, then SIGKILL. A process is
identified by pid and create time, never by name.

Before each spawn the loop checks the process's bind addresses
(bindcheck.py): an address on no interface keeps it WAITING without
counting a failure, and a port another process listens on counts as a
failed start that names that process.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import selectors
import signal
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import psutil

from ..common.states import ALIVE_STATES, State
from ..common.files import write_atomic
from . import bindcheck, listeners
from .runas import RunAs

log = logging.getLogger(__name__)

# Environment variable set in every node process the agent starts; its value
# is the agent's instance id, so a later run can tell its own processes apart.
MARKER_ENV = "QUIL_CLUSTER_AGENT_INSTANCE"
# Seconds start() waits for the loop thread to launch a process.
START_HANDOFF_SECONDS = 10.0
# Seconds a snapshot() call waits for a concurrent call's reading before reading alone.
SNAPSHOT_WAIT_SECONDS = 30.0
# Seconds between checks whether a STARTING process listens yet. Each check reads
# /proc/net/tcp and tcp6, which takes tens of milliseconds on a busy host.
STARTING_POLL_SECONDS = 0.1


@dataclass(frozen=True)
class Policy:
    # Seconds a process must stay up (or listen) to count as started.
    start_seconds: float = 1.0
    # Seconds between SIGTERM and SIGKILL.
    stop_grace_seconds: float = 10.0
    # Backoff after the second consecutive failure, doubling up to the cap (seconds).
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    # Seconds of RUNNING after which earlier failures no longer raise the backoff.
    stable_seconds: float = 10.0
    # This many failures (unexpected exits, failed spawns, held ports) within
    # crash_window seconds end in FATAL. __post_init__ rejects values that
    # would turn the guard off, so it cannot be disabled.
    crash_limit: int = 10
    crash_window: float = 180.0
    # Log rotation: size limit in bytes and rotated copies kept.
    log_max_bytes: int = 10 * 1024 * 1024
    log_backups: int = 3
    # Seconds between size checks of live logs.
    log_check_seconds: float = 10.0
    # Seconds between reads of the interface addresses while a process is WAITING.
    address_poll_seconds: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.crash_limit, bool) or not isinstance(self.crash_limit, int) or self.crash_limit < 2:
            raise ValueError(f"crash_limit must be an integer of at least 2, not {self.crash_limit!r}")
        needed = min_crash_window(self.crash_limit, self)
        if not self.crash_window >= needed:
            raise ValueError(
                f"crash_window {self.crash_window} s is shorter than the {needed:.1f} s a process that exits"
                f" at once needs to fail {self.crash_limit} times, so the crash-loop guard could never trip;"
                f" use at least {math.ceil(needed)} s"
            )


def backoff_delay(failures: int, policy: Policy, rng: Callable[[], float] = random.random) -> float:
    """Seconds to wait before restart number `failures` in a row.

    The first restart is immediate; later ones back off exponentially with
    +/-20 % jitter so a fleet of crashing workers does not restart in step.
    """
    if failures <= 1:
        return 0.0
    delay = min(policy.backoff_cap, policy.backoff_base * 2 ** (failures - 2))
    return delay * (0.8 + 0.4 * rng())


def min_crash_window(crash_limit: int, policy: Policy) -> float:
    """Return the longest time a process that exits at once takes to fail crash_limit times.

    That is the sum of the backoff delays before its restarts, each at the
    top of its jitter range. A shorter crash window would let such a process
    restart forever without reaching FATAL.
    """
    total = sum(backoff_delay(failures, policy, rng=lambda: 1.0) for failures in range(1, crash_limit))
    # Rounded so that float error does not reject a window of exactly this length.
    return round(total, 6)


@dataclass(frozen=True)
class ProcessSpec:
    core: int
    argv: tuple[str, ...]
    cwd: Path
    env: dict[str, str]
    log_path: Path
    # (ip, port) the process should listen on, if any.
    listen: tuple[str, int] | None = None
    listen_multiaddr: str = ""
    # Every multiaddr the process binds; a change means a restart.
    binds: tuple[str, ...] = ()
    # The user to run as when it is not the agent's own (setpriv; see runas.py).
    run_as: RunAs | None = None

    @property
    def label(self) -> str:
        return "control process" if self.core == 0 else f"worker core={self.core}"


@dataclass
class ProcessInfo:
    core: int
    pid: int
    state: State
    start_time: float
    restarts: int
    last_exit: int | None
    cpu_percent: float
    rss_bytes: int
    listen_address: str
    listening: bool
    detail: str
    # "ip:port" of every TCP socket the process listens on.
    listen_sockets: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Progress:
    state: State
    # 0 unless the process is alive.
    pid: int
    # Spawns after the first one; a rise means the process exited in between.
    restarts: int
    last_exit: int | None
    detail: str


@dataclass
class _Record:
    spec: ProcessSpec
    state: State = State.STOPPED
    desired: bool = True
    popen: subprocess.Popen[bytes] | None = None
    pidfd: int | None = None
    create_time: float = 0.0
    start_wall: float = 0.0
    start_mono: float = 0.0
    restarts: int = 0
    failures_in_row: int = 0
    last_exit: int | None = None
    next_start: float = 0.0
    detail: str = ""
    crashes: deque[float] = field(default_factory=deque)
    exited: threading.Event = field(default_factory=threading.Event)
    ps: psutil.Process | None = None
    # Set by start(): the loop thread spawns it on its next pass, then sets `launched`.
    pending: bool = True
    launched: threading.Event = field(default_factory=threading.Event)
    # The spawn that WAITING holds back is a restart.
    relaunch: bool = False

    @property
    def pid(self) -> int:
        return self.popen.pid if self.popen is not None and self.state in ALIVE_STATES else 0


class Supervisor:
    """The table of supervised processes and the thread that keeps it true."""

    def __init__(self, table_path: Path, policy: Policy, instance_id: str) -> None:
        self.policy = policy
        self._table_path = table_path
        self._instance_id = instance_id
        self._records: dict[int, _Record] = {}
        self._lock = threading.RLock()
        self._selector = selectors.DefaultSelector()
        self._to_register: list[_Record] = []
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._closing = False
        self._table_dirty = False
        self._next_rotation = 0.0
        self._addresses: set = set()
        self._addresses_read_at = -math.inf
        self._snapshot_guard = threading.Lock()
        self._snapshot_reading: _SharedReading | None = None
        self._thread = threading.Thread(target=self._loop, name="supervisor", daemon=True)

    # -- public API, called from RPC threads -------------------------------

    def begin(self) -> None:
        self._thread.start()

    def specs(self) -> dict[int, ProcessSpec]:
        with self._lock:
            return {core: rec.spec for core, rec in self._records.items()}

    def states(self) -> dict[int, State]:
        with self._lock:
            return {core: rec.state for core, rec in self._records.items()}

    def running_pids(self) -> dict[int, int]:
        """Return the pid of each RUNNING process by core, without reading /proc as snapshot() does."""
        with self._lock:
            return {core: rec.pid for core, rec in self._records.items() if rec.state == State.RUNNING}

    def start(self, spec: ProcessSpec) -> None:
        """Add spec to the table and have the loop thread launch it; a running process of that core is an error."""
        self.start_all([spec])

    def start_all(self, specs: list[ProcessSpec]) -> None:
        """Add specs to the table and have the loop thread launch them in one pass.

        Raises RuntimeError, before changing anything, if a process of one of
        the cores is running. Returns once the loop has spawned each process,
        or found it must wait (WAITING) or back off (BACKOFF), or after
        START_HANDOFF_SECONDS per process. Before begin() it returns at once,
        and the first pass of the loop launches them.
        """
        with self._lock:
            for spec in specs:
                current = self._records.get(spec.core)
                if current is not None and current.state in ALIVE_STATES:
                    raise RuntimeError(f"{spec.label} is already running (pid {current.pid})")
            records = [_Record(spec=spec) for spec in specs]
            for record in records:
                self._records[record.spec.core] = record
        self._wake()
        if not self._thread.is_alive():
            return
        for record in records:
            if not record.launched.wait(START_HANDOFF_SECONDS):
                log.warning("start: %s not launched by the supervisor loop after %.0f s; it stays queued",
                            record.spec.label, START_HANDOFF_SECONDS)

    def stop(self, cores: list[int]) -> list[int]:
        """Stop the given cores: SIGTERM to each group, the grace period, then SIGKILL.

        Returns the cores whose process was alive and has now exited.
        """
        alive = self._signal_stop(cores)
        deadline = time.monotonic() + self.policy.stop_grace_seconds
        # The whole group must exit: a child of the node can outlive it, e.g. when it ignores SIGTERM.
        running = _wait_groups({record.popen.pid for record in alive if record.popen is not None}, deadline)
        for record in alive:
            if record.popen is not None and record.popen.pid in running:
                self._kill(record)
        for record in alive:
            record.exited.wait(5.0)
        with self._lock:
            for core in cores:
                record = self._records.get(core)
                if record is not None and record.state not in ALIVE_STATES:
                    del self._records[core]
            self._table_dirty = True
        self._wake()
        return sorted(r.spec.core for r in alive if r.exited.is_set())

    def snapshot(self) -> list[ProcessInfo]:
        """Return the status of every process.

        Concurrent callers share one reading: a call that arrives while
        another one reads /proc waits for that result (taken at most one
        reading earlier) instead of reading again. With hundreds of workers
        one reading takes a noticeable share of a core.
        """
        with self._snapshot_guard:
            reading = self._snapshot_reading
            leader = reading is None
            if leader:
                reading = self._snapshot_reading = _SharedReading()
        assert reading is not None
        if not leader:
            if reading.done.wait(SNAPSHOT_WAIT_SECONDS) and reading.result is not None:
                return [replace(info) for info in reading.result]
            return self._read_snapshot()  # the leader failed or is stuck; read alone
        try:
            reading.result = self._read_snapshot()
        finally:
            with self._snapshot_guard:
                self._snapshot_reading = None
            reading.done.set()
        return [replace(info) for info in reading.result]

    def _read_snapshot(self) -> list[ProcessInfo]:
        """Copy the table under the lock, then read CPU, memory and sockets from /proc without it.

        So status calls never hold up the loop thread's restarts.
        """
        by_inode = listeners.listening_by_inode()
        table = set(by_inode.values())
        with self._lock:
            # A process seen listening counts as started now, not at the loop's next poll,
            # so one status never shows it listening and still starting.
            now = time.monotonic()
            for rec in self._records.values():
                if rec.state == State.STARTING:
                    self._promote_if_started(rec, now, table)
            copied = [(self._info(rec, table), rec.ps if rec.state in ALIVE_STATES else None)
                      for _, rec in sorted(self._records.items())]
        for info, ps in copied:
            if ps is not None:
                _add_usage(info, ps, by_inode)
        return [info for info, _ in copied]

    def progress(self, core: int) -> Progress | None:
        """Return where core's process is in its lifecycle, or None when core is not in the table.

        Unlike snapshot() it reads nothing from /proc, so a caller waiting for a
        state change can poll it often.
        """
        with self._lock:
            record = self._records.get(core)
            if record is None:
                return None
            return Progress(record.state, record.pid, record.restarts, record.last_exit, record.detail)

    def close(self) -> None:
        """Stop the loop thread and release its descriptors; supervised processes keep running."""
        self._closing = True
        self._wake()
        if self._thread.is_alive():
            self._thread.join(5.0)
        if self._thread.is_alive() or self._wake_r < 0:
            return  # the loop still uses them, or an earlier close released them
        with self._lock:
            for record in self._records.values():
                if record.pidfd is not None:
                    os.close(record.pidfd)
                    record.pidfd = None
        self._selector.close()
        wake_r, wake_w = self._wake_r, self._wake_w
        # -1 makes later _wake() calls no-ops instead of writes to a reused descriptor.
        self._wake_r = self._wake_w = -1
        os.close(wake_r)
        os.close(wake_w)

    # -- spawning and stopping ---------------------------------------------

    def _launch(self, record: _Record, now: float, restart: bool, table: _ListenTable) -> None:
        """Spawn record's process unless its address is missing (WAITING) or its port is held (BACKOFF)."""
        spec = record.spec
        endpoints = bindcheck.bind_endpoints(spec.binds, spec.listen)
        # 1. Every bind address on an interface, or wait for it without counting a failure.
        missing: list = []
        if any(bindcheck.needs_interface(ip) for ip, _ in endpoints):
            missing = bindcheck.missing_addresses(endpoints, self._local_addresses(now))
        if missing:
            record.relaunch = record.relaunch or restart
            if record.state != State.WAITING:
                # STOPPED/BACKOFF -> WAITING
                record.state = State.WAITING
                text = ", ".join(str(ip) for ip in missing)
                record.detail = f"waiting for address {text} to appear on an interface"
                log.info("waiting: %s (address %s is on no interface; starting when it appears)", spec.label, text)
            return
        if record.state == State.WAITING:
            log.info("address up: %s; starting", spec.label)
        # 2. No other process listening on a bind port, or a failed start that names it.
        held_reason = bindcheck.held_port(endpoints, table.get()) if endpoints else None
        if held_reason is not None:
            # WAITING/STOPPED/BACKOFF -> BACKOFF (or FATAL)
            record.state = State.BACKOFF
            record.relaunch = record.relaunch or restart
            self._record_failure(record, held_reason, event="not started")
            return
        # 3. Spawn.
        self._spawn(record, restart or record.relaunch)
        record.relaunch = False

    def _local_addresses(self, now: float) -> set:
        """Return the interface addresses, read again when the last read is address_poll_seconds old."""
        if now >= self._addresses_read_at + self.policy.address_poll_seconds:
            self._addresses = bindcheck.local_addresses()
            self._addresses_read_at = now
        return self._addresses

    def _spawn(self, record: _Record, restart: bool) -> None:
        spec = record.spec
        env = dict(spec.env, **{MARKER_ENV: self._instance_id})
        argv = spec.argv if spec.run_as is None else spec.run_as.wrap(spec.argv)
        try:
            self._rotate_if_large(spec.log_path)
            with open(spec.log_path, "ab") as output:
                # fork+exec only: no preexec_fn, and the process group is set in C.
                record.popen = subprocess.Popen(
                    argv, cwd=spec.cwd, env=env, stdin=subprocess.DEVNULL, stdout=output,
                    stderr=subprocess.STDOUT, close_fds=True, process_group=0,
                )
        except OSError as err:
            record.popen = None
            record.state = State.BACKOFF
            self._record_failure(record, f"spawn failed: {err.strerror or err}")
            log.error("spawn failed: %s (%s)", spec.label, err)
            return
        try:
            record.pidfd = os.pidfd_open(record.popen.pid)
        except OSError as err:
            # Without a pidfd the exit would go unnoticed, so the process must not run untracked.
            log.error("spawn failed: %s (pidfd_open: %s); killing pid %d", spec.label, err, record.popen.pid)
            _signal_group(record.popen.pid, signal.SIGKILL)
            record.popen.wait()
            record.popen = None
            record.state = State.BACKOFF
            self._record_failure(record, f"spawn failed: pidfd_open: {err.strerror or err}")
            return
        record.exited.clear()
        record.state = State.STARTING
        record.start_wall = time.time()
        record.start_mono = time.monotonic()
        record.detail = ""
        if restart:
            record.restarts += 1
        try:
            record.ps = psutil.Process(record.popen.pid)
            record.create_time = record.ps.create_time()
        except psutil.Error:
            record.ps = None
        self._to_register.append(record)
        self._table_dirty = True
        log.info("started: %s (pid %d)", spec.label, record.popen.pid)

    def _signal_stop(self, cores: list[int]) -> list[_Record]:
        alive = []
        with self._lock:
            for core in cores:
                record = self._records.get(core)
                if record is None:
                    continue
                record.desired = False
                # A launch still queued for the loop is dropped, and its start() caller released.
                record.pending = False
                record.launched.set()
                if record.state in ALIVE_STATES and record.popen is not None:
                    record.state = State.STOPPING
                    _signal_group(record.popen.pid, signal.SIGTERM)
                    log.info("stopping: %s (pid %d, SIGTERM)", record.spec.label, record.popen.pid)
                    alive.append(record)
                else:
                    record.state = State.STOPPED
        return alive

    def _kill(self, record: _Record) -> None:
        """Send SIGKILL to the group of record, which the caller found still running."""
        with self._lock:
            if record.popen is None:
                return
            if record.popen.returncode is None:
                log.warning(
                    "%s (pid %d) still running %.1f s after SIGTERM (stop_grace_seconds); sending SIGKILL",
                    record.spec.label, record.popen.pid, self.policy.stop_grace_seconds,
                )
            else:
                log.warning(
                    "%s (pid %d) exited, but its process group is still running %.1f s after SIGTERM"
                    " (stop_grace_seconds); sending SIGKILL",
                    record.spec.label, record.popen.pid, self.policy.stop_grace_seconds,
                )
            _signal_group(record.popen.pid, signal.SIGKILL)

    # -- the event loop -----------------------------------------------------

    def _loop(self) -> None:
        while not self._closing:
            with self._lock:
                self._register_new()
                timeout = self._run_timers(time.monotonic())
            for key, _ in self._selector.select(timeout):
                if key.data is None:
                    _drain(self._wake_r)
                else:
                    with self._lock:
                        self._on_exit(key.data)
            with self._lock:
                self._flush_table()

    def _register_new(self) -> None:
        for record in self._to_register:
            if record.pidfd is not None:
                self._selector.register(record.pidfd, selectors.EVENT_READ, record)
        self._to_register.clear()

    def _on_exit(self, record: _Record) -> None:
        assert record.popen is not None
        if record.state != State.STOPPING and record.desired:
            # An unexpected exit: end what is left of its process group, so no child of the
            # old process keeps the port or runs next to the restarted one. The pid, and with
            # it the group id, stays allocated until poll() below reaps the exited leader.
            _signal_group(record.popen.pid, signal.SIGKILL)
        code = record.popen.poll()
        if code is None:
            return
        self._selector.unregister(record.pidfd)
        os.close(record.pidfd)  # type: ignore[arg-type]
        record.pidfd = None
        record.last_exit = code
        self._table_dirty = True
        if record.state == State.STOPPING or not record.desired:
            # STOPPING -> STOPPED
            record.state = State.STOPPED
            log.info("stopped: %s (pid %d, exit status %d)", record.spec.label, record.popen.pid, code)
        else:
            # STARTING/RUNNING -> BACKOFF, or FATAL when crashing in a loop
            record.state = State.BACKOFF
            self._record_failure(record, f"exit status {code}")
        record.exited.set()

    def _record_failure(self, record: _Record, reason: str, event: str = "exited") -> None:
        now = time.monotonic()
        record.crashes.append(now)
        while record.crashes and record.crashes[0] < now - self.policy.crash_window:
            record.crashes.popleft()
        if len(record.crashes) >= self.policy.crash_limit:
            record.state = State.FATAL
            record.detail = (
                f"{len(record.crashes)} failures in {self.policy.crash_window:.0f} s, last: {reason};"
                " fix the cause, then run quil-coord restart for this core (or apply again)"
            )
            log.error("fatal: %s (%s)", record.spec.label, record.detail)
            return
        record.failures_in_row += 1
        delay = backoff_delay(record.failures_in_row, self.policy)
        record.next_start = now + delay
        # The failure count is in the detail because restarts counts spawns only, and a process
        # whose spawn fails, or whose port is held, fails again and again with restarts at 0.
        record.detail = (f"{reason}; {len(record.crashes)} failures in {self.policy.crash_window:.0f} s,"
                         f" restarting in {delay:.1f} s")
        if event == "exited":
            log.warning("exited: %s (%s; not expected, restarting in %.1f s)", record.spec.label, reason, delay)
        else:
            log.warning("%s: %s (%s; retrying in %.1f s)", event, record.spec.label, reason, delay)

    def _run_timers(self, now: float) -> float | None:
        """Act on due timers; return seconds until the next one (None: no timer)."""
        waits: list[float] = []
        table = _ListenTable()
        for record in list(self._records.values()):
            # At most one launch per process and pass, so a failed launch is retried
            # on a later pass, after its backoff, never twice in one pass.
            if record.pending:
                record.pending = False
                if record.desired:
                    self._launch(record, now, restart=False, table=table)
                record.launched.set()
            elif record.state == State.BACKOFF and record.desired and now >= record.next_start:
                self._launch(record, now, restart=True, table=table)
            elif record.state == State.WAITING and record.desired:
                self._launch(record, now, restart=False, table=table)
            # Still BACKOFF: not due yet, or the launch failed and set a new next_start.
            if record.state == State.BACKOFF and record.desired:
                waits.append(max(0.0, record.next_start - now))
            if record.state == State.WAITING and record.desired:
                waits.append(self._addresses_read_at + self.policy.address_poll_seconds - now)
            if record.state == State.STARTING:
                if not self._promote_if_started(record, now, table.get() if record.spec.listen is not None else None):
                    waits.append(STARTING_POLL_SECONDS)
            if record.state == State.RUNNING and record.failures_in_row:
                stable_at = record.start_mono + self.policy.stable_seconds
                if now >= stable_at:
                    record.failures_in_row = 0
                else:
                    waits.append(stable_at - now)
        if self._to_register:
            waits.append(0.0)
        waits.append(self._rotate_logs(now))
        return max(0.0, min(waits))

    def _promote_if_started(self, record: _Record, now: float, table: set[tuple[str, int]] | None) -> bool:
        """Move a STARTING record to RUNNING once it counts as started; return whether it did."""
        if not self._started(record, now, table):
            return False
        # STARTING -> RUNNING
        record.state = State.RUNNING
        log.info("running: %s (pid %d)", record.spec.label, record.pid)
        return True

    def _started(self, record: _Record, now: float, table: set[tuple[str, int]] | None) -> bool:
        if now - record.start_mono >= self.policy.start_seconds:
            return True
        listen = record.spec.listen
        return listen is not None and table is not None and listeners.is_listening(listen[0], listen[1], table)

    # -- status, logs and the persisted table -------------------------------

    def _info(self, record: _Record, table: set[tuple[str, int]]) -> ProcessInfo:
        """Return record's status without CPU, memory and sockets, which _add_usage fills in."""
        listen = record.spec.listen
        return ProcessInfo(
            core=record.spec.core, pid=record.pid, state=record.state,
            start_time=record.start_wall if record.state in ALIVE_STATES else 0.0,
            restarts=record.restarts, last_exit=record.last_exit, cpu_percent=0.0, rss_bytes=0,
            listen_address=record.spec.listen_multiaddr,
            listening=bool(listen and record.state in ALIVE_STATES and listeners.is_listening(*listen, table)),
            detail=record.detail, listen_sockets=[],
        )

    def _rotate_logs(self, now: float) -> float:
        if now >= self._next_rotation:
            self._next_rotation = now + self.policy.log_check_seconds
            for record in self._records.values():
                if record.state in ALIVE_STATES:
                    self._rotate_if_large(record.spec.log_path, truncate=True)
        return self._next_rotation - now

    def _rotate_if_large(self, path: Path, truncate: bool = False) -> None:
        """Keep path under log_max_bytes by shifting copies to path.1 .. path.N.

        A running process keeps its file open in append mode, so a live log is
        copied and truncated in place instead of renamed. A failure such as a
        full disk is logged, not raised, so it cannot end the loop thread or
        block a spawn. The next check tries again.
        """
        try:
            self._rotate(path, truncate)
        except OSError as err:
            log.warning("log rotation failed: %s (%s); trying again at the next check", path, err)

    def _rotate(self, path: Path, truncate: bool) -> None:
        try:
            if path.stat().st_size < self.policy.log_max_bytes:
                return
        except FileNotFoundError:
            return
        for index in range(self.policy.log_backups - 1, 0, -1):
            older = path.with_name(f"{path.name}.{index}")
            if older.exists():
                older.replace(path.with_name(f"{path.name}.{index + 1}"))
        first = path.with_name(f"{path.name}.1")
        if truncate:
            first.write_bytes(path.read_bytes())
            os.truncate(path, 0)
        else:
            path.replace(first)

    def _flush_table(self) -> None:
        if not self._table_dirty:
            return
        rows = [
            {"core": r.spec.core, "pid": r.popen.pid, "create_time": r.create_time, "argv": list(r.spec.argv),
             "instance": self._instance_id}
            for r in self._records.values()
            if r.popen is not None and r.state in ALIVE_STATES
        ]
        try:
            write_atomic(self._table_path, json.dumps(rows, indent=1).encode(), mode=0o600)
        except OSError as err:
            # Raising here would end the loop thread, and with it every restart.
            log.warning("process table write failed: %s (%s); writing again at the next process change",
                        self._table_path, err)
        self._table_dirty = False

    def _wake(self) -> None:
        if self._wake_w < 0:
            return
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full, so the loop is awake anyway


class _SharedReading:
    """One snapshot reading that concurrent snapshot() callers wait for."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: list[ProcessInfo] | None = None


class _ListenTable:
    """listeners.listening(), read at most once per pass of the loop and only when needed."""

    def __init__(self) -> None:
        self._table: set[tuple[str, int]] | None = None

    def get(self) -> set[tuple[str, int]]:
        if self._table is None:
            self._table = listeners.listening()
        return self._table


def stop_leftovers(table_path: Path, grace: float) -> list[int]:
    """Stop processes an earlier agent run started and left behind.

    A row counts as ours only when a process with that pid exists, has the
    recorded create time, and either has the recorded command line or carries
    MARKER_ENV with the recorded instance id in its environment. The marker
    covers a node binary that is a script which execs another program, because
    the exec changes the command line but keeps the environment. Any other row
    is a reused pid and is left alone. Returns the cores stopped.
    """
    try:
        rows = json.loads(table_path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as err:
        log.warning("process table %s unreadable (%s); not stopping leftovers", table_path, err)
        return []
    if not isinstance(rows, list):
        log.warning("process table %s is not a JSON list; not stopping leftovers", table_path)
        return []
    ours = [proc for row in rows if (proc := _match(row)) is not None]
    for proc in ours:
        log.info("stopping: leftover core=%s from an earlier run (pid %d, SIGTERM)", proc.info_core, proc.pid)
        _signal_group(proc.pid, signal.SIGTERM)
    running = _wait_groups({proc.pid for proc in ours}, time.monotonic() + grace)
    for proc in ours:
        if proc.pid in running:
            log.warning("leftover pid %d still running %.1f s after SIGTERM; sending SIGKILL", proc.pid, grace)
            _signal_group(proc.pid, signal.SIGKILL)
    psutil.wait_procs(ours, timeout=5.0)
    return sorted(proc.info_core for proc in ours)


def _match(row: dict) -> psutil.Process | None:
    """Return the process of a process table row if an earlier run started it, else None."""
    try:
        proc = psutil.Process(int(row["pid"]))
        if abs(proc.create_time() - float(row["create_time"])) > 0.5:
            return None
        if proc.cmdline() != row["argv"] and not _has_marker(proc, row.get("instance")):
            return None
        proc.info_core = int(row.get("core", -1))  # type: ignore[attr-defined]
    except (psutil.Error, KeyError, TypeError, ValueError):
        return None
    return proc


def _has_marker(proc: psutil.Process, instance: object) -> bool:
    """Tell whether proc's environment sets MARKER_ENV to instance, a non-empty string."""
    if not isinstance(instance, str) or not instance:
        return False
    try:
        return proc.environ().get(MARKER_ENV) == instance
    except psutil.AccessDenied:
        # NOTE: Linux hides the environment of another user's process and of a process
        # that gained privileges through exec, so such a row matches only by argv.
        return False


def _running_groups(pgids: set[int]) -> set[int]:
    """Return the process groups in pgids that have a member which is not a zombie."""
    if not pgids:
        return set()
    found = set()
    for proc in psutil.process_iter():
        try:
            pgid = os.getpgid(proc.pid)
            if pgid in pgids and proc.status() != psutil.STATUS_ZOMBIE:
                found.add(pgid)
        except (OSError, psutil.Error):
            continue  # exited while the table was read
    return found


def _wait_groups(pgids: set[int], deadline: float) -> set[int]:
    """Wait until no group in pgids has a running member or the monotonic deadline passes.

    Returns the groups still running at the deadline.
    """
    running = _running_groups(pgids)
    while running and time.monotonic() < deadline:
        time.sleep(0.05)
        running = _running_groups(running)
    return running


def _add_usage(info: ProcessInfo, ps: psutil.Process, by_inode: dict[int, tuple[str, int]]) -> None:
    """Fill in CPU, memory and listening sockets of info's process; leave zeros if it has exited."""
    # NOTE: the process may exit and be reaped after the table was copied. Then these reads
    # fail and the zeros stay; a pid reused in that instant would report the new process.
    try:
        with ps.oneshot():
            info.cpu_percent = ps.cpu_percent(None)
            info.rss_bytes = ps.memory_info().rss
        info.listen_sockets = listeners.sockets_of(ps.pid, by_inode)
    except (psutil.Error, OSError):
        pass


def _signal_group(pid: int, sig: int) -> None:
    # The process leads its own group (process_group=0). Its id cannot have
    # been reused while the agent has not reaped it yet, nor while another
    # member of its group still runs, because Linux keeps a pid allocated
    # while it names a process group.
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
