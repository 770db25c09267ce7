"""split: deterministic, stratified train / val / test split of the labelled canvases.

Inputs:  LABEL/labels.jsonl.
Outputs: OUT/train.jsonl, OUT/val.jsonl, OUT/test.jsonl: id, name, canvas, canvas_sha256, element.
Params:  split.seed, split.val, split.test, split.min_per_class, contract.labels
Command: python -m src.stages.split data/label data/split

Identical canvases (same sha256) always land in the same part, so a duplicate
photo cannot leak from train into test.

Data sufficiency: every class of contract.labels needs split.min_per_class photos in
each part, or the stage writes nothing and exits with the counts per class and part and
the params to change. A test split with one photo of a class (or none) would pass or
fail the release gates by chance.
"""

from __future__ import annotations

import argparse
import hashlib
from collections import defaultdict
from pathlib import Path
from typing import Any

from src.config.artifacts import SPLITS
from src.config.contract import LABELS
from src.config.params import stage_params
from src.data.files import read_jsonl, write_jsonl


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
    parts: dict[str, list[dict[str, Any]]] = {k: [] for k in SPLITS}
    for element in sorted(by_element):
        shas = sorted(by_element[element], key=lambda s: _rank(seed, s))
        n_test, n_val = round(len(shas) * test), round(len(shas) * val)
        for i, sha in enumerate(shas):
            parts["test" if i < n_test else "val" if i < n_test + n_val else "train"] += groups[sha]
    for k in SPLITS:
        parts[k].sort(key=lambda r: r["id"])
    return parts


def counts(parts: dict[str, list[dict[str, Any]]], labels: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """{label: {part: photos}}, every label of the contract included (a class with no photos counts 0)."""
    return {label: {k: sum(r["element"] == label for r in parts[k]) for k in SPLITS} for label in labels}


def photos_needed(val: float, test: float, min_per_class: int, cap: int = 100_000) -> int | None:
    """The fewest distinct photos of one class that `split` cuts into >= min_per_class per part (None: none up to cap)."""
    for n in range(3 * min_per_class, cap):
        n_test, n_val = round(n * test), round(n * val)
        if min(n_test, n_val, n - n_test - n_val) >= min_per_class:
            return n
    return None


def sufficiency(c: dict[str, dict[str, int]], val: float, test: float, min_per_class: int) -> str | None:
    """None when every class has min_per_class photos in every part; else the message split exits with."""
    short = [f"{label} {k} {n}" for label, per in c.items() for k, n in per.items() if n < min_per_class]
    if not short:
        return None
    table = [f"    {'class':<10}" + "".join(f"{k:>7}" for k in SPLITS)]
    table += [f"    {label:<10}" + "".join(f"{per[k]:>7}" for k in SPLITS) for label, per in c.items()]
    need = photos_needed(val, test, min_per_class)
    hint = (f"each class needs about {need} distinct photos" if need else
            f"no number of photos gives every part {min_per_class} per class")
    listed = ", ".join(short[:10]) + (" ..." if len(short) > 10 else "")
    return (f"split: too few photos per class: {len(short)} class/part counts below split.min_per_class "
            f"{min_per_class} ({listed})\n" + "\n".join(table) + "\n"
            f"  With split.val {val} and split.test {test}, {hint}. Add photos of the short classes, or change "
            f"split.val / split.test (the shares held out) or split.min_per_class in params.yaml.")


def run(label: Path, out: Path, p: dict[str, Any]) -> dict[str, int]:
    """Split LABEL/labels.jsonl's ok rows into OUT/{train,val,test}.jsonl; refuse (SystemExit) too few per class."""
    s = p["split"]
    rows = [r for r in read_jsonl(label / "labels.jsonl") if r["status"] == "ok"]
    parts = split(rows, s["seed"], s["val"], s["test"])
    refusal = sufficiency(counts(parts, LABELS.validate_python(p["contract"]["labels"])), s["val"], s["test"], s["min_per_class"])
    if refusal:
        raise SystemExit(refusal)
    keep = ("id", "canvas", "canvas_sha256", "element")
    for name, part in parts.items():
        # `name`: the photo as the user knows it (file name, URL), for every later message, table and plot
        write_jsonl(out / f"{name}.jsonl", ({**{k: r[k] for k in keep}, "name": r.get("name") or r["id"]}
                                            for r in part))
    print("split: " + ", ".join(f"{k} {len(v)}" for k, v in parts.items()) + f" -> {out}")
    return {k: len(v) for k, v in parts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("label", type=Path)
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    run(args.label, args.out, stage_params("split"))


if __name__ == "__main__":
    main()
