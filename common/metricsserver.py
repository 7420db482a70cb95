"""A small plain-HTTP server for Prometheus metrics, shared by the agent and the coordinator.

It serves GET /metrics from a prometheus_client registry and nothing else.
The exposition contains no secrets (states, counters, versions, hashes), but it
has no authentication either, so it binds loopback by default. At most
MAX_CONNECTIONS requests run at once; a connection beyond that is closed
before it is read, so a flood of idle connections costs no threads.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import socketserver
import threading
import time
from typing import Any, Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app

from .errors import ConfigError

log = logging.getLogger(__name__)

# Requests served at the same time; more scrapers than this are a misconfiguration.
MAX_CONNECTIONS = 4
# Seconds a client may take to send its request or read the reply.
REQUEST_TIMEOUT = 10.0
# Seconds between two warnings about dropped connections.
DROP_WARNING_INTERVAL = 60.0
# Values of a metrics address setting that turn the server off.
OFF_VALUES = ("", "off")

METRICS_PATH = "/metrics"


def parse_address(value: Any, what: str, example: str = "127.0.0.1:9741") -> tuple[str, int] | None:
    """Split a metrics address 'HOST:PORT' or '[IPv6]:PORT'; return None for 'off' or ''.

    Port 0 binds a free port, which the server logs. YAML reads an unquoted
    off as false, so False also means off. Raises ConfigError naming what.
    """
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in OFF_VALUES):
        return None
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError(f"{what}: '{value}' is not HOST:PORT; use e.g. {example}, or 'off'")
    host, _, port_text = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{what}: '{value}' is not HOST:PORT with a port from 0 to 65535; "
                          f"use e.g. {example}, or 'off'")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _QuietHandler(WSGIRequestHandler):
    # Socket timeout for reading the request and writing the reply, so a stalled client frees its slot.
    timeout = REQUEST_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class names it
        log.debug("metrics request from %s: " + format, self.client_address[0], *args)


class _BoundedServer(WSGIServer):
    """A WSGI server that runs each request on its own thread, at most MAX_CONNECTIONS at once."""

    def __init__(self, address: tuple[str, int], family: int) -> None:
        self.address_family = family
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._last_drop_warning = -DROP_WARNING_INTERVAL
        self.dropped = 0
        super().__init__(address, _QuietHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would call socket.getfqdn(), a reverse DNS lookup that can stall the start.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[0], self.server_address[1]
        self.setup_environ()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.dropped += 1
            self._warn_dropped(client_address)
            self.shutdown_request(request)
            return
        thread = threading.Thread(target=self._serve_one, args=(request, client_address),
                                  name="metrics-request", daemon=True)
        thread.start()

    def _serve_one(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except TimeoutError:
            log.debug("metrics request from %s timed out after %.1f s", client_address[0], _QuietHandler.timeout)
        except Exception:  # noqa: BLE001 - one bad request must not end the server
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.warning("metrics request from %s failed", client_address[0], exc_info=True)

    def _warn_dropped(self, client_address: Any) -> None:
        now = time.monotonic()
        if now - self._last_drop_warning >= DROP_WARNING_INTERVAL:
            self._last_drop_warning = now
            log.warning("metrics: closed a connection from %s because %d requests are already running "
                        "(%d dropped so far); scrape less often or from fewer places",
                        client_address[0], MAX_CONNECTIONS, self.dropped)


def _only_metrics_path(app: Callable) -> Callable:
    def route(environ: dict, start_response: Callable) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != METRICS_PATH:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [f"not found; metrics are at {METRICS_PATH}\n".encode()]
        return app(environ, start_response)

    return route


class MetricsServer:
    """The running server; stop() ends it."""

    def __init__(self, server: _BoundedServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.host = server.server_address[0]
        self.port = server.server_address[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{METRICS_PATH}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)


def start(address: tuple[str, int], registry: CollectorRegistry, what: str) -> MetricsServer:
    """Bind address and serve registry on a daemon thread; raise ConfigError when the bind fails."""
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        server = _BoundedServer((host, port), family)
    except OSError as err:
        raise ConfigError(f"{what}: cannot listen on {host}:{port} for metrics ({err.strerror or err}); "
                          "choose a free address, or 'off'") from err
    server.set_app(_only_metrics_path(make_wsgi_app(registry)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                              name="metrics-server", daemon=True)
    thread.start()
    running = MetricsServer(server, thread)
    exposure = "" if is_loopback(host) else "; not loopback, so firewall it: it has no authentication"
    log.info("listening: metrics on %s (plain HTTP%s)", running.url, exposure)
    return running
