"""The llama.cpp that proves parity is the portable build runtime.yaml states, on any x86 machine."""

from __future__ import annotations

import sys
from pathlib import Path

import llama_cpp
import pytest
import yaml

from src.config.params import LLAMA_CPP_CMAKE, installed, stage_params
from src.model.torch_pin import PIN
from testkit.project import ROOT, copy_project, run, stale_after

PINNED = yaml.safe_load((ROOT / "runtime.yaml").read_text())[LLAMA_CPP_CMAKE]


def test_the_venv_runs_the_pinned_portable_build_with_no_avx512_and_no_amx() -> None:
    assert installed(LLAMA_CPP_CMAKE) == PINNED  # what `make setup` built the wheel with
    assert "-DGGML_NATIVE=OFF" in PINNED.split()
    info = llama_cpp.llama_print_system_info().decode()
    features = {k.strip(): v.strip() for k, _, v in (f.partition("=") for f in info.split("|")) if v}
    assert features.get("CPU : SSE3") == "1" and features.get("AVX2") == "1" and features.get("FMA") == "1", info
    assert not [k for k in features if "AVX512" in k or "AMX" in k], info  # the kernels a phone-agnostic proof may not use


def test_a_parity_stage_refuses_a_llama_cpp_built_otherwise(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = copy_project(tmp_path / "repo", {})
    pins = root / "runtime.yaml"
    pins.write_text(pins.read_text().replace(PINNED, "-DGGML_NATIVE=ON"))
    assert "runtime" in stage_params("convert_gguf", root)  # the converter is Python: the build is not its pin
    for stage in ("eval_parity", "release"):
        with pytest.raises(SystemExit) as e:
            stage_params(stage, root)
        assert e.value.code == 2
        assert capsys.readouterr().err.strip() == (
            f"runtime.yaml: llama_cpp_cmake = '-DGGML_NATIVE=ON': installed is {PINNED}; expected the pinned "
            "build (run `make setup`, which installs runtime.yaml's pins)")


@pytest.mark.slow
def test_other_build_flags_reprove_parity_and_nothing_upstream(tiny_repo: Path, tmp_path: Path) -> None:
    assert stale_after(tiny_repo, tmp_path, "runtime.yaml", PINNED, PINNED + " -DGGML_LLAMAFILE=OFF") \
        == {"eval_parity", "release"}


@pytest.mark.slow
def test_eval_parity_gives_the_same_bytes_on_one_thread_and_on_two(tiny_repo: Path, tmp_path: Path) -> None:
    """Threads split llama.cpp's and torch's work differently; the parity figures must not move by a bit."""
    cmd = yaml.safe_load((tiny_repo / "dvc.lock").read_text())["stages"]["eval_parity"]["cmd"].split()
    outs = cmd[-3:]  # metrics, per-image CSV, confusion: written to a folder per thread count
    got = {}
    for threads in ("1", "2"):
        out = tmp_path / threads
        out.mkdir()
        run([*cmd[:-3], *(str(out / Path(o).name) for o in outs)], tiny_repo, env={"OMP_NUM_THREADS": threads})
        got[threads] = {Path(o).name: (out / Path(o).name).read_bytes() for o in outs}
    assert got["1"] == got["2"]
    assert got["1"]["parity.json"] == (tiny_repo / outs[0]).read_bytes()  # and the same as dvc repro's own run


@pytest.mark.parametrize("stage", ["finetune", "eval_parity"])
def test_the_stages_whose_bits_are_compared_run_torch_on_pinned_avx2_kernels(stage: str) -> None:
    """ATen, oneDNN and MKL pick kernels per CPU; these stages pin them before torch loads (src/model/torch_pin.py)."""
    code = (f"import os, src.stages.{stage}, torch; "
            f"print(torch.backends.cpu.get_cpu_capability(), *(os.environ.get(k) for k in {sorted(PIN)!r}))")
    res = run([sys.executable, "-c", code], ROOT, env={k: "" for k in PIN})  # whatever the caller had set
    assert res.stdout.split() == ["AVX2", *(PIN[k] for k in sorted(PIN))]
