"""Each stage gets exactly the params it declares, and every param is declared somewhere."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from src.params import declared_keys, select, stage_params
from tests.conftest import ROOT

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
    assert leaves(stage_params(stage)) == declared
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
