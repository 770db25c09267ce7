"""An untrained model never ships: release refuses it as a QUALITY failure, and eval_parity does not call it parity.

One pipeline run (tests/conftest `make_repo`, the tiny params, `finetune.lr: 0`): the model keeps its
random weights, so every runtime gives the same invalid answers. The runtimes agree, so the parity
gates pass; the quality gate (release.min_accuracy) stops the release and says what to try.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TINY, make_repo, run

pytestmark = pytest.mark.slow


def test_untrained_model_is_refused_by_the_quality_gate_not_parity(tmp_path: Path) -> None:
    # one epoch: with lr 0 more epochs change nothing but the time
    repo = make_repo(tmp_path / "repo", {**TINY, "finetune.lr": 0.0, "finetune.epochs": 1})
    res = run(["dvc", "repro"], repo, check=False)
    out = res.stdout + res.stderr
    print(out[-3000:])
    assert res.returncode != 0 and "Traceback" not in out
    # eval_parity passed: the runtimes agree on every photo, whatever the model answers
    assert "eval_parity: parity gates pass" in res.stdout and "PARITY gate failed" not in out
    parity = json.loads((repo / "metrics/parity.json").read_text())
    assert parity["agreement"] == {"f16": 1.0, "q8_0": 1.0}
    assert parity["invalid_rate"]["q8_0_only"] == 0.0
    assert parity["accuracy"]["q8_0"] < 0.6
    # release refused, as a quality failure, naming the gate and what to change
    assert "release: QUALITY gate failed (not parity" in res.stderr
    assert "< release.min_accuracy 0.6" in res.stderr and "release.min_class_accuracy" in res.stderr
    for param in ("finetune.epochs 1", "finetune.lr 0.0", "base.source"):
        assert param in res.stderr, param
    assert not (repo / "models/release/model.gguf").exists()
    assert (repo / "metrics/release/confusion.png").exists()  # the review plots say what went wrong
