"""A small plain-HTTP server for Prometheus metrics, shared by the agent and the coordinator.

It serves GET /metrics from a prometheus_client registry and nothing else.
The exposition contains no secrets (states, counters, versions, hashes), but it
has no authentication either, so it binds loopback by default.

One reader thread collects the request head of every accepted connection with
non-blocking reads, and closes a connection that has not sent it within
REQUEST_DEADLINE of the accept, however slowly its bytes arrive. Only a
complete request takes one of the MAX_CONNECTIONS request threads, so slow or
half-open connections cannot hold them. At most MAX_PENDING connections wait
for their head, and a new one beyond that closes the oldest, so a flood of
idle connections delays a scrape by at most the deadline.
"""

from __future__ import annotations

import io
import ipaddress
import logging
import selectors
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
# Seconds from the accept within which a client must send its whole request head.
REQUEST_DEADLINE = 5.0
# Connections whose request head is still being read; a new one beyond this closes the oldest.
MAX_PENDING = 64
# Bytes of request line and headers accepted; a scrape sends a few hundred.
MAX_HEAD_BYTES = 8192
# Seconds a client may take to read each part of the reply.
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
    """A request handler that reads the request head the reader thread already collected."""

    # Socket timeout for writing the reply, so a client that stops reading frees its slot.
    timeout = REQUEST_TIMEOUT

    def __init__(self, request: Any, client_address: Any, server: Any, head: bytes) -> None:
        self._head = head
        super().__init__(request, client_address, server)

    def setup(self) -> None:
        super().setup()
        self.rfile.close()
        # A GET has no body, so the head is all the handler reads.
        self.rfile = io.BytesIO(self._head)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class names it
        log.debug("metrics request from %s: " + format, self.client_address[0], *args)


def _head_complete(data: bytes) -> bool:
    return b"\r\n\r\n" in data or b"\n\n" in data


class _Pending:
    """A connection whose request head is still being read."""

    def __init__(self, sock: socket.socket, address: Any, deadline: float) -> None:
        self.sock = sock
        self.address = address
        self.deadline = deadline
        self.head = b""


class _HeadReader:
    """Reads the request heads of accepted connections on one thread, each within a deadline from its accept.

    on_head(sock, address, head) runs on the reader thread with the socket
    back in blocking mode; it owns the socket from then on.
    """

    def __init__(self, on_head: Callable[[socket.socket, Any, bytes], None], deadline: float,
                 max_pending: int) -> None:
        self._on_head = on_head
        self._deadline = deadline
        self._max_pending = max_pending
        self._selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._selector.register(self._wake_read, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._incoming: list[_Pending] = []
        # Insertion order is accept order, so the first entry is the oldest.
        self._pending: dict[socket.socket, _Pending] = {}
        self._stopping = False
        self._last_evict_warning = -DROP_WARNING_INTERVAL
        self.evicted = 0
        self._thread = threading.Thread(target=self._loop, name="metrics-reader", daemon=True)
        self._thread.start()

    def add(self, sock: socket.socket, address: Any) -> None:
        """Hand over a connection the accept loop just accepted."""
        with self._lock:
            self._incoming.append(_Pending(sock, address, time.monotonic() + self._deadline))
        self._wake()

    def stop(self) -> None:
        self._stopping = True
        self._wake()
        self._thread.join(5.0)

    def _wake(self) -> None:
        try:
            self._wake_write.send(b"x")
        except OSError:
            pass  # the buffer is full, so a wake-up is queued already

    def _loop(self) -> None:
        try:
            while not self._stopping:
                now = time.monotonic()
                timeout = min((p.deadline for p in self._pending.values()), default=now + 1.0) - now
                for key, _ in self._selector.select(max(0.0, timeout)):
                    if key.data is None:
                        self._drain_wake()
                    else:
                        self._read(key.data)
                self._take_incoming()
                self._expire(time.monotonic())
        finally:
            with self._lock:
                left = list(self._pending.values()) + self._incoming
                self._pending.clear()
                self._incoming.clear()
            for entry in left:
                entry.sock.close()
            self._selector.close()
            self._wake_read.close()
            self._wake_write.close()

    def _drain_wake(self) -> None:
        try:
            while self._wake_read.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _take_incoming(self) -> None:
        with self._lock:
            incoming, self._incoming = self._incoming, []
        for entry in incoming:
            if len(self._pending) >= self._max_pending:
                self._evict_oldest(entry.address)
            entry.sock.setblocking(False)
            self._selector.register(entry.sock, selectors.EVENT_READ, entry)
            self._pending[entry.sock] = entry

    def _evict_oldest(self, newcomer: Any) -> None:
        oldest = next(iter(self._pending.values()))
        # Counted and logged before the close, so whoever waits for the close finds both.
        self.evicted += 1
        now = time.monotonic()
        if now - self._last_evict_warning >= DROP_WARNING_INTERVAL:
            self._last_evict_warning = now
            log.warning("metrics: closed the oldest incomplete request from %s to admit one from %s, because %d "
                        "connections are waiting for their request (%d closed so far); a client that connects "
                        "and sends nothing looks like this", oldest.address[0], newcomer[0], self._max_pending,
                        self.evicted)
        self._forget(oldest)

    def _read(self, entry: _Pending) -> None:
        try:
            data = entry.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError as err:
            log.debug("metrics request from %s failed while reading (%s)", entry.address[0], err)
            self._forget(entry)
            return
        if not data:
            log.debug("metrics request from %s: closed before the request was complete", entry.address[0])
            self._forget(entry)
            return
        entry.head += data
        if _head_complete(entry.head):
            self._selector.unregister(entry.sock)
            del self._pending[entry.sock]
            entry.sock.setblocking(True)
            self._on_head(entry.sock, entry.address, entry.head)
        elif len(entry.head) > MAX_HEAD_BYTES:
            log.debug("metrics request from %s: head longer than %d bytes, closed", entry.address[0], MAX_HEAD_BYTES)
            self._forget(entry)

    def _expire(self, now: float) -> None:
        for entry in [p for p in self._pending.values() if p.deadline <= now]:
            log.debug("metrics request from %s timed out after %.1f s before the request was complete",
                      entry.address[0], self._deadline)
            self._forget(entry)

    def _forget(self, entry: _Pending) -> None:
        self._selector.unregister(entry.sock)
        del self._pending[entry.sock]
        entry.sock.close()


class _BoundedServer(WSGIServer):
    """A WSGI server that runs each request on its own thread, at most MAX_CONNECTIONS at once."""

    # Listen backlog. The default of 5 lets a burst of connections overflow it, and the
    # kernel then drops SYNs, which the client retries only after 1 s, 3 s, 7 s ...
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], family: int) -> None:
        self.address_family = family
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._last_drop_warning = -DROP_WARNING_INTERVAL
        self.dropped = 0
        # Made first, because TCPServer.__init__ calls server_close(), which stops it, when the bind fails.
        self._reader = _HeadReader(self._on_head, REQUEST_DEADLINE, MAX_PENDING)
        super().__init__(address, _QuietHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would call socket.getfqdn(), a reverse DNS lookup that can stall the start.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[0], self.server_address[1]
        self.setup_environ()

    def process_request(self, request: Any, client_address: Any) -> None:
        self._reader.add(request, client_address)

    def server_close(self) -> None:
        self._reader.stop()
        super().server_close()

    def _on_head(self, request: Any, client_address: Any, head: bytes) -> None:
        if not self._slots.acquire(blocking=False):
            self.dropped += 1
            self._warn_dropped(client_address)
            self.shutdown_request(request)
            return
        thread = threading.Thread(target=self._serve_one, args=(request, client_address, head),
                                  name="metrics-request", daemon=True)
        thread.start()

    def _serve_one(self, request: Any, client_address: Any, head: bytes) -> None:
        try:
            _QuietHandler(request, client_address, self, head)
        except TimeoutError:
            log.debug("metrics request from %s timed out after %.1f s while sending the reply", client_address[0],
                      _QuietHandler.timeout)
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
