"""Too little data stops the pipeline early, with the counts and the param to change.

split refuses when any class falls below split.min_per_class in train, val or test; a
10-photo folder source stops there under `dvc repro`, and nothing after split runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from src.config.artifacts import SPLITS
from src.data import demo
from src.stages.split import counts, photos_needed, split, sufficiency
from testkit.project import CONTRACT, make_repo, run

LABELS = CONTRACT.labels


def rows(per_class: int) -> list[dict[str, str]]:
    return [{"id": f"{label}-{i}", "canvas": f"c/{label}-{i}.png", "canvas_sha256": f"{label}-{i}", "element": label}
            for label in LABELS for i in range(per_class)]


def test_enough_photos_per_class_pass() -> None:
    parts = split(rows(10), seed=0, val=0.15, test=0.15)
    c = counts(parts, LABELS)
    assert all(c[label][k] >= 2 for label in LABELS for k in SPLITS), c
    assert sufficiency(c, 0.15, 0.15, 2) is None


def test_a_short_class_is_named_with_every_count_and_the_params() -> None:
    data = rows(10) + [{"id": "x", "canvas": "c/x.png", "canvas_sha256": "x", "element": "fire"}]
    data = [r for r in data if not (r["element"] == "metal" and r["id"] != "metal-0")]  # one metal photo left
    msg = sufficiency(counts(split(data, 0, 0.15, 0.15), LABELS), 0.15, 0.15, 2)
    assert msg is not None
    first, *table, advice = msg.splitlines()
    assert first.startswith("split: too few photos per class: ") and "below split.min_per_class 2" in first
    assert "metal val 0" in first and "metal test 0" in first and "fire" not in first
    assert table[0].split() == ["class", *SPLITS]
    assert dict((t.split()[0], t.split()[1:]) for t in table[1:])["metal"] == ["1", "0", "0"]
    assert "each class needs about 10 distinct photos" in advice
    for param in ("split.val", "split.test", "split.min_per_class"):
        assert param in advice


def test_a_class_with_no_photos_at_all_is_counted() -> None:
    data = [r for r in rows(10) if r["element"] != "wood"]
    c = counts(split(data, 0, 0.15, 0.15), LABELS)
    assert c["wood"] == {"train": 0, "val": 0, "test": 0}
    assert "wood train 0" in (sufficiency(c, 0.15, 0.15, 2) or "")


def test_photos_needed_follows_the_split_rounding() -> None:
    assert photos_needed(0.15, 0.15, 2) == 10  # round(1.5) = 2 per held-out part, 6 left to train
    assert photos_needed(0.2, 0.2, 1) == 3
    assert photos_needed(0.0, 0.15, 1) is None  # no val share: no count of photos can give val a photo


@pytest.mark.slow
def test_ten_photo_folder_stops_at_split_with_the_counts_and_the_param(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    for i in range(10):  # two photos of each class, in class subfolders, as a user lays them out
        p = demo.photo(i, LABELS, seed=3)
        (photos / p.label).mkdir(parents=True, exist_ok=True)
        (photos / p.label / f"{p.label}-{i}.{p.format.lower()}").write_bytes(p.data)
    repo = make_repo(tmp_path / "repo", {"download.source": "folder", "download.folder.path": str(photos),
                                         "download.folder.class_subfolders": True})
    res = run(["dvc", "repro"], repo, check=False)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "Traceback" not in out
    assert "Running stage 'split'" in res.stdout and "Running stage 'finetune'" not in res.stdout
    assert "split: too few photos per class: 10 class/part counts below split.min_per_class 2" in out
    for label in LABELS:  # every class's counts: 2 in train, none held out
        assert any(line.split() == [label, "2", "0", "0"] for line in out.splitlines()), out
    assert "split.val / split.test" in out and "split.min_per_class" in out
    assert not (repo / "data/split/test.jsonl").exists()
