"""The Batch API teacher: upload the requests, submit, poll, import the answers; resume after a kill.

CACHE/batches.jsonl records every uploaded file and submitted batch id before the
next step, so a restart adopts or polls what it finds there and never pays twice.
Lines are the same bodies as online requests (src/teacher/request.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import openai

from src.label_cache import AnswerCache
from src.records import append_jsonl, read_jsonl
from src.teacher.request import (
    BadAnswer,
    BatchPending,
    Item,
    Tally,
    TeacherConfig,
    answer_record,
    parse_completion,
    redact,
    request_body,
)

BATCH_MAX_LINES = 1000  # ~100 KB per low-detail request: far below the Batch API's 200 MB file limit
BATCH_DONE = ("completed", "failed", "expired", "cancelled")


class BatchLog:
    """CACHE/batches.jsonl: uploaded files and submitted batch ids, so a restart resumes, never resubmits."""

    def __init__(self, root: Path) -> None:
        self.path = root / "batches.jsonl"

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
            cache.put(answer_record(key, requests.get(key, ""), cfg, element, reason, t_in, t_out, "batch"))
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
