"""Parity and quality are judged apart: who disagrees with whom, and what to try when the model is weak."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from src.gates import class_coverage_gate, gates, quality_gates
from tests.conftest import project_params

PARAMS = project_params()
G = PARAMS["eval_parity"]
Q = PARAMS["release"]


def metrics(**over: Any) -> dict[str, Any]:
    m = {"n_test": 30, "canvas": {"max_abs_diff": 0.0}, "eos": {"ok": True, "contract": "e", "hf": "e", "gguf": "e"},
         "layout": {"identical_rate": 1.0}, "agreement": {"f16": 1.0, "q8_0": 1.0},
         "invalid_rate": {"hf": 0.0, "f16": 0.0, "q8_0": 0.0, "q8_0_only": 0.0, "every_runtime": 0.0},
         "arm64": {"n": 10, "variants": {v: {"march": f"armv8.2-a+{v}", "qemu_cpu": "max",
                                             "agreement": {"hf": 1.0, "x86_q8_0": 1.0},
                                             "invalid_rate": {"arm64": 0.0, "arm64_only": 0.0},
                                             "logits": {"kl_hf": 1e-6, "kl_hf_max": 2e-6}}
                                         for v in G["arm64"]["variants"]}}}
    for dotted, v in over.items():
        node = m
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return copy.deepcopy(m)


def test_green_ladder_passes() -> None:
    assert gates(metrics(), G, {}) == []


def test_the_same_invalid_answer_on_every_runtime_is_not_a_parity_failure() -> None:
    m = metrics(invalid_rate__hf=0.8, invalid_rate__f16=0.8, invalid_rate__q8_0=0.8, invalid_rate__every_runtime=0.8)
    assert gates(m, G, {}) == []


def test_q8_0_invalid_where_transformers_answers_is_parity() -> None:
    m = metrics(invalid_rate__q8_0=0.1, invalid_rate__q8_0_only=0.1, agreement__q8_0=0.9)
    fails = gates(m, G, {"q8_0": ["beach.jpg (transformers water, llama.cpp Q8_0 invalid ' wat')"],
                         "invalid_q8_0": ["beach.jpg (transformers water, llama.cpp Q8_0 ' wat')"]})
    assert fails == [
        "rung agreement.q8_0: 0.900 < 0.99: llama.cpp Q8_0 disagrees with transformers on 3/30 photos: "
        "beach.jpg (transformers water, llama.cpp Q8_0 invalid ' wat')",
        "rung invalid_rate.q8_0_only: 0.100 > 0.0: llama.cpp Q8_0 answers no label where transformers does on "
        "3/30 photos: beach.jpg (transformers water, llama.cpp Q8_0 ' wat')"]


def test_parity_names_which_runtime_disagrees_and_caps_the_list() -> None:
    names = [f"https://example.org/p/{i}.jpg" for i in range(12)]
    fails = gates(metrics(agreement__f16=0.6), G, {"f16": names})
    assert len(fails) == 1 and fails[0].startswith("rung agreement.f16: 0.600 < 1.0: llama.cpp F16 disagrees with "
                                                   "transformers on 12/30 photos: https://example.org/p/0.jpg, ")
    assert fails[0].endswith("https://example.org/p/9.jpg ...")


def test_quality_gates_name_overall_and_each_weak_class() -> None:
    per_class = {"fire": {"n": 6, "correct": 6, "accuracy": 1.0}, "water": {"n": 6, "correct": 1, "accuracy": 0.1667}}
    assert quality_gates(0.9, {"fire": per_class["fire"]}, Q) == []
    assert quality_gates(0.5, per_class, {"min_accuracy": 0.6, "min_class_accuracy": 0.4}) == [
        "accuracy 0.500 < release.min_accuracy 0.6 (Q8_0, test split)",
        "class water: 1/6 = 0.167 < release.min_class_accuracy 0.4"]


def test_a_class_missing_from_the_test_split_is_refused_with_the_counts() -> None:
    assert class_coverage_gate({"fire": 3, "water": 1}) is None
    msg = class_coverage_gate({"fire": 3, "water": 0, "wood": 0})
    assert msg is not None and msg.startswith("the test split has 3 photos (fire 3, water 0, wood 0): no photo of "
                                              "water, wood")
    assert "split.test" in msg and "split.min_per_class" in msg
    assert class_coverage_gate({"fire": 0}).startswith("the test split has 0 photos")  # type: ignore[union-attr]


@pytest.mark.parametrize(("dotted", "value", "rung"), [
    ("canvas__max_abs_diff", 3.0, "rung canvas"),
    ("eos__ok", False, "rung eos"),
    ("layout__identical_rate", 0.5, "rung layout"),
    ("agreement__f16", 0.5, "rung agreement.f16"),
    ("agreement__q8_0", 0.5, "rung agreement.q8_0"),
    ("invalid_rate__q8_0_only", 0.5, "rung invalid_rate.q8_0_only"),
    ("arm64__variants__dotprod__agreement__hf", 0.5, "rung arm64.dotprod.agreement.hf"),
    ("arm64__variants__dotprod__agreement__x86_q8_0", 0.5, "rung arm64.dotprod.agreement.x86_q8_0"),
    ("arm64__variants__dotprod__invalid_rate__arm64_only", 0.5, "rung arm64.dotprod.invalid_rate"),
    ("arm64__variants__dotprod__logits__kl_hf", 0.5, "rung arm64.dotprod.logits.kl_hf"),
])
def test_each_rung_fails_alone_and_passes_at_its_threshold(dotted: str, value: Any, rung: str) -> None:
    fails = gates(metrics(**{dotted: value}), G, {})
    assert len(fails) == 1 and fails[0].startswith(rung)
    at = {"canvas__max_abs_diff": G["max_canvas_abs_diff"], "layout__identical_rate": G["min_layout_identical_rate"], "agreement__f16": G["min_agreement_f16"],
          "agreement__q8_0": G["min_agreement_q8_0"], "invalid_rate__q8_0_only": G["max_invalid_rate_q8_0"],
          "arm64__variants__dotprod__agreement__hf": G["arm64"]["min_agreement_hf"],
          "arm64__variants__dotprod__agreement__x86_q8_0": G["arm64"]["min_agreement_x86_q8_0"],
          "arm64__variants__dotprod__invalid_rate__arm64_only": G["arm64"]["max_invalid_rate"],
          "arm64__variants__dotprod__logits__kl_hf": G["arm64"]["max_kl_hf"]}
    if dotted in at:
        assert gates(metrics(**{dotted: at[dotted]}), G, {}) == []


def test_arm64_rung_names_the_variant_its_march_and_the_photos() -> None:
    m = metrics(arm64__variants__i8mm__agreement__x86_q8_0=0.9)
    fails = gates(m, G, {"arm64.i8mm.q8_0": ["beach.jpg (llama.cpp Q8_0 water, llama.cpp Q8_0 arm64 i8mm fire)"]})
    assert fails == ["rung arm64.i8mm.agreement.x86_q8_0: 0.900 < 0.99: llama.cpp Q8_0 arm64 i8mm "
                     "(-march=armv8.2-a+i8mm) disagrees with llama.cpp Q8_0 (x86) on 1/10 photos: "
                     "beach.jpg (llama.cpp Q8_0 water, llama.cpp Q8_0 arm64 i8mm fire)"]


def test_a_variant_the_params_ask_for_but_the_metrics_lack_fails_and_sample_0_turns_the_rung_off() -> None:
    m = metrics()
    del m["arm64"]["variants"]["i8mm"]
    assert gates(m, G, {}) == ["rung arm64.i8mm: not in the metrics (eval_parity did not run it; rerun eval_parity)"]
    off = {**G, "arm64": {**G["arm64"], "sample": 0}}
    del m["arm64"]
    assert gates(m, off, {}) == []
