"""Photos are named as the user knows them (file name or URL) from download's manifest to every table.

A download manifest whose rows carry `name` (a relative path, a URL) goes through resize256, label
and split; the split rows, eval_parity's per-image CSV, release's sample-grid rows and the label
audit all carry the name, never only the hash id. Without a `name` (an older manifest) the id stands in.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from src.config.artifacts import SPLITS
from src.data import demo
from src.data.files import read_jsonl, sha256, write_jsonl
from src.parity.ladder import Row, images_csv
from src.quality.plots import grid_rows
from src.stages import label, release, resize256, split
from testkit.project import CONTRACT

LABELS, SPEC = CONTRACT.labels, CONTRACT.canvas
LABEL_PARAMS = {"contract": {"labels": list(LABELS)}, "label": {"provider": "manifest", "max_failure_rate": 0.0}}
N = 3 * len(LABELS)  # three photos a class: with these shares, one in each part
SPLIT_PARAMS = {"contract": {"labels": list(LABELS)}, "split": {"seed": 0, "val": 0.34, "test": 0.34, "min_per_class": 1}}


def download_dir(tmp: Path, n: int, named: bool) -> Path:
    """A download output as the stage writes it: photos by sha256 and a manifest (names like a folder or URL source)."""
    dl = tmp / "download"
    (dl / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        p = demo.photo(i, LABELS, seed=1)
        digest = sha256(p.data)
        (dl / "images" / f"{digest}.bin").write_bytes(p.data)
        row = {"id": f"folder-{digest[:16]}", "url": f"folder:{p.label}/IMG_{i:04d}.jpg", "status": "ok",
               "sha256": digest, "path": f"images/{digest}.bin", "label": p.label}
        if named:
            row["name"] = f"{p.label}/IMG_{i:04d}.jpg" if i % 2 else f"https://example.org/photos/{i}.jpg"
        rows.append(row)
    write_jsonl(dl / "manifest.jsonl", rows)
    return dl


def through_split(tmp: Path, named: bool) -> tuple[dict[str, str], Path, Path]:
    dl = download_dir(tmp, N, named)
    rs, lab, sp = tmp / "resize256", tmp / "label", tmp / "split"
    resize256.run(dl, rs, SPEC, 1)
    label.run(rs, lab, tmp / "label.json", tmp / "cache", None, LABEL_PARAMS)
    split.run(lab, sp, SPLIT_PARAMS)
    expected = {r["id"]: r.get("name", r["id"]) for r in read_jsonl(dl / "manifest.jsonl")}
    return expected, rs, sp


def test_name_travels_from_the_manifest_to_the_split_rows(tmp_path: Path) -> None:
    expected, rs, sp = through_split(tmp_path, named=True)
    assert {r["id"]: r["name"] for r in read_jsonl(rs / "records.jsonl")} == expected
    html = (tmp_path / "label" / "audit.html").read_text()
    assert "example.org/photos/0.jpg" in html and "IMG_0001.jpg" in html
    rows = [r for part in SPLITS for r in read_jsonl(sp / f"{part}.jsonl")]
    assert len(rows) == N and all(r["name"] == expected[r["id"]] for r in rows)
    assert any(r["name"].startswith("https://") for r in rows) and any(r["name"].endswith(".jpg") for r in rows)


def test_without_a_name_the_id_stands_in(tmp_path: Path) -> None:
    expected, _, sp = through_split(tmp_path, named=False)
    rows = read_jsonl(sp / "test.jsonl")
    assert rows and all(r["name"] == r["id"] == next(k for k in expected if k == r["id"]) for r in rows)


def test_per_image_csv_and_sample_grid_rows_carry_the_name() -> None:
    rows = [Row("folder-9129a1c0449aa13b", "fire/beach.jpg", "canvases/a.png", "fire",
                answers={"hf": "fire", "f16": "fire", "q8_0": "water"}, raw={"hf": " fire", "f16": " fire", "q8_0": " water"},
                probs={"hf": [0.2] * 5, "q8_0": [0.2] * 5})]
    text = images_csv(rows, LABELS)
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert parsed[0]["name"] == "fire/beach.jpg" and parsed[0]["id"] == "folder-9129a1c0449aa13b"
    rows = release.parity_rows(text, LABELS)
    assert rows == [{"id": "folder-9129a1c0449aa13b", "name": "fire/beach.jpg", "canvas": "canvases/a.png",
                        "truth": "fire", "pred": "water"}]
    assert grid_rows(rows, LABELS, 5)[0]["name"] == "fire/beach.jpg"
    json.dumps(rows)  # plain data: what the grid is drawn from
