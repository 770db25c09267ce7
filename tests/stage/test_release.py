"""The release: its pieces (grid, hashes, data counts, card) on their own; the bundle, its card and plots; and
a version pushed, tagged with GTO and got back by DVC alone.

The last test is the app build's path end to end: the tiny pipeline's repository (tests/conftest
`tiny_repo`, copied into a fresh git repo) gets a local DVC remote, is committed and pushed, and
`gto register` tags v0.1.0. A bare clone stands for the git server, so the only place the bundle
can come from is the remote. `dvc artifacts get` fetches it elsewhere, and the reading client,
run on the raw test photos, answers exactly what eval_parity's Q8_0 answered.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from src.config.artifacts import BUNDLE, PLOTS, SPLITS
from src.config.contract import Contract
from src.data.files import write_jsonl
from src.quality.card import card_markdown, dvc_hashes, file_hashes, model_card
from src.quality.plots import INVALID, grid_rows, per_class_accuracy
from src.runtime.grammar import gbnf
from src.stages.release import data_counts, parity_rows
from testkit.project import CONTRACT, ROOT, project_params, run

NAME = "element-classifier"
PNG = b"\x89PNG\r\n\x1a\n"


def paths(repo: Path) -> dict[str, str]:
    return yaml.safe_load((repo / "dvc.yaml").read_text())["vars"][0]["paths"]


def contract_of(repo: Path) -> Contract:
    return Contract.from_dict(yaml.safe_load((repo / "params.yaml").read_text())["contract"])


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


C = CONTRACT
A, B, D = C.labels[0], C.labels[1], C.labels[2]


def test_grid_shows_every_mistake_first_then_each_class_in_turn() -> None:
    rows = [{"id": f"{i:02d}", "name": f"photo{i:02d}.jpg", "truth": t, "pred": p} for i, (t, p) in enumerate(
        [(A, A), (A, A), (B, B), (B, A), (A, INVALID), (D, D), (B, B)])]
    assert [r["id"] for r in grid_rows(rows, C.labels, 5)] == ["03", "04", "00", "02", "05"]
    assert [r["id"] for r in grid_rows(rows, C.labels, 2)] == ["03", "04"]
    assert len(grid_rows(rows, C.labels, 100)) == len(rows)


def test_answers_mark_what_is_not_a_label_invalid() -> None:
    text = f"id,canvas,truth,q8_0\na,a.png,{A},{B}\nb,b.png,{A},INVALID:'x'\n"
    assert [r["pred"] for r in parity_rows(text, C.labels)] == [B, INVALID]


def test_file_hashes_are_those_of_the_bytes(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x" * (3 << 20))  # several read blocks
    assert file_hashes(f) == {"bytes": 3 << 20, "md5": md5(f), "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}


def test_data_counts_per_split_and_label(tmp_path: Path) -> None:
    for name, labels in (("train", [A, A, B]), ("val", [D]), ("test", [])):
        write_jsonl(tmp_path / f"{name}.jsonl", ({"id": str(i), "element": x} for i, x in enumerate(labels)))
    counts = data_counts(tmp_path, C.labels)
    assert counts["train"] == {"n": 3, **{x: (2 if x == A else 1 if x == B else 0) for x in C.labels}}
    assert counts["val"]["n"] == counts["val"][D] == 1 and counts["test"]["n"] == 0


def test_dvc_hashes_come_from_the_lock_and_say_unknown_otherwise(tmp_path: Path) -> None:
    lock = tmp_path / "dvc.lock"
    lock.write_text(yaml.safe_dump({"stages": {"s": {"outs": [{"path": "models/q8", "md5": "abc.dir"}]}}}))
    assert dvc_hashes(lock, [Path("models/q8/"), Path("other")]) == {"models/q8": "abc.dir", "other": "unknown"}
    assert dvc_hashes(tmp_path / "absent.lock", [Path("models/q8")]) == {"models/q8": "unknown"}


def test_card_states_metrics_data_and_files_for_people() -> None:
    runtime = yaml.safe_load((ROOT / "runtime.yaml").read_text())
    p = {**project_params(),
         "runtime": {"torch": "1.0", "llama_cpp_python": runtime["llama_cpp_python"], "llama_cpp_cmake": "-DGGML_AVX2=ON",
                     "llama_cpp_arm64": {"dotprod": "armv8.2-a+dotprod"}}}
    parity = {"n_test": 4, "accuracy": {"q8_0": 0.75}, "agreement": {"q8_0": 1.0}, "invalid_rate": {"q8_0": 0.0},
              "arm64": {"n": 2, "variants": {"dotprod": {"march": "armv8.2-a+dotprod", "qemu_cpu": "cortex-a76"}}}}
    per_class = per_class_accuracy([A, A, B, D], [A, B, B, D], C.labels)
    counts = {s: {"n": 1, **{x: int(x == A) for x in C.labels}} for s in SPLITS}
    files = {BUNDLE["model"]: {"bytes": 3, "md5": "m", "sha256": "s" * 64}}
    card = model_card(C, p, parity, {"val_acc": 1.0}, per_class, counts, files, {"models/q8": "abc"})
    assert card["labels"] == list(C.labels) and card["metrics"]["test_q8_0"]["accuracy"] == 0.75
    md = card_markdown(card)
    assert f"| {A} | 2 | 1 | 0.5 |" in md
    assert f"| train | 1 | {' | '.join('1' if x == A else '0' for x in C.labels)} |" in md
    assert f"| {BUNDLE['model']} | 3 | `{'s' * 64}` |" in md
    assert "`models/q8` md5 `abc`" in md and "Runtime: torch 1.0" in md
    assert "llama_cpp_arm64.dotprod armv8.2-a+dotprod" in md
    # which kernels proved it: the x86 flags on every rung, each arm64 -march on its rung
    assert "- x86, every rung on 4 test photos: `-DGGML_AVX2=ON`" in md
    assert "- arm64 dotprod, the arm64 rung on 2 test photos under qemu -cpu cortex-a76: `-march=armv8.2-a+dotprod`" in md


@pytest.mark.slow
def test_bundle_holds_what_the_app_ships(tiny_repo: Path) -> None:
    p = paths(tiny_repo)
    bundle = tiny_repo / p["release"]
    contract = contract_of(tiny_repo)
    assert sorted(x.name for x in bundle.iterdir()) == sorted(BUNDLE.values())
    assert (bundle / BUNDLE["model"]).read_bytes() == (tiny_repo / p["quantize_q8"] / "text-q8_0.gguf").read_bytes()
    assert (bundle / BUNDLE["contract"]).read_text() == contract.to_json()
    assert Contract.load(bundle / BUNDLE["contract"]) == contract
    assert (bundle / BUNDLE["grammar"]).read_text() == gbnf(contract.labels, contract.target)
    for name in PLOTS.values():
        assert (tiny_repo / p["release_plots"] / name).read_bytes().startswith(PNG), name


@pytest.mark.slow
def test_model_card_states_metrics_base_data_params_and_hashes(tiny_repo: Path) -> None:
    p = paths(tiny_repo)
    card = json.loads((tiny_repo / p["release"] / BUNDLE["card"]).read_text())
    params = yaml.safe_load((tiny_repo / "params.yaml").read_text())
    parity = json.loads((tiny_repo / p["m_parity"]).read_text())
    assert card["metrics"]["parity"] == parity
    assert card["metrics"]["test_q8_0"]["accuracy"] == parity["accuracy"]["q8_0"]
    per_class = card["metrics"]["test_q8_0"]["per_class"]
    assert sum(v["n"] for v in per_class.values()) == parity["n_test"]
    assert card["base_model"]["revision"] == params["base"]["revision"]
    assert card["base_model"]["hub_id"] == params["base"]["hub_id"]
    for split in SPLITS:
        n = len((tiny_repo / p["split"] / f"{split}.jsonl").read_text().splitlines())
        assert card["data"][split]["n"] == n
    assert card["params"]["contract"] == params["contract"]
    assert card["params"]["finetune"]["epochs"] == params["finetune"]["epochs"]
    for name, h in card["files"].items():
        assert h["md5"] == md5(tiny_repo / p["release"] / name), name
    # what the bundle was built from: the md5s dvc.lock holds for the stage's inputs, the runtime pins;
    # no git commit (it does not exist yet when the bundle is written; the release's tag names it)
    assert card["provenance"]["runtime"] == yaml.safe_load((tiny_repo / "runtime.yaml").read_text())
    assert "git" not in card["provenance"]
    lock = yaml.safe_load((tiny_repo / "dvc.lock").read_text())["stages"]
    assert card["provenance"]["dvc_deps_md5"][p["quantize_q8"]] == lock["quantize_q8"]["outs"][0]["md5"]
    deps = {d["path"]: d["md5"] for d in lock["release"]["deps"]}
    assert {k: deps[k] for k in card["provenance"]["dvc_deps_md5"]} == card["provenance"]["dvc_deps_md5"]
    assert "## Metrics" in (tiny_repo / p["release"] / BUNDLE["card_md"]).read_text()


@pytest.mark.slow
def test_release_refuses_when_a_gate_fails(tiny_repo: Path, tmp_path: Path) -> None:
    p = paths(tiny_repo)
    parity = json.loads((tiny_repo / p["m_parity"]).read_text())
    parity["agreement"]["q8_0"] = 0.5
    (tmp_path / "parity.json").write_text(json.dumps(parity))
    out = tmp_path / "release"
    res = run(["python", "-m", "src.stages.release", p["quantize_q8"], p["convert_gguf"], p["split"], p["resize256"],
               str(tmp_path / "parity.json"), p["parity_images"], p["m_finetune"], str(out), str(tmp_path / "plots")],
              tiny_repo, check=False)
    assert res.returncode != 0
    assert "rung agreement.q8_0: 0.500" in res.stderr
    assert not out.exists()


@pytest.mark.slow
def test_version_pushed_tagged_and_got_by_dvc_alone_reads_as_eval_parity(
        tiny_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    repo, remote, origin, app = tmp_path / "repo", tmp_path / "dvc-remote", tmp_path / "origin.git", tmp_path / "app"
    shutil.copytree(tiny_repo, repo, symlinks=True, ignore=shutil.ignore_patterns(".git"))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    run(["git", "init", "-q"], repo)
    run(["git", "config", "user.name", "t"], repo)  # gto's annotated tag needs an identity
    run(["git", "config", "user.email", "t@t"], repo)
    run(["dvc", "remote", "add", "-d", "store", str(remote)], repo)
    # the pipeline, release included, is reproduced and nothing is left to do
    run(["dvc", "repro"], repo)
    assert json.loads(run(["dvc", "status", "--json"], repo).stdout) == {}
    run(["git", "add", "-A"], repo)
    run([*git, "commit", "-q", "-m", "release"], repo)
    run(["dvc", "push"], repo)
    run(["gto", "register", NAME, "--version", "v0.1.0"], repo)
    assert f"{NAME}@v0.1.0" in run(["git", "tag"], repo).stdout.split()
    # the git server: history and tags, no DVC cache; the bundle can only come from the remote
    run(["git", "clone", "-q", "--bare", str(repo), str(origin)], tmp_path)

    app.mkdir()
    run(["dvc", "artifacts", "get", str(origin), NAME, "--rev", "v0.1.0", "-o", "bundle"], app)
    bundle = app / "bundle"
    p = paths(repo)
    for name in BUNDLE.values():
        assert md5(bundle / name) == md5(repo / p["release"] / name), name
    run(["dvc", "get", str(origin), p["release"], "--rev", f"{NAME}@v0.1.0", "-o", "by-path"], app)
    assert md5(app / "by-path" / BUNDLE["model"]) == md5(bundle / BUNDLE["model"])

    # the raw test photos, as the app would get them, and eval_parity's Q8_0 answers for them
    manifest = {json.loads(x)["id"]: json.loads(x) for x in (repo / p["download"] / "manifest.jsonl").read_text().splitlines()}
    expected = {r["id"]: r["q8_0"] for r in csv.DictReader((repo / p["parity_images"]).open())}
    photos = {i: repo / p["download"] / manifest[i]["path"] for i in expected}
    ids = sorted(photos)
    assert len(ids) >= 10
    # run from the app's directory, by the entry point `make setup` installs: nothing but the pulled bundle and the photos
    res = subprocess.run([str(Path(sys.executable).parent / "smolvlm-read"), *[str(photos[i]) for i in ids],
                          "--bundle", "bundle", "--json"], cwd=app,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    got = dict(zip(ids, out["elements"], strict=True))
    print(f"reading vs eval_parity q8_0: {sum(got[i] == expected[i] for i in ids)}/{len(ids)} equal")
    assert got == {i: expected[i] for i in ids}
    assert len(out["links"]) == len(ids) - 1
