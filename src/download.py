"""download: fetch the source photos, as they are, into a content-addressed store.

Inputs:  the source named in params (the embedded demo needs nothing).
Outputs: OUT/images/<sha256>.<ext> and OUT/manifest.jsonl, one record per item:
         id, url, status, error, sha256, path, width, height, format, label, source, licence.
Params:  download.source, download.demo.n, download.demo.seed, download.max_failure_rate,
         contract.labels
Command: python -m src.download data/download metrics/download.json
"""

from __future__ import annotations

import argparse
import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from src import demo
from src.contract import labels_of
from src.params import stage_params
from src.records import sha256, write_bytes_atomic, write_json, write_jsonl

log = logging.getLogger("download")
EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}


def store(out: Path, item_id: str, url: str, data: bytes, extra: dict[str, Any]) -> dict[str, Any]:
    """Write `data` under its sha256 and return its manifest record."""
    digest = sha256(data)
    with Image.open(io.BytesIO(data)) as img:
        fmt, (w, h) = img.format or "unknown", img.size
    rel = f"images/{digest}.{EXT.get(fmt, 'bin')}"
    if not (out / rel).exists():
        write_bytes_atomic(out / rel, data)
    return {"id": item_id, "url": url, "status": "ok", "error": None, "sha256": digest, "path": rel,
            "width": w, "height": h, "format": fmt, **extra}


def demo_items(n: int, seed: int, labels: tuple[str, ...]) -> Iterator[tuple[str, str, bytes, dict[str, Any]]]:
    for i in range(n):
        p = demo.photo(i, labels, seed)
        yield p.id, f"demo:{p.id}", p.data, {"label": p.label, "source": "demo", "licence": "CC0-1.0 (generated)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("metrics", type=Path)
    args = ap.parse_args()
    p = stage_params("download")
    d = p["download"]
    if d["source"] != "demo":
        raise SystemExit(f"download.source={d['source']!r}: unknown source (known: demo)")
    items = demo_items(d["demo"]["n"], d["demo"]["seed"], labels_of(p["contract"]))
    rows = [store(args.out, i, url, data, extra) for i, url, data, extra in tqdm(items, total=d["demo"]["n"], desc="download")]
    write_jsonl(args.out / "manifest.jsonl", rows)
    failed = sum(r["status"] != "ok" for r in rows)
    write_json(args.metrics, {"items": len(rows), "ok": len(rows) - failed, "failed": failed})
    print(f"download: {len(rows) - failed} ok, {failed} failed -> {args.out}/manifest.jsonl")


if __name__ == "__main__":
    main()
