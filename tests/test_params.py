"""Each stage gets exactly the params it declares, and every param is declared somewhere."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from src.params import declared as declared_params
from src.params import declared_keys, select, stage_params
from src.schema import ParamsError, validate
from tests.conftest import ROOT, copy_project, set_param

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def leaves(tree: dict[str, Any], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for k, v in tree.items():
        out |= leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
    return out


@pytest.mark.parametrize("stage", list(DVC["stages"]))
def test_stage_gets_exactly_its_declared_leaves(stage: str) -> None:
    declared = set(declared_keys(stage, ROOT / "dvc.yaml"))
    runtime = {f"runtime.{k}" for k in declared_params(stage, ROOT / "dvc.yaml").get("runtime.yaml", [])}
    assert leaves(stage_params(stage)) == declared | runtime
    assert declared <= leaves(PARAMS), f"{stage} declares params that params.yaml lacks"


def test_declarations_are_leaves() -> None:
    for stage in DVC["stages"]:
        for key in declared_keys(stage, ROOT / "dvc.yaml"):
            assert key in leaves(PARAMS), f"{stage}: {key} is not a leaf of params.yaml"


def test_every_param_is_read_by_some_stage() -> None:
    used = {k for s in DVC["stages"] for k in declared_keys(s, ROOT / "dvc.yaml")}
    assert leaves(PARAMS) - used == set()


def test_undeclared_key_is_a_key_error(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="no param"):
        select({"a": {"b": 1}}, ["a.c"], tmp_path / "params.yaml")
    assert select({"a": {"b": 1, "c": 2}}, ["a.b"], tmp_path / "params.yaml") == {"a": {"b": 1}}


# ---- the schema: a user's typo is one line, exit 2, before any work --------------------------------

BAD: list[tuple[dict[str, Any], str]] = [
    # (overrides, the key the one line must name)
    ({"contract.canvas.resample": "nearest"}, "contract.canvas.resample"),
    ({"contract.canvas.alpha": "composite_white"}, "contract.canvas.alpha"),
    ({"contract.canvas.exif": "rotate"}, "contract.canvas.exif"),
    ({"contract.vision.longest_edge": 64}, "contract.vision.longest_edge"),
    ({"contract.labels": ["water", "water", "fire"]}, "contract.labels"),
    ({"contract.prompt.template": "Classify this image.\nElement:"}, "contract.prompt.template"),
    ({"download.source": "foldr"}, "download.source"),
    ({"download.source": "folder", "download.folder.path": "no/such/folder"}, "download.folder.path"),
    ({"download.source": "manifest", "download.manifest.path": "urls.csv"}, "download.manifest.path"),
    ({"download.http.workers": 0}, "download.http.workers"),
    ({"resize256.workers": -1}, "resize256.workers"),
    ({"label.provider": "techer"}, "label.provider"),
    ({"label.teacher.mode": "onlin"}, "label.teacher.mode"),
    ({"label.teacher.base_url": "api.openai.com/v1"}, "label.teacher.base_url"),
    ({"label.teacher.api_key_env": "sk-proj-abc123"}, "label.teacher.api_key_env"),
    ({"split.test": 1.5}, "split.test"),
    ({"split.val": 0.5, "split.test": 0.5}, "split.test"),
    ({"finetune.lr": "1e-3"}, "finetune.lr"),  # YAML 1.1 reads 1e-3 (no dot) as a string
    ({"finetune.epochs": 0}, "finetune.epochs"),
    ({"finetune.batch_size": 2.5}, "finetune.batch_size"),
    ({"finetune.epoch": 8}, "finetune.epoch"),  # misspelt: refused, not silently ignored
    ({"base.source": "hub"}, "base.revision"),
    ({"convert_gguf.text_outtypes": ["f16"]}, "convert_gguf.text_outtypes"),
    ({"quantize_q8.ftype": "q4_0"}, "quantize_q8.ftype"),
    ({"eval_parity.min_agreement_q8_0": 1.2}, "eval_parity.min_agreement_q8_0"),
]


def with_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    params = copy.deepcopy(PARAMS)
    for k, v in overrides.items():
        set_param(params, k, v)
    return params


def test_params_yaml_is_valid() -> None:
    validate(PARAMS)


@pytest.mark.parametrize("overrides,key", BAD, ids=[k for _, k in BAD])
def test_a_bad_value_is_one_line_naming_key_value_and_what_was_expected(overrides: dict[str, Any], key: str) -> None:
    with pytest.raises(ParamsError) as e:
        validate(with_overrides(overrides))
    assert len(e.value.lines) == 1, e.value.lines
    line = e.value.lines[0]
    assert line.startswith(f"params.yaml: {key} = ") and "; expected " in line, line


def test_the_key_itself_never_appears_in_the_message() -> None:
    with pytest.raises(ParamsError) as e:
        validate(with_overrides({"label.teacher.api_key_env": "sk-proj-abc123"}))
    assert "sk-proj-abc123" not in str(e.value)


def test_a_misspelt_key_gets_a_suggestion() -> None:
    with pytest.raises(ParamsError, match=r"unknown key \(did you mean 'epochs'\?\)"):
        validate(with_overrides({"finetune.epoch": 8}))


@pytest.mark.parametrize("stage", ["download", "split", "convert_gguf"])
def test_a_stage_with_bad_params_exits_2_with_one_line_and_no_traceback(stage: str, tmp_path: Path) -> None:
    """The real stage, in a copy of the repository whose params.yaml has a typo in another stage's section:
    every stage validates the whole file, so nothing runs on a broken params.yaml."""
    repo = copy_project(tmp_path / "repo", {"label.teacher.mode": "onlin"})
    args = DVC["stages"][stage]["cmd"].split()[3:]  # the stage's own positional arguments, as dvc.yaml passes them
    res = subprocess.run([sys.executable, "-m", f"src.stages.{stage}", *args], cwd=repo, capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "params.yaml: label.teacher.mode = 'onlin': not a known value; expected one of online, batch"]


def test_empty_default_folder_is_one_line_naming_the_param(tmp_path: Path) -> None:
    repo = copy_project(tmp_path / "repo", {"download.source": "folder"})  # the placeholder data/sources/photos
    res = subprocess.run([sys.executable, "-m", "src.stages.download", "data/download", "m.json"],
                         cwd=repo, capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip() == ("params.yaml: download.folder.path = 'data/sources/photos': no photos in it; "
                                  "expected photos in one subfolder per class (water/, land/, fire/, wood/, metal/)")


def test_build_flags_are_checked_against_the_venvs_record_and_arm64_flags_are_not_a_distribution() -> None:
    from src.params import runtime_mismatches

    built = (Path(sys.prefix) / "llama_cpp_cmake").read_text().strip()  # make setup records it
    assert runtime_mismatches({"llama_cpp_cmake": built, "llama_cpp_arm64": {"dotprod": "armv8.2-a+dotprod"}}) == []
    (line,) = runtime_mismatches({"llama_cpp_cmake": "-DGGML_NATIVE=ON"})
    assert line.startswith("runtime.yaml: llama_cpp_cmake = '-DGGML_NATIVE=ON': llama-cpp-python was built with ")
