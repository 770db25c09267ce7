"""End to end: the tiny pipeline reproduces, is then up to date, and params invalidate exactly downstream."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import run, set_param

pytestmark = pytest.mark.slow

STAGES = ["download", "resize256", "label", "split", "base", "finetune", "convert_gguf", "quantize_q8", "eval_parity", "release"]


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([a-z0-9_]+)'", output))


def edit_params(repo: Path, dotted: str, value: object) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    set_param(params, dotted, value)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_repro_produces_every_stage_and_a_green_ladder(tiny_repo: Path) -> None:
    lock = yaml.safe_load((tiny_repo / "dvc.lock").read_text())
    assert list(lock["stages"]) == STAGES
    m = json.loads((tiny_repo / "metrics/parity.json").read_text())
    assert m["layout"]["identical_rate"] == 1.0
    assert m["agreement"]["f16"] == 1.0
    assert m["invalid_rate"]["q8_0"] == 0.0
    assert m["eos"]["ok"] is True
    assert m["n_test"] >= 10
    assert (tiny_repo / "models/quantize_q8/text-q8_0.gguf").stat().st_size > 0


def test_after_repro_nothing_is_left_to_do(tiny_repo: Path) -> None:
    assert json.loads(run(["dvc", "status", "--json"], tiny_repo).stdout) == {}
    assert ran(run(["dvc", "repro"], tiny_repo).stdout) == set()


def test_prompt_change_reruns_finetune_and_after_only(tiny_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo, symlinks=True)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    template = params["contract"]["prompt"]["template"]
    edit_params(repo, "contract.prompt.template", template.replace("Element:", "Answer:"))
    out = run(["dvc", "repro"], repo).stdout
    assert ran(out) == {"finetune", "convert_gguf", "quantize_q8", "eval_parity", "release"}


def test_canvas_size_change_starts_at_resize256(tiny_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo, symlinks=True)
    edit_params(repo, "contract.canvas.size", 224)
    status = json.loads(run(["dvc", "status", "--json"], repo).stdout)
    # the first stage DVC finds changed is resize256; download is untouched, everything after reads its output
    assert "download" not in status
    assert min(STAGES.index(s) for s in status) == STAGES.index("resize256")


def test_default_remote_round_trips_data_and_models(tiny_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "work" / "repo"
    shutil.copytree(tiny_repo, repo, symlinks=True)
    shutil.copy(Path(__file__).resolve().parent.parent / ".dvc/config", repo / ".dvc/config")  # the shipped remote
    run(["dvc", "push"], repo)
    assert any((repo.parent / "dvc-remote").rglob("*")), "the default remote is ../../dvc-remote, beside the clone"
    shutil.rmtree(repo / ".dvc/cache")
    for out in ("data/resize256", "models/finetune", "models/quantize_q8"):
        shutil.rmtree(repo / out)
    run(["dvc", "pull"], repo)
    assert json.loads(run(["dvc", "status", "--json"], repo).stdout) == {}
    assert (repo / "models/quantize_q8/text-q8_0.gguf").stat().st_size > 0
