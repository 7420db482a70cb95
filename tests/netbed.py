"""A multi-host test bed made of Linux network namespaces on one machine.

Layout of one bed with prefix P and hosts ctl, w1:

    P-switch   namespace with the bridge Pbr and one port Pp<N> per host
    P-ctl      namespace with lo and eth0 = 198.18.0.1/24, the peer of Pp1
    P-w1       namespace with lo and eth0 = 198.18.0.2/24, the peer of Pp2

Every link is created inside the bed's own namespaces, so the root namespace
never gains an interface, route or firewall rule. Deleting the namespaces
removes the veth pairs, the bridge and any nftables tables a test added in them.

Each bed records its owner in OWNER_DIR/<prefix>.json (pid and process start
time). A bed is destroyed by destroy(), by leaving its `with` block, by the
atexit hook or by SIGTERM; NetBed.sweep_stale() removes what a SIGKILLed owner
left behind. Needs root, iproute2 and nftables.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType

__all__ = ["NetBed", "NetBedError", "NetHost", "OWNER_DIR", "PREFIX_ROOT", "SUBNET"]

log = logging.getLogger(__name__)

# Start of every auto-generated prefix: "qcb" + pid % 10000 (4 digits) + a per-process counter.
PREFIX_ROOT = "qcb"
# Owner records, one JSON file per bed, next to the namespace files iproute2 keeps in /run/netns.
OWNER_DIR = Path("/run/quil-netbed")
# Host addresses are SUBNET.<index + 1>/24, inside 198.18.0.0/15, the block reserved for network benchmarks.
SUBNET = "198.18.0"
# Longest Linux interface name (IFNAMSIZ 16 minus the terminating NUL).
MAX_IFNAME = 15
# Most hosts one /24 bed can address: .1 to .254.
MAX_HOSTS = 254
# Seconds popen() processes get between SIGTERM and SIGKILL in destroy().
STOP_GRACE = 1.0
# Seconds to wait for killed processes to exit and for switch ports to forward.
SETTLE_TIMEOUT = 5.0
# Default timeout in seconds of run().
RUN_TIMEOUT = 60.0
# Timeout in seconds of each `ip` or `nft` call the harness makes itself.
TOOL_TIMEOUT = 30.0

_HOST_NAME = re.compile(r"[a-z][a-z0-9]*")
_PREFIX = re.compile(r"[a-z][a-z0-9]*")
_SWITCH_ROLE = "switch"

# Runs inside the source namespace and prints one outcome word. Any other OSError exits non-zero.
_CONNECT_SCRIPT = """\
import socket, sys
sock = socket.socket()
sock.settimeout(float(sys.argv[3]))
try:
    sock.connect((sys.argv[1], int(sys.argv[2])))
except ConnectionRefusedError:
    print("refused")
except TimeoutError:
    print("timeout")
else:
    print("open")
"""


class NetBedError(RuntimeError):
    """Raised when a namespace, link or process of a bed cannot be created, reached or removed."""


@dataclass(frozen=True)
class NetHost:
    """One host of a bed: its role name, namespace and IPv4 address."""

    name: str
    netns: str
    address: str


# ---------------------------------------------------------------------------
# Tools and processes


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT)
    if check and result.returncode != 0:
        raise NetBedError(f"{' '.join(argv)} failed (exit status {result.returncode}): {result.stderr.strip()}")
    return result


def _netns_list() -> set[str]:
    # Lines read "name" or "name (id: 3)".
    output = _ip("netns", "list").stdout
    return {line.split()[0] for line in output.splitlines() if line.strip()}


def _netns_pids(netns: str) -> list[int]:
    result = _ip("netns", "pids", netns, check=False)
    if result.returncode != 0:
        return []
    return [int(word) for word in result.stdout.split()]


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat from field 3 (state) on, or None when the pid does not exist."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name in field 2 may contain spaces and parentheses.
    return text.rsplit(")", 1)[1].split()


def _pid_alive(pid: int) -> bool:
    """Return whether pid runs. A zombie counts as gone because it has left its namespace."""
    fields = _proc_stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def _start_time(pid: int) -> int | None:
    """Start time of pid in clock ticks after boot (field 22 of /proc/<pid>/stat)."""
    fields = _proc_stat(pid)
    return None if fields is None else int(fields[19])


def _signal_process(pid: int, sig: signal.Signals) -> None:
    """Send sig to the process group that pid leads, or to pid alone when it leads none."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _kill_netns_processes(netns: str) -> None:
    """SIGKILL every process inside netns until none is left."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        pids = [pid for pid in _netns_pids(netns) if pid != os.getpid()]
        if not pids:
            return
        if time.monotonic() > deadline:
            raise NetBedError(f"processes {pids} in {netns} still running {SETTLE_TIMEOUT} s after SIGKILL; "
                              "look for processes in uninterruptible sleep (state D)")
        for pid in pids:
            log.info("killed: pid %d left in %s", pid, netns)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def _delete_netns(netns: str) -> None:
    """Kill what runs in netns, then delete it. A namespace that is already gone is no error."""
    _kill_netns_processes(netns)
    result = _ip("netns", "del", netns, check=False)
    if result.returncode != 0 and netns in _netns_list():
        raise NetBedError(f"ip netns del {netns} failed: {result.stderr.strip()}")


# ---------------------------------------------------------------------------
# Owner records


def _owner_path(prefix: str) -> Path:
    return OWNER_DIR / f"{prefix}.json"


def _claim_prefix(prefix: str) -> bool:
    """Create the owner record of prefix for this process. Return False when a record exists already."""
    OWNER_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    record = {"pid": os.getpid(), "start_time": _start_time(os.getpid())}
    try:
        fd = os.open(_owner_path(prefix), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as file:
        json.dump(record, file)
    return True


def _owner_alive(prefix: str) -> tuple[bool, int | None]:
    """Return whether the owner recorded for prefix still runs, and its pid.

    An unreadable record counts as alive, so sweep_stale() keeps its namespaces.
    """
    try:
        record = json.loads(_owner_path(prefix).read_text())
        pid, start_time = int(record["pid"]), record["start_time"]
    except (OSError, ValueError, KeyError, TypeError):
        return True, None
    # The start time guards against a new process that reuses the pid.
    return _pid_alive(pid) and _start_time(pid) == start_time, pid


_counter = itertools.count()


def _allocate_prefix() -> str:
    """Claim the first free prefix qcb<pid % 10000><n> for this process."""
    base = f"{PREFIX_ROOT}{os.getpid() % 10000:04d}"
    existing = _netns_list()
    for _ in range(1000):
        prefix = f"{base}{next(_counter)}"
        # A namespace without a record (left by a lost record) blocks the prefix too.
        if any(name.startswith(prefix + "-") for name in existing):
            continue
        if _claim_prefix(prefix):
            return prefix
    raise NetBedError(f"no free prefix {base}<n> after 1000 tries; run NetBed.sweep_stale() or clear {OWNER_DIR}")


# ---------------------------------------------------------------------------
# Teardown of every live bed of this process

_live_beds: set[NetBed] = set()
_previous_sigterm: object = signal.SIG_DFL
_sigterm_installed = False


def _destroy_live_beds() -> None:
    # A forked child inherits the set and the hooks but owns none of the beds.
    for bed in list(_live_beds):
        if bed.owner_pid != os.getpid():
            continue
        try:
            bed.destroy()
        except (NetBedError, OSError, subprocess.SubprocessError):
            log.exception("destroy failed: bed %s; NetBed.sweep_stale() removes it after this process exits",
                          bed.prefix)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # NOTE: Python runs this between two bytecodes of the main thread. A create() that is cut
    # short here may add a namespace after destroy(), and only sweep_stale() removes it later.
    _destroy_live_beds()
    if callable(_previous_sigterm):
        _previous_sigterm(signum, frame)
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _install_sigterm_handler() -> None:
    global _previous_sigterm, _sigterm_installed
    if _sigterm_installed:
        return
    previous = signal.getsignal(signal.SIGTERM)
    # A process that ignores SIGTERM keeps doing so. signal.signal works only in the main thread.
    if previous == signal.SIG_IGN or threading.current_thread() is not threading.main_thread():
        return
    _previous_sigterm = previous
    signal.signal(signal.SIGTERM, _on_sigterm)
    _sigterm_installed = True


atexit.register(_destroy_live_beds)


# ---------------------------------------------------------------------------
# Requirements


@functools.cache
def _probe() -> str | None:
    if os.geteuid() != 0:
        return f"network namespaces need root; this process runs as uid {os.geteuid()}"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"{tool} not found on PATH; install the {package} package"
    # One namespace with the same kinds of links a bed uses, and nft run inside it.
    probe = f"{PREFIX_ROOT}probe{os.getpid()}"
    link = f"{PREFIX_ROOT}probe"
    steps = [
        ["ip", "netns", "add", probe],
        ["ip", "-n", probe, "link", "add", f"{link}br", "type", "bridge"],
        ["ip", "-n", probe, "link", "add", f"{link}a", "type", "veth", "peer", "name", f"{link}b"],
        ["ip", "netns", "exec", probe, "nft", "list", "tables"],
    ]
    try:
        for argv in steps:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT)
            if result.returncode != 0:
                return f"{' '.join(argv)} failed (exit status {result.returncode}): {result.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=TOOL_TIMEOUT)
    return None


# ---------------------------------------------------------------------------
# The bed


class NetBed:
    """Hosts in their own network namespaces, joined by one bridge, with tracked processes."""

    def __init__(self, names: list[str], prefix: str | None = None) -> None:
        """Check the host names and claim a prefix. create() builds the namespaces."""
        self._check_names(names)
        if prefix is not None:
            self._check_prefix(prefix, len(names))
            if not _claim_prefix(prefix):
                raise NetBedError(f"prefix {prefix} is in use: {_owner_path(prefix)} exists")
        else:
            prefix = _allocate_prefix()
            try:
                self._check_prefix(prefix, len(names))
            except ValueError:
                _owner_path(prefix).unlink(missing_ok=True)
                raise
        self.prefix = prefix
        self.owner_pid = os.getpid()
        self.switch_netns = f"{prefix}-{_SWITCH_ROLE}"
        self.bridge = f"{prefix}br"
        self.stop_grace = STOP_GRACE
        self._hosts = {
            name: NetHost(name, f"{prefix}-{name}", f"{SUBNET}.{index + 1}") for index, name in enumerate(names)
        }
        self._processes: list[subprocess.Popen] = []
        self._state = "claimed"
        _live_beds.add(self)
        _install_sigterm_handler()

    @staticmethod
    def _check_names(names: list[str]) -> None:
        if not names:
            raise ValueError("a bed needs at least one host name")
        if len(names) > MAX_HOSTS:
            raise ValueError(f"{len(names)} hosts do not fit in {SUBNET}.0/24; the maximum is {MAX_HOSTS}")
        if len(set(names)) != len(names):
            raise ValueError(f"host names must be unique: {names}")
        for name in names:
            if not _HOST_NAME.fullmatch(name) or name == _SWITCH_ROLE:
                raise ValueError(f"invalid host name {name!r}: use [a-z][a-z0-9]*, not {_SWITCH_ROLE!r}")

    @staticmethod
    def _check_prefix(prefix: str, count: int) -> None:
        if not _PREFIX.fullmatch(prefix):
            raise ValueError(f"invalid prefix {prefix!r}: use [a-z][a-z0-9]*")
        longest = f"{prefix}p{count}"
        if len(longest) > MAX_IFNAME:
            raise ValueError(f"prefix {prefix!r} makes interface name {longest!r} longer than {MAX_IFNAME} characters")

    # -- building ----------------------------------------------------------

    def create(self) -> None:
        """Create the switch namespace, one namespace per host and the links between them."""
        if self._state != "claimed":
            raise NetBedError(f"bed {self.prefix} is {self._state}; create() runs only once per bed")
        self._state = "creating"
        try:
            # 1. Switch: a namespace holding only the bridge.
            _ip("netns", "add", self.switch_netns)
            _ip("link", "add", self.bridge, "type", "bridge", netns=self.switch_netns)
            _ip("link", "set", self.bridge, "up", netns=self.switch_netns)
            # 2. Hosts: a namespace each, cabled to a bridge port.
            for index, host in enumerate(self._hosts.values()):
                self._add_host(index, host)
            # 3. Wait until every bridge port forwards, so the first packet is not lost.
            self._wait_forwarding()
        except BaseException:
            self.destroy()
            raise
        self._state = "created"
        log.info("created: bed %s (hosts %s)", self.prefix, ", ".join(self._hosts))

    def _add_host(self, index: int, host: NetHost) -> None:
        port = f"{self.prefix}p{index + 1}"
        _ip("netns", "add", host.netns)
        _ip("link", "set", "lo", "up", netns=host.netns)
        # The pair is born inside the switch and host namespaces, never in the root namespace.
        _ip("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", host.netns,
            netns=self.switch_netns)
        _ip("addr", "add", f"{host.address}/24", "dev", "eth0", netns=host.netns)
        _ip("link", "set", "eth0", "up", netns=host.netns)
        _ip("link", "set", port, "master", self.bridge, "up", netns=self.switch_netns)

    def _wait_forwarding(self) -> None:
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while True:
            output = _ip("-j", "-d", "link", "show", "master", self.bridge, netns=self.switch_netns).stdout
            ports = json.loads(output)
            ready = [
                port for port in ports
                if port.get("operstate") == "UP"
                and port.get("linkinfo", {}).get("info_slave_data", {}).get("state") == "forwarding"
            ]
            if len(ready) == len(self._hosts):
                return
            if time.monotonic() > deadline:
                raise NetBedError(f"{len(ready)} of {len(self._hosts)} ports of {self.bridge} forward "
                                  f"after {SETTLE_TIMEOUT} s")
            time.sleep(0.02)

    # -- hosts -------------------------------------------------------------

    def host(self, name: str) -> NetHost:
        """The host with role name `name`."""
        try:
            return self._hosts[name]
        except KeyError:
            raise KeyError(f"bed {self.prefix} has no host {name!r}; hosts: {', '.join(self._hosts)}") from None

    @property
    def hosts(self) -> list[NetHost]:
        """The hosts in the order of the names given to the constructor."""
        return list(self._hosts.values())

    # -- processes ---------------------------------------------------------

    def _exec_argv(self, name: str, argv: Sequence[str]) -> list[str]:
        if isinstance(argv, str):
            raise TypeError("argv must be a sequence of arguments, not a string")
        if self._state != "created":
            raise NetBedError(f"bed {self.prefix} is {self._state}; call create() first")
        return ["ip", "netns", "exec", self.host(name).netns, *argv]

    def popen(self, name: str, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start argv inside host `name`'s namespace; destroy() stops it.

        The process leads a new session unless kwargs set start_new_session, so
        destroy() can signal its whole process group.
        """
        kwargs.setdefault("start_new_session", True)
        process = subprocess.Popen(self._exec_argv(name, argv), **kwargs)
        self._processes.append(process)
        log.info("started: %s in %s (pid %d)", argv[0], self.host(name).netns, process.pid)
        return process

    def run(self, name: str, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        """Run argv inside host `name`'s namespace and wait for it (text output captured, 60 s timeout)."""
        kwargs.setdefault("timeout", RUN_TIMEOUT)
        kwargs.setdefault("text", True)
        if not any(key in kwargs for key in ("stdout", "stderr", "capture_output")):
            kwargs["capture_output"] = True
        return subprocess.run(self._exec_argv(name, argv), **kwargs)

    def connect(self, source: str, target_address: str, port: int, timeout: float = 2.0) -> str:
        """Open a TCP connection from inside `source`; return "open", "refused" or "timeout".

        Raises NetBedError for any other failure, such as "No route to host".
        """
        argv = [sys.executable, "-I", "-c", _CONNECT_SCRIPT, target_address, str(port), str(timeout)]
        result = self.run(source, argv, timeout=timeout + RUN_TIMEOUT)
        outcome = result.stdout.strip()
        if result.returncode != 0 or outcome not in ("open", "refused", "timeout"):
            raise NetBedError(f"connect from {source} to {target_address}:{port} failed "
                              f"(exit status {result.returncode}): {result.stderr.strip()}")
        return outcome

    # -- teardown ----------------------------------------------------------

    def destroy(self) -> None:
        """Stop every process of the bed, delete its namespaces and release its prefix.

        Safe to call again and on a bed that create() never finished. Raises
        NetBedError when a namespace cannot be removed; its owner record then
        stays, so sweep_stale() removes the namespace after this process exits.
        """
        if self._state == "destroyed":
            return
        # 1. Processes started with popen(): SIGTERM, the grace period, then SIGKILL.
        self._stop_processes()
        # 2. Namespaces: hosts first, then the switch, killing whatever still runs in them.
        existing = _netns_list()
        names = [host.netns for host in self._hosts.values()] + [self.switch_netns]
        for netns in names:
            if netns in existing:
                _delete_netns(netns)
        # 3. Release the prefix only after every namespace is gone.
        _owner_path(self.prefix).unlink(missing_ok=True)
        self._state = "destroyed"
        _live_beds.discard(self)
        log.info("destroyed: bed %s", self.prefix)

    def _stop_processes(self) -> None:
        running = [process for process in self._processes if process.poll() is None]
        for process in running:
            _signal_process(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace
        for process in running:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("killing: pid %d (still running %.1f s after SIGTERM; NetBed.stop_grace sets the wait)",
                            process.pid, self.stop_grace)
                _signal_process(process.pid, signal.SIGKILL)
                self._reap(process)
        # Pipes the caller asked for would otherwise raise ResourceWarning when collected.
        for process in self._processes:
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None:
                    stream.close()

    @staticmethod
    def _reap(process: subprocess.Popen) -> None:
        try:
            process.wait(SETTLE_TIMEOUT)
        except subprocess.TimeoutExpired:
            # Deleting its namespace kills it again and raises if it still runs.
            log.error("still running: pid %d %s s after SIGKILL", process.pid, SETTLE_TIMEOUT)

    def __enter__(self) -> NetBed:
        if self._state == "claimed":
            self.create()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.destroy()

    def __repr__(self) -> str:
        return f"NetBed(prefix={self.prefix!r}, hosts={list(self._hosts)}, state={self._state!r})"

    # -- class-level tools -------------------------------------------------

    @staticmethod
    def unavailable_reason() -> str | None:
        """Why beds cannot run here (not root, a tool missing, namespaces not permitted), or None.

        The first call creates and deletes a probe namespace; the result is cached.
        """
        return _probe()

    @staticmethod
    def sweep_stale(prefix_root: str = PREFIX_ROOT) -> list[str]:
        """Delete the namespaces of beds whose owner process is gone; return their names.

        Considers only prefixes that start with prefix_root and have an owner
        record in OWNER_DIR, plus probe namespaces <prefix_root>probe<pid> of
        exited pids. Namespaces of a live owner, or without a record, stay.
        """
        existing = _netns_list()
        removed = []
        # 1. Beds with an owner record whose owner exited.
        records = sorted(OWNER_DIR.glob(f"{prefix_root}*.json")) if OWNER_DIR.is_dir() else []
        for path in records:
            prefix = path.name.removesuffix(".json")
            alive, pid = _owner_alive(prefix)
            if alive:
                continue
            for netns in sorted(name for name in existing if name.startswith(prefix + "-")):
                _delete_netns(netns)
                removed.append(netns)
                log.info("swept: %s (owner pid %s exited)", netns, pid)
            path.unlink(missing_ok=True)
        # 2. Probe namespaces that unavailable_reason() could not delete.
        probe = re.compile(rf"{re.escape(prefix_root)}probe(\d+)")
        for netns in sorted(existing):
            match = probe.fullmatch(netns)
            if match and not _pid_alive(int(match.group(1))):
                _delete_netns(netns)
                removed.append(netns)
                log.info("swept: %s (probe pid %s exited)", netns, match.group(1))
        return removed
