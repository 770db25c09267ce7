"""A real HTTP server on 127.0.0.1 for tests: real sockets, scripted misbehaviour, a request log.

    with LoopbackServer({"/a.jpg": ok(data, "image/jpeg"), "/gone": status(404)}) as srv:
        fetch(srv.url("/a.jpg")); assert srv.paths() == ["/a.jpg"]

A route is a function of the request handler that writes the whole response. The
builders below cover what real hosts do: good files, error codes, slow drips,
stalls, lies about content type, redirects (also to file://), oversized bodies with
and without Content-Length, and flaky hosts that fail a few times first. Waits end
early when the server stops, so a test never hangs on its own server.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Route = Callable[["_Handler"], None]


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def handle(self) -> None:
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client hung up between requests (a timeout, or a closed keep-alive connection)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        self.server.log_request_path(path)
        route = self.server.routes.get(path)
        try:
            if route is None:
                status(404)(self)
            else:
                route(self)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout, byte cap): expected for the slow routes

    def log_message(self, *args: Any) -> None:  # keep test output quiet
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, routes: dict[str, Route]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes = routes
        self.closing = threading.Event()
        self.log: list[str] = []
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def log_request_path(self, path: str) -> None:
        with self.lock:
            self.log.append(path)
            self.counts[path] = self.counts.get(path, 0) + 1

    def hits(self, path: str) -> int:
        with self.lock:
            return self.counts.get(path, 0)


class LoopbackServer:
    """ThreadingHTTPServer on an ephemeral 127.0.0.1 port, run in a daemon thread."""

    def __init__(self, routes: dict[str, Route]) -> None:
        self.routes = routes
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> LoopbackServer:
        self._server = _Server(self.routes)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._server is not None and self._thread is not None
        self._server.closing.set()  # release stalled handlers
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    @property
    def base(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + path

    def paths(self) -> list[str]:
        """Every request path received so far, in arrival order."""
        assert self._server is not None
        with self._server.lock:
            return list(self._server.log)

    def clear_log(self) -> None:
        assert self._server is not None
        with self._server.lock:
            self._server.log.clear()

    def hits(self, path: str) -> int:
        assert self._server is not None
        return self._server.hits(path)


def _head(h: _Handler, code: int, ctype: str, length: int | None, extra: dict[str, str] | None = None) -> None:
    h.send_response(code)
    h.send_header("Content-Type", ctype)
    if length is None:
        h.send_header("Connection", "close")  # body ends when the connection closes
        h.close_connection = True
    else:
        h.send_header("Content-Length", str(length))
    for k, v in (extra or {}).items():
        h.send_header(k, v)
    h.end_headers()


def ok(body: bytes, ctype: str = "application/octet-stream", delay_s: float = 0.0,
       headers: dict[str, str] | None = None) -> Route:
    """200 with `body` (and `headers`), after `delay_s` (a host that takes a while)."""
    def route(h: _Handler) -> None:
        if delay_s:
            h.server.closing.wait(delay_s)
        _head(h, 200, ctype, len(body), headers)
        h.wfile.write(body)
    return route


def status(code: int, body: bytes = b"error\n") -> Route:
    def route(h: _Handler) -> None:
        _head(h, code, "text/plain", len(body))
        h.wfile.write(body)
    return route


def redirect(location: str, code: int = 302) -> Route:
    def route(h: _Handler) -> None:
        _head(h, code, "text/plain", 0, {"Location": location})
    return route


def drip(body: bytes, every_s: float, chunk: int = 1) -> Route:
    """200 whose body arrives `chunk` bytes every `every_s`: each read succeeds, the whole never ends in time."""
    def route(h: _Handler) -> None:
        _head(h, 200, "image/jpeg", len(body))
        for i in range(0, len(body), chunk):
            if h.server.closing.wait(every_s):
                return
            h.wfile.write(body[i:i + chunk])
            h.wfile.flush()
    return route


def stall(stall_s: float, after_bytes: bytes = b"") -> Route:
    """200 headers (and `after_bytes`), then silence for `stall_s`."""
    def route(h: _Handler) -> None:
        _head(h, 200, "image/jpeg", len(after_bytes) + 1000)
        h.wfile.write(after_bytes)
        h.wfile.flush()
        h.server.closing.wait(stall_s)
        h.close_connection = True
    return route


def no_length(body: bytes, ctype: str = "image/png") -> Route:
    """200 without Content-Length: the client only learns the size by reading."""
    def route(h: _Handler) -> None:
        _head(h, 200, ctype, None)
        h.wfile.write(body)
    return route


def flaky(failures: int, then: Route, code: int = 503) -> Route:
    """`code` for the first `failures` requests, then `then`: a transient outage."""
    seen = {"n": 0}
    lock = threading.Lock()

    def route(h: _Handler) -> None:
        with lock:
            seen["n"] += 1
            n = seen["n"]
        (status(code) if n <= failures else then)(h)
    return route


def wait_for(predicate: Callable[[], bool], timeout_s: float, every_s: float = 0.01) -> bool:
    """Poll `predicate` until true or `timeout_s` passed; returns its last value."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(every_s)
    return predicate()

