"""teacher: label canvases with a VLM over an OpenAI-compatible API: strict, cached, resumable.

Used by src/label.py when label.provider is `teacher`; it is not a stage of its own.
Inputs:  canvas PNGs (by path), the contract's labels, label.teacher.* and label.* params.
Outputs: answers appended to CACHE/answers.jsonl (the label cache); in batch mode,
         CACHE/batches.jsonl records every uploaded file and submitted batch id.
Params:  label.teacher.{base_url, model, api_key_env, prompt, detail, max_tokens, temperature,
         timeout_s, mode}, label.{concurrency, max_attempts, answer_attempts, backoff_s},
         label.batch.{poll_s, wait_s}, label.price.{input_per_1m, output_per_1m, batch_discount}

The request: the canvas as a base64 PNG (`detail` low by default) after the teacher
prompt, and a strict JSON schema whose `element` is an enum of the contract's labels,
plus a short `reason`. The answer is still checked: OpenAI-compatible servers differ
in how strictly they honour a schema.

The cache is content-addressed: key = sha256(canvas sha256, model, rendered prompt,
schema, detail). A rerun asks only for keys it lacks, a killed run loses at most the
answers in flight, and a prompt change makes every key new. It is a journal outside
the stage's outs, so DVC removing data/label before a rerun does not empty it. Only
valid answers are cached: a failure is asked again on the next run.

The API key is read from the environment variable named by label.teacher.api_key_env,
handed to the client, and scrubbed from every error message this module records.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import json
import os
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import openai
from tqdm import tqdm

from src.records import append_jsonl, read_jsonl

SCHEMA_NAME = "element_label"
BATCH_MAX_LINES = 1000  # ~100 KB per low-detail request: far below the Batch API's 200 MB file limit
BATCH_DONE = ("completed", "failed", "expired", "cancelled")
MAX_BACKOFF_S = 60.0


@dataclass(frozen=True)
class TeacherConfig:
    base_url: str
    model: str
    api_key_env: str
    prompt: str
    detail: Literal["low", "high", "auto"]
    max_tokens: int
    temperature: float | None
    timeout_s: float
    mode: Literal["online", "batch"]
    concurrency: int
    max_attempts: int      # HTTP attempts per answer: 429, 5xx, timeouts, connection errors
    answer_attempts: int   # answers per canvas: malformed or off-enum answers are asked again
    backoff_s: float
    batch_poll_s: float
    batch_wait_s: float
    price_in: float        # USD per 1M input tokens
    price_out: float       # USD per 1M output tokens
    batch_discount: float  # price factor in batch mode (0.5: half price)

    @classmethod
    def from_params(cls, label: dict[str, Any]) -> TeacherConfig:
        t, b, pr = label["teacher"], label["batch"], label["price"]
        if t["mode"] not in ("online", "batch"):
            raise ValueError(f"label.teacher.mode={t['mode']!r}: expected online or batch")
        if t["detail"] not in ("low", "high", "auto"):
            raise ValueError(f"label.teacher.detail={t['detail']!r}: expected low, high or auto")
        return cls(base_url=t["base_url"], model=t["model"], api_key_env=t["api_key_env"], prompt=t["prompt"],
                   detail=t["detail"], max_tokens=int(t["max_tokens"]),
                   temperature=None if t["temperature"] is None else float(t["temperature"]),
                   timeout_s=float(t["timeout_s"]), mode=t["mode"], concurrency=max(1, int(label["concurrency"])),
                   max_attempts=max(1, int(label["max_attempts"])), answer_attempts=max(1, int(label["answer_attempts"])),
                   backoff_s=float(label["backoff_s"]), batch_poll_s=float(b["poll_s"]), batch_wait_s=float(b["wait_s"]),
                   price_in=float(pr["input_per_1m"]), price_out=float(pr["output_per_1m"]),
                   batch_discount=float(pr["batch_discount"]))

    def cost(self, tokens_in: int, tokens_out: int, batch: bool) -> float:
        usd = (tokens_in * self.price_in + tokens_out * self.price_out) / 1e6
        return usd * (self.batch_discount if batch else 1.0)


@dataclass(frozen=True)
class Item:
    """One distinct request: records sharing a canvas share it."""

    key: str
    canvas_sha256: str
    png: Path


class TeacherFatal(RuntimeError):
    """No request can succeed (bad key, unknown model, no quota): stop the run."""


class ItemFailed(RuntimeError):
    """This canvas got no valid answer within its attempts."""


class BadAnswer(ValueError):
    """The teacher answered, but not with one of the labels."""


class BatchPending(RuntimeError):
    """Submitted batches are still running; a rerun resumes polling them."""


# -- the request -------------------------------------------------------------------------------

def answer_schema(labels: tuple[str, ...]) -> dict[str, Any]:
    return {"type": "object",
            "properties": {"element": {"type": "string", "enum": list(labels)},
                           "reason": {"type": "string", "description": "a few words: what in the image decided it"}},
            "required": ["element", "reason"], "additionalProperties": False}


def render_prompt(template: str, labels: tuple[str, ...]) -> str:
    return template.replace("{labels}", ", ".join(labels))


def cache_key(canvas_sha256: str, cfg: TeacherConfig, labels: tuple[str, ...]) -> str:
    """What decides the answer, hashed: the canvas, the model, the prompt, the schema, the detail."""
    what = {"canvas": canvas_sha256, "model": cfg.model, "prompt": render_prompt(cfg.prompt, labels),
            "schema": answer_schema(labels), "detail": cfg.detail}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def request_body(cfg: TeacherConfig, labels: tuple[str, ...], png: bytes) -> dict[str, Any]:
    """The chat completion body, the same for an online request and a batch line."""
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    body: dict[str, Any] = {
        "model": cfg.model,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": render_prompt(cfg.prompt, labels)},
            {"type": "image_url", "image_url": {"url": url, "detail": cfg.detail}}]}],
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": SCHEMA_NAME, "strict": True, "schema": answer_schema(labels)}},
        "max_completion_tokens": cfg.max_tokens,
    }
    if cfg.temperature is not None:  # reasoning models refuse any temperature; null leaves it out
        body["temperature"] = cfg.temperature
    return body


def parse_completion(resp: dict[str, Any], labels: tuple[str, ...]) -> tuple[str, str, int, int]:
    """(element, reason, tokens in, tokens out) of a chat completion body; BadAnswer if it is not a label.

    Tokens are counted before the answer is checked: a bad answer is paid for too.
    BadAnswer carries them in `args[1:]`.
    """
    usage = resp.get("usage") or {}
    t_in, t_out = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    try:
        choice = resp["choices"][0]
        message = choice["message"]
    except (KeyError, IndexError, TypeError):
        raise BadAnswer("no choices in the response", t_in, t_out) from None
    if message.get("refusal"):
        raise BadAnswer(f"refused: {message['refusal'][:200]}", t_in, t_out)
    if choice.get("finish_reason") == "length":
        raise BadAnswer("answer cut off at max_tokens", t_in, t_out)
    content = message.get("content")
    try:
        answer = json.loads(content or "")
    except json.JSONDecodeError:
        raise BadAnswer(f"answer is not JSON: {str(content)[:120]!r}", t_in, t_out) from None
    if not isinstance(answer, dict):
        raise BadAnswer(f"answer is not an object: {str(content)[:120]!r}", t_in, t_out)
    element, reason = answer.get("element"), answer.get("reason")
    if element not in labels:
        raise BadAnswer(f"element {element!r} is not one of {list(labels)}", t_in, t_out)
    if not isinstance(reason, str):
        raise BadAnswer(f"reason is {type(reason).__name__}, not a string", t_in, t_out)
    return element, reason.strip(), t_in, t_out


# -- the cache ---------------------------------------------------------------------------------

def _repair_tail(path: Path) -> None:
    """Cut a torn last line (a SIGKILL mid-append), so the next append starts on a line of its own."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


class AnswerCache:
    """CACHE/answers.jsonl: one fsynced line per valid answer, keyed by `cache_key`; last line wins."""

    def __init__(self, root: Path) -> None:
        self.path = root / "answers.jsonl"
        _repair_tail(self.path)
        self._rows = {r["key"]: r for r in read_jsonl(self.path)}
        self._lock = threading.Lock()

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    def get(self, key: str) -> dict[str, Any] | None:
        return self._rows.get(key)

    def put(self, entry: dict[str, Any]) -> None:
        with self._lock:
            append_jsonl(self.path, entry)
            self._rows[entry["key"]] = entry


def _entry(item_key: str, canvas: str, cfg: TeacherConfig, element: str, reason: str,
           t_in: int, t_out: int, via: str) -> dict[str, Any]:
    return {"key": item_key, "canvas_sha256": canvas, "model": cfg.model, "element": element, "reason": reason,
            "tokens_in": t_in, "tokens_out": t_out, "via": via,
            "cost_usd": cfg.cost(t_in, t_out, via == "batch"),
            "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


# -- bookkeeping -------------------------------------------------------------------------------

@dataclass
class Tally:
    """What this run did and paid; thread-safe counters."""

    requests: int = 0          # HTTP requests sent to the teacher's server, retries included
    rate_limited: int = 0
    server_errors: int = 0
    timeouts: int = 0          # timeouts and dropped connections
    invalid_answers: int = 0   # malformed or off-enum answers (paid, then asked again)
    batch_lines: int = 0
    batches_submitted: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **kw: float) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def paid(self, cfg: TeacherConfig, t_in: int, t_out: int, batch: bool) -> None:
        self.add(tokens_in=t_in, tokens_out=t_out, cost_usd=cfg.cost(t_in, t_out, batch))

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 9) if isinstance(v, float) else v) for k, v in vars(self).items() if not k.startswith("_")}


class Pacer:
    """Shared by all workers: a 429's Retry-After pauses every request, not only the one refused."""

    def __init__(self) -> None:
        self._not_before = 0.0
        self._lock = threading.Lock()

    def defer(self, seconds: float) -> None:
        with self._lock:
            self._not_before = max(self._not_before, time.monotonic() + seconds)

    def wait(self) -> None:
        while (delay := self._not_before - time.monotonic()) > 0:
            time.sleep(delay)


def retry_after(headers: Any) -> float | None:
    """Seconds a response asks us to wait (Retry-After-Ms, Retry-After seconds or HTTP date), else None."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) * scale)
        except ValueError:
            try:
                return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
            except (TypeError, ValueError):
                return None
    return None


def _backoff(cfg: TeacherConfig, attempt: int) -> float:
    # exponential with jitter, so workers that failed together do not retry together
    return min(MAX_BACKOFF_S, cfg.backoff_s * 2 ** attempt) * random.uniform(0.75, 1.0)


def redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "[redacted]") if secret else text


def api_key(cfg: TeacherConfig) -> str:
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise TeacherFatal(f"label.provider=teacher needs an API key in the environment variable "
                           f"{cfg.api_key_env} (label.teacher.api_key_env); it is not set")
    return key


def make_client(cfg: TeacherConfig, key: str) -> openai.OpenAI:
    # The client's own retries are off: ours count every request, share one 429 pause
    # across workers and retry bad answers too.
    return openai.OpenAI(api_key=key, base_url=cfg.base_url, timeout=cfg.timeout_s, max_retries=0)


# -- online ------------------------------------------------------------------------------------

def _complete(client: openai.OpenAI, body: dict[str, Any], cfg: TeacherConfig, pacer: Pacer,
              tally: Tally, stop: threading.Event, secret: str) -> dict[str, Any]:
    """One chat completion, retried on 429 (after Retry-After), 5xx, timeouts and dropped connections."""
    last = "no attempt"
    for attempt in range(cfg.max_attempts):
        if stop.is_set():
            raise ItemFailed("run stopped")
        pacer.wait()
        tally.add(requests=1)
        try:
            resp = client.chat.completions.create(**body)
        except openai.APITimeoutError:
            tally.add(timeouts=1)
            last = f"timed out after {cfg.timeout_s:g} s"
            delay = _backoff(cfg, attempt)
        except openai.APIConnectionError as e:
            tally.add(timeouts=1)
            last = f"connection error: {e}"
            delay = _backoff(cfg, attempt)
        except openai.APIStatusError as e:
            code = e.status_code
            last = f"HTTP {code}: {e.message}"
            if code in (401, 403, 404) or (code == 429 and getattr(e, "code", None) == "insufficient_quota"):
                stop.set()  # before raising: the next queued item must not pay for the same refusal
                raise TeacherFatal(f"{cfg.base_url} refused the request ({last}); check the key, the model "
                                   f"{cfg.model!r} and the account") from None
            if code == 429:
                tally.add(rate_limited=1)
                wait_s = retry_after(e.response.headers)
                delay = wait_s if wait_s is not None else _backoff(cfg, attempt)
                pacer.defer(delay)
            elif code >= 500 or code in (408, 409):
                tally.add(server_errors=1)
                wait_s = retry_after(e.response.headers)
                delay = wait_s if wait_s is not None else _backoff(cfg, attempt)
            else:  # 400, 413, 422: the request itself is wrong; asking again will not help
                raise ItemFailed(redact(last, secret)) from None
        except openai.APIResponseValidationError as e:  # a 200 whose body is not a completion
            tally.add(server_errors=1)
            last = f"unreadable response: {e.message}"
            delay = _backoff(cfg, attempt)
        except json.JSONDecodeError as e:  # a 200 labelled JSON that is not (a proxy's error page)
            tally.add(server_errors=1)
            last = f"response is not JSON: {e.doc[:120]!r}"
            delay = _backoff(cfg, attempt)
        else:
            if isinstance(resp, str):  # a 200 the client could not parse as JSON comes back as text
                tally.add(server_errors=1)
                last = f"response is not JSON: {resp[:120]!r}"
                delay = _backoff(cfg, attempt)
            else:
                return resp.model_dump()
        if attempt + 1 < cfg.max_attempts:
            time.sleep(delay)
    raise ItemFailed(redact(f"{cfg.max_attempts} attempts failed; last: {last}", secret))


def _answer(client: openai.OpenAI, item: Item, labels: tuple[str, ...], cfg: TeacherConfig, pacer: Pacer,
            tally: Tally, stop: threading.Event, secret: str) -> dict[str, Any]:
    try:
        png = item.png.read_bytes()
    except OSError as e:
        raise ItemFailed(f"cannot read canvas {item.png}: {e.strerror}") from None
    body = request_body(cfg, labels, png)
    last = ""
    for _ in range(cfg.answer_attempts):
        resp = _complete(client, body, cfg, pacer, tally, stop, secret)
        try:
            element, reason, t_in, t_out = parse_completion(resp, labels)
        except BadAnswer as e:
            tally.paid(cfg, int(e.args[1]), int(e.args[2]), batch=False)
            tally.add(invalid_answers=1)
            last = str(e.args[0])
            continue
        tally.paid(cfg, t_in, t_out, batch=False)
        return _entry(item.key, item.canvas_sha256, cfg, element, reason, t_in, t_out, "online")
    raise ItemFailed(redact(f"{cfg.answer_attempts} answers were invalid; last: {last}", secret))


def label_online(client: openai.OpenAI, todo: list[Item], labels: tuple[str, ...], cfg: TeacherConfig,
                 cache: AnswerCache, tally: Tally, secret: str) -> dict[str, str]:
    """Ask for every item with at most `concurrency` requests in flight; cache each answer as it lands."""
    pacer, stop, errors = Pacer(), threading.Event(), {}
    pool = ThreadPoolExecutor(cfg.concurrency, thread_name_prefix="teacher")
    futures: dict[Future[dict[str, Any]], Item] = {
        pool.submit(_answer, client, it, labels, cfg, pacer, tally, stop, secret): it for it in todo}
    try:
        with tqdm(total=len(futures), desc="label (teacher)") as bar:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    try:
                        cache.put(f.result())  # journalled at once: a kill loses only requests in flight
                    except ItemFailed as e:
                        errors[futures[f].key] = str(e)
                    bar.update()
    except BaseException:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    return errors


# -- batch -------------------------------------------------------------------------------------

class BatchLog:
    """CACHE/batches.jsonl: uploaded files and submitted batch ids, so a restart resumes, never resubmits."""

    def __init__(self, root: Path) -> None:
        self.path = root / "batches.jsonl"
        _repair_tail(self.path)

    def rows(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path)

    def add(self, **row: Any) -> None:
        append_jsonl(self.path, {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **row})

    def state(self) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, str]]]:
        """(uploads not yet submitted, batches not yet imported), each id -> {request key: canvas sha256}.

        The canvas rides along because a batch result names only its key.
        """
        uploads: dict[str, dict[str, str]] = {}
        batches: dict[str, dict[str, str]] = {}
        for r in self.rows():
            if r["event"] == "uploaded":
                uploads[r["input_file_id"]] = r["requests"]
            elif r["event"] == "submitted":
                batches[r["batch_id"]] = uploads.pop(r["input_file_id"], r["requests"])
            elif r["event"] == "imported":
                batches.pop(r["batch_id"], None)
        return uploads, batches


def _chunks(items: list[tuple[Item, bytes]], n: int) -> Iterator[list[tuple[Item, bytes]]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _submit(client: openai.OpenAI, file_id: str, tally: Tally) -> str:
    tally.add(requests=1)
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h",
                                  metadata={"purpose": "smolvlm-elements label"})
    tally.add(batches_submitted=1)
    return batch.id


def _adopt(client: openai.OpenAI, file_id: str, tally: Tally) -> str | None:
    """The batch already created from `file_id` (a run killed between create and its log line)."""
    tally.add(requests=1)
    for b in client.batches.list(limit=100):
        if b.input_file_id == file_id:
            return b.id
    return None


def _import(client: openai.OpenAI, batch: Any, requests: dict[str, str], labels: tuple[str, ...], cfg: TeacherConfig,
            cache: AnswerCache, tally: Tally, secret: str) -> dict[str, str]:
    """Put a finished batch's valid answers into the cache; the errors of the rest, by key."""
    errors: dict[str, str] = {}
    seen: set[str] = set()
    for file_id in (batch.output_file_id, batch.error_file_id):
        if not file_id:
            continue
        tally.add(requests=1)
        text = client.files.content(file_id).text
        for line in text.splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            key = row["custom_id"]
            seen.add(key)
            resp = row.get("response") or {}
            if resp.get("status_code") != 200:
                msg = ((resp.get("body") or {}).get("error") or {}).get("message") or row.get("error")
                errors[key] = redact(f"batch {batch.id}: HTTP {resp.get('status_code')}: {msg}", secret)
                continue
            try:
                element, reason, t_in, t_out = parse_completion(resp["body"], labels)
            except BadAnswer as e:
                tally.paid(cfg, int(e.args[1]), int(e.args[2]), batch=True)
                tally.add(invalid_answers=1)
                errors[key] = redact(f"batch {batch.id}: {e.args[0]}", secret)
                continue
            tally.paid(cfg, t_in, t_out, batch=True)
            cache.put(_entry(key, requests.get(key, ""), cfg, element, reason, t_in, t_out, "batch"))
    for key in requests:
        if key not in seen:
            errors[key] = f"batch {batch.id} ended {batch.status} without a result for this request"
    return errors


def label_batch(client: openai.OpenAI, todo: list[Item], labels: tuple[str, ...], cfg: TeacherConfig,
                cache: AnswerCache, tally: Tally, cache_dir: Path, secret: str) -> dict[str, str]:
    """Submit what no batch holds yet, then poll every open batch and import what finished.

    Raises BatchPending when label.batch.wait_s passes first; the ids are logged, so
    the next run polls the same batches instead of paying for the requests again.
    """
    log = BatchLog(cache_dir)
    uploads, open_batches = log.state()
    for file_id, reqs in uploads.items():  # uploaded, then killed before the batch id was logged
        batch_id = _adopt(client, file_id, tally) or _submit(client, file_id, tally)
        log.add(event="submitted", batch_id=batch_id, input_file_id=file_id, requests=reqs)
        open_batches[batch_id] = reqs
    held = {k for keys in open_batches.values() for k in keys}
    fresh = [it for it in todo if it.key not in held]
    errors: dict[str, str] = {}
    readable = []
    for it in fresh:
        try:
            readable.append((it, it.png.read_bytes()))
        except OSError as e:
            errors[it.key] = f"cannot read canvas {it.png}: {e.strerror}"
    for chunk in _chunks(readable, BATCH_MAX_LINES):
        lines = [json.dumps({"custom_id": it.key, "method": "POST", "url": "/v1/chat/completions",
                             "body": request_body(cfg, labels, png)}) for it, png in chunk]
        tally.add(requests=1, batch_lines=len(lines))
        f = client.files.create(file=("label-batch.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch")
        reqs = {it.key: it.canvas_sha256 for it, _ in chunk}
        log.add(event="uploaded", input_file_id=f.id, requests=reqs)
        batch_id = _submit(client, f.id, tally)
        log.add(event="submitted", batch_id=batch_id, input_file_id=f.id, requests=reqs)
        open_batches[batch_id] = reqs
        print(f"label: submitted batch {batch_id} ({len(reqs)} requests)")
    deadline = time.monotonic() + cfg.batch_wait_s
    while open_batches:
        for batch_id in list(open_batches):
            tally.add(requests=1)
            try:
                batch = client.batches.retrieve(batch_id)
            except openai.NotFoundError:  # another account or server: its requests are submitted again next run
                for key in open_batches.pop(batch_id):
                    errors[key] = f"batch {batch_id} is unknown to {cfg.base_url}"
                log.add(event="imported", batch_id=batch_id, status="not_found")
                continue
            if batch.status in BATCH_DONE:
                errors.update(_import(client, batch, open_batches.pop(batch_id), labels, cfg, cache, tally, secret))
                log.add(event="imported", batch_id=batch_id, status=batch.status)
                print(f"label: batch {batch_id} {batch.status}, imported")
        if open_batches and time.monotonic() + cfg.batch_poll_s > deadline:
            raise BatchPending(f"batches {sorted(open_batches)} still running after label.batch.wait_s="
                               f"{cfg.batch_wait_s:g} s; their ids are in {log.path}: rerun to resume polling "
                               f"(nothing is submitted twice)")
        if open_batches:
            time.sleep(cfg.batch_poll_s)
    return errors


# -- entry point -------------------------------------------------------------------------------

def teach(todo: list[Item], labels: tuple[str, ...], cfg: TeacherConfig, cache: AnswerCache,
          cache_dir: Path) -> tuple[dict[str, str], Tally]:
    """Ask the teacher for every item (none of them cached); (errors by key, tally). Raises TeacherFatal."""
    tally = Tally()
    if not todo and not (cfg.mode == "batch" and any(BatchLog(cache_dir).state())):
        return {}, tally  # all cached: no key, no client, no network
    secret = api_key(cfg)
    client = make_client(cfg, secret)
    try:
        if cfg.mode == "batch":
            # Few, cheap calls (upload, create, poll): the client's own retries, which honour
            # Retry-After, are enough here; `requests` then counts calls, not their retries.
            batch_client = client.with_options(max_retries=cfg.max_attempts - 1)
            return label_batch(batch_client, todo, labels, cfg, cache, tally, cache_dir, secret), tally
        return label_online(client, todo, labels, cfg, cache, tally, secret), tally
    except openai.APIStatusError as e:  # batch endpoints: no per-item retry; say what failed, without the key
        raise TeacherFatal(redact(f"{cfg.base_url}: HTTP {e.status_code}: {e.message}", secret)) from None
    except openai.APIConnectionError as e:
        raise TeacherFatal(redact(f"{cfg.base_url}: {e}", secret)) from None
    finally:
        client.close()
