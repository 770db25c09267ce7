"""The online teacher: a pool of at most label.concurrency requests in flight, each answer cached as it lands.

Retried: 429 (after Retry-After, which pauses every worker), 5xx, 408/409, timeouts,
dropped connections and unreadable 200s, up to label.max_attempts per answer, with
exponential backoff and jitter; malformed or off-enum answers are asked again up to
label.answer_attempts. An answer cut off at the token budget is asked once more with
`retry_budget` tokens (not one of those attempts), then fails naming the param to
change. Not retried: any other 4xx (that canvas fails), and a refused field or an
ignored token limit (src/labeling/teacher/request.py), which stops the run in one line,
because every request would meet the same refusal.
"""

from __future__ import annotations

import email.utils
import json
import random
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import openai
from tqdm import tqdm

from src.config.settings import Label
from src.labeling.answer_cache import AnswerCache
from src.labeling.teacher.request import (
    BadAnswer,
    CutOff,
    Item,
    ItemFailed,
    Tally,
    TeacherFatal,
    answer_record,
    cut_off_line,
    ignored_limit_line,
    parse_completion,
    redact,
    refusal_line,
    refused_field,
    request_body,
    retry_budget,
)

MAX_BACKOFF_S = 60.0


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


def _backoff(cfg: Label, attempt: int) -> float:
    # exponential with jitter, so workers that failed together do not retry together
    return min(MAX_BACKOFF_S, cfg.backoff_s * 2 ** attempt) * random.uniform(0.75, 1.0)


def _fatal(stop: threading.Event, line: str, secret: str) -> TeacherFatal:
    stop.set()  # before raising: the next queued item must not pay for the same refusal
    return TeacherFatal(redact(line, secret))


def _complete(client: openai.OpenAI, body: dict[str, Any], cfg: Label, pacer: Pacer,
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
            last = f"timed out after {cfg.teacher.timeout_s:g} s"
            delay = _backoff(cfg, attempt)
        except openai.APIConnectionError as e:
            tally.add(timeouts=1)
            last = f"connection error: {e}"
            delay = _backoff(cfg, attempt)
        except openai.APIStatusError as e:
            code = e.status_code
            last = f"HTTP {code}: {e.message}"
            if code in (401, 403, 404) or (code == 429 and getattr(e, "code", None) == "insufficient_quota"):
                raise _fatal(stop, f"{cfg.teacher.base_url} refused the request ({last}); check the key, the model "
                                   f"{cfg.teacher.model!r} and the account", secret) from None
            refused = refused_field(code, e.body, e.message)
            if refused:  # checked before the 5xx retry: some servers send a bad request as a 500
                raise _fatal(stop, refusal_line(cfg, code, *refused), secret) from None
            if code == 429:
                tally.add(rate_limited=1)
                wait_s = retry_after(e.response.headers)
                delay = wait_s if wait_s is not None else _backoff(cfg, attempt)
                pacer.defer(delay)
            elif code >= 500 or code in (408, 409):
                tally.add(server_errors=1)
                wait_s = retry_after(e.response.headers)
                delay = wait_s if wait_s is not None else _backoff(cfg, attempt)
            else:  # 400, 413, 422 about this canvas: asking again will not help
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


def _answer(client: openai.OpenAI, item: Item, labels: tuple[str, ...], cfg: Label, pacer: Pacer,
            tally: Tally, stop: threading.Event, secret: str) -> dict[str, Any]:
    try:
        png = item.png.read_bytes()
    except OSError as e:
        raise ItemFailed(f"cannot read canvas {item.png}: {e.strerror}") from None
    budget, asked, last = cfg.teacher.max_tokens, 0, ""
    while asked < cfg.answer_attempts:
        resp = _complete(client, request_body(cfg, labels, png, budget), cfg, pacer, tally, stop, secret)
        try:
            element, reason, t_in, t_out = parse_completion(resp, labels)
        except BadAnswer as e:
            t_in, t_out = int(e.args[1]), int(e.args[2])
            tally.paid(cfg, t_in, t_out, batch=False)
            if t_out > budget:  # the server read another field: every answer would run on
                raise _fatal(stop, ignored_limit_line(cfg, t_out, budget), secret) from None
            tally.add(invalid_answers=1)
            if isinstance(e, CutOff):
                if budget != cfg.teacher.max_tokens:  # cut off with the room the bound needs: more tries will not close it
                    raise ItemFailed(redact(cut_off_line(cfg, labels, budget), secret)) from None
                budget = retry_budget(cfg)  # kept for this canvas's later answers
                continue
            asked += 1
            last = str(e.args[0])
            continue
        tally.paid(cfg, t_in, t_out, batch=False)
        if t_out > budget:
            raise _fatal(stop, ignored_limit_line(cfg, t_out, budget), secret)
        return answer_record(item.key, item.canvas_sha256, cfg, element, reason, t_in, t_out, "online")
    raise ItemFailed(redact(f"{cfg.answer_attempts} answers were invalid; last: {last}", secret))


def label_online(client: openai.OpenAI, todo: list[Item], labels: tuple[str, ...], cfg: Label,
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
