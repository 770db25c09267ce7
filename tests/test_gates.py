"""The release gates: each rung fails on its own, names itself and its images, and passes at the threshold."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from src.gates import gates
from tests.conftest import ROOT

G = yaml.safe_load((ROOT / "params.yaml").read_text())["eval_parity"]
GREEN = {"eos": {"ok": True, "contract": "<e>", "hf": "<e>", "gguf": "<e>"},
         "layout": {"identical_rate": G["min_layout_identical_rate"]},
         "agreement": {"f16": G["min_agreement_f16"], "q8_0": G["min_agreement_q8_0"]},
         "invalid_rate": {"q8_0": G["max_invalid_rate_q8_0"]}}


def broken(path: str, value: Any) -> dict[str, Any]:
    m = copy.deepcopy(GREEN)
    a, b = path.split(".")
    m[a][b] = value
    return m


def test_metrics_at_the_thresholds_pass() -> None:
    assert gates(GREEN, G, {}) == []


@pytest.mark.parametrize(("path", "value", "rung", "offenders"), [
    ("eos.ok", False, "rung eos", None),
    ("layout.identical_rate", 0.5, "rung layout", "layout"),
    ("agreement.f16", 0.5, "rung agreement.f16", "f16"),
    ("agreement.q8_0", 0.5, "rung agreement.q8_0", "q8_0"),
    ("invalid_rate.q8_0", 0.5, "rung invalid_rate.q8_0", "invalid_q8_0"),
])
def test_each_rung_fails_alone_and_names_its_images(path: str, value: Any, rung: str, offenders: str | None) -> None:
    ids = [f"img{i}" for i in range(12)]
    fails = gates(broken(path, value), G, {offenders: ids} if offenders else {})
    assert len(fails) == 1 and fails[0].startswith(rung)
    if offenders:
        assert "(12 images: img0, " in fails[0] and "img9 ..." in fails[0] and "img10" not in fails[0]


def test_every_failed_rung_is_reported() -> None:
    m = broken("agreement.q8_0", 0.0)
    m["eos"]["ok"] = False
    assert [f.split(":")[0] for f in gates(m, G, {})] == ["rung eos", "rung agreement.q8_0"]
