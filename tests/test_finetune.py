"""finetune: a killed run that resumes exactly where an uninterrupted one ends."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tests.conftest import BIN


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tiny_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo, symlinks=True)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["finetune"]
    cmd = lock["cmd"].split()
    ckpt = repo / cmd[-1]
    shutil.rmtree(ckpt, ignore_errors=True)
    shutil.rmtree(repo / "models/finetune")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("epoch 2:"):  # two epochs checkpointed, the rest still to run
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert json.loads((ckpt / "state.json").read_text())["epoch"] == 2
    res = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming after epoch 2" in res.stdout
    got, want = (json.loads((r / "metrics/finetune.json").read_text()) for r in (repo, tiny_repo))
    for key in ("val_acc", "val_loss", "best_epoch", "epochs"):
        assert got[key] == want[key], key
    a, b = (load_file(r / "models/finetune/model.safetensors") for r in (repo, tiny_repo))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.mark.slow
def test_two_processes_train_like_one(tiny_repo: Path, tmp_path: Path) -> None:
    """The `accelerate launch` path on CPU (gloo via torchrun): each process takes half of every batch,
    gradients are averaged, so two processes learn what one does, up to float rounding."""
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo, symlinks=True)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["finetune"]["epochs"] = 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cmd = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["finetune"]["cmd"].split()[3:]  # after -m src.stages.finetune
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    runs = {}
    for name, launcher in (("one", ["python", "-m", "src.stages.finetune"]),
                           ("two", ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "src.stages.finetune"])):
        args = [*cmd[:2], f"out-{name}", f"m-{name}.json", f"live-{name}", f".cache/ckpt-{name}"]
        res = subprocess.run([*launcher, *args], cwd=repo, env=env, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name] = json.loads((repo / f"m-{name}.json").read_text())
    assert runs["two"]["val_acc"] == runs["one"]["val_acc"]
    assert runs["two"]["val_loss"] == pytest.approx(runs["one"]["val_loss"], rel=1e-3)
