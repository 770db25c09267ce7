"""The project as tests and benchmarks use it: its params, the one throwaway-repo builder, the tiny model spec."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from src.config.contract import Contract
from src.config.paths import ROOT
from src.data.files import read_jsonl
from testkit.http_server import wait_for

BIN = Path(sys.executable).parent
# The params every test starts from: the project's own, kept with the tests. The working params.yaml is the
# user's (pointed at their photos, committed in their clone); a test that read it would test their choices.
PARAMS_FILE = ROOT / "tests" / "params.yaml"
# Under CI a test that cannot run here (no sshd, a package missing) fails: a green CI run ran every test.
CI = os.environ.get("CI", "").lower() in ("true", "1")

# Tiny but real: the demo's small model and stages, on half the photos. Fewer steps than this
# leave the answers near ties, where Q8_0 rounding flips them (random weights make near ties).
TINY = {
    "download.demo.n": 100,
    "split.val": 0.2,
    "split.test": 0.2,
    "finetune.epochs": 10,
    "finetune.batch_size": 4,
    "eval_parity.arm64.sample": 5,  # one photo a class on each arm64 variant: emulation costs seconds a photo
}


# The SmolVLM every test builds in-process (src.config.settings.Builder fields; as a dict, so importing this file
# does not import transformers): the smallest model the demo geometry (contract.vision) takes.
TINY_MODEL = {"vision_hidden": 32, "vision_layers": 1, "vision_heads": 2, "patch": 8, "scale_factor": 2,
              "text_hidden": 32, "text_layers": 1, "text_heads": 2, "text_kv_heads": 1, "seed": 0}


def project_params() -> dict[str, Any]:
    """A fresh copy of the tests' params (tests/params.yaml)."""
    return yaml.safe_load(PARAMS_FILE.read_text())


def params_for(stage: str) -> dict[str, Any]:
    """What `src.config.params.stage_params(stage)` hands the stage, read from the tests' params instead of params.yaml."""
    from src.config.params import declared_keys, select

    return select(project_params(), declared_keys(stage, ROOT / "dvc.yaml"), PARAMS_FILE)


def set_param(params: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        params = params[p]
    params[leaf] = value


def edit_yaml(path: Path, changes: dict[str, Any]) -> None:
    """Set dotted keys in a YAML file (a repo's params.yaml), as a user editing it would."""
    tree = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        set_param(tree, key, value)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))


def run(cmd: list[str], cwd: Path, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(cwd), **(env or {})}
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    return res


def kill_midway(script: str, args: list[str], journal: Path, rows: int, timeout_s: float) -> list[dict]:
    """Run `python -c script *args` (from the repo root) in its own process group, SIGKILL the whole
    group (a stage and its pool workers) once `journal` holds `rows` rows, and return the journal."""
    proc = subprocess.Popen([sys.executable, "-c", script, *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert wait_for(lambda: len(read_jsonl(journal)) >= rows, timeout_s=timeout_s)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return read_jsonl(journal)


def stale_after(repo: Path, tmp_path: Path, edit: str, old: str, new: str) -> set[str]:
    """The stages `dvc status` names in a copy of a reproduced repo after replacing `old` by `new` in `edit`."""
    copy = tmp_path / "copy"
    shutil.copytree(repo, copy, symlinks=True)
    f = copy / edit
    assert old in f.read_text()
    f.write_text(f.read_text().replace(old, new))
    return set(json.loads(run(["dvc", "status", "--json"], copy).stdout or "{}"))


def copy_project(dest: Path, overrides: dict[str, Any], stages: tuple[str, ...] | None = None) -> Path:
    """This project's code, pipeline and params (with overrides) in `dest`: enough to run a stage there.

    `stages` keeps only those dvc.yaml stages (a repo for part of the pipeline).
    """
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("runtime.yaml", ".dvcignore", "data/label_overrides.csv"):  # tracked inputs, not DVC outputs
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, dest / name)
    shutil.copytree(ROOT / "data" / "sources", dest / "data" / "sources")  # the sources' empty placeholders
    dvc = (ROOT / "dvc.yaml").read_text()
    if stages is not None:
        tree = yaml.safe_load(dvc)
        tree["stages"] = {k: v for k, v in tree["stages"].items() if k in stages}
        dvc = yaml.safe_dump(tree, sort_keys=False)
    (dest / "dvc.yaml").write_text(dvc)
    params = project_params()
    for k, v in overrides.items():
        set_param(params, k, v)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # the converter lives in the project's .cache, the sdist beside it (the arm64 probe's sources):
    # link them rather than unpack or download them again
    (dest / ".cache").mkdir(exist_ok=True)
    for vendor in [*(ROOT / ".cache").glob("llama.cpp-*"), *(ROOT / ".cache").glob("sdist")]:
        (dest / ".cache" / vendor.name).symlink_to(vendor)
    (dest / ".gitignore").write_text("/.cache/\n__pycache__/\n")
    return dest


def make_repo(dest: Path, overrides: dict[str, Any], stages: tuple[str, ...] | None = None) -> Path:
    """The one throwaway repo builder: copy_project, then a fresh git + DVC repo with one commit."""
    copy_project(dest, overrides, stages)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    for cmd in (["git", "init", "-q"], [*git, "commit", "-q", "--allow-empty", "-m", "init"], ["dvc", "init", "-q"],
                ["git", "add", "-A"], [*git, "commit", "-q", "-m", "tiny"]):
        run(cmd, dest)
    return dest


# The one contract every test shares: the tests' params', never the working params.yaml's.
CONTRACT = Contract.from_dict(project_params()["contract"])
