"""The house rules that keep the layout honest: stages apart, and DVC told about every line of code a stage runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from src import deps
from src.params import ROOT


def stages() -> list[str]:
    return list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])


def test_every_stage_has_its_module_and_no_other_module_is_a_stage() -> None:
    modules = {p.stem for p in (ROOT / deps.STAGES).glob("*.py") if p.stem != "__init__"}
    assert modules == set(stages())


def test_no_stage_imports_another_stage() -> None:
    assert deps.stage_imports_stage() == []


def test_a_stage_importing_a_stage_is_caught(tmp_path: Path) -> None:
    """The rule above can fail: a copy of src/ where split imports download."""
    shutil.copytree(ROOT / "src", tmp_path / "src")
    split = tmp_path / deps.STAGES / "split.py"
    split.write_text(split.read_text().replace("from src.params import", "from src.stages.download import run\nfrom src.params import"))
    assert deps.stage_imports_stage(tmp_path) == ["src/stages/split.py imports src/stages/download.py"]


def test_dvc_yaml_lists_exactly_the_code_each_stage_imports() -> None:
    assert deps.diff(ROOT / "dvc.yaml") == {}


def test_a_missing_transitive_import_is_caught(tmp_path: Path) -> None:
    """src/vlm.py imports src/geometry.py: finetune must list it, though finetune never names geometry."""
    assert "src/geometry.py" in deps.code_deps("finetune")
    text = (ROOT / "dvc.yaml").read_text().replace("      - src/geometry.py\n", "", 1)
    (tmp_path / "dvc.yaml").write_text(text)
    missing = {stage: m for stage, (m, _) in deps.diff(tmp_path / "dvc.yaml").items()}
    assert "src/geometry.py" in next(iter(missing.values()))


def test_write_restores_what_a_hand_edit_dropped(tmp_path: Path) -> None:
    text = (ROOT / "dvc.yaml").read_text()
    (tmp_path / "dvc.yaml").write_text(text.replace("      - src/geometry.py\n", ""))
    assert deps.write(tmp_path / "dvc.yaml") != []
    assert (tmp_path / "dvc.yaml").read_text() == text
