"""label: give every canvas one element of the contract's label set.

Inputs:  RESIZE256/records.jsonl (and its canvases), OVERRIDES (a tracked CSV of human labels),
         BASE (the base model: its frozen vision tower gives the review queue's features).
Outputs: OUT/labels.jsonl, one record per canvas: id, name, canvas, canvas_sha256, element,
         status (ok|failed), error, provider (manifest|teacher|override), reason;
         OUT/queue.csv, every labelled canvas ranked most-suspect first (src/labeling/review_queue.py);
         OUT/review.csv, the suspects as overrides rows (guess filled in, `approve` empty) to copy over;
         OUT/audit.html, the canvases in queue order with reasons and guesses, filterable, for review;
         METRICS: counts, label distribution, requests, cache hits, tokens, estimated cost, overrides
         applied and pending, the queue's suspects by pair (`label->guess`).
         Provider `teacher` also appends to CACHE (src/labeling/answer_cache.py), which outlives OUT, and so do
         the queue's features (CACHE/features/).
Params:  label.provider, label.max_failure_rate, label.concurrency, label.max_attempts,
         label.answer_attempts, label.backoff_s, label.teacher.*, label.batch.*, label.price.*,
         label.queue.*, contract.labels
Command: python -m src.stages.label data/resize256 data/label metrics/label.json \
             --cache .cache/label --overrides data/label_overrides.csv --base models/base

Provider `manifest` (the default: no key, no network) takes the label the source
supplied and checks it against the contract's labels. Provider `teacher` asks a VLM
over an OpenAI-compatible API (label.teacher.base_url, .model; the key only from the
environment variable named by label.teacher.api_key_env), online or via the Batch API
(src/labeling/teacher/). label.teacher.response_format and .max_tokens_field fit the request to
the server (OpenAI, vLLM, llama.cpp: docs/labels.md "Teacher servers"); a server that refuses
one of them stops the stage with one line naming the field. In the bounded forms
(json_object, json_schema_bounded) the schema bounds the reason to fit
label.teacher.max_tokens (src/labeling/teacher/request.py).

Overrides win over either provider. Each CSV row is `name,element,note[,approve]` (name: the photo as
the user knows it, or a canvas sha256 or a source id) or the older `key,element,note` (sha256 or id);
with an `approve` column only approved rows apply; lines starting with # are comments. An overridden
canvas is not sent to the teacher. The review queue runs on the final labels, on CPU, with no teacher call. More than label.max_failure_rate failed canvases fail the
stage, after every output is written so the failures can be reviewed.
"""

from __future__ import annotations

from src.model import torch_pin  # noqa: F401  (first: the queue's features run torch, pinned as finetune's)

# isort: split

import argparse
import csv
import io
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from src.config.contract import LABELS
from src.config.params import stage_params
from src.config.settings import Label
from src.data.files import read_jsonl, write_json, write_jsonl, write_text_atomic
from src.data.refused import name_refused
from src.labeling import review_queue
from src.labeling.answer_cache import AnswerCache
from src.labeling.audit_page import audit_html
from src.labeling.teacher.client import teach
from src.labeling.teacher.request import (
    BOUNDED_FORMS,
    BatchPending,
    Item,
    Tally,
    TeacherFatal,
    cache_key,
    reason_bound,
)

PROVIDERS = ("manifest", "teacher")
APPROVED = ("y", "yes", "x", "1", "true", "ok")  # an `approve` cell that applies its row (case-insensitive)


@dataclass(frozen=True)
class Override:
    """One approved row of the overrides file; `key` is a canvas sha256, a source id or (by_name) a photo's name."""

    key: str
    element: str
    note: str
    row: int
    by_name: bool


def read_overrides(path: Path | None, labels: tuple[str, ...]) -> tuple[list[Override], int]:
    """(approved overrides, rows still waiting for approval); a missing file is no overrides.

    Columns: `key` (canvas sha256 or source id) or `name` (the photo as the user knows it: its path under
    the folder, its URL, its demo or dataset id; also a sha256 or an id), `element`, optional `note`, and
    optional `approve`: when the column is there, only rows marked y/yes/x/1/true/ok apply (the queue's
    review.csv arrives that way); without it every row applies. Lines starting with # are comments.
    """
    if path is None or not path.exists():
        return [], 0
    out: list[Override] = []
    pending, seen = 0, set()
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    reader = csv.DictReader(lines)
    column = "name" if "name" in (reader.fieldnames or ()) else "key"
    for n, row in enumerate(reader, start=2):
        key, element = (row.get(column) or "").strip(), (row.get("element") or "").strip()
        if "approve" in row and (row["approve"] or "").strip().lower() not in APPROVED:
            pending += 1
            continue
        if not key or element not in labels:
            raise SystemExit(f"{path}: row {n} {row}: needs a {column} and an element of {list(labels)}")
        if key in seen:
            raise SystemExit(f"{path}: row {n}: {key!r} is overridden twice")
        seen.add(key)
        out.append(Override(key, element, (row.get("note") or "").strip(), n, column == "name"))
    return out, pending


def match_overrides(rows: list[dict[str, Any]], overrides: list[Override],
                    path: Path | None) -> tuple[dict[str, Override], list[str]]:
    """source id -> the override for that record (by canvas sha256, id or name); the `key`s that matched nothing.

    A name that matches no photo stops the stage (a typo would otherwise leave the wrong label in training);
    an unmatched sha256 or id is reported only (the photo may have left the source since the review).
    """
    by: dict[str, Override] = {o.key: o for o in overrides}
    matched: dict[str, Override] = {}
    used: set[str] = set()
    for r in rows:
        o = next((by[k] for k in (r["canvas_sha256"], r["id"], r.get("name")) if k in by), None)
        if o is not None:
            matched[r["id"]] = o
            used.add(o.key)
    for o in overrides:
        if o.by_name and o.key not in used:
            raise SystemExit(f"{path}: row {o.row}: name {o.key!r} matches no photo (names are as "
                             "data/label/queue.csv lists them: a folder photo's path, a URL, a demo id)")
    return matched, sorted(o.key for o in overrides if o.key not in used)


def _base(row: dict[str, Any], provider: str) -> dict[str, Any]:
    return {"id": row["id"], "name": row.get("name") or row["id"], "canvas": row["canvas"],
            "canvas_sha256": row["canvas_sha256"], "provider": provider}


def from_manifest(row: dict[str, Any], labels: tuple[str, ...]) -> dict[str, Any]:
    base = {**_base(row, "manifest"), "reason": None}
    label = row.get("label")
    if label not in labels:
        return {**base, "status": "failed", "element": None,
                "error": f"source label {label!r} is not one of {list(labels)}"}
    return {**base, "status": "ok", "element": label, "error": None}


def from_teacher(rows: list[dict[str, Any]], resize256: Path, labels: tuple[str, ...], cfg: Label,
                 cache_dir: Path, skip: set[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Label rows from the cache, asking the teacher once per distinct uncached canvas (not those in `skip`)."""
    cache = AnswerCache(cache_dir)
    keys = {r["canvas_sha256"]: cache_key(r["canvas_sha256"], cfg, labels) for r in rows}
    wanted = {r["canvas_sha256"]: r for r in rows if r["id"] not in skip and r["canvas_sha256"] not in skip}
    todo = [Item(keys[sha], sha, resize256 / r["canvas"]) for sha, r in sorted(wanted.items()) if keys[sha] not in cache]
    hits = len(wanted) - len(todo)
    errors, tally = teach(todo, labels, cfg, cache, cache_dir)
    out = []
    for r in rows:
        hit = cache.get(keys[r["canvas_sha256"]])
        if hit:
            out.append({**_base(r, "teacher"), "status": "ok", "element": hit["element"], "error": None,
                        "reason": hit["reason"]})
        else:
            error = errors.get(keys[r["canvas_sha256"]], "not asked (overridden)")
            out.append({**_base(r, "teacher"), "status": "failed", "element": None, "error": error, "reason": None})
    used = {keys[r["canvas_sha256"]] for r in rows}
    stats = {"model": cfg.teacher.model, "mode": cfg.teacher.mode, "unique_canvases": len(wanted), "cache_hits": hits,
             "asked": len(todo), **tally.as_dict(),
             "cost_labels_usd": round(sum((cache.get(k) or {}).get("cost_usd", 0.0) for k in used), 9)}
    return out, stats


def apply_overrides(rows: list[dict[str, Any]], matched: dict[str, Override]) -> tuple[list[dict[str, Any]], int]:
    """Rows with the human label where one is given; (rows, how many were overridden)."""
    out = []
    for r in rows:
        o = matched.get(r["id"])
        if o is None:
            out.append(r)
            continue
        was = f"; {r['provider']} said {r['element']}" + (f" ({r['reason']})" if r["reason"] else "") if r["element"] else ""
        out.append({**r, "element": o.element, "status": "ok", "error": None, "provider": "override",
                    "reason": f"override: {o.note or 'human review'}{was}"})
    return out, len(matched)


def csv_text(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def rank_for_review(labelled: list[dict[str, Any]], labels: tuple[str, ...], resize256: Path, base: Path,
                    cache_dir: Path, q: review_queue.QueueParams) -> tuple[list[dict[str, Any]] | None, dict[str, Any]]:
    """The labelled canvases ranked most-suspect first (src/labeling/review_queue.py) and the queue's metrics.

    Too few photos to hold any out (one class, a class of one photo) is no queue, said on the console and in
    the metrics: the queue advises, so the labels still stand (split judges whether they are enough)."""
    ok = [r for r in labelled if r["status"] == "ok"]
    why = review_queue.cannot_hold_out([r["element"] for r in ok], labels)
    if why:  # before the encoder pass: it would be spent for nothing
        print(f"label: no review queue: {why}", file=sys.stderr)
        return None, {"photos": len(ok), "skipped": why}
    x = review_queue.features(base, [resize256 / r["canvas"] for r in ok], [r["canvas_sha256"] for r in ok],
                             cache_dir, q.batch_size)
    return review_queue.rank(ok, x, labels, q)


def run(resize256: Path, out: Path, metrics: Path, cache_dir: Path, overrides_path: Path | None,
        p: dict[str, Any], base: Path | None = None) -> dict[str, Any]:
    """The whole stage on plain params; returns the metrics. SystemExit on a bad config or the failure gate.

    Without `base` (a unit test's labels alone) there is no review queue: the audit page lists by class.
    """
    labels = LABELS.validate_python(p["contract"]["labels"])
    lp = p["label"]
    if lp["provider"] not in PROVIDERS:
        raise SystemExit(f"label.provider={lp['provider']!r}: unknown provider (known: {', '.join(PROVIDERS)})")
    overrides, pending = read_overrides(overrides_path, labels)
    rows = [r for r in read_jsonl(resize256 / "records.jsonl") if r["status"] == "ok"]
    matched, unused = match_overrides(rows, overrides, overrides_path)
    if lp["provider"] == "manifest":
        labelled = [from_manifest(r, labels) for r in rows]
        stats = {"model": None, "mode": None, "unique_canvases": 0, "cache_hits": 0, "asked": 0, **Tally().as_dict(),
                 "cost_labels_usd": 0.0}
    else:
        try:
            cfg = Label.model_validate(lp)
            if cfg.teacher.response_format in BOUNDED_FORMS:
                reason_bound(cfg, labels)  # a budget with no room for the reason: a config error, before any request
        except ValueError as e:
            raise SystemExit(f"label: {e}") from None
        try:
            labelled, stats = from_teacher(rows, resize256, labels, cfg, cache_dir, set(matched))
        except (TeacherFatal, BatchPending) as e:
            raise SystemExit(f"label: {e}") from None
    labelled, applied = apply_overrides(labelled, matched)
    write_jsonl(out / "labels.jsonl", labelled)
    queue, qm = None, None
    if base is not None:
        queue, qm = rank_for_review(labelled, labels, resize256, base, cache_dir, review_queue.QueueParams(**lp["queue"]))
    if queue is not None:
        write_text_atomic(out / "queue.csv", csv_text(queue, review_queue.QUEUE_COLUMNS))
        write_text_atomic(out / "review.csv", csv_text(review_queue.review_rows(queue), review_queue.REVIEW_COLUMNS))
    write_text_atomic(out / "audit.html", audit_html(labelled, resize256, labels, queue,
                                                     f"label audit: {len(labelled)} canvases"))
    ok = [r for r in labelled if r["status"] == "ok"]
    failed = [r for r in labelled if r["status"] != "ok"]
    rate = len(failed) / len(labelled) if labelled else 0.0
    m = {"canvases": len(labelled), "labelled": len(ok), "failed": len(failed), "failure_rate": round(rate, 6),
         "distribution": dict(sorted(Counter(r["element"] for r in ok).items())), "provider": lp["provider"],
         "overrides_applied": applied, "overrides_unused": len(unused), "overrides_pending": pending, "queue": qm,
         **stats}
    write_json(metrics, m)
    if unused:
        print(f"label: {len(unused)} overrides match no canvas: {', '.join(unused[:5])}", file=sys.stderr)
    named = name_refused("label", "failed", [f"{r['name']}: {r['error']}" for r in failed], out / "labels.jsonl")
    if named:
        print(named)
    if rate > lp["max_failure_rate"]:
        first = "; ".join(f"{r['name']}: {r['error']}" for r in failed[:5])
        raise SystemExit(f"label: {len(failed)}/{len(labelled)} canvases failed ({rate:.1%} > label.max_failure_rate "
                         f"{lp['max_failure_rate']:.1%}); see {out}/labels.jsonl and {out}/audit.html. First: {first}")
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("resize256", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("metrics", type=Path)
    ap.add_argument("--cache", type=Path, required=True, help="label cache; outlives the stage's outs")
    ap.add_argument("--overrides", type=Path, default=None, help="CSV key|name,element,note[,approve]; wins over the provider")
    ap.add_argument("--base", type=Path, default=None,
                    help="the base model, whose frozen vision tower ranks the review queue (dvc.yaml passes it; "
                         "without it the labels alone)")
    args = ap.parse_args()
    m = run(args.resize256, args.out, args.metrics, args.cache, args.overrides, stage_params("label"), args.base)
    print(f"label: {m['labelled']} labelled, {m['failed']} failed ({m['provider']}; {m['requests']} requests, "
          f"{m['cache_hits']} cache hits, ${m['cost_usd']:.4f}); "
          + (f"review queue: {m['queue']['n_suspects']} suspects in {args.out}/review.csv; "
             if m["queue"] and "skipped" not in m["queue"] else "")
          + f"-> {args.out}/labels.jsonl, audit.html, {args.metrics}")


if __name__ == "__main__":
    main()
