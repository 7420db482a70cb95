"""The quil-coord command line: turns argv into a call, output and an exit status."""

from __future__ import annotations

import os

# gRPC's core logs one line per failed TLS handshake on the enrollment endpoint,
# so anyone who can reach it could flood the log; keep its own logging to errors.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Any, Callable  # noqa: E402

from ..common import logsetup, pki  # noqa: E402
from ..common.install import add_arguments as install_arguments  # noqa: E402
from ..common.errors import (ConfigError, HostError, InventoryError, QuilClusterError, StateError,  # noqa: E402
                             TLSError, UnreachableError)
from ..common.exitcodes import ExitCode  # noqa: E402
from . import cluster, output, ui  # noqa: E402
from .home import Home  # noqa: E402
from .inventory import Host  # noqa: E402

if TYPE_CHECKING:
    from ..common import metricsserver

log = logging.getLogger(__name__)

EPILOG = """exit status: 0 ok, 1 unexpected error, 2 usage, 3 invalid input or state,
4 a host failed (doctor: a problem found), 5 a host unreachable, 6 TLS or authorization, 7 verify found a violation,
130 interrupted (status --watch ends with 0 on Ctrl-C)

output: tables and live progress on a terminal; plain text when piped or with
TERM=dumb; NO_COLOR drops colour. Commands that report state take --json."""

# Highest core index; it equals the agent's MAX_CORES (agent/reconcile.py), which rejects higher ones.
MAX_CORE_INDEX = 65535
# Seconds between two refreshes of status --watch, by default and at least.
WATCH_INTERVAL = 2.0
MIN_WATCH_INTERVAL = 0.5
MAX_WATCH_INTERVAL = 3600.0

# Example for serve --metrics-address, which is off by default; the agent's metrics use 9741.
METRICS_EXAMPLE = "127.0.0.1:9742"

# Expected failures and their exit status; anything else is a bug.
ERROR_EXIT = (
    (TLSError, ExitCode.TLS),
    (UnreachableError, ExitCode.UNREACHABLE),
    (HostError, ExitCode.HOST_FAILED),
    (ConfigError, ExitCode.CONFIG),
    (InventoryError, ExitCode.CONFIG),
    (StateError, ExitCode.CONFIG),
    (QuilClusterError, ExitCode.CONFIG),
)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors have the shape of every other error line."""

    def error(self, message: str):  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(ExitCode.USAGE, f"error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="quil-coord", description="Assign, configure and run a Quilibrium "
                     "node cluster through the quil-agent on every host.", epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", help="state directory (default: $QUIL_COORD_HOME)")
    parser.add_argument("--debug", action="store_true", help="log details and show tracebacks")
    parser.add_argument("--log-format", choices=logsetup.FORMATS, default="text",
                        help="log line format on stderr (default text)")
    sub = parser.add_subparsers(dest="command", required=True)

    init = sub.add_parser("init", help="create the cluster CA, the coordinator certificate and the settings")
    init.add_argument("--control-config", required=True, type=Path, help="the control host's node config.yml")
    init.add_argument("--name", default="quil", help="cluster name, part of every certificate (default quil)")
    init.add_argument("--generation", choices=("1.4", "2.0", "2.1"),
                      help="node generation (default: detected from the config's keys)")
    init.add_argument("--port-scheme", choices=("per-host", "global"), default="per-host",
                      help="per-host: each host counts ports from the base; global: core N gets base+N-1")
    init.add_argument("--base-port", type=int, help="first worker port (1.4/2.0: 40000; 2.1 P2P: 25000)")
    init.add_argument("--stream-base-port", type=int, help="2.1 only: first worker stream port (32500)")
    init.add_argument("--local", action="store_true",
                      help="all hosts on this machine: allow loopback worker addresses when hosts join")
    init.add_argument("--no-auto-apply", dest="auto_apply", action="store_false",
                      help="do not assign and apply when a host joins; run them by hand")
    init.add_argument("--firewall", choices=("off", "nftables", "ufw"), default="off",
                      help="firewall mode given to hosts that join (default off)")

    _add_host_parsers(sub)

    assign = sub.add_parser("assign", help="compute and record the core index assignment")
    assign.add_argument("--json", action="store_true", help="print JSON instead of a table")
    assign.add_argument("--dry-run", action="store_true", help="show the plan without recording it")

    apply = sub.add_parser("apply", help="push the config and drive every agent to the recorded assignment")
    apply.add_argument("--json", action="store_true", help="print JSON instead of lines")
    apply.add_argument("--wait", action="store_true", help="wait for a running apply to finish instead of failing")
    apply.add_argument("--no-verify", action="store_true", help="do not run verify after the apply")
    apply.add_argument("--yes", action="store_true", help="apply even when 2.1 cores move to another host")
    apply.add_argument("--max-failures", type=_failure_count, metavar="N",
                       help="apply hosts one at a time and stop once more than N failed; the rest are skipped "
                            "(default: no limit, every host in parallel)")

    verify = sub.add_parser("verify", help="measure which hosts reach which worker ports, against the policy")
    verify.add_argument("--json", action="store_true", help="print JSON instead of the grid")

    imp = sub.add_parser("import", help="create the inventory and assignment from the control config's worker list")
    imp.add_argument("--control-address", help="worker address of the control host (default: the host of core 1)")

    config = sub.add_parser("config", help="the node config each host gets").add_subparsers(
        dest="config_command", required=True)
    config_show = config.add_parser("show", help="print a host's rendered config.yml (secrets masked)")
    config_show.add_argument("--host", help="the host (default: the control host)")
    config_show.add_argument("--diff", action="store_true", help="show the difference from the host's file instead")

    firewall = sub.add_parser("firewall", help="firewall rules for the worker ports").add_subparsers(
        dest="firewall_command", required=True)
    show = firewall.add_parser("show", help="print the nftables and ufw rules each host gets")
    show.add_argument("--host", help="only this host")
    show.add_argument("--json", action="store_true", help="print JSON instead of the scripts")

    doctor = sub.add_parser("doctor", help="check every host for the common field problems and print the fixes")
    doctor.add_argument("--json", action="store_true", help="print JSON instead of lines")

    status = sub.add_parser("status", help="show every host's processes")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.add_argument("--watch", action="store_true",
                        help="refresh until Ctrl-C: in place on a terminal, else one snapshot per interval "
                             "(with --json one JSON object per line)")
    status.add_argument("--interval", type=_watch_interval,
                        help=f"seconds between refreshes of --watch (default {WATCH_INTERVAL:g}, "
                             f"at least {MIN_WATCH_INTERVAL:g})")

    _add_process_parsers(sub)

    _add_token_parsers(sub)

    ca = sub.add_parser("ca", help="rotate the cluster CA").add_subparsers(dest="ca_command", required=True)
    ca.add_parser("rotate", help="create the next CA and move every agent onto it, trusting both")
    ca.add_parser("finish", help="drop the old CA once every agent uses the next one")
    cert = sub.add_parser("cert", help="the coordinator's own certificate").add_subparsers(dest="cert_command",
                                                                                          required=True)
    cert.add_parser("rotate", help="issue a new coordinator certificate and revoke the old one")

    serve = sub.add_parser("serve", help="run the enrollment endpoint that quil-agent join talks to")
    serve.add_argument("--listen", default="0.0.0.0:7351", help="HOST:PORT to listen on (default 0.0.0.0:7351)")
    serve.add_argument("--advertise", help="HOST:PORT joining hosts dial (default: --listen; required when "
                       "--listen is a wildcard)")
    serve.add_argument("--metrics-address", default="off",
                       help=f"HOST:PORT to serve the cluster metrics on over plain HTTP, e.g. {METRICS_EXAMPLE} "
                       "(default off)")

    metrics = sub.add_parser("metrics", help="print the cluster metrics once in the Prometheus text format")
    metrics.add_argument("--output", type=Path, help="write them to this file atomically instead, for "
                         "node_exporter's textfile collector (name it *.prom)")

    install = sub.add_parser("install-service", help="create the quil-coord user, the venv in /opt/quil-cluster, "
                             "the state directory and the serve unit (safe to run again)")
    install_arguments(install)
    install.add_argument("--advertise", help="HOST:PORT joining hosts dial, written to /etc/quil-coord/serve.env")

    demo = sub.add_parser("demo", help="run a local demo cluster on 127.0.0.2-127.0.0.4 with the stand-in node")
    demo.add_argument("--dir", type=Path, help="directory for the demo's files (default: a temporary one)")
    demo.add_argument("--keep", action="store_true", help="keep the cluster running until Ctrl-C")
    return parser


def _add_host_parsers(sub: argparse._SubParsersAction) -> None:
    host = sub.add_parser("host", help="manage the inventory").add_subparsers(dest="host_command", required=True)
    add = host.add_parser("add", help="register a host and write its agent bundle")
    add.add_argument("name")
    add.add_argument("--address", required=True, help="IP address the host's workers bind")
    add.add_argument("--agent", required=True, help="HOST:PORT of the host's agent")
    add.add_argument("--control", action="store_true", help="this host runs the control process")
    add.add_argument("--probe-only", action="store_true",
                     help="this host runs no node processes; verify probes worker ports from it")
    add.add_argument("--firewall", choices=("off", "nftables", "ufw"), default="off",
                     help="firewall the agent manages for the host's worker ports (default off)")
    _add_count_options(add)
    add.add_argument("--node-binary", help="node binary path on the host (written to agent.yaml)")
    add.add_argument("--node-config-dir", help="node config directory on the host (written to agent.yaml)")
    add.add_argument("--state-dir", help="agent state directory on the host (written to agent.yaml)")
    add.add_argument("--bundle", required=True, type=Path, help="directory to write the agent bundle to")

    lst = host.add_parser("list", help="list the hosts")
    lst.add_argument("--json", action="store_true", help="print JSON instead of a table")
    remove = host.add_parser("remove", help="stop a host's workers, revoke its certificate, then assign and apply")
    remove.add_argument("name")
    remove.add_argument("--no-apply", action="store_true", help="only remove from the inventory and revoke")
    remove.add_argument("--yes", action="store_true", help="apply even when 2.1 cores move to another host")
    rebundle = host.add_parser("bundle", help="write a fresh agent bundle for a recorded host (revokes the old one)")
    rebundle.add_argument("name")
    rebundle.add_argument("--node-binary", help="node binary path on the host (written to agent.yaml)")
    rebundle.add_argument("--node-config-dir", help="node config directory on the host (written to agent.yaml)")
    rebundle.add_argument("--state-dir", help="agent state directory on the host (written to agent.yaml)")
    rebundle.add_argument("--bundle", required=True, type=Path, help="directory to write the agent bundle to")
    renew = host.add_parser("renew", help="renew a host's agent certificate now")
    renew.add_argument("name")
    change = host.add_parser("set", help="change a host (run assign and apply afterwards)")
    change.add_argument("name")
    change.add_argument("--address")
    change.add_argument("--agent")
    change.add_argument("--control", action=argparse.BooleanOptionalAction, default=None)
    change.add_argument("--firewall", choices=("off", "nftables", "ufw"),
                        help="firewall the agent manages for the host's worker ports")
    _add_count_options(change)


def _add_process_parsers(sub: argparse._SubParsersAction) -> None:
    from .control import DEFAULT_WAIT_SECONDS

    helps = {"start": "start a host's node processes (ends a hold by stop, and a crash loop)",
             "stop": "stop a host's node processes and hold them stopped until start or restart",
             "restart": "restart a host's node processes (ends a hold by stop, and a crash loop)"}
    for verb, text in helps.items():
        command = sub.add_parser(verb, help=text)
        command.add_argument("host", help="host name in the inventory")
        command.add_argument("--core", dest="cores", action="append", type=_core_index, default=[], metavar="N",
                             help="core index, 0 for the control process; repeat for more (default: all of the "
                                  "host's processes)")
        command.add_argument("--wait", type=_wait_seconds, default=DEFAULT_WAIT_SECONDS, metavar="SECONDS",
                             help="seconds to wait for the processes to reach their new state, 0 to 120 "
                                  f"(default {DEFAULT_WAIT_SECONDS:.0f})")
        command.add_argument("--json", action="store_true", help="print JSON instead of lines")
    logs = sub.add_parser("logs", help="print a node process's log from its host")
    logs.add_argument("host", help="host name in the inventory")
    logs.add_argument("--core", type=_core_index, metavar="N",
                      help="core index, 0 for the control process (default: the host's only process)")
    logs.add_argument("--lines", type=_line_count, default=100, metavar="N", help="lines from the end, 1 to 10000 (default 100)")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing new lines until Ctrl-C")


def _core_index(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_CORE_INDEX:
        raise argparse.ArgumentTypeError(
            f"invalid core index {text!r}: use 0 (the control process) to {MAX_CORE_INDEX}")
    return value


def _wait_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 120:
        raise argparse.ArgumentTypeError(f"invalid wait {text!r}: use 0 to 120 seconds")
    return value


def _failure_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: use 0 or more")
    return value


def _line_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 10_000:
        raise argparse.ArgumentTypeError(f"invalid line count {text!r}: use 1 to 10000")
    return value


def _add_token_parsers(sub: argparse._SubParsersAction) -> None:
    token = sub.add_parser("token", help="join tokens for new hosts").add_subparsers(dest="token_command",
                                                                                      required=True)
    create = token.add_parser("create", help="create a join token and print the join command")
    create.add_argument("--ttl", default="30m", help="lifetime: 90s, 30m, 2h or 1d (default 30m, at most 7d)")
    create.add_argument("--uses", type=int, default=1, help="number of hosts that may join with it (default 1)")
    create.add_argument("--workers", type=int, help="worker count of the joining host (default: its CPUs)")
    create.add_argument("--host-name", help="name of the joining host (default: host-TOKENID)")
    lst = token.add_parser("list", help="list tokens (never their secrets)")
    lst.add_argument("--json", action="store_true", help="print JSON instead of a table")
    revoke = token.add_parser("revoke", help="revoke a token by its id")
    revoke.add_argument("token_id")


def _watch_interval(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid interval '{text}': give seconds, like 2 or 0.5") from None
    if not math.isfinite(seconds) or seconds > MAX_WATCH_INTERVAL:
        raise argparse.ArgumentTypeError(
            f"invalid interval '{text}': give seconds from {MIN_WATCH_INTERVAL:g} to {MAX_WATCH_INTERVAL:g}")
    if not seconds >= MIN_WATCH_INTERVAL:
        raise argparse.ArgumentTypeError(f"interval {text} is too short: give at least {MIN_WATCH_INTERVAL:g} s")
    return seconds


def _add_count_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--workers", type=int, help="number of data workers on the host")
    group.add_argument("--reserve", type=int, help="CPUs left free; workers = CPUs - reserve")
    parser.add_argument("--cpus", type=int, help="logical CPUs of the host (default: ask its agent)")
    parser.add_argument("--cpu-basis", choices=("logical", "physical"),
                        help="count logical CPUs (threads, the default) or physical cores for a derived count")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logsetup.configure(logging.DEBUG if args.debug else logging.WARNING, args.log_format)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except QuilClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        return next(code for kind, code in ERROR_EXIT if isinstance(err, kind))
    except BrokenPipeError:
        # The reader of our output went away (quil-coord status | head), so there is nothing left to print.
        _silence_stdout()
        return ExitCode.OK
    except Exception:  # noqa: BLE001 - the last resort for bugs: show them, do not hide them
        traceback.print_exc()
        print("error: unexpected failure (a bug in quil-coord); rerun with --debug and report the traceback above",
              file=sys.stderr)
        return ExitCode.ERROR


def _silence_stdout() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _home(args: argparse.Namespace) -> Home:
    """Return the state directory; every command but init requires it initialized."""
    home = Home.from_env(args.home)
    if getattr(args, "command", None) != "init":
        home.require()
    return home


def cmd_init(args: argparse.Namespace) -> int:
    settings = cluster.init(_home(args), args.control_config, name=args.name, generation=args.generation,
                            port_scheme=args.port_scheme, base_port=args.base_port,
                            stream_base_port=args.stream_base_port, local=args.local,
                            auto_apply=args.auto_apply, firewall=args.firewall)
    print(f"initialized cluster {settings.name}: node generation {settings.node_generation}, "
          f"port scheme {settings.port_scheme}, base port {settings.base_port}")
    return ExitCode.OK


def cmd_host(args: argparse.Namespace) -> int:
    home = _home(args)
    if args.host_command == "add":
        host = Host(name=args.name, address=args.address, agent=args.agent, control=args.control,
                    workers=args.workers, reserve=args.reserve, cpus=args.cpus, probe_only=args.probe_only,
                    firewall=args.firewall, cpu_basis=args.cpu_basis or "logical")
        path = cluster.add_host(home, host, args.bundle, node_binary=args.node_binary,
                                node_config_dir=args.node_config_dir, state_dir=args.state_dir)
        print(f"added host {host.name}; copy {path.parent} to the host and run: quil-agent run --config agent.yaml")
    elif args.host_command == "list":
        home.require()
        hosts = home.load_hosts()
        _print(output.hosts_json(hosts) if args.json else output.host_listing([h.to_dict() for h in hosts]))
    elif args.host_command == "remove":
        return _remove_host(home, args)
    elif args.host_command == "bundle":
        path = cluster.rebundle_host(home, args.name, args.bundle, node_binary=args.node_binary,
                                     node_config_dir=args.node_config_dir, state_dir=args.state_dir)
        print(f"wrote a new bundle for host {args.name}; copy {path.parent} to the host and restart its agent")
    elif args.host_command == "renew":
        from .renew import renew_host

        not_after = renew_host(home, args.name)
        print(f"renewed the certificate of host {args.name}; valid until {output.timestamp(not_after)}")
    else:
        changes = dict(address=args.address, agent=args.agent, control=args.control, workers=args.workers,
                       reserve=args.reserve, cpus=args.cpus, firewall=args.firewall, cpu_basis=args.cpu_basis)
        cluster.set_host(home, args.name, **changes)
        print(f"updated host {args.name}; run quil-coord assign, then quil-coord apply")
    return ExitCode.OK


def _remove_host(home: Home, args: argparse.Namespace) -> int:
    from .apply import apply
    from .membership import stop_host_processes

    stopped = stop_host_processes(home, args.name)
    cluster.remove_host(home, args.name)
    print(f"removed host {args.name} ({stopped}); its certificate is revoked")
    if args.no_apply:
        print("run quil-coord assign, then quil-coord apply")
        return ExitCode.OK
    if not home.load_hosts():
        return ExitCode.OK
    code = cmd_assign(argparse.Namespace(home=args.home, json=False, dry_run=False))
    with ui.host_progress("apply") as progress:
        report = apply(home, confirm_moves=lambda moves: args.yes or _ask_moves(moves), progress=progress)
    _print(output.apply_listing(report))
    return max(code, report.exit_code)


def cmd_token(args: argparse.Namespace) -> int:
    from . import tokens
    from .enroll import advertised_address

    home = _home(args)
    home.require()
    if args.token_command == "create":
        text, record = tokens.create(home, ttl_seconds=tokens.parse_duration(args.ttl), uses=args.uses,
                                     workers=args.workers, host_name=args.host_name)
        address = advertised_address(home) or "COORDINATOR:7351"
        ca_hash = pki.spki_sha256(home.signing_ca()[1])
        print(f"token {record.id} expires {output.timestamp(record.expires)}, {record.uses_total} use(s). "
              "On the new host run:")
        print(f"quil-agent join {address} --token {text} --ca-hash {ca_hash}")
    elif args.token_command == "list":
        rows = tokens.list_tokens(home)
        _print(output.tokens_json(rows) if args.json else output.token_listing(rows))
    else:
        record = tokens.revoke(home, args.token_id)
        print(f"revoked token {record.id}")
    return ExitCode.OK


def cmd_ca(args: argparse.Namespace) -> int:
    from .rotation import begin_ca_rotation, finish_ca_rotation

    home = _home(args)
    results = begin_ca_rotation(home) if args.ca_command == "rotate" else finish_ca_rotation(home)
    for name, outcome in sorted(results.items()):
        print(f"{name}: {outcome}")
    failed = [name for name, outcome in results.items() if outcome != "renewed"]
    if failed:
        print(f"error: hosts {', '.join(sorted(failed))} were not moved; fix them and run "
              f"quil-coord ca {args.ca_command} again", file=sys.stderr)
        return ExitCode.HOST_FAILED
    if args.ca_command == "rotate":
        print("every agent trusts both CAs and uses the next one; run quil-coord ca finish to drop the old CA")
    else:
        print("CA rotation finished; restart quil-coord serve and share the new --ca-hash from token create")
    return ExitCode.OK


def cmd_cert(args: argparse.Namespace) -> int:
    from .rotation import rotate_coordinator_cert

    serial = rotate_coordinator_cert(_home(args))
    print(f"new coordinator certificate {serial}; the old one is revoked on every agent at the next apply")
    return ExitCode.OK


def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from ..common import metricsserver
    from .enroll import build_server

    home = _home(args)
    logsetup.configure(logging.DEBUG if args.debug else logging.INFO, args.log_format)
    advertise = args.advertise or args.listen
    if advertise.split(":")[0] in ("0.0.0.0", "[::]", ""):
        raise InventoryError("--listen is a wildcard address; pass --advertise HOST:PORT that joining hosts dial")
    metrics_address = metricsserver.parse_address(args.metrics_address, "--metrics-address", METRICS_EXAMPLE)
    server = build_server(home, args.listen, advertise)
    try:
        metrics = _start_metrics(home, metrics_address)
    except ConfigError:
        server.stop()
        raise
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    if metrics is not None:
        metrics.stop()
    server.stop()
    return ExitCode.OK


def _start_metrics(home: Home, address: tuple[str, int] | None) -> metricsserver.MetricsServer | None:
    from ..common import metricsserver
    from .metrics import make_registry

    if address is None:
        return None
    return metricsserver.start(address, make_registry(home), "--metrics-address")


def cmd_metrics(args: argparse.Namespace) -> int:
    from ..common.files import write_atomic
    from .metrics import exposition

    text = exposition(_home(args))
    if args.output is None:
        sys.stdout.write(text.decode())
        return ExitCode.OK
    try:
        # 0644: node_exporter runs as its own user and must read the file.
        write_atomic(args.output, text, mode=0o644)
    except OSError as err:
        raise ConfigError(f"--output {args.output}: cannot write ({err.strerror or err}); "
                          "choose a writable directory") from err
    return ExitCode.OK


def cmd_assign(args: argparse.Namespace) -> int:
    from .facts import host_facts

    home = _home(args)
    settings = home.load_settings()
    plan, recorded = cluster.run_assign(home, lambda hosts, required: host_facts(home, hosts, required),
                                        args.dry_run)
    rows = output.assignment_rows(settings, recorded.slots)
    if args.json:
        print(json.dumps({"config_generation": recorded.config_generation, "recorded": not args.dry_run,
                          "added": plan.added, "removed": plan.removed, "moved": plan.moved,
                          "moved_from": plan.moved_from, "sizing": plan.sizing, "workers": rows},
                         indent=2))
    else:
        _print(output.assignment_listing(rows, plan, recorded.config_generation, args.dry_run))
    return ExitCode.OK


def cmd_apply(args: argparse.Namespace) -> int:
    from .apply import apply

    home = _home(args)
    with ui.host_progress("apply") as progress:
        report = apply(home, wait=args.wait, confirm_moves=lambda moves: args.yes or _ask_moves(moves),
                       progress=progress, max_failures=args.max_failures)
    _print(output.apply_json(report) if args.json else output.apply_listing(report))
    if report.exit_code != ExitCode.OK or args.no_verify:
        return report.exit_code
    return _run_verify(home, as_json=False, quiet_when_ok=args.json)


def _ask_moves(moves: list[str]) -> bool:
    """Ask on a terminal whether moved cores may go ahead; never when stdin is not a terminal."""
    if not sys.stdin.isatty():
        return False
    print("these cores move to another host and resync their shard state there:", *moves, sep="\n  ")
    return input("apply? [y/N] ").strip().lower() in ("y", "yes")


def cmd_verify(args: argparse.Namespace) -> int:
    return _run_verify(_home(args), as_json=args.json, quiet_when_ok=False)


def _run_verify(home: Home, as_json: bool, quiet_when_ok: bool) -> int:
    from .verify import verify

    with ui.host_progress("verify") as progress:
        report = verify(home, progress=progress)
    if as_json:
        print(output.verify_json(report))
    elif not (quiet_when_ok and report.exit_code == ExitCode.OK):
        _print(output.verify_listing(report), sys.stderr if quiet_when_ok else sys.stdout)
    return report.exit_code


def cmd_import(args: argparse.Namespace) -> int:
    from .importer import import_cluster

    home = _home(args)
    hosts = import_cluster(home, args.control_address)
    for host in hosts:
        print(f"imported host {host.name}: {host.address}, {host.workers} workers" + (", control" if host.control else ""))
    print("write each host's agent bundle with quil-coord host bundle NAME --bundle DIR (change its agent "
          "endpoint first with host set NAME --agent HOST:PORT if it is not ADDRESS:7350), then quil-coord apply")
    return ExitCode.OK


def cmd_config(args: argparse.Namespace) -> int:
    from . import configview

    home = _home(args)
    text = configview.diff(home, args.host) if args.diff else configview.show(home, args.host)
    sys.stdout.write(text)
    return ExitCode.OK


def cmd_firewall(args: argparse.Namespace) -> int:
    from ..common.firewall import render_show
    from .policy import host_policy

    home = _home(args)
    settings, hosts, assignment = home.load_settings(), home.load_hosts(), home.load_assignment()
    slots = assignment.slots if assignment else []
    chosen = [h for h in hosts if not h.probe_only and (args.host is None or h.name == args.host)]
    if args.host is not None and not chosen:
        if any(h.name == args.host for h in hosts):
            raise InventoryError(f"host {args.host} is probe-only: it runs no workers, so it has no worker ports")
        raise InventoryError(f"unknown host '{args.host}'; known hosts: {', '.join(h.name for h in hosts)}")
    policies = [host_policy(settings, hosts, slots, h) for h in chosen]
    print(output.firewall_json(policies) if args.json else "\n\n".join(render_show(p) for p in policies))
    return ExitCode.OK


def cmd_status(args: argparse.Namespace) -> int:
    from .status import collect

    home = _home(args)
    if args.interval is not None and not args.watch:
        raise ConfigError("--interval sets the refresh of --watch; run quil-coord status --watch --interval "
                          f"{args.interval:g}, or drop --interval")
    if args.watch:
        return _watch_status(home, args.interval or WATCH_INTERVAL, args.json)
    hosts = collect(home)
    _print(output.status_json(hosts) if args.json else output.status_listing(hosts))
    return _status_exit(hosts)


def _status_exit(hosts) -> int:
    from .status import unhealthy

    failing = [h.exit_code for h in hosts if h.exit_code != ExitCode.OK]
    if failing:
        return max(failing)
    # Reachable, but an assigned core is missing, backing off or fatal.
    return ExitCode.HOST_FAILED if any(unhealthy(h) for h in hosts) else ExitCode.OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import doctor, render_json, render_text

    report = doctor(_home(args))
    print(render_json(report) if args.json else render_text(report))
    return report.exit_code


def cmd_install_service(args: argparse.Namespace) -> int:
    from ..common import install

    result = install.install(install.COORD, install.options_from(args))
    print(install.summary(install.COORD, result, args.venv))
    return ExitCode.OK


def _watch_status(home: Home, interval: float, as_json: bool) -> int:
    """Show status every interval until Ctrl-C, which ends the watch with exit status 0.

    On a terminal the table is redrawn in place; anywhere else each snapshot is
    printed whole, separated by a blank line (or one JSON object per line), so a
    log or a script receives every refresh.
    """
    try:
        if as_json or not ui.is_rich(sys.stdout):
            _watch_plain(home, interval, as_json)
        else:
            _watch_live(home, interval)
    except KeyboardInterrupt:
        pass
    return ExitCode.OK


def _watch_live(home: Home, interval: float) -> None:
    from .status import collect

    with ui.live_view() as update:
        while True:
            listing = output.status_listing(collect(home))
            listing.after.append(f"refreshed {time.strftime('%H:%M:%S')}, every {interval:g} s; Ctrl-C stops")
            update(ui.render(listing))
            time.sleep(interval)


def _watch_plain(home: Home, interval: float, as_json: bool) -> None:
    from .status import collect

    first = True
    while True:
        hosts = collect(home)
        if as_json:
            print(output.status_json(hosts, indent=None), flush=True)
        else:
            print(("" if first else "\n") + output.status_table(hosts), flush=True)
        first = False
        time.sleep(interval)


def _print(result: "output.Listing | str", stream=None) -> None:
    """Print a listing through ui (a table on a terminal) or a prepared text such as JSON as it is."""
    if isinstance(result, output.Listing):
        ui.show(result, stream)
    else:
        print(result, file=stream or sys.stdout)


def cmd_process(args: argparse.Namespace) -> int:
    from .control import control, exit_code

    outcomes = control(_home(args), args.host, args.command, args.cores, args.wait)
    print(output.control_json(args.host, outcomes) if args.json else output.control_lines(outcomes))
    return exit_code(outcomes)


def cmd_logs(args: argparse.Namespace) -> int:
    from .logs import read_log

    out = sys.stdout.buffer
    chunks = read_log(_home(args), args.host, args.core, args.lines, args.follow)
    try:
        for data, truncated in chunks:
            if truncated:
                print(f"note: {args.host}: the agent skipped log data to stay within its bounds (1 MiB per "
                      "second, a tail of 1 MiB)", file=sys.stderr)
            out.write(data)
            out.flush()
    except KeyboardInterrupt:
        # Ctrl-C is the normal end of --follow: no message, just the status.
        return ExitCode.INTERRUPTED
    finally:
        chunks.close()
    return ExitCode.OK


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.dir, keep=args.keep)


COMMANDS: dict[str, Callable[[Any], int]] = {
    "init": cmd_init, "host": cmd_host, "assign": cmd_assign, "apply": cmd_apply, "status": cmd_status,
    "demo": cmd_demo, "doctor": cmd_doctor, "install-service": cmd_install_service, "verify": cmd_verify,
    "firewall": cmd_firewall, "config": cmd_config, "import": cmd_import, "token": cmd_token, "serve": cmd_serve,
    "ca": cmd_ca, "cert": cmd_cert, "metrics": cmd_metrics,
    "start": cmd_process, "stop": cmd_process, "restart": cmd_process, "logs": cmd_logs,
}
