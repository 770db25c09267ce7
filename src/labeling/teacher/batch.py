"""The Batch API teacher: upload the requests, submit, poll, import the answers; resume after a kill.

CACHE/batches.jsonl records every uploaded file and submitted batch id before the
next step, so a restart adopts or polls what it finds there and never pays twice.
Lines are the same bodies as online requests (src/labeling/teacher/request.py).

An answer cut off at the token budget is asked once more, as online mode does, with
`retry_budget` tokens: in a follow-up batch of the cut-off requests, logged with its
budget and submitted before the batch it follows is logged imported. A run killed in
between imports that batch again on restart and finds the follow-up already holding its
cut-off requests, so nothing is asked twice. Cut off again, the request fails naming the
param to change.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import openai

from src.config.settings import Label
from src.data.files import append_jsonl, read_jsonl
from src.labeling.answer_cache import AnswerCache
from src.labeling.teacher.request import (
    BadAnswer,
    BatchPending,
    CutOff,
    Item,
    Tally,
    answer_record,
    cut_off_line,
    parse_completion,
    redact,
    request_body,
    retry_budget,
)

BATCH_MAX_LINES = 1000  # ~100 KB per low-detail request: far below the Batch API's 200 MB file limit
BATCH_DONE = ("completed", "failed", "expired", "cancelled")


@dataclass
class Pending:
    """An uploaded file or an open batch: {request key: canvas sha256}, and the token budget its lines
    carry when it is the follow-up of cut-off answers (None: label.teacher.max_tokens)."""

    requests: dict[str, str]
    budget: int | None = None

    def row(self) -> dict[str, Any]:
        return {"requests": self.requests} | ({} if self.budget is None else {"budget": self.budget})


class BatchLog:
    """CACHE/batches.jsonl: uploaded files and submitted batch ids, so a restart resumes, never resubmits."""

    def __init__(self, root: Path) -> None:
        self.path = root / "batches.jsonl"

    def rows(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path)

    def add(self, **row: Any) -> None:
        append_jsonl(self.path, {"at": datetime.now(UTC).isoformat(timespec="seconds"), **row})

    def state(self) -> tuple[dict[str, Pending], dict[str, Pending]]:
        """(uploads not yet submitted, batches not yet imported), by file id and batch id.

        The canvas rides along because a batch result names only its key.
        """
        uploads: dict[str, Pending] = {}
        batches: dict[str, Pending] = {}
        for r in self.rows():
            if r["event"] == "uploaded":
                uploads[r["input_file_id"]] = Pending(r["requests"], r.get("budget"))
            elif r["event"] == "submitted":
                batches[r["batch_id"]] = uploads.pop(r["input_file_id"], None) or Pending(r["requests"], r.get("budget"))
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


def _send(client: openai.OpenAI, chunk: list[tuple[Item, bytes]], budget: int | None, labels: tuple[str, ...],
          cfg: Label, log: BatchLog, tally: Tally) -> tuple[str, Pending]:
    """Upload and submit one batch, logging each step before the next; (batch id, what it holds)."""
    lines = [json.dumps({"custom_id": it.key, "method": "POST", "url": "/v1/chat/completions",
                         "body": request_body(cfg, labels, png, budget)}) for it, png in chunk]
    tally.add(requests=1, batch_lines=len(lines))
    f = client.files.create(file=("label-batch.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch")
    pending = Pending({it.key: it.canvas_sha256 for it, _ in chunk}, budget)
    log.add(event="uploaded", input_file_id=f.id, **pending.row())
    batch_id = _submit(client, f.id, tally)
    log.add(event="submitted", batch_id=batch_id, input_file_id=f.id, **pending.row())
    return batch_id, pending


def _import(client: openai.OpenAI, batch: Any, pending: Pending, labels: tuple[str, ...], cfg: Label,
            cache: AnswerCache, tally: Tally, secret: str) -> tuple[dict[str, str], list[str]]:
    """Put a finished batch's valid answers into the cache; (the errors of the rest by key, the keys cut off
    at the token budget), a cut-off key not among the errors: it may be asked once more."""
    errors: dict[str, str] = {}
    cut: list[str] = []
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
                if isinstance(e, CutOff):
                    cut.append(key)
                else:
                    errors[key] = redact(f"batch {batch.id}: {e.args[0]}", secret)
                continue
            tally.paid(cfg, t_in, t_out, batch=True)
            cache.put(answer_record(key, pending.requests.get(key, ""), cfg, element, reason, t_in, t_out, "batch"))
    for key in pending.requests:
        if key not in seen:
            errors[key] = f"batch {batch.id} ended {batch.status} without a result for this request"
    return errors, cut


def _readable(items: list[Item], errors: dict[str, str]) -> list[tuple[Item, bytes]]:
    """(item, PNG bytes) of each item whose canvas reads; the others' errors into `errors`."""
    out = []
    for it in items:
        try:
            out.append((it, it.png.read_bytes()))
        except OSError as e:
            errors[it.key] = f"cannot read canvas {it.png}: {e.strerror}"
    return out


def label_batch(client: openai.OpenAI, todo: list[Item], labels: tuple[str, ...], cfg: Label,
                cache: AnswerCache, tally: Tally, cache_dir: Path, secret: str) -> dict[str, str]:
    """Submit what no batch holds yet, then poll every open batch, import what finished, and ask the
    cut-off answers once more in a follow-up batch.

    Raises BatchPending when label.batch.wait_s passes first; the ids are logged, so
    the next run polls the same batches instead of paying for the requests again.
    """
    log = BatchLog(cache_dir)
    uploads, open_batches = log.state()
    for file_id, pending in uploads.items():  # uploaded, then killed before the batch id was logged
        batch_id = _adopt(client, file_id, tally) or _submit(client, file_id, tally)
        log.add(event="submitted", batch_id=batch_id, input_file_id=file_id, **pending.row())
        open_batches[batch_id] = pending
    held = {k for p in open_batches.values() for k in p.requests}
    items = {it.key: it for it in todo}
    errors: dict[str, str] = {}
    for chunk in _chunks(_readable([it for it in todo if it.key not in held], errors), BATCH_MAX_LINES):
        batch_id, open_batches[batch_id] = _send(client, chunk, None, labels, cfg, log, tally)
        print(f"label: submitted batch {batch_id} ({len(chunk)} requests)")
    deadline = time.monotonic() + cfg.batch.wait_s
    while open_batches:
        for batch_id in list(open_batches):
            tally.add(requests=1)
            try:
                batch = client.batches.retrieve(batch_id)
            except openai.NotFoundError:  # another account or server: its requests are submitted again next run
                for key in open_batches.pop(batch_id).requests:
                    errors[key] = f"batch {batch_id} is unknown to {cfg.teacher.base_url}"
                log.add(event="imported", batch_id=batch_id, status="not_found")
                continue
            if batch.status not in BATCH_DONE:
                continue
            pending = open_batches.pop(batch_id)
            failed, cut = _import(client, batch, pending, labels, cfg, cache, tally, secret)
            errors.update(failed)
            if pending.budget is not None:  # cut off again, with the room the bound needs
                errors.update({k: redact(f"batch {batch_id}: {cut_off_line(cfg, labels, pending.budget)}", secret)
                               for k in cut})
            else:
                # a restart that imports this batch again finds its follow-up already holding these keys
                held_now = {k for p in open_batches.values() for k in p.requests}
                again = [items[k] for k in cut if k in items and k not in held_now]
                errors.update({k: redact(f"batch {batch_id}: answer cut off at max_tokens", secret)
                               for k in cut if k not in items and k not in held_now})  # no longer asked for
                for chunk in _chunks(_readable(again, errors), BATCH_MAX_LINES):
                    retry_id, open_batches[retry_id] = _send(client, chunk, retry_budget(cfg), labels, cfg, log, tally)
                    print(f"label: submitted batch {retry_id} ({len(chunk)} answers cut off at "
                          f"{cfg.teacher.max_tokens_field}={cfg.teacher.max_tokens}, asked again with {retry_budget(cfg)})")
            log.add(event="imported", batch_id=batch_id, status=batch.status)  # after its follow-up is logged
            print(f"label: batch {batch_id} {batch.status}, imported")
        if open_batches and time.monotonic() + cfg.batch.poll_s > deadline:
            raise BatchPending(f"batches {sorted(open_batches)} still running after label.batch.wait_s="
                               f"{cfg.batch.wait_s:g} s; their ids are in {log.path}: rerun to resume polling "
                               f"(nothing is submitted twice)")
        if open_batches:
            time.sleep(cfg.batch.poll_s)
    return errors
