"""End to end: the tiny pipeline reproduces, is then up to date, and params invalidate exactly downstream."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from src.config.paths import ROOT
from testkit.project import edit_yaml, run

pytestmark = pytest.mark.slow

# In an order DVC can run them: label reads base (the review queue's features); base reads no data.
STAGES = ["download", "resize256", "base", "label", "split", "finetune", "convert_gguf", "quantize_q8", "eval_parity", "release"]


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([a-z0-9_]+)'", output))


def test_repro_produces_every_stage_and_a_green_ladder(tiny_repo: Path) -> None:
    lock = yaml.safe_load((tiny_repo / "dvc.lock").read_text())
    assert sorted(lock["stages"]) == sorted(STAGES)  # the order among independent stages is DVC's
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


def downstream(stage: str, repo: Path) -> set[str]:
    """`stage` and every stage that reads, directly or not, what it writes (from dvc.yaml)."""
    dvc = yaml.safe_load((repo / "dvc.yaml").read_text())
    paths, stages = dvc["vars"][0]["paths"], dvc["stages"]
    outs = {s: {str(o if isinstance(o, str) else next(iter(o))) for o in v.get("outs", [])} for s, v in stages.items()}
    resolve = {f"${{paths.{k}}}": v for k, v in paths.items()}
    found = {stage}
    for s in STAGES[STAGES.index(stage) + 1:]:
        deps = {resolve.get(d, d) for d in stages[s].get("deps", [])}
        if any(resolve.get(o, o) in deps for up in found for o in outs[up]):
            found.add(s)
    return found


def test_prompt_change_invalidates_finetune_and_after_only(tiny_repo: Path, tmp_path: Path) -> None:
    """`dvc status` on a copy with another prompt: nothing before finetune changed, finetune did, and
    every stage after it reads finetune's output (so `dvc repro` runs exactly finetune and after)."""
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo, symlinks=True)
    template = yaml.safe_load((repo / "params.yaml").read_text())["contract"]["prompt"]["template"]
    edit_yaml(repo / "params.yaml", {"contract.prompt.template": "Look closely. " + template})
    status = json.loads(run(["dvc", "status", "--json"], repo).stdout)
    assert min(STAGES.index(s) for s in status) == STAGES.index("finetune")
    changed = [c["changed deps"] for c in status["finetune"] if isinstance(c, dict) and "changed deps" in c]
    assert changed == [{"params.yaml": {"contract.prompt.template": "modified"}}]
    assert downstream("finetune", repo) == set(STAGES[STAGES.index("finetune"):])


def test_canvas_size_change_starts_at_resize256(tiny_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo, symlinks=True)
    edit_yaml(repo / "params.yaml", {"contract.canvas.size": 224})
    status = json.loads(run(["dvc", "status", "--json"], repo).stdout)
    # the first stage DVC finds changed is resize256; download is untouched, everything after reads its output
    assert "download" not in status
    assert min(STAGES.index(s) for s in status) == STAGES.index("resize256")


def test_default_remote_round_trips_data_and_models(tiny_repo: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "work" / "repo"
    shutil.copytree(tiny_repo, repo, symlinks=True)
    shutil.copy(ROOT / ".dvc/config", repo / ".dvc/config")  # the shipped remote
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # DVC expands ~ in the remote's url: keep it in the test
    run(["dvc", "push"], repo)
    remote = tmp_path / "home/.cache/smolvlm-elements/dvc-remote"
    assert any(remote.rglob("*")), "the default remote is ~/.cache/smolvlm-elements/dvc-remote, whatever the folder"
    shutil.rmtree(repo / ".dvc/cache")
    for out in ("data/resize256", "models/finetune", "models/quantize_q8"):
        shutil.rmtree(repo / out)
    run(["dvc", "pull"], repo)
    assert json.loads(run(["dvc", "status", "--json"], repo).stdout) == {}
    assert (repo / "models/quantize_q8/text-q8_0.gguf").stat().st_size > 0
