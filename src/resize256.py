"""resize256: draw every downloaded photo on the contract's canvas, losslessly.

Inputs:  DOWNLOAD/manifest.jsonl and the images it names.
Outputs: OUT/canvases/<canvas sha256>.png and OUT/records.jsonl, one record per input,
         ok (canvas, canvas_sha256) or rejected (reason); inputs = written + rejected.
Params:  contract.canvas.*, resize256.workers
Command: python -m src.resize256 data/download data/resize256
"""

from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from tqdm import tqdm

from src.canvas import BadImage, canvas_png, decode, to_canvas
from src.contract import CanvasSpec
from src.params import stage_params
from src.records import read_jsonl, sha256, write_bytes_atomic, write_jsonl


def render(data: bytes, spec: CanvasSpec) -> bytes:
    """Photo bytes -> canvas PNG bytes (raises BadImage)."""
    return canvas_png(to_canvas(decode(data, spec), spec))


def resize_one(task: tuple[dict[str, Any], Path, Path, CanvasSpec]) -> dict[str, Any]:
    row, src_dir, out, spec = task
    base = {k: row.get(k) for k in ("id", "url", "sha256", "label")}
    try:
        png = render((src_dir / row["path"]).read_bytes(), spec)
    except (BadImage, OSError) as e:
        return {**base, "status": "rejected", "reason": str(e), "canvas": None, "canvas_sha256": None}
    digest = sha256(png)
    rel = f"canvases/{digest}.png"
    if not (out / rel).exists():
        write_bytes_atomic(out / rel, png)
    return {**base, "status": "ok", "reason": None, "canvas": rel, "canvas_sha256": digest}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("download", type=Path)
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    p = stage_params("resize256")
    spec = CanvasSpec(**p["contract"]["canvas"])
    rows = [r for r in read_jsonl(args.download / "manifest.jsonl") if r["status"] == "ok"]
    tasks = [(r, args.download, args.out, spec) for r in rows]
    with ProcessPoolExecutor(p["resize256"]["workers"] or None) as pool:
        records = list(tqdm(pool.map(resize_one, tasks, chunksize=8), total=len(tasks), desc="resize256"))
    write_jsonl(args.out / "records.jsonl", records)
    rejected = sum(r["status"] != "ok" for r in records)
    print(f"resize256: {len(records) - rejected} canvases, {rejected} rejected -> {args.out}/records.jsonl")


if __name__ == "__main__":
    main()
