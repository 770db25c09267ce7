"""A fake forge on 127.0.0.1: GitHub's issue-comments API and GitLab's merge-request notes API, in memory.

    with FakeForge("github", token="t0k") as forge:
        forge.api   # http://127.0.0.1:PORT, the API root the client is given
        forge.comments[("o/r", 7)]  # [{"id", "body"}], what the merge request shows

Only the endpoints the review's client uses: list (paginated, 100 a page with the forge's own next-page
signal), create, edit. A wrong token answers 401; `fail_with` makes every request answer that status.
Like testkit/http_server.py: real sockets, a daemon thread, a request log.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

GITHUB_LIST = re.compile(r"^/repos/([^/]+/[^/]+)/issues/(\d+)/comments$")
GITHUB_EDIT = re.compile(r"^/repos/([^/]+/[^/]+)/issues/comments/(\d+)$")
GITLAB_LIST = re.compile(r"^/projects/([^/]+)/merge_requests/(\d+)/notes$")
GITLAB_EDIT = re.compile(r"^/projects/([^/]+)/merge_requests/(\d+)/notes/(\d+)$")


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method: str) -> None:
        srv = self.server
        url = urlsplit(self.path)
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
        with srv.lock:
            srv.log.append((method, url.path))
        if srv.fail_with:
            return self._send(srv.fail_with, {"message": "Server Error"})
        token = (self.headers.get("Authorization", "").removeprefix("Bearer ") if srv.forge == "github"
                 else self.headers.get("PRIVATE-TOKEN", ""))
        if token != srv.token:
            return self._send(401, {"message": "Bad credentials"})
        m = (GITHUB_LIST if srv.forge == "github" else GITLAB_LIST).match(url.path)
        if m:
            key = (unquote(m[1]), int(m[2]))
            comments = srv.comments.setdefault(key, [])
            if method == "GET":
                q = parse_qs(url.query)
                page, per = int(q.get("page", ["1"])[0]), min(int(q.get("per_page", ["30"])[0]), 100)
                items = comments[(page - 1) * per: page * per]
                more = page * per < len(comments)
                headers = ({"Link": f'<{srv.api}{url.path}?page={page + 1}>; rel="next"'} if srv.forge == "github"
                           else {"X-Next-Page": str(page + 1)}) if more else {}
                return self._send(200, items, headers)
            if method == "POST":
                with srv.lock:
                    srv.next_id += 1
                    comments.append({"id": srv.next_id, "body": body["body"]})
                return self._send(201, comments[-1])
        m = (GITHUB_EDIT if srv.forge == "github" else GITLAB_EDIT).match(url.path)
        if m and method == ("PATCH" if srv.forge == "github" else "PUT"):
            cid = int(m[m.lastindex])
            for comments in srv.comments.values():
                for c in comments:
                    if c["id"] == cid:
                        c["body"] = body["body"]
                        return self._send(200, c)
        return self._send(404, {"message": "Not Found"})

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_PATCH(self) -> None:  # noqa: N802
        self._handle("PATCH")

    def do_PUT(self) -> None:  # noqa: N802
        self._handle("PUT")

    def log_message(self, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, forge: str, token: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.forge, self.token = forge, token
        self.api = f"http://127.0.0.1:{self.server_address[1]}"
        self.comments: dict[tuple[str, int], list[dict[str, Any]]] = {}
        self.log: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.next_id = 1000
        self.fail_with = 0


class FakeForge:
    def __init__(self, forge: str, token: str) -> None:
        self.server = _Server(forge, token)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        return self.server

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
