"""download: fetch the source photos, as they are, into a content-addressed store.

Inputs:  the source named in params (src/data/sources.py: demo, a CSV/JSONL URL manifest, a
         local folder, a Hugging Face dataset); the embedded demo needs no network.
Outputs: OUT/images/<sha256>.<ext> (each distinct content once) and OUT/manifest.jsonl, one
         record per item in source order: id, url, name, status ("ok"|"failed"), error, error_kind,
         sha256, path, bytes, width, height, format, label, source, licence, duplicate_of, and for
         URLs the snapshot it was fetched or revalidated under, with the server's etag and last_modified;
         METRICS: counts (items, ok, failed, duplicates, failure_rate, errors by kind, formats).
Params:  download.source, download.demo.*, download.manifest.path, download.folder.*,
         download.hf.*, download.http.* (snapshot: the URL refresh policy), download.max_failure_rate,
         contract.labels
Command: python -m src.stages.download data/download metrics/download.json

Remote items are fetched over http/https only (other schemes are refused, also as a
redirect target), by a bounded thread pool, with a total timeout per attempt, retries
with exponential backoff on transient errors (timeouts, connection errors, 408/425/429/5xx)
and a byte cap. Content is judged by decoding its header, never by extension or
Content-Type. Every result is appended to OUT/journal.jsonl (fsynced) as it lands, so a
killed run resumes. The output persists between runs (dvc.yaml `persist`), and dvc.yaml lists
every source's location as a dependency, so DVC reruns download when a photo or a manifest row
is added, removed or changed, and the rerun does only that work: a local photo whose bytes hash
as before is not decoded again, and a stored URL is not fetched again while
download.http.snapshot stays the same. A new snapshot revalidates every stored URL with a
conditional GET (If-None-Match / If-Modified-Since): 304 keeps the stored file. The
manifest is written atomically at the end, then the journal and unreferenced files are
removed, so a resumed run leaves the same bytes as an uninterrupted one. The stage exits
non-zero when the failure rate exceeds download.max_failure_rate. The console names every failed
item with its cause (the first ten, then a count), and the work line counts the photos of the last
run that are gone from the source (`removed`).
"""

from __future__ import annotations

import argparse
import io
import sys
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from src.config.contract import LABELS
from src.config.params import stage_params
from src.config.settings import Http
from src.data.files import append_jsonl, prune_store, read_jsonl, sha256, write_bytes_atomic, write_json, write_jsonl
from src.data.formats import EXT  # importing it also lets Pillow read HEIC/HEIF
from src.data.http import FetchError, fetch, root_cause
from src.data.refused import name_refused
from src.data.sources import Item, SourceError, items_from_params

JOURNAL = "journal.jsonl"
MANIFEST = "manifest.jsonl"


def identify(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) by decoding the header; an HTML error page or junk is FetchError."""
    if not data:
        raise FetchError("not_image", "empty body: 0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # resize256 applies the contract's cap
            with Image.open(io.BytesIO(data)) as img:
                return img.format or "unknown", img.width, img.height
    except Image.DecompressionBombError as e:
        raise FetchError("too_many_pixels", f"too many pixels: {e}") from None
    except Exception as e:  # PIL raises several types for "not an image"
        raise FetchError("not_image", f"not an image: {len(data)} bytes starting {data[:24]!r} ({type(e).__name__})") from None


def store(out: Path, data: bytes) -> dict[str, Any]:
    """Write `data` under its sha256 (atomically, once) and return the content fields of its record."""
    fmt, w, h = identify(data)
    digest = sha256(data)
    rel = f"images/{digest}.{EXT.get(fmt, 'bin')}"
    if not (out / rel).exists():
        write_bytes_atomic(out / rel, data)
    return {"sha256": digest, "path": rel, "bytes": len(data), "width": w, "height": h, "format": fmt}


CONTENT = ("sha256", "path", "bytes", "width", "height", "format")


def _record(item: Item, **fields: Any) -> dict[str, Any]:
    base = {"id": item.id, "url": item.url, "name": item.name, "label": item.label, "source": item.source,
            "licence": item.licence, "status": "ok", "error": None, "error_kind": None, "sha256": None, "path": None,
            "bytes": None, "width": None, "height": None, "format": None, "duplicate_of": None,
            "snapshot": None, "etag": None, "last_modified": None}
    return {**base, **fields}


def stored(row: dict[str, Any] | None, out: Path) -> bool:
    """An ok record of an earlier run whose file is still in the store."""
    return bool(row) and row.get("status") == "ok" and bool(row.get("path")) and (out / row["path"]).exists()


def get_item(item: Item, out: Path, cfg: Http, earlier: dict[str, Any] | None) -> tuple[dict[str, Any], str]:
    """(record, what it cost: fetched | decoded | revalidated | unchanged). Never raises for a bad item:
    a failed item is a failed record naming the photo and the cause."""
    try:
        if item.load is not None:
            data = item.load()
            if stored(earlier, out) and earlier["sha256"] == sha256(data):
                return _record(item, **{k: earlier[k] for k in CONTENT}), "unchanged"  # same bytes: no decode
            return _record(item, **store(out, data)), "decoded"
        validators = {}
        if stored(earlier, out) and earlier.get("url") == item.url:
            validators = {k: v for k, v in (("If-None-Match", earlier.get("etag")),
                                            ("If-Modified-Since", earlier.get("last_modified"))) if v}
        got = fetch(item.url, cfg, validators)
        tags = {"snapshot": cfg.snapshot, "etag": got.etag, "last_modified": got.last_modified}
        if got.body is None:
            return _record(item, **{k: earlier[k] for k in CONTENT}, **tags), "revalidated"
        return _record(item, **store(out, got.body), **tags), "fetched"
    except FetchError as e:
        return _record(item, status="failed", error=f"{item.name}: {e}", error_kind=e.kind), "failed"
    except OSError as e:  # local sources: unreadable file
        return _record(item, status="failed", error=f"{item.name}: cannot read: {root_cause(e)}",
                       error_kind="read"), "failed"


def current(row: dict[str, Any] | None, item: Item, out: Path, snapshot: str) -> bool:
    """A stored remote item fetched (or revalidated) under this snapshot: nothing to do for it."""
    return (item.load is None and stored(row, out) and row.get("url") == item.url
            and row.get("snapshot") == snapshot)


def mark_duplicates(records: list[dict[str, Any]]) -> None:
    """The first item (in source order) with a given content is canonical; later ones point to it."""
    first: dict[str, str] = {}
    for r in records:
        if r["status"] == "ok":
            r["duplicate_of"] = first.get(r["sha256"])
            first.setdefault(r["sha256"], r["id"])


def summarize(records: list[dict[str, Any]], max_failure_rate: float) -> dict[str, Any]:
    ok = [r for r in records if r["status"] == "ok"]
    failed = len(records) - len(ok)
    return {"items": len(records), "ok": len(ok), "failed": failed,
            "duplicates": sum(r["duplicate_of"] is not None for r in ok),
            "failure_rate": round(failed / len(records), 6) if records else 1.0,
            "max_failure_rate": max_failure_rate,
            "bytes": sum(r["bytes"] for r in ok if r["duplicate_of"] is None),
            "errors": dict(sorted(Counter(r["error_kind"] for r in records if r["status"] != "ok").items())),
            "formats": dict(sorted(Counter(r["format"] for r in ok).items()))}


def run(items: list[Item], out: Path, metrics: Path, cfg: Http, max_failure_rate: float) -> dict[str, Any]:
    """Fetch or read what changed, write manifest + metrics; raise SystemExit above the failure gate."""
    out.mkdir(parents=True, exist_ok=True)
    previous = read_jsonl(out / MANIFEST)
    earlier = {r["id"]: r for r in [*previous, *read_jsonl(out / JOURNAL)]}
    # in the last finished run's output, gone from the source now: dropped from the manifest and the store
    cost: Counter[str] = Counter(removed=len({r["id"] for r in previous} - {it.id for it in items}))
    done: dict[str, dict[str, Any]] = {}
    for it in items:
        row = earlier.get(it.id)
        if current(row, it, out, cfg.snapshot):
            done[it.id] = _record(it, **{k: row[k] for k in (*CONTENT, "snapshot", "etag", "last_modified")})
    todo = [it for it in items if it.id not in done]
    # The same url listed twice is fetched once.
    by_url: dict[str, list[Item]] = {}
    for it in todo:
        by_url.setdefault(it.url if it.load is None else f"{it.id}\0{it.url}", []).append(it)
    cost["current"] = len(done)
    pool = ThreadPoolExecutor(max(1, cfg.workers))
    try:
        futures = {pool.submit(get_item, group[0], out, cfg, earlier.get(group[0].id)): group for group in by_url.values()}
        for fut in tqdm(as_completed(futures), total=len(futures), desc="download", unit="item"):
            first, how = fut.result()
            cost[how] += 1
            for it in futures[fut]:
                row = {**first, "id": it.id, "name": it.name, "label": it.label, "source": it.source,
                       "licence": it.licence}
                append_jsonl(out / JOURNAL, row)  # fsynced: survives SIGKILL
                done[it.id] = row
    finally:
        # On Ctrl-C, drop the queue instead of fetching it all first; the journal keeps what landed.
        pool.shutdown(wait=True, cancel_futures=True)
    records = [done[it.id] for it in items]
    mark_duplicates(records)
    write_jsonl(out / MANIFEST, records)
    prune_store(out, "images", {r["path"] for r in records if r["path"]}, JOURNAL)
    summary = summarize(records, max_failure_rate)
    write_json(metrics, summary)
    work = ", ".join(f"{k} {cost[k]}" for k in ("fetched", "decoded", "revalidated", "unchanged", "current", "failed",
                                                  "removed"))
    print(f"download: {summary['ok']} ok ({summary['duplicates']} duplicates), {summary['failed']} failed; "
          f"work: {work} -> {out / MANIFEST}, {metrics}")
    named = name_refused("download", "failed", [r["error"] for r in records if r["status"] != "ok"], out / MANIFEST)
    if named:
        print(named)
    if summary["failure_rate"] > max_failure_rate:
        worst = ", ".join(f"{k} {v}" for k, v in sorted(summary["errors"].items(), key=lambda kv: -kv[1]))
        raise SystemExit(f"download: failure rate {summary['failure_rate']:.1%} ({summary['failed']}/{summary['items']}) "
                         f"exceeds download.max_failure_rate {max_failure_rate:.1%}; errors: {worst}; "
                         f"per-item causes in {out / MANIFEST}")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("metrics", type=Path)
    args = ap.parse_args()
    p = stage_params("download")
    d = p["download"]
    try:
        items = items_from_params(d, LABELS.validate_python(p["contract"]["labels"]))
    except SourceError as e:
        print(f"params.yaml: {e}" if str(e).startswith("download.") else str(e), file=sys.stderr)
        raise SystemExit(2) from None
    run(items, args.out, args.metrics, Http.model_validate(d["http"]), d["max_failure_rate"])


if __name__ == "__main__":
    main()
