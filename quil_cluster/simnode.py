"""quil-simnode: a stand-in for the Quilibrium node binary, for tests and the demo.

This is a test double, not a node: it does no peer-to-peer networking, no
proofs and keeps no store. It keeps the real Go binary's command-line contract
so the agent can start, watch and stop it the same way. For generations 1.4,
2.0 and 2.1 it imitates Go `flag` parsing and its errors, the new identity
written when config.yml is missing, a data worker's (--core N >= 1) choice of
listen addresses with its panics, fatal errors and exit statuses, its TCP
listeners and "data worker listening" line, the parent check every second,
2.1's graceful SIGTERM, and the control process (--core 0) dialling each
configured worker and logging "could not dial" for unreachable ones.

It does not imitate signature checks, gRPC or TLS, because its listeners
accept each connection and close it. Nor does it spawn local workers, run
2.1's reachability test, fill keys.yml, keep stores or log files, panic like
the 1.4-2.0.4 control process with fewer than 3 workers, or accept any flag
missing from FLAGS. docs/simnode.md has the details.
"""

import enum
import json
import os
import re
import select
import signal
import socket
import sys
import time
from pathlib import Path

import yaml

GENERATIONS = ("1.4", "2.0", "2.1")
GENERATION_ENV = "QUIL_SIMNODE_GENERATION"
DIAL_INTERVAL_ENV = "QUIL_SIMNODE_DIAL_INTERVAL"
# Test modes with no counterpart in the real node: data workers that fail at
# start (comma-separated core indices), and data workers that ignore SIGTERM ("1").
FAIL_CORES_ENV = "QUIL_SIMNODE_FAIL_CORES"
IGNORE_SIGTERM_ENV = "QUIL_SIMNODE_IGNORE_SIGTERM"
# Release file names such as node-2.1.0.25-linux-amd64 or node-1.4.21-linux-amd64.
RELEASE_IN_FILE_NAME = re.compile(r"node-([0-9]+)\.([0-9]+)(?:\.[0-9]+)+")
MULTIADDR = re.compile(r"/(ip4|ip6)/([^/]+)/tcp/([0-9]{1,5})")
# Rewrites 2.1.0.16+ workers and masters apply to stream addresses before binding or dialing.
WILDCARD_TO_LOOPBACK = (
    ("/0.0.0.0/", "/127.0.0.1/"), ("/0:0:0:0:0:0:0:0/", "/::1/"), ("/::/", "/::1/"),
)

PARENT_CHECK_INTERVAL = 1.0  # seconds between parent checks, as in every real worker
DIAL_INTERVAL = 2.0  # seconds between the control process's dial rounds
DIAL_TIMEOUT = 1.0  # seconds per TCP connect, like the 2.0.6 master's DialContext
GO_INT_RANGE = (-(2**63), 2**63 - 1)
GO_UINT_RANGE = (0, 2**64 - 1)

FlagValue = str | int | bool
# Flag name -> (Go type shown in usage, default, help text).
FLAGS: dict[str, tuple[str, FlagValue, str]] = {
    "config": ("string", ".config", "configuration directory that contains config.yml"),
    "core": ("int", 0, "core index: 0 runs the control process, N >= 1 runs data worker N"),
    "debug": ("bool", False, "accepted; the stand-in logs the same either way"),
    "generation": ("string", "", "node generation to imitate: 1.4, 2.0 or 2.1 (stand-in only;"
                   f" else ${GENERATION_ENV}, the release in the file name, then 1.4)"),
    "network": ("uint", 0, "network id, 0 for mainnet (accepted and ignored)"),
    "parent-process": ("int", 0, "pid the data worker watches; it exits once that process is gone"),
    "signature-check": ("bool", True, "accepted and ignored; the stand-in has no signature files"),
}
GO_BOOLEANS = {"1": True, "t": True, "T": True, "TRUE": True, "true": True, "True": True,
               "0": False, "f": False, "F": False, "FALSE": False, "false": False, "False": False}


class ExitStatus(enum.IntEnum):
    """Exit statuses of the real node that the stand-in reproduces."""

    OK = 0
    # os.Exit(1) and zap's Fatal.
    FATAL = 1
    # Go's status for a panic and for a flag error. Stand-in usage errors use it too.
    PANIC = 2
    USAGE = 2


class NodeExit(Exception):
    """Raised where the real node stops. main() writes `text` to stderr and returns `status`."""

    def __init__(self, status: ExitStatus, text: str = "") -> None:
        super().__init__(text)
        self.status = status
        self.text = text


def panic(message: object) -> NodeExit:
    """Build the exit of a Go panic: the first lines of its report on stderr, status 2."""
    return NodeExit(ExitStatus.PANIC, f"panic: {message}\n\ngoroutine 1 [running]:\n")


class ZapLog:
    """Writer of JSON log lines in the shape of zap's production encoder."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def __call__(self, level: str, message: str, **fields: object) -> None:
        record = {"level": level, "ts": round(time.time(), 6), "msg": message, **fields}
        self.stream.write(json.dumps(record) + "\n")
        self.stream.flush()

    def fatal(self, message: str) -> NodeExit:
        """Log at level fatal and return the exit status 1 that zap's Fatal ends with."""
        self("fatal", message)
        return NodeExit(ExitStatus.FATAL)


def usage(program: str) -> str:
    """Return the flag list in the layout of Go's flag.PrintDefaults."""
    lines = [f"Usage of {program}:"]
    for name, (kind, default, text) in sorted(FLAGS.items()):
        lines.append(f"  -{name}" if kind == "bool" else f"  -{name} {kind}")
        if default in ("", 0, False):
            lines.append(f"    \t{text}")
        elif kind == "string":
            lines.append(f'    \t{text} (default "{default}")')
        else:
            lines.append(f"    \t{text} (default {str(default).lower()})")
    return "\n".join(lines) + "\n"


def parse_flags(args: list[str], program: str) -> dict[str, FlagValue]:
    """Parse args as Go's flag.Parse does. On error, raise NodeExit with Go's message and usage."""
    values = {name: spec[1] for name, spec in FLAGS.items()}
    position = 0
    while position < len(args):
        arg = args[position]
        # Go stops at the first argument that is not a flag, and after "--".
        if len(arg) < 2 or arg[0] != "-" or arg == "--":
            break
        position += 1
        name, has_value, value = arg[2 if arg[1] == "-" else 1:].partition("=")
        if not name or name[0] in "-=":
            raise _flag_error(f"bad flag syntax: {arg}", program)
        if name in ("h", "help"):
            raise NodeExit(ExitStatus.OK, usage(program))
        if name not in FLAGS:
            raise _flag_error(f"flag provided but not defined: -{name}", program)
        kind = FLAGS[name][0]
        if kind == "bool" and not has_value:
            values[name] = True
            continue
        if not has_value:
            if position == len(args):
                raise _flag_error(f"flag needs an argument: -{name}", program)
            value = args[position]
            position += 1
        values[name] = _convert_flag(name, kind, value, program)
    return values


def _convert_flag(name: str, kind: str, value: str, program: str) -> FlagValue:
    if kind == "string":
        return value
    if kind == "bool":
        if value not in GO_BOOLEANS:
            raise _flag_error(f'invalid boolean value "{value}" for -{name}: parse error', program)
        return GO_BOOLEANS[value]
    prefix = f'invalid value "{value}" for flag -{name}'
    try:
        number = parse_go_integer(value, signed=(kind == "int"))
    except ValueError:
        raise _flag_error(f"{prefix}: parse error", program) from None
    low, high = GO_INT_RANGE if kind == "int" else GO_UINT_RANGE
    if not low <= number <= high:
        raise _flag_error(f"{prefix}: value out of range", program)
    return number


def parse_go_integer(text: str, signed: bool) -> int:
    """Parse an integer as Go's strconv.ParseInt or ParseUint with base 0, or raise ValueError."""
    digits = text[1:] if signed and text[:1] in ("+", "-") else text
    if not digits.isascii() or not digits[:1].isdigit():
        raise ValueError(text)
    # Go reads a leading 0 as octal, which Python's int(..., 0) rejects.
    if len(digits) > 1 and digits[0] == "0" and digits[1].isdigit():
        number = int(digits, 8)
    else:
        number = int(digits, 0)
    return -number if text.startswith("-") else number


def _flag_error(message: str, program: str) -> NodeExit:
    return NodeExit(ExitStatus.USAGE, f"{message}\n{usage(program)}")


def resolve_generation(flag_value: str, environ, program: str) -> str:
    """Pick the generation: --generation, else the environment, else the file name, else 1.4."""
    match = RELEASE_IN_FILE_NAME.search(os.path.basename(program))
    if flag_value:
        value, source = flag_value, "--generation"
    elif environ.get(GENERATION_ENV):
        value, source = environ[GENERATION_ENV], f"${GENERATION_ENV}"
    elif match:
        value, source = f"{match[1]}.{match[2]}", f"file name {os.path.basename(program)}"
    else:
        return "1.4"
    if value not in GENERATIONS:
        choices = ", ".join(GENERATIONS)
        raise NodeExit(ExitStatus.USAGE, f'quil-simnode: unknown generation "{value}" from'
                                         f" {source}; use one of {choices}\n")
    return value


def read_dial_interval(environ) -> float:
    """Return the seconds between the control process's dial rounds."""
    text = environ.get(DIAL_INTERVAL_ENV, "")
    try:
        interval = float(text) if text else DIAL_INTERVAL
    except ValueError:
        interval = -1.0
    if not 0 < interval < float("inf"):
        raise NodeExit(ExitStatus.USAGE, f"quil-simnode: invalid {DIAL_INTERVAL_ENV} {text!r};"
                                         " set a positive number of seconds\n")
    return interval


def read_fail_cores(environ) -> frozenset[int]:
    """Return the core indices whose data workers FAIL_CORES_ENV sets to fail at start."""
    text = environ.get(FAIL_CORES_ENV, "")
    items = [item.strip() for item in text.split(",")] if text else []
    if not all(item.isascii() and item.isdigit() for item in items):
        raise NodeExit(ExitStatus.USAGE, f"quil-simnode: invalid {FAIL_CORES_ENV} {text!r};"
                                         " set comma-separated core indices such as 3,5\n")
    return frozenset(int(item) for item in items)


class EngineConfig:
    """The `engine` mapping of config.yml, read with the real node's zero-means-default rule."""

    def __init__(self, path: str, values: dict) -> None:
        self.path = path
        self.values = values

    def addresses(self, key: str) -> list[str]:
        """Return the multiaddr list under `key`, or an empty list if the key is missing or null."""
        value = self.values.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise panic(f"{self.path}: engine.{key} must be a list of multiaddrs, not {value!r}")
        return [str(item) for item in value]

    def setting(self, key: str, default, kind: type):
        """Return the value under `key`, or `default` if the key is missing, null, "" or 0."""
        value = self.values.get(key)
        # yaml.v2 leaves absent keys at Go's zero value, and the node then applies its default.
        if value in (None, "", 0):
            return default
        if not isinstance(value, kind) or isinstance(value, bool):
            raise panic(f"{self.path}: engine.{key} must be a {kind.__name__}, not {value!r}")
        return value


def load_engine_config(config_dir: str, generation: str) -> EngineConfig:
    """Read config_dir/config.yml, first writing a new identity there if the file is missing."""
    path = os.path.join(config_dir, "config.yml")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        if not os.path.isdir(config_dir):
            os.mkdir(config_dir, 0o700)
        if not os.path.exists(path):
            write_new_identity(config_dir, path, generation)
        with open(path, encoding="utf-8") as file:
            document = yaml.load(file, Loader=loader) or {}
    except OSError as err:
        raise panic(err) from err
    except yaml.YAMLError as err:
        raise panic(f"{path}: invalid YAML: {err}") from err
    engine = document.get("engine") if isinstance(document, dict) else None
    if not isinstance(engine or {}, dict):
        raise panic(f"{path}: engine must be a mapping, not {engine!r}")
    return EngineConfig(path, engine or {})


def write_new_identity(config_dir: str, path: str, generation: str) -> None:
    """Write a minimal config.yml with a placeholder peer key where the real node has a real one."""
    # A random placeholder lets tests see that two config dirs contain different identities.
    peer_key = f"SIMNODE-PLACEHOLDER-{os.urandom(8).hex()}"

    if generation == "2.1":
        workers = {"dataWorkerP2PMultiaddrs": [], "dataWorkerStreamMultiaddrs": []}
    else:
        workers = {"dataWorkerMultiaddrs": []}
    keys_path = os.path.join(config_dir, "keys.yml")
    document = {
        "key": {"keyManagerType": "file", "keyManagerFile": {
            "path": keys_path, "createIfMissing": False,
            "encryptionKey": f"SIMNODE-PLACEHOLDER-{os.urandom(8).hex()}"}},
        "p2p": {"listenMultiaddr": "/ip4/0.0.0.0/udp/8336/quic-v1", "peerPrivKey": peer_key},
        "engine": workers,
        "db": {"path": os.path.join(config_dir, "store")},
    }

    # Write then rename, so a process started at the same moment never reads half a file.
    partial = f"{path}.{os.getpid()}.tmp"
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(descriptor, "w", encoding="utf-8") as file:
        yaml.safe_dump(document, file, sort_keys=False)
    os.replace(partial, path)

    try:
        descriptor = os.open(keys_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass  # an existing keys.yml is left as it is
    else:
        with open(descriptor, "w", encoding="utf-8") as file:
            file.write("null:\n")

    print(f"warning: {path} was missing, so a new identity with peer key {peer_key} was generated"
          " and written there. Copy the control process's config.yml to share its identity.",
          file=sys.stderr, flush=True)


def parse_multiaddr(address: str) -> tuple[socket.AddressFamily, str, int]:
    """Split /ip4/A.B.C.D/tcp/PORT or /ip6/ADDR/tcp/PORT into (family, host, port).

    Raises ValueError for anything else.
    NOTE: the real node's multiaddr parser also accepts port 0, DNS names and other
    protocols. The stand-in rejects them because a data worker needs a bindable TCP address.
    """
    match = MULTIADDR.fullmatch(address)
    if not match:
        raise ValueError("expected /ip4/ADDRESS/tcp/PORT or /ip6/ADDRESS/tcp/PORT")
    family = socket.AF_INET if match[1] == "ip4" else socket.AF_INET6
    try:
        socket.inet_pton(family, match[2])
    except OSError:
        raise ValueError(f"invalid {match[1]} address {match[2]!r}") from None
    port = int(match[3])
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is outside 1-65535")
    return family, match[2], port


def loopback_stream_address(address: str) -> str:
    """Rewrite a wildcard stream address to loopback and force TCP, as 2.1.0.16+ nodes do."""
    for wildcard, loopback in WILDCARD_TO_LOOPBACK:
        address = address.replace(wildcard, loopback)
    return address.replace("/quic-v1", "").replace("/udp/", "/tcp/")


def pick_address(listed: list[str], core: int, pattern: str, base_port: int) -> str:
    """Return listed[core-1], or the pattern filled with base_port + core - 1 if listed is empty."""
    if not listed:
        port = base_port + core - 1
        if "%d" in pattern:
            return pattern.replace("%d", str(port), 1)
        # Go's Sprintf appends this note when the pattern has no verb, so the parse fails later.
        return f"{pattern}%!(EXTRA int={port})"
    index = core - 1
    if index < 0:
        raise panic(f"runtime error: index out of range [{index}]")
    if index >= len(listed):
        raise panic(f"runtime error: index out of range [{index}] with length {len(listed)}")
    return listed[index]


def plan_worker(engine: EngineConfig, generation: str, core: int, parent_pid: int,
                log: ZapLog) -> list[str]:
    """Return the addresses data worker `core` binds, or raise NodeExit where the real one stops.

    A 2.1 worker gets [P2P address, stream address], and older ones get one address.
    """
    if generation != "2.1":
        listed = engine.addresses("dataWorkerMultiaddrs")
        if parent_pid == 0 and not listed:
            raise panic("parent process pid not specified")
        pattern = engine.setting("dataWorkerBaseListenMultiaddr", "/ip4/127.0.0.1/tcp/%d", str)
        port = engine.setting("dataWorkerBaseListenPort", 40000, int)
        return [pick_address(listed, core, pattern, port)]
    p2p = engine.addresses("dataWorkerP2PMultiaddrs")
    if parent_pid == 0 and not p2p:
        raise log.fatal("parent process pid not specified")
    pattern = engine.setting("dataWorkerBaseListenMultiaddr", "/ip4/0.0.0.0/tcp/%d", str)
    # 2.1 replaces the 1.4/2.0 default pattern with its own.
    if pattern == "/ip4/127.0.0.1/tcp/%d":
        pattern = "/ip4/0.0.0.0/tcp/%d"
    stream_port = engine.setting("dataWorkerBaseStreamPort", 32500, int)
    p2p_port = engine.setting("dataWorkerBaseP2PPort", 25000, int)
    stream_list = engine.addresses("dataWorkerStreamMultiaddrs")
    stream = loopback_stream_address(pick_address(stream_list, core, pattern, stream_port))
    return [pick_address(p2p, core, pattern, p2p_port), stream]


def watch_stop_signals() -> int:
    """Install SIGTERM and SIGINT handlers and return a pipe end that turns readable on either."""
    # The wakeup pipe lets select() in the main loops see the signal without a race.
    reader, writer = os.pipe()
    os.set_blocking(writer, False)
    signal.set_wakeup_fd(writer)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    return reader


def listen(address: str) -> socket.socket:
    """Bind and listen on a TCP multiaddr, raising the real worker's panics on failure."""
    try:
        family, host, port = parse_multiaddr(address)
    except ValueError as err:
        raise panic(f'failed to parse multiaddr "{address}": {err}') from err
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # Go sets SO_REUSEADDR on listeners, and IPV6_V6ONLY for a "tcp6" listener.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError as err:
        sock.close()
        network, go_host = ("tcp4", host) if family == socket.AF_INET else ("tcp6", f"[{host}]")
        reason = go_error_text(err)
        raise panic(f"start: listen {network} {go_host}:{port}: bind: {reason}") from err
    return sock


def go_error_text(err: OSError) -> str:
    """Return the OS error message in Go's lower-case form, such as "address already in use"."""
    text = err.strerror or str(err)
    return text[:1].lower() + text[1:]


def process_exists(pid: int) -> bool:
    """Return whether signal 0 reaches pid. EPERM counts as gone, as in the real worker."""
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def run_worker(engine: EngineConfig, generation: str, core: int, parent_pid: int,
               stop: int | None, log: ZapLog) -> ExitStatus:
    """Run data worker `core` until its parent is gone or, if `stop` is given, a stop signal."""
    addresses = plan_worker(engine, generation, core, parent_pid, log)
    listeners: list[socket.socket] = []
    try:
        # Bind every address before logging, so the log line means "connectable".
        for address in addresses:
            listeners.append(listen(address))
        log("info", "data worker listening", address=addresses[-1], core=core)
        if generation == "2.1":
            log("info", "data worker p2p listening", address=addresses[0], core=core)
        elif parent_pid == 0:
            log("info", "no parent process id specified, running in detached worker mode")
        return serve(listeners, parent_pid, stop, generation, log)
    finally:
        for listener in listeners:
            listener.close()


def serve(listeners: list[socket.socket], parent_pid: int, stop: int | None,
          generation: str, log: ZapLog) -> ExitStatus:
    """Accept and close connections, and check the parent every second when one is given."""
    waitables: list = [*listeners] if stop is None else [*listeners, stop]
    next_check = time.monotonic() + PARENT_CHECK_INTERVAL
    while True:
        timeout = max(0.0, next_check - time.monotonic()) if parent_pid else None
        ready, _, _ = select.select(waitables, [], [], timeout)
        if stop is not None and stop in ready:
            log("info", "received stop signal, stopping data worker")
            return ExitStatus.OK
        for listener in ready:
            try:
                listener.accept()[0].close()
            except OSError as err:
                log("warn", "could not accept connection", error=str(err))
        if parent_pid and time.monotonic() >= next_check:
            if not process_exists(parent_pid):
                log("info", "parent process not found, terminating", parent_process=parent_pid)
                # 2.1 stops the worker node and returns from main, and 1.4/2.0 call os.Exit(1).
                return ExitStatus.OK if generation == "2.1" else ExitStatus.FATAL
            next_check = time.monotonic() + PARENT_CHECK_INTERVAL


def dial_workers(addresses: list[str], log: ZapLog) -> int:
    """Connect to each worker over TCP, log each failure, and return how many were reachable."""
    reachable = 0
    for core, address in enumerate(addresses, start=1):
        try:
            family, host, port = parse_multiaddr(address)
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.settimeout(DIAL_TIMEOUT)
                sock.connect((host, port))
        except (ValueError, OSError) as err:
            reason = go_error_text(err) if isinstance(err, OSError) else str(err)
            log("warn", "could not dial", core=core, multiaddr=address, error=reason)
            continue
        reachable += 1
    log("info", "dialed data workers", reachable=reachable, unreachable=len(addresses) - reachable,
        total=len(addresses))
    return reachable


def run_control_process(engine: EngineConfig, generation: str, interval: float, stop: int,
                        log: ZapLog) -> ExitStatus:
    """Dial the configured workers every `interval` seconds until a stop signal."""
    if generation == "2.1":
        listed = engine.addresses("dataWorkerStreamMultiaddrs")
        addresses = [loopback_stream_address(address) for address in listed]
    else:
        addresses = engine.addresses("dataWorkerMultiaddrs")
    if not addresses:
        log("info", "worker list is empty; the real control process would spawn local data"
                    " workers, and the stand-in spawns none")
    elif generation == "2.1":
        log("warn", "data workers configured by multiaddr, be sure these are running...")
    else:
        print("Data workers configured by multiaddr, be sure these are running...", flush=True)
    while True:
        if addresses:
            dial_workers(addresses, log)
        ready, _, _ = select.select([stop], [], [], interval)
        if ready:
            log("info", "received stop signal, stopping control process")
            return ExitStatus.OK


def run(program: str, args: list[str], environ) -> ExitStatus:
    """Run one node process from its arguments, or raise NodeExit where the real node stops."""
    # 1. Flags, then the generation and the log stream it selects. 2.1 logs to stdout, and
    #    zap's production logger in 1.4/2.0 logs to stderr.
    flags = parse_flags(args, program)
    generation = resolve_generation(str(flags["generation"]), environ, program)
    log = ZapLog(sys.stdout if generation == "2.1" else sys.stderr)
    # 2. Config, and 2.1's list check, which every process runs before looking at --core.
    engine = load_engine_config(str(flags["config"]), generation)
    p2p_count = len(engine.addresses("dataWorkerP2PMultiaddrs"))
    if generation == "2.1" and p2p_count != len(engine.addresses("dataWorkerStreamMultiaddrs")):
        raise log.fatal("mismatch of worker count for p2p and stream multiaddrs")
    # 3. Go dies of SIGPIPE on a closed stdout or stderr, where Python would raise instead.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    # 4. Core index 0 is the control process.
    #    NOTE: a 1.4/2.0 control process's exit status on SIGTERM was not confirmed from its
    #    source, so the stand-in stops cleanly with status 0 in every generation.
    core = int(flags["core"])
    if core == 0:
        interval = read_dial_interval(environ)
        return run_control_process(engine, generation, interval, watch_stop_signals(), log)
    # 5. Any other core index is a data worker. A 1.4/2.0 worker has no signal handler, so
    #    SIGTERM and SIGINT kill it as they kill Go code. A 2.1 worker stops cleanly.
    parent_pid = int(flags["parent-process"])
    #    The test modes come first: a failing core exits before it binds anything.
    if core in read_fail_cores(environ):
        raise log.fatal(f"stand-in test mode: core {core} fails at start ({FAIL_CORES_ENV})")
    if environ.get(IGNORE_SIGTERM_ENV) == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return run_worker(engine, generation, core, parent_pid, None, log)
    if generation == "2.1":
        return run_worker(engine, generation, core, parent_pid, watch_stop_signals(), log)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    return run_worker(engine, generation, core, parent_pid, None, log)


def main(argv: list[str] | None = None, environ=None) -> int:
    """Run quil-simnode and return its exit status. argv[0] may select the generation."""
    argv = sys.argv if argv is None else argv
    environ = os.environ if environ is None else environ
    try:
        return run(argv[0] if argv else "quil-simnode", argv[1:], environ)
    except NodeExit as stop:
        if stop.text:
            sys.stderr.write(stop.text)
            sys.stderr.flush()
        return stop.status


if __name__ == "__main__":
    sys.exit(main())


def write_wrapper(directory: Path, version: str) -> Path:
    """Write an executable named like a node release (node-VERSION-linux-amd64) that runs this stand-in.

    The wrapper passes --generation because the name a script is called by
    does not reach the Python process it execs.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"node-{version}-linux-amd64"
    generation = ".".join(version.split(".")[:2])
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m quil_cluster.simnode --generation {generation} "$@"\n')
    path.chmod(0o755)
    return path
