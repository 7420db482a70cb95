"""The quil-agent command line: turns argv into a call and an exit status."""

from __future__ import annotations

import os

# The agent spawns processes; gRPC's fork handlers are not needed for
# fork+exec and have caused deadlocks, so keep them off before grpc loads.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
# gRPC's C core logs an INFO line for every failed TLS handshake, so anyone who
# can reach the port could flood the agent's log. Keep its errors only; a
# GRPC_VERBOSITY set in the environment still wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import argparse  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

from ..common import logsetup  # noqa: E402
from ..common.errors import QuilClusterError, TLSError, UnreachableError  # noqa: E402
from ..common.exitcodes import ExitCode  # noqa: E402
from ..common.install import add_arguments as install_arguments  # noqa: E402
from . import config as agent_config  # noqa: E402

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quil-agent",
        description="Run and supervise this host's Quilibrium node processes for quil-coord.",
        epilog="Exit status: 0 ok, 1 unexpected error, 2 usage, 3 invalid config, 4 join rejected,"
        " 6 TLS or coordinator not verified, 130 interrupted.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve the agent API and supervise the node processes")
    run.add_argument("--config", type=Path, default=agent_config.DEFAULT_CONFIG_PATH,
                     help=f"agent config file (default {agent_config.DEFAULT_CONFIG_PATH})")
    run.add_argument("--log-format", choices=("text", "json"), default="text", help="log line format on stderr")
    run.add_argument("--debug", action="store_true", help="log per-RPC detail")
    sub.add_parser("sample-config", help="print an annotated agent.yaml with the defaults")

    join = sub.add_parser("join", help="enroll this host with a join token from quil-coord token create")
    join.add_argument("coordinator", help="HOST:PORT of quil-coord serve")
    join.add_argument("--token", required=True, help="the join token")
    join.add_argument("--ca-hash", required=True, help="sha256:HEX of the cluster CA's public key (pinned)")
    join.add_argument("--address", help="IP address this host's workers bind (default: the one that reaches "
                      "the coordinator)")
    join.add_argument("--agent-port", type=int, default=7350, help="port the agent listens on (default 7350)")
    join.add_argument("--dir", type=Path, default=agent_config.DEFAULT_CONFIG_PATH.parent,
                      help=f"where to write agent.yaml and the TLS files (default {agent_config.DEFAULT_CONFIG_PATH.parent})")
    join.add_argument("--node-binary", default="/opt/quilibrium/node/node", help="the node binary on this host")
    join.add_argument("--node-config-dir", default="/var/lib/quil-agent/node/.config",
                      help="node config directory on this host (passed as --config)")
    join.add_argument("--state-dir", default="/var/lib/quil-agent/state", help="agent state directory")
    join.add_argument("--run", action="store_true", help="start the agent right after joining")

    install = sub.add_parser("install-service", help="create the quil user, the venv in /opt/quil-cluster, "
                             "the directories and the systemd unit (safe to run again)")
    install_arguments(install)
    install.add_argument("--firewall", action="store_true",
                         help="also install the drop-in that lets the agent manage nftables or ufw")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "sample-config":
        sys.stdout.write(agent_config.sample())
        return ExitCode.OK
    logsetup.configure(logging.DEBUG if getattr(args, "debug", False) else logging.INFO,
                       getattr(args, "log_format", "text"))
    try:
        if args.command == "join":
            return run_join(args)
        if args.command == "install-service":
            return run_install(args)
        return run(args.config)
    except QuilClusterError as err:
        # join and install-service are run by hand, so their errors read as one line; run logs them for the journal.
        if args.command in ("join", "install-service"):
            print(f"error: {err}", file=sys.stderr)
        else:
            log.error("%s", err)
        return _exit_code(err)
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED


def _exit_code(err: QuilClusterError) -> int:
    from .join import JoinFailed

    if isinstance(err, TLSError):
        return ExitCode.TLS
    if isinstance(err, UnreachableError):
        return ExitCode.UNREACHABLE
    return ExitCode.HOST_FAILED if isinstance(err, JoinFailed) else ExitCode.CONFIG


def run_join(args: argparse.Namespace) -> int:
    from .join import JoinOptions, join

    options = JoinOptions(
        coordinator=args.coordinator, token=args.token, ca_hash=args.ca_hash, directory=args.dir,
        address=args.address, agent_port=args.agent_port, node_binary=args.node_binary,
        node_config_dir=args.node_config_dir, state_dir=args.state_dir,
    )
    path = join(options)
    print(f"joined; agent config written to {path}")
    if args.run:
        return run(path)
    print(f"start the agent with: quil-agent run --config {path}")
    return ExitCode.OK


def run_install(args: argparse.Namespace) -> int:
    from ..common import install

    result = install.install(install.AGENT, install.options_from(args))
    print(install.summary(install.AGENT, result, args.venv))
    return ExitCode.OK


def run(config_path: Path) -> int:
    from . import capabilities
    from .service import build_server  # imports grpc; kept out of sample-config

    # Before any thread exists, so no node process inherits a capability (see capabilities.py).
    capabilities.clear_ambient()

    config = agent_config.load(config_path)
    agent = build_server(config)
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stop.wait()
    log.info("stopping: agent (signal %s); stopping node processes", signal.Signals(received[0]).name)
    agent.stop(stop_processes=True)
    return ExitCode.INTERRUPTED if received[0] == signal.SIGINT else ExitCode.OK
