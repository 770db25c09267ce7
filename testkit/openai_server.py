"""A real, loopback-only, OpenAI-compatible HTTP server for tests, with scripted faults.

Implements what the label stage uses, as the official `openai` client speaks it:
  POST /v1/chat/completions          (response_format json_schema; image as a base64 PNG data URL)
  POST /v1/files                     (multipart upload, purpose=batch)
  GET  /v1/files/{id}/content
  POST /v1/batches, GET /v1/batches/{id}, GET /v1/batches

The server knows the right answer per canvas (`truth`: PNG sha256 -> element) and
injects faults per canvas, consumed one per request (`faults`), or on every request
(`always`): "429" (with Retry-After), "500", "timeout" (no answer until the client
gives up), "garbage" (a 200 whose body is not JSON), "malformed" (message content
not JSON), "offenum" (an element outside the schema's enum), "cutoff" (the reason runs
on until the request's token budget, finish_reason `length`), "ramble" (a weak model under
a server's guided decoding: the reason as long as the schema's `pattern` lets it be, one
token a character, so it closes only if that bound fits the budget, and without a bound
runs to the budget, cut off), "echo_key" (a 400 whose message quotes the caller's key
back, as careless proxies do).

It validates what it is sent (Bearer key, strict json_schema whose `element` enum is
the label set, image detail) and answers 400/401 otherwise, so a test that passes
also proves the request's shape. Every request is logged with its time, its token
limit and its response_format as received.

`dialect="llama-cpp-python"` answers as that server's 0.3.36 does (tests/stage/test_label.py
runs the real one): `response_format` only as `json_object` + `schema`, anything else
refused with HTTP 500 and pydantic's message; the token limit read from `max_tokens`
only, so without it an answer runs to the end of the context (`N_CTX`), cut off.
`dialect="openai-reasoning"` refuses `max_tokens` as OpenAI's reasoning models do (400, param).
"""

from __future__ import annotations

import base64
import email
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

OFF_ENUM = "plasma"
N_CTX = 2048  # llama-cpp-python's default context: where an answer without max_tokens stops
# What llama-cpp-python 0.3.36 sends (HTTP 500) for OpenAI's json_schema form, as captured from it
# (its install path shortened).
LLAMA_CPP_REFUSAL = ("1 validation error:\n  {'type': 'literal_error', 'loc': ('body', 'response_format', 'type'), "
                     "'msg': \"Input should be 'text' or 'json_object'\", 'input': 'json_schema', "
                     "'ctx': {'expected': \"'text' or 'json_object'\"}}\n\n  File \"llama_cpp/server/app.py\", "
                     "line 376, in create_chat_completion\n    POST /v1/chat/completions")


def _completion(body: dict[str, Any], canvas: str, content: str, finish: str, usage: dict[str, int]) -> dict[str, Any]:
    """A chat completion as OpenAI returns it."""
    return {"id": f"chatcmpl-{canvas[:12]}", "object": "chat.completion", "created": int(time.time()),
            "model": body["model"],
            "choices": [{"index": 0, "finish_reason": finish, "logprobs": None,
                         "message": {"role": "assistant", "content": content, "refusal": None}}],
            "usage": usage}


@dataclass
class Logged:
    at: float
    method: str
    path: str
    canvas: str | None = None
    fault: str | None = None
    budget: int | None = None  # the token limit a chat request carried
    response_format: dict[str, Any] | None = None  # as the server received it


@dataclass
class FakeOpenAI:
    truth: dict[str, str]
    api_key: str
    faults: dict[str, list[str]] = field(default_factory=dict)
    always: dict[str, str] = field(default_factory=dict)
    retry_after: float = 1.0
    hang_s: float = 3.0
    delay_s: float = 0.0
    batch_polls: int = 1  # GETs of a batch that still answer in_progress
    hold_from: int = 0  # if set, the chat request of this number (1-based) and later ones wait for release()
    dialect: str = "openai"  # or "llama-cpp-python", "openai-reasoning" (see the module's docstring)
    log: list[Logged] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0  # chat requests being served at once, at most
    files: dict[str, bytes] = field(default_factory=dict)
    batches: dict[str, dict[str, Any]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None
    _released: threading.Event = field(default_factory=threading.Event)

    # -- lifecycle ---------------------------------------------------------------
    def __enter__(self) -> FakeOpenAI:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        self.release()
        self._server.shutdown()
        self._server.server_close()

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def release(self) -> None:
        """Answer the held requests (see hold_from) and hold no more."""
        self._released.set()

    # -- what tests read -----------------------------------------------------------
    def count(self, method: str = "", prefix: str = "/v1/") -> int:
        with self.lock:
            return sum(1 for r in self.log if r.path.startswith(prefix) and (not method or r.method == method))

    @property
    def chat_requests(self) -> int:
        return self.count("POST", "/v1/chat/completions")

    def times(self, canvas: str) -> list[tuple[float, str | None]]:
        with self.lock:
            return [(r.at, r.fault) for r in self.log if r.canvas == canvas]

    def budgets(self, canvas: str) -> list[int | None]:
        with self.lock:
            return [r.budget for r in self.log if r.canvas == canvas]

    def response_formats(self) -> list[dict[str, Any]]:
        """The response_format of every chat request and batch line received, in order."""
        with self.lock:
            return [r.response_format for r in self.log if r.response_format is not None]

    # -- the answer logic, shared by chat and batch -----------------------------------
    def _next_fault(self, canvas: str) -> str | None:
        with self.lock:
            if canvas in self.always:
                return self.always[canvas]
            queue = self.faults.get(canvas)
            return queue.pop(0) if queue else None

    def completion(self, body: dict[str, Any]) -> tuple[int, dict[str, Any], str | None, str | None]:
        """(status, response body, canvas sha256, fault) for one chat completion request."""
        refused = self._dialect_refusal(body)
        if refused:
            return (*refused, None, "refused")
        problem, canvas, labels = _check_request(body, self.dialect)
        if problem:
            return 400, {"error": {"message": problem, "type": "invalid_request_error"}}, canvas, "bad_request"
        assert canvas is not None
        fault = self._next_fault(canvas)
        element = self.truth.get(canvas, labels[0])
        budget = _budget(body, self.dialect) or N_CTX
        if fault == "ramble":
            return self._ramble(body, canvas, element, budget)
        if fault == "offenum":
            content = json.dumps({"element": OFF_ENUM, "reason": "it glows"})
        elif fault == "malformed":
            content = '{"element": "' + element + '", "reason": '  # cut off mid-object
        else:
            content = json.dumps({"element": element, "reason": f"looks like {element}"})
        text = "".join(p.get("text", "") for m in body["messages"] for p in _parts(m))
        usage = {"prompt_tokens": 85 + len(text) // 4, "completion_tokens": len(content) // 4 + 1}
        finish = "stop"
        if fault == "cutoff":  # a rambling reason, stopped by the token limit mid-string
            content, finish = content[:-2] + " and so on and so on", "length"
            usage["completion_tokens"] = _budget(body, self.dialect)
        if self.dialect == "llama-cpp-python" and body.get("max_tokens") is None:
            # max_completion_tokens is not read: the reason runs on to the end of the context
            content, finish = content[:-2] + " and so on", "length"
            usage["completion_tokens"] = N_CTX - usage["prompt_tokens"]
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return 200, _completion(body, canvas, content, finish, usage), canvas, fault

    def _ramble(self, body: dict[str, Any], canvas: str, element: str,
                budget: int) -> tuple[int, dict[str, Any], str | None, str | None]:
        """A reason as long as the schema's `pattern` (`{0,N}`) allows, as a grammar server decodes a weak model."""
        pattern = ((_schema(body, self.dialect).get("properties") or {}).get("reason") or {}).get("pattern") or ""
        bound = re.search(r"\{0,(\d+)\}\$$", pattern)
        words = "and so on " * budget
        reason = words[:int(bound[1])] if bound else words
        content = json.dumps({"element": element, "reason": reason}, separators=(",", ":"))
        tokens = len(content) + 1  # one token a character, and the end-of-text token
        finish = "stop" if tokens <= budget else "length"
        if finish == "length":
            content, tokens = content[:budget], budget
        text = "".join(p.get("text", "") for m in body["messages"] for p in _parts(m))
        usage = {"prompt_tokens": 85 + len(text) // 4, "completion_tokens": tokens}
        usage["total_tokens"] = usage["prompt_tokens"] + tokens
        return 200, _completion(body, canvas, content, finish, usage), canvas, "ramble"

    def _dialect_refusal(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
        """The refusal this server's dialect gives a field it does not take, else None."""
        rf_type = (body.get("response_format") or {}).get("type")
        if self.dialect == "llama-cpp-python" and rf_type not in ("text", "json_object"):
            return 500, {"error": {"message": LLAMA_CPP_REFUSAL, "type": "internal_server_error",
                                   "param": None, "code": None}}
        if self.dialect == "openai-reasoning" and "max_tokens" in body:
            return 400, {"error": {"message": "Unsupported parameter: 'max_tokens' is not supported with this "
                                              "model. Use 'max_completion_tokens' instead.",
                                   "type": "invalid_request_error", "param": "max_tokens",
                                   "code": "unsupported_parameter"}}
        return None

    # -- batches -----------------------------------------------------------------------
    def _run_batch(self, batch: dict[str, Any]) -> None:
        out, err = [], []
        for line in self.files[batch["input_file_id"]].decode().splitlines():
            req = json.loads(line)
            status, body, canvas, fault = self.completion(req["body"])
            with self.lock:
                self.log.append(Logged(time.time(), "BATCH", "batch-line", canvas, fault,
                                       _budget(req["body"], self.dialect), req["body"].get("response_format")))
            if fault in ("429", "500", "timeout", "garbage", "echo_key"):
                status, body = 500, {"error": {"message": f"injected {fault}", "type": "server_error"}}
            row = {"id": f"req-{len(out) + len(err)}", "custom_id": req["custom_id"],
                   "response": {"status_code": status, "request_id": "r", "body": body}, "error": None}
            (out if status == 200 else err).append(json.dumps(row))
        batch["output_file_id"] = self._store("\n".join(out).encode() + b"\n") if out else None
        batch["error_file_id"] = self._store("\n".join(err).encode() + b"\n") if err else None
        batch["request_counts"] = {"total": len(out) + len(err), "completed": len(out), "failed": len(err)}
        batch["status"], batch["completed_at"] = "completed", int(time.time())

    def _store(self, data: bytes) -> str:
        fid = f"file-{len(self.files) + 1:04d}"
        self.files[fid] = data
        return fid


def _budget(body: dict[str, Any], dialect: str) -> int | None:
    """The token limit this dialect reads from the request."""
    if dialect == "llama-cpp-python":
        return body.get("max_tokens")
    return body.get("max_completion_tokens", body.get("max_tokens"))


def _schema(body: dict[str, Any], dialect: str) -> dict[str, Any]:
    """The answer's schema where this dialect reads it."""
    rf = body.get("response_format") or {}
    return (rf if dialect == "llama-cpp-python" else rf.get("json_schema") or {}).get("schema") or {}


def _parts(message: dict[str, Any]) -> list[dict[str, Any]]:
    c = message.get("content")
    return [{"type": "text", "text": c}] if isinstance(c, str) else list(c or [])


def _check_request(body: dict[str, Any], dialect: str = "openai") -> tuple[str | None, str | None, list[str]]:
    """A reason to refuse the request (or None), the canvas sha256 it carries, and the enum."""
    rf = body.get("response_format") or {}
    js = rf.get("json_schema") or {}
    schema = _schema(body, dialect)
    enum = ((schema.get("properties") or {}).get("element") or {}).get("enum") or []
    canvas = None
    detail = None
    for m in body.get("messages", []):
        for p in _parts(m):
            if p.get("type") == "image_url":
                url = p["image_url"]["url"]
                detail = p["image_url"].get("detail")
                if url.startswith("data:image/png;base64,"):
                    canvas = hashlib.sha256(base64.b64decode(url.split(",", 1)[1])).hexdigest()
    if not body.get("model"):
        return "model is required", canvas, enum
    if dialect != "llama-cpp-python" and (rf.get("type") != "json_schema" or js.get("strict") is not True):
        return "response_format must be a strict json_schema", canvas, enum
    if not enum or set(schema.get("required", [])) != {"element", "reason"} or schema.get("additionalProperties") is not False:
        return "schema must require element (an enum) and reason, and nothing else", canvas, enum
    if canvas is None:
        return "no base64 PNG image_url in messages", canvas, enum
    if detail not in ("low", "high", "auto"):
        return f"image detail {detail!r}", canvas, enum
    return None, canvas, enum


class _Handler(BaseHTTPRequestHandler):
    fake: FakeOpenAI

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass

    def _send(self, status: int, body: bytes, ctype: str = "application/json", headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and left; that is the point of a "timeout" fault

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers=headers)

    def _authorised(self) -> bool:
        if self.headers.get("Authorization") == f"Bearer {self.fake.api_key}":
            return True
        self._json(401, {"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error",
                                   "code": "invalid_api_key"}})
        return False

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _log(self, canvas: str | None = None, fault: str | None = None, budget: int | None = None,
             response_format: dict[str, Any] | None = None) -> None:
        with self.fake.lock:
            self.fake.log.append(Logged(time.time(), self.command, self.path, canvas, fault, budget, response_format))

    def do_POST(self) -> None:  # noqa: N802
        body = self._body()
        if not self._authorised():
            self._log(fault="401")
            return
        if self.path == "/v1/chat/completions":
            self._chat(json.loads(body))
        elif self.path == "/v1/files":
            self._log()
            self._upload(body)
        elif self.path == "/v1/batches":
            self._log()
            req = json.loads(body)
            fake = self.fake
            with fake.lock:
                bid = f"batch_{len(fake.batches) + 1:04d}"
                fake.batches[bid] = {"id": bid, "object": "batch", "endpoint": req["endpoint"],
                                     "input_file_id": req["input_file_id"], "completion_window": req["completion_window"],
                                     "status": "validating", "created_at": int(time.time()), "polls": 0,
                                     "output_file_id": None, "error_file_id": None,
                                     "metadata": req.get("metadata")}
            self._json(200, _public(fake.batches[bid]))
        else:
            self._log()
            self._json(404, {"error": {"message": f"no route {self.path}"}})

    def do_GET(self) -> None:  # noqa: N802
        if not self._authorised():
            self._log(fault="401")
            return
        self._log()
        fake = self.fake
        path = self.path.split("?", 1)[0]
        if path == "/v1/batches":
            with fake.lock:
                data = [_public(b) for b in fake.batches.values()]
            self._json(200, {"object": "list", "data": data, "has_more": False})
        elif path.startswith("/v1/batches/"):
            bid = path.rsplit("/", 1)[1]
            if bid not in fake.batches:
                self._json(404, {"error": {"message": f"no batch {bid}"}})
                return
            with fake.lock:
                batch = fake.batches[bid]
                batch["polls"] += 1
                done = batch["polls"] > fake.batch_polls and batch["status"] != "completed"
                if batch["status"] == "validating":
                    batch["status"] = "in_progress"
            if done:
                fake._run_batch(batch)
            self._json(200, _public(batch))
        elif path.startswith("/v1/files/") and path.endswith("/content"):
            fid = path.split("/")[3]
            if fid not in fake.files:
                self._json(404, {"error": {"message": f"no file {fid}"}})
                return
            self._send(200, fake.files[fid], "application/octet-stream")
        else:
            self._json(404, {"error": {"message": f"no route {path}"}})

    def _upload(self, body: bytes) -> None:
        msg = email.message_from_bytes(b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + body)
        fields = {p.get_param("name", header="content-disposition"): p for p in msg.get_payload()}
        data = fields["file"].get_payload(decode=True)
        purpose = fields["purpose"].get_payload(decode=True).decode()
        with self.fake.lock:
            fid = self.fake._store(data)
        self._json(200, {"id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                         "filename": fields["file"].get_filename() or "input.jsonl", "purpose": purpose,
                         "status": "processed"})

    def _chat(self, body: dict[str, Any]) -> None:
        fake = self.fake
        with fake.lock:
            fake.in_flight += 1
            fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
        try:
            self._answer_chat(body)
        finally:
            with fake.lock:
                fake.in_flight -= 1

    def _answer_chat(self, body: dict[str, Any]) -> None:
        fake = self.fake
        status, resp, canvas, fault = fake.completion(body)
        self._log(canvas, fault, _budget(body, fake.dialect), body.get("response_format"))  # on arrival: counts even if its caller is killed waiting
        if fake.hold_from and fake.chat_requests >= fake.hold_from:
            fake._released.wait()  # a known point to kill the client at, whatever the machine's speed
        if fake.delay_s:
            time.sleep(fake.delay_s)
        if fault == "429":
            self._json(429, {"error": {"message": "Rate limit reached", "type": "rate_limit_exceeded"}},
                       headers={"Retry-After": f"{fake.retry_after:g}"})
        elif fault == "500":
            self._json(500, {"error": {"message": "The server had an error", "type": "server_error"}})
        elif fault == "timeout":
            time.sleep(fake.hang_s)
            self._json(200, resp)
        elif fault == "echo_key":
            self._json(400, {"error": {"message": f"bad request from {self.headers.get('Authorization')}",
                                       "type": "invalid_request_error"}})
        elif fault == "garbage":
            self._send(200, b"<html>upstream proxy error", "application/json")
        else:
            self._json(status, resp)


def _public(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if k != "polls"}
