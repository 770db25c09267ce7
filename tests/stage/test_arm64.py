"""The arm64 rung: its flags come from one place, and the cross-built probe answers as x86 llama.cpp does."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from src.config.schema import ParamsError, validate
from src.parity.ladder import arm64_sample
from src.runtime import arm64
from testkit.project import CONTRACT, ROOT, project_params

RUNTIME = yaml.safe_load((ROOT / "runtime.yaml").read_text())
PARAMS = project_params()
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())


def runtime_pins(stage: str) -> list[str]:
    return next(e["runtime.yaml"] for e in DVC["stages"][stage]["params"] if isinstance(e, dict))


def test_each_variants_march_is_stated_once_in_runtime_yaml_and_reaches_build_stage_and_card() -> None:
    marches = arm64.variants()
    assert marches == RUNTIME["llama_cpp_arm64"] and "dotprod" in marches  # the phones' baseline
    for variant, march in marches.items():
        args = arm64.cmake_args(march)
        # the kernels come from -march alone: never from the build machine
        assert f"-DGGML_CPU_ARM_ARCH={march}" in args and "-DGGML_NATIVE=OFF" in args
        assert not any("ARM_ARCH" in a for a in arm64.CMAKE)
        # a changed -march reruns the rung and the release (DVC hashes what a stage declares)
        for stage in ("eval_parity", "release"):
            assert f"llama_cpp_arm64.{variant}" in runtime_pins(stage), stage
        assert variant in arm64.QEMU_CPU
    assert set(PARAMS["eval_parity"]["arm64"]["variants"]) <= set(marches)
    assert "llama_cpp_cmake" in runtime_pins("release")  # the card names the x86 flags too


def test_the_cache_key_follows_the_march_and_the_probe_source(tmp_path: Path) -> None:
    version = RUNTIME["llama_cpp_python"]
    a, b = (arm64.build_id(version, m) for m in ("armv8.2-a+dotprod", "armv8.2-a+dotprod+i8mm"))
    assert a != b and a == arm64.build_id(version, "armv8.2-a+dotprod")
    src = shutil.copytree(arm64.PROBE_SRC, tmp_path / "probe")
    assert arm64.build_id(version, "armv8.2-a+dotprod", src) == a
    (src / "probe.cpp").write_text((src / "probe.cpp").read_text() + "\n// changed\n")
    assert arm64.build_id(version, "armv8.2-a+dotprod", src) != a


def test_llama_cpp_revision_is_the_one_the_sdist_changelog_gives_its_version(tmp_path: Path) -> None:
    log = (b"# Changelog\n\n## [Unreleased]\n\n- feat: update llama.cpp to ggml-org/llama.cpp@fffffff\n\n## [9.9.9]\n\n"
           b"- fix: x\n- feat: update llama.cpp to ggml-org/llama.cpp@abc1234\n"
           b"\n## [9.9.8]\n\n- feat: update llama.cpp to ggml-org/llama.cpp@0000000\n")
    (tmp_path / ".cache" / "sdist").mkdir(parents=True)
    with tarfile.open(arm64.sdist("9.9.9", tmp_path), "w:gz") as tar:
        info = tarfile.TarInfo("llama_cpp_python-9.9.9/CHANGELOG.md")
        info.size = len(log)
        tar.addfile(info, io.BytesIO(log))
    assert arm64.llama_cpp_revision("9.9.9", tmp_path) == "abc1234"  # its own section: not Unreleased's, not 9.9.8's
    assert arm64.llama_cpp_revision("9.9.7", tmp_path) == "unknown"


def test_the_sample_takes_the_classes_in_turn() -> None:
    rows = [{"id": f"{e}{i}", "element": e} for e in ("fire", "water", "wood") for i in range(3)]
    assert arm64_sample(rows, 4, ("water", "fire", "wood")) == ["water0", "fire0", "wood0", "water1"]
    assert len(arm64_sample(rows, 50, ("water", "fire", "wood"))) == 9


def test_a_sample_with_no_variant_to_run_it_on_is_refused() -> None:
    params = project_params()
    params["eval_parity"]["arm64"]["variants"] = []
    with pytest.raises(ParamsError) as e:
        validate(params)
    assert e.value.lines == ["params.yaml: eval_parity.arm64.variants = []: a sample to run needs a variant to run it "
                             "on; expected at least one of runtime.yaml llama_cpp_arm64's variants (or sample: 0)"]
    params["eval_parity"]["arm64"]["sample"] = 0
    validate(params)


# ---- the probe itself, cross-built and run under qemu on the tiny pipeline's GGUFs ----------------------

def q8(repo: Path) -> tuple[Path, Path]:
    from src.config.artifacts import mmproj_of, text_gguf

    return text_gguf(repo / "models/quantize_q8", "q8_0"), mmproj_of(repo / "models/convert_gguf")


def canvases(repo: Path, n: int) -> list[Image.Image]:
    rows = [json.loads(x) for x in (repo / "data/split/test.jsonl").read_text().splitlines()][:n]
    return [Image.open(repo / "data/resize256" / r["canvas"]).convert("RGB") for r in rows]


@pytest.mark.slow
def test_the_tiny_pipeline_runs_the_rung_and_the_card_names_the_kernels(tiny_repo: Path) -> None:
    parity = json.loads((tiny_repo / "metrics/parity.json").read_text())
    arm = parity["arm64"]
    assert set(arm["variants"]) == set(PARAMS["eval_parity"]["arm64"]["variants"]) and arm["n"] >= 1
    for variant, r in arm["variants"].items():
        assert r["march"] == RUNTIME["llama_cpp_arm64"][variant]
        assert r["agreement"] == {"hf": 1.0, "x86_q8_0": 1.0}, variant
    assert "seconds" not in json.dumps(arm)  # no clocks in outputs
    card = json.loads((tiny_repo / "models/release/model_card.json").read_text())["runtime"]["kernels"]
    assert card["x86"]["cmake"] == RUNTIME["llama_cpp_cmake"]
    assert {v: k["march"] for v, k in card["arm64"].items()} == {v: RUNTIME["llama_cpp_arm64"][v] for v in arm["variants"]}
    assert card["llama_cpp_revision"] != "unknown"


@pytest.mark.slow
def test_the_arm64_probe_answers_as_x86_llama_cpp_and_a_changed_prompt_does_not(tiny_repo: Path) -> None:
    from src.runtime.llama_vlm import LlamaVLM

    contract = CONTRACT
    gen, n_ctx = contract.generation, PARAMS["eval_parity"]["n_ctx"]
    images = canvases(tiny_repo, 2)
    probe = arm64.build({"dotprod": RUNTIME["llama_cpp_arm64"]["dotprod"]}, RUNTIME["llama_cpp_python"])["dotprod"]
    with LlamaVLM(*q8(tiny_repo), n_ctx=n_ctx) as v:
        prompt = contract.prompt_for(v.marker())
        x86 = [v.generate(prompt, c, gen) for c in images]
    arm = arm64.run(probe, "dotprod", *q8(tiny_repo), prompt, images, gen.max_new_tokens, n_ctx)
    kernels = []
    for a, x in zip(arm, x86):
        assert (a.tokens, a.text, a.stopped) == (x.tokens, x.text, x.stopped)
        # same weights and graph, other kernels (NEON dot product vs AVX2): only the rounding differs
        # (measured: up to 0.018 on the tiny pipeline and on the demo)
        kernels.append(float(np.abs(a.first_logits - x.first_logits).max()))
        assert kernels[-1] < 0.05
    # the comparison can fail: a stray space in the prompt moves the first-token logits by more than the
    # kernels do (measured: 0.047 and 0.19 on two tiny pipelines, against 0.013 to 0.018 for the kernels)
    head, last = prompt.rsplit("\n", 1)
    moved = arm64.run(probe, "dotprod", *q8(tiny_repo), f"{head}\n {last}", images[:1], gen.max_new_tokens, n_ctx)
    assert np.abs(moved[0].first_logits - x86[0].first_logits).max() > 2 * max(kernels)


@pytest.mark.slow
def test_a_probe_on_a_core_without_its_instructions_fails_naming_the_variant_and_the_core(tiny_repo: Path) -> None:
    """Cortex-A76 has dot product but no i8mm: the i8mm build must trap there, so the dotprod rung on it proves
    the baseline phones' instruction set and not more."""
    from src.runtime.llama_vlm import LlamaVLM

    contract = CONTRACT
    prompt, n_ctx = contract.prompt_for(LlamaVLM.marker()), PARAMS["eval_parity"]["n_ctx"]
    probe = arm64.build({"i8mm": RUNTIME["llama_cpp_arm64"]["i8mm"]}, RUNTIME["llama_cpp_python"])["i8mm"]
    args = (*q8(tiny_repo), prompt, canvases(tiny_repo, 1), contract.generation.max_new_tokens, n_ctx)
    assert len(arm64.run(probe, "i8mm", *args)) == 1  # on its own core (qemu's `max`) it runs
    with pytest.raises(arm64.Arm64Error, match="the i8mm probe failed under qemu-aarch64 -cpu cortex-a76"):
        arm64.run(probe, "i8mm", *args, cpu="cortex-a76")
