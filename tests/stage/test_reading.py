"""The reference reading client: the five-element relations, the contract applied to raw photos, clear errors.

The end-to-end check (a pulled bundle answering as eval_parity's Q8_0 on the test split) is in
tests/stage/test_release.py, where the bundle is got by version from a DVC remote.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from src.client.fortune import (
    GENERATES,
    MEANING,
    OVERCOMES,
    ReadingError,
    canvases,
    default_bundle,
    links,
    load_bundle,
    reading_text,
    relation,
)
from src.config.artifacts import BUNDLE
from src.config.contract import Contract
from src.data.canvas import decode, to_canvas
from testkit.project import CONTRACT, ROOT

ELEMENTS = sorted(GENERATES)


def photo(path: Path, w: int = 300, h: int = 180, fmt: str = "JPEG") -> Path:
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([255 * x / w, 255 * y / h, 60 + 0 * x], -1).astype(np.uint8)
    Image.fromarray(rgb, "RGB").save(path, format=fmt)
    return path


def stub_bundle(dest: Path, contract: Contract = CONTRACT) -> Path:
    """A bundle whose text files are real and whose GGUFs are empty: enough for everything before llama.cpp."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in BUNDLE.values():
        (dest / name).write_bytes(b"")
    (dest / BUNDLE["contract"]).write_text(contract.to_json())
    (dest / BUNDLE["card"]).write_text(json.dumps({"runtime": {"n_ctx": 2048}}))
    return dest


def reading_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "src.client.fortune", *args], cwd=cwd, env=env, capture_output=True, text=True)


def smolvlm_read() -> Path:
    """The client's entry point, as `make setup` installs it into the venv (pyproject.toml [project.scripts])."""
    script = Path(sys.executable).parent / "smolvlm-read"
    assert script.is_file(), f"{script}: not installed; `make setup` installs this clone into the venv"
    return script


def test_the_cycles_are_the_classical_ones_with_land_for_earth() -> None:
    chain = ["wood"]
    for _ in range(5):
        chain.append(GENERATES[chain[-1]])
    assert chain == ["wood", "fire", "land", "metal", "water", "wood"]
    assert OVERCOMES == {"wood": "land", "land": "water", "water": "fire", "fire": "metal", "metal": "wood"}
    # each element overcomes its grandchild in the generating cycle
    assert all(OVERCOMES[e] == GENERATES[GENERATES[e]] for e in ELEMENTS)
    assert set(ELEMENTS) == set(CONTRACT.labels)


def test_every_pair_has_exactly_one_relation_and_its_mirror() -> None:
    mirror = {"generates": "generated_by", "generated_by": "generates", "overcomes": "overcome_by",
              "overcome_by": "overcomes", "same": "same"}
    for a, b in itertools.product(ELEMENTS, repeat=2):
        r = relation(a, b)
        assert r in MEANING
        assert relation(b, a) == mirror[r]
        assert (r == "same") == (a == b)
    assert relation("water", "fire") == "overcomes" and relation("fire", "land") == "generates"
    with pytest.raises(ValueError):
        relation("earth", "fire")


def test_reading_links_consecutive_photos() -> None:
    r = reading_text(["wood", "fire", "metal"])
    assert [(x["a"], x["b"], x["relation"]) for x in r["links"]] == [("wood", "fire", "generates"),
                                                                      ("fire", "metal", "overcomes")]
    assert "wood feeds fire" in r["links"][0]["text"]
    assert r["summary"].startswith("A balanced day")
    assert reading_text(["water", "wood", "fire"])["summary"].startswith("A flowing day")
    assert "fire leads (2 of 3)" in reading_text(["fire", "metal", "fire"])["summary"]
    assert [x.relation for x in links(["land", "land"])] == ["same"]


def test_canvas_follows_contract_json_not_params(tmp_path: Path) -> None:
    """The client draws with the bundle's Canvas, exactly as src/data/canvas.py does for training."""
    spec = CONTRACT.canvas.model_copy(update={"size": 96, "resample": "lanczos"})
    contract, _, _ = load_bundle(stub_bundle(tmp_path / "b", CONTRACT.model_copy(update={"canvas": spec})))
    p = photo(tmp_path / "a.jpg")
    (canvas,) = canvases([p], contract)
    assert canvas.size == (96, 96)
    assert canvas.tobytes() == to_canvas(decode(p.read_bytes(), spec), spec).tobytes()


def test_bad_photos_are_named_with_their_cause(tmp_path: Path) -> None:
    good = photo(tmp_path / "good.jpg")
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo")
    truncated = tmp_path / "cut.png"
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, format="PNG")
    truncated.write_bytes(buf.getvalue()[:60])
    with pytest.raises(ReadingError) as e:
        canvases([good, text, tmp_path / "missing.jpg", truncated], CONTRACT)
    msg = str(e.value)
    assert f"{text}: not an image" in msg
    assert f"{tmp_path / 'missing.jpg'}: cannot read" in msg
    assert f"{truncated}: truncated or corrupt" in msg
    assert str(good) not in msg


def test_cli_exits_nonzero_on_bad_photos_before_loading_a_model(tmp_path: Path) -> None:
    bundle = stub_bundle(tmp_path / "bundle")  # empty GGUFs: reaching llama.cpp would fail differently
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    res = reading_cli([str(photo(tmp_path / "ok.jpg")), str(bad), "--bundle", str(bundle)], tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip() == f"reading: {bad}: empty file: 0 bytes"
    assert res.stdout == ""


def test_cli_names_a_missing_bundle(tmp_path: Path) -> None:
    res = reading_cli([str(photo(tmp_path / "ok.jpg")), "--bundle", str(tmp_path / "nowhere")], tmp_path)
    assert res.returncode == 2
    assert "is not a release bundle: missing model.gguf" in res.stderr
    res = reading_cli([str(photo(tmp_path / "ok.jpg"))], tmp_path)  # no dvc.yaml in tmp_path either
    assert res.returncode == 2 and "no --bundle given" in res.stderr


def test_default_bundle_is_the_release_path_of_dvc_yaml() -> None:
    vars_ = yaml.safe_load((ROOT / "dvc.yaml").read_text())["vars"]
    assert default_bundle(ROOT / "dvc.yaml") == Path(vars_[0]["paths"]["release"])


def test_the_installed_client_runs_from_any_folder_on_a_fetched_bundle(tmp_path: Path) -> None:
    """`smolvlm-read` from a folder outside the repository (no dvc.yaml, no PYTHONPATH): relative photo and
    bundle paths are the user's, and a bad photo is still one line and exit 2 before any model loads."""
    app = tmp_path / "my app"
    stub_bundle(app / "bundle")
    photo(app / "ok.jpg")
    (app / "bad.jpg").write_bytes(b"<html>not a photo</html>")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([str(smolvlm_read()), "ok.jpg", "bad.jpg", "--bundle", "bundle"], cwd=app, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.startswith("reading: bad.jpg: not an image: "), res.stderr
    assert "Traceback" not in res.stderr and "ok.jpg" not in res.stderr
    res = subprocess.run([str(smolvlm_read()), "ok.jpg"], cwd=app, env=env, capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr == ("reading: no --bundle given and no dvc.yaml here to find the release "
                                                  "stage's output\n")
