"""label: give every canvas one element of the contract's label set.

Inputs:  RESIZE256/records.jsonl (and its canvases), OVERRIDES (a tracked CSV of human labels).
Outputs: OUT/labels.jsonl, one record per canvas: id, name, canvas, canvas_sha256, element,
         status (ok|failed), error, provider (manifest|teacher|override), reason;
         OUT/audit.html, the canvases grouped by element with their reasons, for review;
         METRICS: counts, label distribution, requests, cache hits, tokens, estimated cost.
         Provider `teacher` also appends to CACHE (src/label_cache.py), which outlives OUT.
Params:  label.provider, label.max_failure_rate, label.concurrency, label.max_attempts,
         label.answer_attempts, label.backoff_s, label.teacher.*, label.batch.*, label.price.*,
         contract.labels
Command: python -m src.stages.label data/resize256 data/label metrics/label.json \
             --cache .cache/label --overrides data/label_overrides.csv

Provider `manifest` (the default: no key, no network) takes the label the source
supplied and checks it against the contract's labels. Provider `teacher` asks a VLM
over an OpenAI-compatible API (label.teacher.base_url, .model; the key only from the
environment variable named by label.teacher.api_key_env), online or via the Batch API
(src/teacher/). label.teacher.response_format and .max_tokens_field fit the request to
the server (OpenAI, vLLM, llama.cpp: README "Teacher servers"); a server that refuses
one of them stops the stage with one line naming the field. In the bounded forms
(json_object, json_schema_bounded) the schema bounds the reason to fit
label.teacher.max_tokens (src/teacher/request.py).

Overrides win over either provider. Each CSV row is `key,element,note`, key being a
canvas sha256 or a source id; lines starting with # are comments. An overridden canvas
is not sent to the teacher. More than label.max_failure_rate failed canvases fail the
stage, after every output is written so the failures can be reviewed.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from src.audit import audit_html
from src.contract import labels_of
from src.label_cache import AnswerCache
from src.params import stage_params
from src.records import read_jsonl, write_json, write_jsonl, write_text_atomic
from src.report import name_refused
from src.teacher.client import teach
from src.teacher.request import (
    BOUNDED_FORMS,
    BatchPending,
    Item,
    Tally,
    TeacherConfig,
    TeacherFatal,
    cache_key,
    reason_bound,
)

PROVIDERS = ("manifest", "teacher")
Override = tuple[str, str]  # (element, note)


def read_overrides(path: Path | None, labels: tuple[str, ...]) -> dict[str, Override]:
    """key (canvas sha256 or source id) -> (element, note); a missing file is no overrides."""
    if path is None or not path.exists():
        return {}
    out: dict[str, Override] = {}
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    for n, row in enumerate(csv.DictReader(lines), start=2):
        key, element = (row.get("key") or "").strip(), (row.get("element") or "").strip()
        if not key or element not in labels:
            raise SystemExit(f"{path}: row {n} {row}: needs a key and an element of {list(labels)}")
        if key in out:
            raise SystemExit(f"{path}: row {n}: {key!r} is overridden twice")
        out[key] = (element, (row.get("note") or "").strip())
    return out


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


def from_teacher(rows: list[dict[str, Any]], resize256: Path, labels: tuple[str, ...], cfg: TeacherConfig,
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
    stats = {"model": cfg.model, "mode": cfg.mode, "unique_canvases": len(wanted), "cache_hits": hits,
             "asked": len(todo), **tally.as_dict(),
             "cost_labels_usd": round(sum((cache.get(k) or {}).get("cost_usd", 0.0) for k in used), 9)}
    return out, stats


def apply_overrides(rows: list[dict[str, Any]], overrides: dict[str, Override]) -> tuple[list[dict[str, Any]], int, list[str]]:
    """Rows with the human label where one is given; (rows, how many changed, override keys that matched nothing)."""
    used: set[str] = set()
    out = []
    for r in rows:
        key = r["canvas_sha256"] if r["canvas_sha256"] in overrides else r["id"] if r["id"] in overrides else None
        if key is None:
            out.append(r)
            continue
        used.add(key)
        element, note = overrides[key]
        was = f"; {r['provider']} said {r['element']}" + (f" ({r['reason']})" if r["reason"] else "") if r["element"] else ""
        out.append({**r, "element": element, "status": "ok", "error": None, "provider": "override",
                    "reason": f"override: {note or 'human review'}{was}"})
    return out, len([r for r in out if r["provider"] == "override"]), sorted(set(overrides) - used)


def label_stage(resize256: Path, out: Path, metrics: Path, cache_dir: Path, overrides_path: Path | None,
                p: dict[str, Any]) -> dict[str, Any]:
    """The whole stage on plain params; returns the metrics. SystemExit on a bad config or the failure gate."""
    labels = labels_of(p["contract"])
    lp = p["label"]
    if lp["provider"] not in PROVIDERS:
        raise SystemExit(f"label.provider={lp['provider']!r}: unknown provider (known: {', '.join(PROVIDERS)})")
    overrides = read_overrides(overrides_path, labels)
    rows = [r for r in read_jsonl(resize256 / "records.jsonl") if r["status"] == "ok"]
    if lp["provider"] == "manifest":
        labelled = [from_manifest(r, labels) for r in rows]
        stats = {"model": None, "mode": None, "unique_canvases": 0, "cache_hits": 0, "asked": 0, **Tally().as_dict(),
                 "cost_labels_usd": 0.0}
    else:
        try:
            cfg = TeacherConfig.from_params(lp)
            if cfg.response_format in BOUNDED_FORMS:
                reason_bound(cfg, labels)  # a budget with no room for the reason: a config error, before any request
        except ValueError as e:
            raise SystemExit(f"label: {e}") from None
        try:
            labelled, stats = from_teacher(rows, resize256, labels, cfg, cache_dir, set(overrides))
        except (TeacherFatal, BatchPending) as e:
            raise SystemExit(f"label: {e}") from None
    labelled, applied, unused = apply_overrides(labelled, overrides)
    write_jsonl(out / "labels.jsonl", labelled)
    write_text_atomic(out / "audit.html", audit_html(labelled, resize256, labels, f"label audit: {len(labelled)} canvases"))
    ok = [r for r in labelled if r["status"] == "ok"]
    failed = [r for r in labelled if r["status"] != "ok"]
    rate = len(failed) / len(labelled) if labelled else 0.0
    m = {"canvases": len(labelled), "labelled": len(ok), "failed": len(failed), "failure_rate": round(rate, 6),
         "distribution": dict(sorted(Counter(r["element"] for r in ok).items())), "provider": lp["provider"],
         "overrides_applied": applied, "overrides_unused": len(unused), **stats}
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
    ap.add_argument("--overrides", type=Path, default=None, help="CSV key,element,note; wins over the provider")
    args = ap.parse_args()
    m = label_stage(args.resize256, args.out, args.metrics, args.cache, args.overrides, stage_params("label"))
    print(f"label: {m['labelled']} labelled, {m['failed']} failed ({m['provider']}; {m['requests']} requests, "
          f"{m['cache_hits']} cache hits, ${m['cost_usd']:.4f}) -> {args.out}/labels.jsonl, "
          f"{args.out}/audit.html, {args.metrics}")


if __name__ == "__main__":
    main()
