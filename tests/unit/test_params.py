"""Each stage gets exactly the params it declares, and every param is declared somewhere."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from src.config.params import declared as declared_params
from src.config.params import declared_keys, select, stage_params
from src.config.schema import COMMANDS, ParamsError, validate
from testkit.project import PARAMS_FILE, ROOT, copy_project, project_params, set_param

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PARAMS = project_params()


def leaves(tree: dict[str, Any], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for k, v in tree.items():
        out |= leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
    return out


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """dvc.yaml, runtime.yaml and the tests' params as params.yaml: where stage_params reads them."""
    root = tmp_path_factory.mktemp("project")
    for name in ("dvc.yaml", "runtime.yaml"):
        shutil.copy(ROOT / name, root / name)
    shutil.copy(PARAMS_FILE, root / "params.yaml")
    return root


def test_the_tests_params_have_exactly_the_keys_of_params_yaml() -> None:
    """The values of params.yaml are the user's; its keys are the project's, and the tests' file follows them."""
    assert leaves(PARAMS) == leaves(yaml.safe_load((ROOT / "params.yaml").read_text()))


@pytest.mark.parametrize("stage", list(DVC["stages"]))
def test_stage_gets_exactly_its_declared_leaves(stage: str, project: Path) -> None:
    declared = set(declared_keys(stage, ROOT / "dvc.yaml"))
    runtime = {f"runtime.{k}" for k in declared_params(stage, ROOT / "dvc.yaml").get("runtime.yaml", [])}
    assert leaves(stage_params(stage, project)) == declared | runtime
    assert declared <= leaves(PARAMS), f"{stage} declares params that params.yaml lacks"


def test_declarations_are_leaves() -> None:
    for stage in DVC["stages"]:
        for key in declared_keys(stage, ROOT / "dvc.yaml"):
            assert key in leaves(PARAMS), f"{stage}: {key} is not a leaf of params.yaml"


def test_every_param_is_read_by_some_stage() -> None:
    used = {k for s in DVC["stages"] for k in declared_keys(s, ROOT / "dvc.yaml")}
    commands = {k for k in leaves(PARAMS) if k.split(".")[0] in COMMANDS}  # read by a command, not a stage
    assert leaves(PARAMS) - used - commands == set()
    assert not used & commands, "a stage declares a command's param: it would rerun on a tolerance change"


def test_undeclared_key_is_a_key_error(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="no param"):
        select({"a": {"b": 1}}, ["a.c"], tmp_path / "params.yaml")
    assert select({"a": {"b": 1, "c": 2}}, ["a.b"], tmp_path / "params.yaml") == {"a": {"b": 1}}


# ---- the schema: a user's typo is one line, exit 2, before any work --------------------------------

BAD: list[tuple[dict[str, Any], str]] = [
    # (overrides, the whole line: the key, the value as written, the cause, and what was expected)
    ({"contract.canvas.resample": "nearest"},
     "contract.canvas.resample = 'nearest': not a known value; expected one of bilinear, lanczos, skia_bilinear"),
    ({"contract.canvas.alpha": "composite_white"},
     "contract.canvas.alpha = 'composite_white': not a known value; expected one of composite_black, drop"),
    ({"contract.canvas.exif": "rotate"},
     "contract.canvas.exif = 'rotate': not a known value; expected one of ignore, apply"),
    ({"contract.vision.longest_edge": 64},
     "contract.vision.longest_edge = 64: below 2 x tile (128): transformers and llama.cpp would lay the image out "
     "differently; expected at least 128"),
    ({"contract.labels": ["water", "water", "fire"]},
     "contract.labels = ['water', 'water', 'fire']: labels repeat; expected distinct labels"),
    ({"contract.prompt.template": "Classify this image.\nElement:"},
     "contract.prompt.template = 'Classify this image.\\nElement:': the image placeholder must appear exactly once; "
     "expected one {image} (rendered as each runtime's image marker)"),
    ({"download.source": "foldr"},
     "download.source = 'foldr': not a known value; expected one of demo, manifest, folder, hf"),
    ({"download.source": "folder", "download.folder.path": "no/such/folder"},
     "download.folder.path = 'no/such/folder': no such folder; expected the folder of photos "
     "(one subfolder per class with class_subfolders: true)"),
    ({"download.source": "manifest", "download.manifest.path": "urls.csv"},
     "download.manifest.path = 'urls.csv': no such file; expected an existing .csv or .jsonl URL list"),
    ({"download.http.workers": 0},
     "download.http.workers = 0: should be greater than or equal to 1; expected >= 1"),
    ({"resize256.workers": -1},
     "resize256.workers = -1: should be greater than or equal to 0; expected >= 0"),
    ({"label.provider": "techer"},
     "label.provider = 'techer': not a known value; expected one of manifest, teacher"),
    ({"label.teacher.mode": "onlin"},
     "label.teacher.mode = 'onlin': not a known value; expected one of online, batch"),
    ({"label.teacher.base_url": "api.openai.com/v1"},
     "label.teacher.base_url = 'api.openai.com/v1': should match pattern '^https?://\\S+$'; expected an http(s) URL"),
    ({"label.teacher.api_key_env": "sk-proj-abc123"},  # the value is hidden: it looks like the key itself
     "label.teacher.api_key_env = '<hidden>': not an environment variable name (is it the key itself?); "
     "expected the NAME of the variable that holds the key, e.g. OPENAI_API_KEY"),
    ({"split.test": 1.5},
     "split.test = 1.5: should be less than 1; expected < 1.0"),
    ({"split.val": 0.5, "split.test": 0.5},
     "split.test = 0.5: val + test = 1 leaves nothing to train on; expected val + test below 1 (e.g. test 0.15)"),
    ({"finetune.lr": "1e-3"},  # YAML 1.1 reads 1e-3 (no dot) as a string
     "finetune.lr = '1e-3': a str; expected a number"),
    ({"finetune.epochs": 0},
     "finetune.epochs = 0: should be greater than or equal to 1; expected >= 1"),
    ({"finetune.batch_size": 2.5},
     "finetune.batch_size = 2.5: a float; expected an integer"),
    ({"finetune.epoch": 8},  # misspelt: refused, not silently ignored
     "finetune.epoch = 8: unknown key (did you mean 'epochs'?); expected one of lora, train_full, "
     "train_answer_tokens, feature_cache, epochs, batch_size, lr, seed"),
    ({"base.source": "hub"},
     "base.revision = '': a hub model must be pinned to a commit (a branch moves); expected a 40-hex commit sha: "
     "`hf models info HuggingFaceTB/SmolVLM-256M-Instruct --expand sha`, or "
     "https://huggingface.co/HuggingFaceTB/SmolVLM-256M-Instruct/commits/main (copy the full commit id)"),
    ({"convert_gguf.text_outtypes": ["f16"]},
     "convert_gguf.text_outtypes = ['f16']: quantize_q8 reads f32 and eval_parity's f16 rung reads f16; "
     "expected [f32, f16]"),
    ({"quantize_q8.ftype": "q4_0"},
     "quantize_q8.ftype = 'q4_0': not a known value; expected one of q8_0"),
    ({"eval_parity.min_agreement_q8_0": 1.2},
     "eval_parity.min_agreement_q8_0 = 1.2: should be less than or equal to 1; expected <= 1.0"),
]


def with_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    params = copy.deepcopy(PARAMS)
    for k, v in overrides.items():
        set_param(params, k, v)
    return params


def key_of(line: str) -> str:
    return line.split(" = ", 1)[0]


def test_the_tests_params_are_valid() -> None:
    validate(PARAMS)


@pytest.mark.parametrize("overrides,line", BAD, ids=[key_of(line) for _, line in BAD])
def test_a_bad_value_is_one_line_naming_key_value_and_what_was_expected(overrides: dict[str, Any], line: str) -> None:
    with pytest.raises(ParamsError) as e:
        validate(with_overrides(overrides))
    assert e.value.lines == [f"params.yaml: {line}"]


def test_the_key_itself_never_appears_in_the_message() -> None:
    with pytest.raises(ParamsError) as e:
        validate(with_overrides({"label.teacher.api_key_env": "sk-proj-abc123"}))
    assert "sk-proj-abc123" not in str(e.value)


def test_a_misspelt_key_gets_a_suggestion() -> None:
    with pytest.raises(ParamsError, match=r"unknown key \(did you mean 'epochs'\?\)"):
        validate(with_overrides({"finetune.epoch": 8}))


def run_stage_with(stage: str, overrides: dict[str, Any], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    repo = copy_project(tmp_path / "repo", overrides)
    args = DVC["stages"][stage]["cmd"].split()[3:]  # the stage's own positional arguments, as dvc.yaml passes them
    return subprocess.run([sys.executable, "-m", f"src.stages.{stage}", *args], cwd=repo, capture_output=True, text=True)


# Every stage, each given a different bad value, none in the stage's own section: every stage validates the
# whole file, so nothing runs on a broken params.yaml. The heavy stages import torch first (seconds each).
STAGE_CASES = {stage: next(c for c in BAD[n:] + BAD[:n] if not key_of(c[1]).startswith(stage + "."))
               for n, stage in enumerate(DVC["stages"])}


def test_a_stage_with_bad_params_exits_2_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    """The real stage, in a copy of the repository whose params.yaml has a typo in another stage's section."""
    res = run_stage_with("download", {"label.teacher.mode": "onlin"}, tmp_path)
    assert (res.returncode, res.stderr.strip().splitlines()) == (
        2, ["params.yaml: label.teacher.mode = 'onlin': not a known value; expected one of online, batch"])


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(STAGE_CASES))
def test_every_stage_exits_2_with_the_one_line_for_its_bad_value(stage: str, tmp_path: Path) -> None:
    overrides, line = STAGE_CASES[stage]
    res = run_stage_with(stage, overrides, tmp_path)
    assert (res.returncode, res.stderr.strip().splitlines()) == (2, [f"params.yaml: {line}"])


def test_empty_default_folder_is_one_line_naming_the_param(tmp_path: Path) -> None:
    repo = copy_project(tmp_path / "repo", {"download.source": "folder"})  # the placeholder data/sources/photos
    res = subprocess.run([sys.executable, "-m", "src.stages.download", "data/download", "m.json"],
                         cwd=repo, capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip() == ("params.yaml: download.folder.path = 'data/sources/photos': no photos in it; "
                                  "expected photos in one subfolder per class (water/, land/, fire/, wood/, metal/)")


def test_build_flags_are_checked_against_the_venvs_record_and_arm64_flags_are_not_a_distribution() -> None:
    from src.config.params import runtime_mismatches

    built = (Path(sys.prefix) / "llama_cpp_cmake").read_text().strip()  # make setup records it
    assert runtime_mismatches({"llama_cpp_cmake": built, "llama_cpp_arm64": {"dotprod": "armv8.2-a+dotprod"}}) == []
    (line,) = runtime_mismatches({"llama_cpp_cmake": "-DGGML_NATIVE=ON"})
    assert line == (f"runtime.yaml: llama_cpp_cmake = '-DGGML_NATIVE=ON': installed is {built}; expected the pinned "
                    "build (run `make setup`, which installs runtime.yaml's pins)")
