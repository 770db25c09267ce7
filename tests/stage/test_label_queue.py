"""The review queue (src/labeling/review_queue.py, in the label stage): ranking on small in-process data, overrides by a
photo's name, the page and CSVs it writes, and (slow) the demo with 10 % of photos filed under a wrong class:
the flips come first in the queue, an override by file name fixes one and reruns only what depends on it."""

from __future__ import annotations

import copy
import csv
import io
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from src.config.artifacts import SPLITS
from src.data import demo
from src.data.files import read_jsonl
from src.labeling import review_queue
from src.model import hf_vlm
from src.stages.label import match_overrides, read_overrides
from src.stages.label import run as label_stage
from testkit.photos import make_canvases
from testkit.project import CONTRACT, TINY, make_repo, params_for, run

LABELS = CONTRACT.labels
Q = review_queue.QueueParams(folds=5, seed=0, C=0.1, batch_size=16)
# Measured on the demo below (200 photos, 20 flipped, the demo's builder base): top-20 precision = recall 0.95
# (label.queue.C 0.1). A random order's expectation is the flip rate, 0.1.
MIN_TOP_K = 0.8


def top_k_hits(order: list[str], flipped: set[str]) -> float:
    """Precision of the first len(flipped) names against the flips (= recall: k is the number of flips)."""
    return len(set(order[:len(flipped)]) & flipped) / len(flipped)


def clusters(n_per: int, flips: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, given labels, flipped indices): five separable Gaussian classes, `flips` labels changed."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (len(LABELS), 16))
    y = np.repeat(np.arange(len(LABELS)), n_per)
    x = centres[y] + rng.normal(0, 1, (len(y), 16))
    flipped = rng.choice(len(y), flips, replace=False)
    given = y.copy()
    given[flipped] = (y[flipped] + rng.integers(1, len(LABELS), flips)) % len(LABELS)
    return x, given, flipped


def rows_for(given: np.ndarray, provider: str = "manifest") -> list[dict[str, Any]]:
    return [{"id": f"id-{i}", "name": f"p{i:03d}.jpg", "canvas_sha256": f"{i:064x}", "canvas": f"c/{i}.png",
             "element": LABELS[g], "provider": provider, "reason": "r", "status": "ok"} for i, g in enumerate(given)]


# -- ranking ---------------------------------------------------------------------------------------------

def test_the_flipped_labels_lead_the_queue_and_become_suspects_by_pair() -> None:
    x, given, flipped = clusters(30, 15)
    queue, m = review_queue.rank(rows_for(given), x, LABELS, Q)
    flips = {f"p{i:03d}.jpg" for i in flipped}
    assert top_k_hits([e["name"] for e in queue], flips) >= 0.9
    assert [e["rank"] for e in queue] == list(range(1, len(queue) + 1))
    assert all(a["score"] <= b["score"] for a, b in zip(queue, queue[1:]))
    suspects = [e for e in queue if e["suspect"]]
    assert m["n_suspects"] == len(suspects) == sum(m["suspects"].values()) and len(suspects) >= 12
    assert all(e["guess"] != e["label"] and f"{e['label']}->{e['guess']}" in m["suspects"] for e in suspects)
    assert m["folds"] == 5 and m["photos"] == 150
    # the review file: one row a suspect, the guess filled in, waiting for approval
    review = review_queue.review_rows(queue)
    assert [r["name"] for r in review] == [e["name"] for e in suspects]
    assert all(r["approve"] == "" and r["element"] == e["guess"] for r, e in zip(review, suspects))


def test_a_random_order_fails_the_threshold_the_queue_clears() -> None:
    x, given, flipped = clusters(30, 15)
    flips = {f"p{i:03d}.jpg" for i in flipped}
    names = [f"p{i:03d}.jpg" for i in np.random.default_rng(0).permutation(len(given))]
    assert top_k_hits(names, flips) < MIN_TOP_K


def test_an_overridden_photo_is_ranked_but_never_a_suspect() -> None:
    x, given, flipped = clusters(30, 15)
    rows = rows_for(given)
    for i in flipped:
        rows[i]["provider"] = "override"  # a person said the label stands
    queue, m = review_queue.rank(rows, x, LABELS, Q)
    assert len(queue) == 150 and not any(e["suspect"] for e in queue if e["provider"] == "override")


def test_few_photos_a_class_lower_the_folds_and_one_photo_is_one_line() -> None:
    x, given, _ = clusters(3, 0)
    _, m = review_queue.rank(rows_for(given), x, LABELS, Q)
    assert m["folds"] == 3
    given[0], given[1] = 4, 4  # water keeps 1 photo
    with pytest.raises(ValueError, match=r"^class 'water' has 1 labelled photo"):
        review_queue.rank(rows_for(given), x, LABELS, Q)


def test_a_class_with_no_photo_gets_probability_zero() -> None:
    x, given, _ = clusters(10, 0)
    keep = given != 2  # no fire
    queue, m = review_queue.rank(rows_for(given[keep]), x[keep], LABELS, Q)
    assert m["photos"] == 40 and all(e["guess"] != "fire" for e in queue)


# -- overrides by name -----------------------------------------------------------------------------------

def test_overrides_by_name_wait_for_approval_and_an_unknown_name_is_one_line(tmp_path: Path) -> None:
    rows = [{"id": "folder-1", "name": "wood/a.jpg", "canvas_sha256": "a" * 64},
            {"id": "folder-2", "name": "land/b.jpg", "canvas_sha256": "b" * 64},
            {"id": "folder-3", "name": "fire/c.jpg", "canvas_sha256": "c" * 64}]
    ov = tmp_path / "overrides.csv"
    ov.write_text("# from review.csv\nname,element,note,approve\nwood/a.jpg,land,rank 1,y\nland/b.jpg,wood,rank 2,\n"
                  f"folder-3,water,by id,YES\n{'c' * 64},water,by sha,no\n")
    overrides, pending = read_overrides(ov, LABELS)
    assert pending == 2 and [o.key for o in overrides] == ["wood/a.jpg", "folder-3"]
    matched, unused = match_overrides(rows, overrides, ov)
    assert {k: o.element for k, o in matched.items()} == {"folder-1": "land", "folder-3": "water"} and unused == []
    ov.write_text("name,element\nwood/a.jpg,land\nwood/typo.jpg,land\n")
    with pytest.raises(SystemExit, match=r"overrides.csv: row 3: name 'wood/typo.jpg' matches no photo \(names"):
        match_overrides(rows, read_overrides(ov, LABELS)[0], ov)
    ov.write_text("key,element\nwood/a.jpg,metal\n" + "d" * 64 + ",fire\n")  # the old form: key, no approve
    matched, unused = match_overrides(rows, read_overrides(ov, LABELS)[0], ov)
    assert matched["folder-1"].element == "metal" and unused == ["d" * 64]


# -- the stage, in-process on a tiny base ----------------------------------------------------------------

def test_canvas_pixels_are_the_training_inputs_pixels(tiny_model: tuple[Any, Any]) -> None:
    from PIL import Image

    _, processor = tiny_model
    c = CONTRACT
    img = Image.new("RGB", (c.canvas.size, c.canvas.size), (10, 200, 30))
    px = hf_vlm.canvas_pixels(processor, img)
    t = hf_vlm.training_example(processor, c.prompt, c.labels, c.target, img, "wood")
    assert px["pixel_values"].equal(t["pixel_values"]) and px["pixel_attention_mask"].equal(t["pixel_attention_mask"])


def test_the_stage_writes_the_queue_review_file_page_and_metrics(tmp_path: Path, tiny_model: tuple[Any, Any]) -> None:
    model, processor = tiny_model
    hf_vlm.save(model, processor, tmp_path / "base")
    make_canvases(tmp_path / "resize256", 20)
    p = copy.deepcopy(params_for("label"))
    m = label_stage(tmp_path / "resize256", tmp_path / "label", tmp_path / "label.json", tmp_path / "cache", None, p,
                    tmp_path / "base")
    queue = list(csv.DictReader((tmp_path / "label/queue.csv").open()))
    assert tuple(queue[0]) == review_queue.QUEUE_COLUMNS and len(queue) == 20 == m["queue"]["photos"]
    assert [int(r["rank"]) for r in queue] == list(range(1, 21)) and m["queue"]["folds"] == 4  # 4 photos a class
    review = list(csv.DictReader((tmp_path / "label/review.csv").open()))
    assert len(review) == m["queue"]["n_suspects"] and (tmp_path / "label/review.csv").read_text().startswith(
        "name,element,note,approve\n")
    page = (tmp_path / "label/audit.html").read_text()
    names = re.findall(r"<figcaption><b>([^<]+)</b>", page)
    assert names == [r["name"] for r in queue]  # the page in queue order
    assert "id=cls" in page and "id=pair" in page and page.count("data:image/jpeg;base64,") == 20
    assert m["overrides_applied"] == 0 and m["overrides_pending"] == 0
    # the features are cached per base: a second run (after a review) does not run the encoder
    assert len(list((tmp_path / "cache/features").glob("*.npz"))) == 1
    shutil.rmtree(tmp_path / "base")
    (tmp_path / "base").mkdir()
    hf_vlm.save(model, processor, tmp_path / "base")  # the same weights: the same cache file
    m2 = label_stage(tmp_path / "resize256", tmp_path / "label", tmp_path / "label.json", tmp_path / "cache", None,
                     p, tmp_path / "base")
    assert m2["queue"] == m["queue"] and len(list((tmp_path / "cache/features").glob("*.npz"))) == 1


def test_too_few_photos_to_hold_out_is_no_queue_said_in_one_line_and_the_labels_stand(
        tmp_path: Path, tiny_model: tuple[Any, Any], capsys: pytest.CaptureFixture[str]) -> None:
    model, processor = tiny_model
    hf_vlm.save(model, processor, tmp_path / "base")
    make_canvases(tmp_path / "resize256", 6)
    p = copy.deepcopy(params_for("label"))
    records = tmp_path / "resize256/records.jsonl"
    for n_classes in (1, 5):  # one class; then 6 photos in 5 classes: four classes of one photo
        rows = [json.loads(line) for line in records.read_text().splitlines()]
        for i, r in enumerate(rows):
            r["label"] = LABELS[i % n_classes]
        records.write_text("".join(json.dumps(r) + "\n" for r in rows))
        m = label_stage(tmp_path / "resize256", tmp_path / f"label{n_classes}", tmp_path / "label.json",
                        tmp_path / "cache", None, p, tmp_path / "base")
        err = capsys.readouterr().err
        assert m["labelled"] == 6 and set(m["queue"]) == {"photos", "skipped"}, m["queue"]
        assert err.count("label: no review queue: ") == 1 and m["queue"]["skipped"] in err
        assert (tmp_path / f"label{n_classes}/labels.jsonl").exists()
        assert not (tmp_path / f"label{n_classes}/queue.csv").exists()
    assert "class 'land' has 1 labelled photo" in m["queue"]["skipped"]


# -- the demo with flipped labels (slow) -----------------------------------------------------------------

def flipped_folder(root: Path, n: int, rate: float, seed: int) -> set[str]:
    """n demo photos filed as photos/<class>/<id>.<ext>, a `rate` share of them under a wrong class (seeded);
    returns the flipped photos' names (their paths under the folder, as the label stage names them)."""
    rng = np.random.default_rng(seed)
    flips = set(rng.choice(n, round(n * rate), replace=False).tolist())
    names = set()
    for i in range(n):
        ph = demo.photo(i, LABELS, 0)
        label = ph.label
        if i in flips:
            label = LABELS[(LABELS.index(label) + int(rng.integers(1, len(LABELS)))) % len(LABELS)]
        name = f"{label}/{ph.id}.{'jpg' if ph.format == 'JPEG' else 'png'}"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(ph.data)
        if i in flips:
            names.add(name)
    return names


@pytest.fixture(scope="module")
def flipped_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, set[str]]:
    """A repo of download, resize256, base, label and split on 200 demo photos in a folder, 20 of them misfiled."""
    overrides = {**TINY, "download.source": "folder", "download.folder.path": "data/sources/photos",
                 "download.folder.class_subfolders": True}
    repo = make_repo(tmp_path_factory.mktemp("flipped") / "repo", overrides,
                     ("download", "resize256", "label", "base", "split"))
    flips = flipped_folder(repo / "data/sources/photos", 200, 0.1, seed=1)
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "photos"], repo)
    run(["dvc", "repro", "label"], repo)
    return repo, flips


@pytest.mark.slow
def test_the_flipped_photos_lead_the_queue_on_the_demo(flipped_repo: tuple[Path, set[str]]) -> None:
    repo, flips = flipped_repo
    queue = list(csv.DictReader((repo / "data/label/queue.csv").open()))
    order = [r["name"] for r in queue]
    assert len(queue) == 200 and len(flips) == 20
    hits = top_k_hits(order, flips)
    print(f"top-{len(flips)} precision = recall = {hits:.2f}; flips' ranks "
          f"{sorted(order.index(f) + 1 for f in flips)}")
    assert hits >= MIN_TOP_K
    assert top_k_hits([order[i] for i in np.random.default_rng(0).permutation(len(order))], flips) < MIN_TOP_K
    m = json.loads((repo / "metrics/label.json").read_text())["queue"]
    suspects = {r["name"] for r in queue if r["suspect"] == "True"}
    assert m["n_suspects"] == len(suspects) and len(suspects & flips) >= MIN_TOP_K * len(flips)


@pytest.mark.slow
def test_an_override_by_file_name_relabels_the_photo_and_reruns_only_label_and_after(
        flipped_repo: tuple[Path, set[str]]) -> None:
    repo, flips = flipped_repo
    queue = list(csv.DictReader((repo / "data/label/queue.csv").open()))
    top = next(r for r in queue if r["name"] in flips and r["suspect"] == "True")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    run(["dvc", "repro", "split"], repo)  # everything up to date before the review
    run(["git", "add", "-A"], repo)
    run([*git, "commit", "-q", "-m", "reproduced"], repo)
    # the person copies the suspect's row from review.csv into the overrides file and approves it
    review = {r["name"]: r for r in csv.DictReader((repo / "data/label/review.csv").open())}
    row = {**review[top["name"]], "approve": "y"}
    buf = io.StringIO()
    csv.DictWriter(buf, fieldnames=review_queue.REVIEW_COLUMNS, lineterminator="\n").writerows([row])
    (repo / "data/label_overrides.csv").write_text("name,element,note,approve\n" + buf.getvalue())
    status = json.loads(run(["dvc", "status", "--json"], repo).stdout or "{}")
    assert set(status) == {"label"}
    out = run(["dvc", "repro", "split"], repo).stdout
    ran = set(re.findall(r"Running stage '(\w+)'", out))
    assert ran == {"label", "split"}, out
    labels = {r["name"]: r for r in read_jsonl(repo / "data/label/labels.jsonl")}
    assert labels[top["name"]]["element"] == top["guess"] != top["label"]
    assert labels[top["name"]]["provider"] == "override"
    split = [r for s in SPLITS for r in read_jsonl(repo / f"data/split/{s}.jsonl")]
    assert next(r["element"] for r in split if r["name"] == top["name"]) == top["guess"]
    diff = json.loads(run(["dvc", "metrics", "diff", "--json"], repo).stdout)["metrics/label.json"]
    assert diff["overrides_applied"] == {"old": 0, "new": 1, "diff": 1}
    assert diff["queue.n_suspects"]["new"] < diff["queue.n_suspects"]["old"]
