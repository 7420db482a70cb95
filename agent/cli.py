"""The quil-agent command line: turns argv into a call and an exit status."""

from __future__ import annotations

import os

# The agent spawns processes; gRPC's fork handlers are not needed for
# fork+exec and have caused deadlocks, so keep them off before grpc loads.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import argparse  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

from ..common import logsetup  # noqa: E402
from ..common.errors import ConfigError, QuilClusterError, TLSError  # noqa: E402
from ..common.exitcodes import ExitCode  # noqa: E402
from . import config as agent_config  # noqa: E402

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quil-agent",
        description="Run and supervise this host's Quilibrium node processes for quil-coord.",
        epilog="Exit status: 0 ok, 1 unexpected error, 2 usage, 3 invalid config, 6 TLS, 130 interrupted.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve the agent API and supervise the node processes")
    run.add_argument("--config", type=Path, default=agent_config.DEFAULT_CONFIG_PATH,
                     help=f"agent config file (default {agent_config.DEFAULT_CONFIG_PATH})")
    run.add_argument("--log-format", choices=("text", "json"), default="text", help="log line format on stderr")
    run.add_argument("--debug", action="store_true", help="log per-RPC detail")
    sub.add_parser("sample-config", help="print an annotated agent.yaml with the defaults")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "sample-config":
        sys.stdout.write(agent_config.sample())
        return ExitCode.OK
    logsetup.configure(logging.DEBUG if args.debug else logging.INFO, args.log_format)
    try:
        return run(args.config)
    except TLSError as err:
        log.error("%s", err)
        return ExitCode.TLS
    except (ConfigError, QuilClusterError) as err:
        log.error("%s", err)
        return ExitCode.CONFIG
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED


def run(config_path: Path) -> int:
    from .service import build_server  # imports grpc; kept out of sample-config

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
