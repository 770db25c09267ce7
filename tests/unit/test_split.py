"""split: stratified, deterministic, and identical canvases always in one part."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from src.config.artifacts import SPLITS
from src.data.files import read_jsonl, write_jsonl
from src.stages.split import run as split_stage
from src.stages.split import split
from testkit.project import CONTRACT

LABELS = CONTRACT.labels


def row(i: int, element: str, canvas: str | None = None) -> dict[str, Any]:
    canvas = canvas or f"c{i}"
    return {"id": f"{i:04d}", "canvas": f"{canvas}.png", "element": element,
            "canvas_sha256": hashlib.sha256(canvas.encode()).hexdigest()}


def part_of(parts: dict[str, list[dict[str, Any]]]) -> dict[str, set[str]]:
    """canvas sha -> the parts its rows landed in."""
    out: dict[str, set[str]] = {}
    for name, rows in parts.items():
        for r in rows:
            out.setdefault(r["canvas_sha256"], set()).add(name)
    return out


def test_every_row_lands_once_and_each_class_is_cut_in_proportion() -> None:
    rows = [row(i, LABELS[i % 5]) for i in range(200)]
    parts = split(rows, seed=0, val=0.15, test=0.15)
    assert sorted(r["id"] for p in parts.values() for r in p) == sorted(r["id"] for r in rows)
    for name, share in (("test", 0.15), ("val", 0.15)):
        assert Counter(r["element"] for r in parts[name]) == {label: round(40 * share) for label in LABELS}
    assert all(parts[k] == sorted(parts[k], key=lambda r: r["id"]) for k in SPLITS)


def test_the_same_seed_gives_the_same_split_and_another_seed_another() -> None:
    rows = [row(i, LABELS[i % 5]) for i in range(100)]
    assert split(rows, 3, 0.2, 0.2) == split(list(reversed(rows)), 3, 0.2, 0.2)
    assert split(rows, 3, 0.2, 0.2)["test"] != split(rows, 4, 0.2, 0.2)["test"]


def test_identical_canvases_share_a_part_even_when_labelled_differently() -> None:
    """Ten canvases each appear three times: twice with one label, once with another (over several seeds)."""
    rows = [row(i, LABELS[i % 5]) for i in range(60)]
    n = len(rows)
    for d in range(10):
        a, b = LABELS[d % 5], LABELS[(d + 1) % 5]
        rows += [row(n + 3 * d, a, f"dup{d}"), row(n + 3 * d + 1, a, f"dup{d}"), row(n + 3 * d + 2, b, f"dup{d}")]
    for seed in range(10):
        parts = split(rows, seed, val=0.2, test=0.2)
        spread = {sha: where for sha, where in part_of(parts).items() if len(where) > 1}
        assert spread == {}, f"seed {seed}"
        assert sum(len(p) for p in parts.values()) == len(rows)


def test_the_stage_refuses_a_short_class_and_writes_no_part(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lab, out = tmp_path / "label", tmp_path / "split"
    rows = [{**row(i, LABELS[i % 5]), "status": "ok"} for i in range(15)]
    rows += [{**row(100, "water"), "status": "failed"}]  # a failed label is not split
    write_jsonl(lab / "labels.jsonl", rows)
    p = {"contract": {"labels": list(LABELS)}, "split": {"seed": 0, "val": 0.34, "test": 0.34, "min_per_class": 1}}
    assert split_stage(lab, out, p) == {"train": 5, "val": 5, "test": 5}
    assert "split: train 5, val 5, test 5" in capsys.readouterr().out
    assert {r["name"] for r in read_jsonl(out / "test.jsonl")} <= {r["id"] for r in rows}  # no name: the id stands in
    with pytest.raises(SystemExit, match="split: too few photos per class: 15 class/part counts below split.min_per_class 2"):
        split_stage(lab, tmp_path / "refused", {**p, "split": {**p["split"], "min_per_class": 2}})
    assert not (tmp_path / "refused").exists()
