"""resize256: draw every downloaded photo on the contract's canvas, losslessly.

Inputs:  DOWNLOAD/manifest.jsonl (rows with status "ok") and the images it names.
Outputs: OUT/canvases/<canvas sha256>.png, OUT/records.jsonl (one record per input, in
         manifest order: id, name, url, sha256, label, status "ok"|"rejected", cause, reason,
         canvas, canvas_sha256) and OUT/summary.json (inputs = written + rejected, rejections
         by cause).
Params:  contract.canvas.*, resize256.workers (processes; 0 = one per core)
Command: python -m src.stages.resize256 data/download data/resize256

The canvas is `src.data.canvas`: `decode` then `to_canvas`, PNG-encoded by `canvas_png`, so
every byte is a function of the input bytes and the contract. A bad file (not an image,
truncated, too many pixels, unsupported mode, missing, or a duplicate of an earlier
input) becomes a rejected record with a fixed `cause` (one of CAUSES) and a `reason`
that says what exactly; it never stops the stage. `name` is the photo as the user
knows it (download's name: a relative path, a URL), carried on for every later message; the
console names every rejected photo with its reason (the first ten, then a count).
Work runs in a process pool; each result is appended to OUT/journal.jsonl, so a killed
run, rerun, renders only what the journal lacks. The output persists between runs
(dvc.yaml `persist`): under the same canvas contract (summary.json `spec`), a photo
rendered by the last run is not rendered again, so adding photos costs only them. The
journal and any file no
record names are removed at the end: a resumed run leaves the same bytes as an
uninterrupted one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from tqdm import tqdm

from src.config.contract import Canvas
from src.config.params import stage_params
from src.data.canvas import CAUSES as CANVAS_CAUSES
from src.data.canvas import BadImage, render_png
from src.data.files import append_jsonl, prune_store, read_jsonl, sha256, write_bytes_atomic, write_json, write_jsonl
from src.data.refused import name_refused

JOURNAL = "journal.jsonl"
RESULT_KEYS = ("status", "cause", "reason", "canvas", "canvas_sha256")
# What summary.json counts rejections by: the canvas's causes and the stage's own.
CAUSES = (*CANVAS_CAUSES, "missing input", "corrupt input", "duplicate", "unexpected error")
# a duplicate's record speaks of another row, a missing or corrupt input of the store: not of the content
NOT_REUSED = ("duplicate", "missing input", "corrupt input")


def spec_key(spec: Canvas) -> str:
    """Journal entries are only reused under the same canvas contract."""
    return hashlib.sha256(json.dumps(spec.model_dump(), sort_keys=True).encode()).hexdigest()[:16]


def _rejected(cause: str, detail: str) -> dict[str, Any]:
    return {"status": "rejected", "cause": cause, "reason": f"{cause}: {detail}", "canvas": None, "canvas_sha256": None}


def resize_one(task: tuple[Path, str, Path, Canvas]) -> dict[str, Any]:
    """One input file -> its result fields; every failure is a rejection with a reason, never a raise."""
    path, expected_sha, out, spec = task
    try:
        data = path.read_bytes()
    except OSError as e:
        return _rejected("missing input", f"cannot read {path.name}: {e.strerror or type(e).__name__}")
    if sha256(data) != expected_sha:
        return _rejected("corrupt input", f"{path.name} does not match the manifest's sha256")
    try:
        png = render_png(data, spec)
    except BadImage as e:
        return _rejected(e.cause, e.detail)
    except Exception as e:  # a codec bug must not take the stage down; counted under its own cause
        return _rejected("unexpected error", f"{type(e).__name__}: {e}")
    digest = sha256(png)
    rel = f"canvases/{digest}.png"
    if not (out / rel).exists():  # content-addressed: an existing file already holds these bytes
        write_bytes_atomic(out / rel, png)
    return {"status": "ok", "cause": None, "reason": None, "canvas": rel, "canvas_sha256": digest}


def _resume(out: Path, key: str) -> dict[str, dict[str, Any]]:
    """Results of earlier runs under the same contract whose canvas is still there: the last finished
    run's records (the output persists, so adding photos renders only them) and a killed run's journal."""
    summary = out / "summary.json"
    finished = read_jsonl(out / "records.jsonl") if summary.exists() and json.loads(summary.read_text()).get("spec") == key else []
    done = {}
    finished = [{**r, "spec": key} for r in finished if r.get("cause") not in NOT_REUSED]
    for r in [*finished, *read_jsonl(out / JOURNAL)]:
        if r.get("spec") == key and "cause" in r and (r["canvas"] is None or (out / r["canvas"]).exists()):
            done[r["sha256"]] = {k: r[k] for k in RESULT_KEYS}
    return done


def run(download: Path, out: Path, spec: Canvas, workers: int) -> dict[str, Any]:
    """Render every ok manifest row; write records.jsonl and summary.json; return the summary."""
    rows = [r for r in read_jsonl(download / "manifest.jsonl") if r["status"] == "ok"]
    out.mkdir(parents=True, exist_ok=True)
    key = spec_key(spec)
    results = _resume(out, key)
    first: dict[str, str] = {}  # sha256 -> id of its first input: later ones are duplicates
    first_name: dict[str, str] = {}
    paths: dict[str, Path] = {}
    for r in rows:
        first.setdefault(r["sha256"], r["id"])
        first_name.setdefault(r["sha256"], r.get("name") or r["id"])
        paths.setdefault(r["sha256"], download / r["path"])
    todo = [s for s in paths if s not in results]
    resumed = len(paths) - len(todo)
    tasks = [(paths[s], s, out, spec) for s in todo]
    with ProcessPoolExecutor(workers if workers > 0 else None) as pool:  # 0: one per core
        for s, res in tqdm(zip(todo, pool.map(resize_one, tasks, chunksize=4)), total=len(tasks), desc="resize256", unit="img"):
            append_jsonl(out / JOURNAL, {"sha256": s, "spec": key, **res})  # fsynced: survives SIGKILL
            results[s] = res
    records = []
    for r in rows:
        # `name` (download's: the relative path, the URL) is what the user knows; the id is a fallback
        base = {"id": r["id"], "name": r.get("name") or r["id"], **{k: r.get(k) for k in ("url", "sha256", "label")}}
        if first[r["sha256"]] != r["id"]:
            # One content, one training example: a copy could land in train and test at once.
            res = _rejected("duplicate", f"same content as {first_name[r['sha256']]} (sha256 {r['sha256'][:12]})")
        else:
            res = results[r["sha256"]]
        records.append({**base, **res})
    write_jsonl(out / "records.jsonl", records)
    prune_store(out, "canvases", {r["canvas"] for r in records if r["canvas"]}, JOURNAL)
    rejected = [r for r in records if r["status"] != "ok"]
    summary = {"spec": key, "inputs": len(rows), "written": len(records) - len(rejected), "rejected": len(rejected),
               "canvases": len({r["canvas"] for r in records if r["canvas"]}),
               "rejected_by": dict(sorted(Counter(r["cause"] for r in rejected).items()))}
    if summary["inputs"] != summary["written"] + summary["rejected"]:
        raise AssertionError(f"resize256: counts do not reconcile: {summary}")
    write_json(out / "summary.json", summary)
    print(f"resize256: {summary['inputs']} inputs = {summary['written']} written + {summary['rejected']} rejected "
          f"{summary['rejected_by']}; {resumed} resumed -> {out}/records.jsonl, {out}/canvases/")
    named = name_refused("resize256", "rejected", [f"{r['name']}: {r['reason']}" for r in rejected], out / "records.jsonl")
    if named:
        print(named)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("download", type=Path)
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    p = stage_params("resize256")
    run(args.download, args.out, Canvas.model_validate(p["contract"]["canvas"]), p["resize256"]["workers"])


if __name__ == "__main__":
    main()
