"""The contract renders one prompt for both runtimes, and nothing else in src/ restates it."""

from __future__ import annotations

import ast
import hashlib
import json
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from src.config.contract import LABELS, Contract, Prompt
from src.config.paths import ROOT
from src.stages.resize256 import spec_key
from testkit.project import project_params

CONTRACT = project_params()["contract"]


def test_prompt_renders_the_app_string_with_each_runtime_marker() -> None:
    c = Contract.from_dict(CONTRACT)
    labels = ", ".join(CONTRACT["labels"])
    # The app's literal prompt (seed, SmolVLMManager.kt), written out once here as the expected value.
    app = f"<__media__>\nClassify this image into one of these elements: {labels}.\n\nElement:"
    assert c.prompt_for("<__media__>") == app
    assert c.prompt_for("<image>") == app.replace("<__media__>", "<image>")


@pytest.mark.parametrize("template", ["no image here", "{image}{image} twice"])
def test_template_must_hold_the_image_slot_once(template: str) -> None:
    """A prompt that breaks the rule cannot be constructed: render never sees one."""
    with pytest.raises(ValidationError, match="exactly once"):
        Prompt(template=template, chat_template=False)
    with pytest.raises(ValidationError, match="exactly once"):
        Contract.from_dict({**CONTRACT, "prompt": {"template": template, "chat_template": False}})


def test_labels_repeat_is_refused_once_for_both_ways_in() -> None:
    """The contract and a stage that declares only contract.labels check the labels by one rule."""
    twice = [CONTRACT["labels"][0]] * 2
    with pytest.raises(ValidationError, match="labels repeat"):
        Contract.from_dict({**CONTRACT, "labels": twice})
    with pytest.raises(ValidationError, match="labels repeat"):
        LABELS.validate_python(twice)
    assert LABELS.validate_python(CONTRACT["labels"]) == Contract.from_dict(CONTRACT).labels == tuple(CONTRACT["labels"])


def test_contract_json_round_trips(tmp_path: Path) -> None:
    c = Contract.from_dict(CONTRACT)
    (tmp_path / "contract.json").write_text(c.to_json())
    assert Contract.load(tmp_path / "contract.json") == c


def test_contract_json_and_canvas_key_keep_their_bytes() -> None:
    """contract.json (shipped) and resize256's canvas key (in its summary.json) are the params' own values: the
    same keys, ints as ints and floats as floats, sorted, whatever classes carry them (golden: the dataclasses'
    asdict gave exactly this)."""
    raw = project_params()["contract"]
    c = Contract.from_dict(raw)
    assert c.to_json() == json.dumps(raw, indent=2, sort_keys=True) + "\n"
    assert spec_key(c.canvas) == hashlib.sha256(json.dumps(raw["canvas"], sort_keys=True).encode()).hexdigest()[:16]


def test_generation_is_greedy_and_bounded() -> None:
    c = Contract.from_dict(CONTRACT)
    assert c.generation.greedy
    assert c.generation.max_new_tokens == 32  # the app's LLamaAndroid.kt budget


# Literals that belong to the contract alone, looked for in code (docstrings and comments may explain them).
# Each allowance (a path, or a folder ending in /) says why it is not a restatement.
LABEL_DATA = "tests and benchmarks need concrete labels as data (fake answers, cycles, rows)"
BAD_TEMPLATE = "a template without the image slot, refused on purpose"
STRAY_STRINGS = {
    r"Classify this image": {"tests/unit/test_params.py": BAD_TEMPLATE},
    r"Element:": {"tests/unit/test_params.py": BAD_TEMPLATE},
    r"<__media__>": {},
    r"<end_of_utterance>": {"src/model/hf_vlm.py": "the tokenizer vocabulary SmolVLM adds, not the EOS choice"},
    r"^ ?(water|land|fire|wood|metal)$": {"src/data/demo.py": "the demo's painters, one per drawable element",
                                          "src/client/fortune.py": "the five-element cycles, checked against the labels",
                                          "tests/": LABEL_DATA, "testkit/": LABEL_DATA, "bench/": LABEL_DATA},
}
STRAY_KEYWORDS = {"max_new_tokens", "temperature", "top_k", "repeat_penalty", "repetition_penalty", "size"}
# Where 256 or a `size=` is not the canvas.
STRAY_NUMBERS = {
    "src/config/schema.py": "bounds of label.concurrency and eval_parity.n_ctx, not the canvas",
    "bench/resize.py": "the seed's resize_for_android, kept as written: it is the baseline",
    "bench/tokens.py": "vision tile candidates the benchmark compares, not the canvas",
    "bench/run.py": "the benchmark's re-tiled vision geometry, not the canvas",
    "tests/unit/test_geometry.py": "vision geometries under test, not the canvas",
    "testkit/photos.py": "pixel colours modulo 256",
    "tests/stage/test_reading.py": "a canvas unlike params.yaml's, to show the bundle's contract wins",
}


def allowed(rel: str, allowances: dict[str, str]) -> bool:
    return any(rel == k or (k.endswith("/") and rel.startswith(k)) for k in allowances)


def code_constants(path: Path) -> list[tuple[int, object, str | None]]:
    """(line, value, keyword it is passed as) for every constant that is not a docstring."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    keyword_of = {id(k.value): k.arg for k in ast.walk(tree) if isinstance(k, ast.keyword)}
    return [(n.lineno, n.value, keyword_of.get(id(n))) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and id(n) not in docstrings]


SOURCES = sorted(p for d in ("src", "bench", "tests", "testkit") for p in (ROOT / d).rglob("*.py")
                 if p != Path(__file__).resolve())  # this file states the patterns it hunts


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_stray_contract_literals_in_code(path: Path) -> None:
    rel, hits = str(path.relative_to(ROOT)), []
    for line, value, keyword in code_constants(path):
        if isinstance(value, str):
            hits += [f"{rel}:{line}: {value!r}" for pat, allowances in STRAY_STRINGS.items()
                     if re.search(pat, value) and not allowed(rel, allowances)]
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and not allowed(rel, STRAY_NUMBERS):
            if value == 256 or (keyword in STRAY_KEYWORDS):
                hits.append(f"{rel}:{line}: {keyword or ''}={value!r}")
    assert not hits, "contract values restated outside params.yaml:\n" + "\n".join(hits)


def test_the_stray_literal_check_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text('"""Docs may say Element: freely."""\nPROMPT = "Element:"\ngen(max_new_tokens=32)\n')
    found = [(v, k) for _, v, k in code_constants(bad)]
    assert ("Element:", None) in found and (32, "max_new_tokens") in found
