"""The preflight `python -m src.tools.check` (`make check`, run by `make repro` before `dvc repro`).

DVC reads params.yaml and every source path before a stage can speak, so without the check a missing
folder is DVC's `[Errno 2] No such file or directory` and an empty params.yaml DVC's `failed to parse
'stages.download.deps'`. Each case here runs in its own project copy with its own params.yaml.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from src.tools.check import problems
from testkit.project import ROOT, copy_project


def check(project: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "src.tools.check"], cwd=project, capture_output=True, text=True)


def test_a_missing_photo_folder_is_the_schemas_one_line_and_exit_2(tmp_path: Path) -> None:
    nowhere = tmp_path / "my photos" / "elements"
    project = copy_project(tmp_path / "p", {"download.source": "folder", "download.folder.path": str(nowhere)})
    res = check(project)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.splitlines() == [  # one line, the schema's: the key, the value, why, and what to put there
        f"params.yaml: download.folder.path = {str(nowhere)!r}: no such folder; expected the folder of photos "
        "(one subfolder per class with class_subfolders: true)"]


def test_an_empty_params_yaml_is_one_line_and_exit_2(tmp_path: Path) -> None:
    project = copy_project(tmp_path / "p", {})
    (project / "params.yaml").write_text("")
    res = check(project)
    assert res.returncode == 2 and res.stderr.splitlines() == [
        "params.yaml: empty; expected the pipeline's params, a mapping of keys (contract, download, ...) "
        "(`git checkout params.yaml` restores the committed one)"]


def test_a_good_project_passes(tmp_path: Path) -> None:
    res = check(copy_project(tmp_path / "p", {}))
    assert res.returncode == 0 and res.stderr == "" and res.stdout.startswith("check: params.yaml passes the schema")


@pytest.mark.parametrize("text, line", [
    ("download: [\n", "params.yaml: not valid YAML: line 2, column 1: expected the node content, but found '<stream end>'"),
    ("- a\n- b\n", "params.yaml: a list, not a mapping of keys"),
])
def test_params_that_are_not_a_mapping_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str,
                                                    line: str) -> None:
    project = copy_project(tmp_path / "p", {})
    (project / "params.yaml").write_text(text)
    monkeypatch.chdir(project)
    got = problems(Path("params.yaml"), Path("dvc.yaml"))
    assert len(got) == 1 and got[0].startswith(line), got


def test_a_source_not_in_use_must_still_exist_as_dvc_hashes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = copy_project(tmp_path / "p", {"download.manifest.path": "data/sources/gone.csv"})  # source: demo
    monkeypatch.chdir(project)
    assert problems(Path("params.yaml"), Path("dvc.yaml")) == [
        "params.yaml: download.manifest.path = 'data/sources/gone.csv': no such file or folder; expected an existing "
        "path (dvc.yaml lists it as a dep of stage download; a source not in use keeps its empty placeholder under "
        "data/sources/)"]


def test_make_repro_runs_the_check_before_dvc() -> None:
    # -n prints the recipe without running it: the check must come first, or DVC's message reaches the user
    lines = subprocess.run(["make", "-n", "repro"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines()
    check_at = next(i for i, x in enumerate(lines) if x.endswith("-m src.tools.check"))
    assert check_at < next(i for i, x in enumerate(lines) if x.endswith("dvc repro"))
