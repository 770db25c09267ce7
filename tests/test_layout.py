"""The house rules that keep the layout honest: stages apart, and DVC told about every line of code a stage runs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from src import deps
from src.params import ROOT, stage_params
from tests.conftest import copy_project, run


PINS = yaml.safe_load((ROOT / "runtime.yaml").read_text())


def bump(version: str) -> str:
    """Another version than the pin: its last number plus one."""
    *head, last = str(version).split(".")
    return ".".join([*head, str(int(last) + 1)])


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


def test_a_stale_dep_is_caught(tmp_path: Path) -> None:
    """A code dep that no import reaches (left behind when an import went) reruns the stage for nothing."""
    assert "src/llama_runtime.py" not in deps.code_deps("split")
    split = "python -m src.stages.split ${paths.label} ${paths.split}\n    deps:\n"
    text = (ROOT / "dvc.yaml").read_text()
    assert split in text
    (tmp_path / "dvc.yaml").write_text(text.replace(split, split + "      - src/llama_runtime.py\n"))
    assert deps.diff(tmp_path / "dvc.yaml") == {"split": ([], ["src/llama_runtime.py"])}


def test_relative_imports_are_followed(tmp_path: Path) -> None:
    """`from .. import x` and `from .x import y` import src files as surely as `from src import x` does."""
    shutil.copytree(ROOT / "src", tmp_path / "src")
    split = tmp_path / deps.STAGES / "split.py"
    split.write_text(split.read_text().replace("from src.params import", "from .. import geometry\nfrom src.params import"))
    (tmp_path / "src" / "geometry.py").write_text("from .teacher.request import x\n")
    found = set(deps.code_deps("split", tmp_path))
    assert {"src/geometry.py", "src/teacher/__init__.py", "src/teacher/request.py"} <= found
    assert "src/geometry.py" not in deps.code_deps("split")  # the real split imports neither


def test_write_restores_what_a_hand_edit_dropped(tmp_path: Path) -> None:
    text = (ROOT / "dvc.yaml").read_text()
    (tmp_path / "dvc.yaml").write_text(text.replace("      - src/geometry.py\n", ""))
    assert deps.write(tmp_path / "dvc.yaml") != []
    assert (tmp_path / "dvc.yaml").read_text() == text


def stale_after(repo: Path, tmp_path: Path, edit: str, old: str, new: str) -> set[str]:
    """The stages `dvc status` names in a copy of a reproduced repo after replacing `old` by `new` in `edit`."""
    copy = tmp_path / "copy"
    shutil.copytree(repo, copy, symlinks=True)
    f = copy / edit
    assert old in f.read_text()
    f.write_text(f.read_text().replace(old, new))
    return set(json.loads(run(["dvc", "status", "--json"], copy).stdout or "{}"))


@pytest.mark.slow
def test_a_llama_cpp_upgrade_reruns_conversion_and_reproves_parity_and_nothing_upstream(
        tiny_repo: Path, tmp_path: Path) -> None:
    pin = PINS["llama_cpp_python"]
    assert stale_after(tiny_repo, tmp_path, "runtime.yaml", f'llama_cpp_python: "{pin}"', f'llama_cpp_python: "{bump(pin)}"') \
        == {"convert_gguf", "quantize_q8", "eval_parity", "release"}


@pytest.mark.slow
def test_a_transformers_upgrade_reruns_training_and_everything_after(tiny_repo: Path, tmp_path: Path) -> None:
    pin = PINS["transformers"]
    stale = stale_after(tiny_repo, tmp_path, "runtime.yaml", f'transformers: "{pin}"', f'transformers: "{bump(pin)}"')
    assert "finetune" in stale and {"convert_gguf", "eval_parity", "release"} <= stale
    assert not stale & {"download", "resize256", "label", "split"}


def test_a_stage_refuses_a_runtime_other_than_the_pinned_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = copy_project(tmp_path / "repo", {})
    pins = root / "runtime.yaml"
    pin = PINS["transformers"]
    assert f'transformers: "{pin}"' in pins.read_text()
    pins.write_text(pins.read_text().replace(f'transformers: "{pin}"', 'transformers: "9.9.9"'))
    assert "runtime" not in stage_params("split", root)  # a stage that declares no pin is not held back
    with pytest.raises(SystemExit) as e:
        stage_params("finetune", root)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"runtime.yaml: transformers = '9.9.9': installed is {pin}; expected the pinned version "
        "(run `make setup`, which installs runtime.yaml's pins)")


def readme_commands(text: str) -> list[str]:
    """The README's shell lines, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [" ".join(line.split("#")[0].split()) for block in blocks for line in block.replace("\\\n", " ").splitlines()]


def test_readme_runs_stages_with_dvc_yaml_arguments_and_the_venv_python() -> None:
    """A stage run by hand from the README takes the arguments dvc.yaml gives it, and dvc only runs stages
    with the venv active (it runs the first `python` on PATH)."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    paths = dvc["vars"][0]["paths"]
    expected = {name: re.sub(r"\$\{paths\.(\w+)\}", lambda m: paths[m.group(1)], " ".join(s["cmd"].split()))
                for name, s in dvc["stages"].items()}
    commands = readme_commands((ROOT / "README.md").read_text())
    by_hand = [c for c in commands if " -m src.stages." in c]
    assert by_hand, "the README runs no stage by hand: nothing checked"
    for c in by_hand:
        stage = re.search(r"-m src\.stages\.(\w+)", c).group(1)
        assert c[c.index("-m src.stages."):] == expected[stage].split("python ", 1)[1], c
    runs_stages = [c for c in commands if re.search(r"\bdvc (repro|exp run)\b", c)]
    assert runs_stages and not [c for c in runs_stages if ".venv/bin/dvc" in c]
