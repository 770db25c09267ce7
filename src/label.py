"""label: give every canvas one element of the contract's label set.

Inputs:  RESIZE256/records.jsonl.
Outputs: OUT/labels.jsonl, one record per canvas: id, canvas, canvas_sha256, element,
         status (ok|failed), error, provider, reason.
Params:  label.provider, contract.labels
Command: python -m src.label data/resize256 data/label metrics/label.json

Provider `manifest` takes the label the source supplied (a human-labelled set,
or the demo's ground truth) and checks it against the contract's labels.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import Any

from src.contract import labels_of
from src.params import stage_params
from src.records import read_jsonl, write_json, write_jsonl


def from_manifest(row: dict[str, Any], labels: tuple[str, ...]) -> dict[str, Any]:
    base = {"id": row["id"], "canvas": row["canvas"], "canvas_sha256": row["canvas_sha256"],
            "provider": "manifest", "reason": None}
    label = row.get("label")
    if label not in labels:
        return {**base, "status": "failed", "element": None,
                "error": f"source label {label!r} is not one of {list(labels)}"}
    return {**base, "status": "ok", "element": label, "error": None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("resize256", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("metrics", type=Path)
    args = ap.parse_args()
    p = stage_params("label")
    labels = labels_of(p["contract"])
    if p["label"]["provider"] != "manifest":
        raise SystemExit(f"label.provider={p['label']['provider']!r}: unknown provider (known: manifest)")
    rows = [r for r in read_jsonl(args.resize256 / "records.jsonl") if r["status"] == "ok"]
    out = [from_manifest(r, labels) for r in rows]
    write_jsonl(args.out / "labels.jsonl", out)
    ok = [r for r in out if r["status"] == "ok"]
    write_json(args.metrics, {"canvases": len(out), "labelled": len(ok), "failed": len(out) - len(ok),
                              "distribution": dict(sorted(Counter(r["element"] for r in ok).items()))})
    print(f"label: {len(ok)} labelled, {len(out) - len(ok)} failed -> {args.out}/labels.jsonl")


if __name__ == "__main__":
    main()
