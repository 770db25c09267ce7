"""split: deterministic, stratified train / val / test split of the labelled canvases.

Inputs:  LABEL/labels.jsonl.
Outputs: OUT/train.jsonl, OUT/val.jsonl, OUT/test.jsonl: id, canvas, canvas_sha256, element.
Params:  split.seed, split.val, split.test
Command: python -m src.stages.split data/label data/split

Identical canvases (same sha256) always land in the same part, so a duplicate
photo cannot leak from train into test.
"""

from __future__ import annotations

import argparse
import hashlib
from collections import defaultdict
from pathlib import Path
from typing import Any

from src.params import stage_params
from src.records import read_jsonl, write_jsonl

PARTS = ("train", "val", "test")


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def group_element(rows: list[dict[str, Any]]) -> str:
    """The stratum of a group of identical canvases: its most common label (ties: the first in sort order).

    Identical canvases can carry different labels (a teacher or a source disagreeing with itself);
    they still form one group, so they land in one part whatever their labels.
    """
    counts: dict[str, int] = defaultdict(int)
    for r in rows:
        counts[r["element"]] += 1
    return min(counts, key=lambda e: (-counts[e], e))


def split(rows: list[dict[str, Any]], seed: int, val: float, test: float) -> dict[str, list[dict[str, Any]]]:
    """Group rows by canvas sha256; per stratum, order groups by a seeded hash and cut test, val, then train."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[r["canvas_sha256"]].append(r)
    by_element: dict[str, list[str]] = defaultdict(list)
    for sha, members in groups.items():
        by_element[group_element(members)].append(sha)
    parts: dict[str, list[dict[str, Any]]] = {k: [] for k in PARTS}
    for element in sorted(by_element):
        shas = sorted(by_element[element], key=lambda s: _rank(seed, s))
        n_test, n_val = round(len(shas) * test), round(len(shas) * val)
        for i, sha in enumerate(shas):
            parts["test" if i < n_test else "val" if i < n_test + n_val else "train"] += groups[sha]
    for k in PARTS:
        parts[k].sort(key=lambda r: r["id"])
    return parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("label", type=Path)
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    s = stage_params("split")["split"]
    rows = [r for r in read_jsonl(args.label / "labels.jsonl") if r["status"] == "ok"]
    parts = split(rows, s["seed"], s["val"], s["test"])
    keep = ("id", "canvas", "canvas_sha256", "element")
    for name, part in parts.items():
        write_jsonl(args.out / f"{name}.jsonl", ({k: r[k] for k in keep} for r in part))
    print("split: " + ", ".join(f"{k} {len(v)}" for k, v in parts.items()) + f" -> {args.out}")


if __name__ == "__main__":
    main()
