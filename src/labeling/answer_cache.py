"""The label stage's answer cache: CACHE/answers.jsonl, a journal of valid teacher answers.

The cache is content-addressed: key = sha256(canvas sha256, model, rendered prompt,
schema, detail) (src/labeling/teacher/request.py `cache_key`). A rerun asks only for keys it
lacks, a killed run loses at most the answers in flight, and a prompt change makes
every key new. It lives outside the stage's outs, so DVC removing data/label before a
rerun does not empty it. Only valid answers are cached: a failure is asked again on
the next run.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from src.data.files import append_jsonl, read_jsonl


class AnswerCache:
    """CACHE/answers.jsonl: one fsynced line per valid answer, keyed by `cache_key`; last line wins."""

    def __init__(self, root: Path) -> None:  # append_jsonl cuts a torn last line before it writes
        self.path = root / "answers.jsonl"
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
