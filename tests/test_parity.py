"""Break parity on purpose and watch eval_parity fail, naming the rung."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from src.contract import Contract
from src.artifacts import text_gguf, the_mmproj
from src.gates import gates
from src.stages.eval_parity import ladder
from src.llama_runtime import LlamaVLM
from src.records import read_jsonl
from tests.conftest import run

pytestmark = pytest.mark.slow


def eval_cmd(repo: Path) -> list[str]:
    """eval_parity's command exactly as DVC ran it (from dvc.lock)."""
    return yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["eval_parity"]["cmd"].split()


def copy(repo: Path, dest: Path) -> Path:
    shutil.copytree(repo, dest, symlinks=True)
    return dest


def test_stray_space_in_the_app_prompt_fails_the_layout_rung(tiny_repo: Path) -> None:
    params = yaml.safe_load((tiny_repo / "params.yaml").read_text())
    contract = Contract.from_dict(params["contract"])
    rows = read_jsonl(tiny_repo / "data/split/test.jsonl")[:3]
    app_prompt = contract.prompt_for(LlamaVLM.marker()).replace("\n\nElement:", "\n\n Element:")
    conv, q8 = tiny_repo / "models/convert_gguf", tiny_repo / "models/quantize_q8"
    metrics, _, offenders = ladder(contract, rows, tiny_repo / "data/resize256", {}, tiny_repo / "models/finetune",
                                   (text_gguf(conv, "f16"), the_mmproj(conv)), (text_gguf(q8, "q8_0"), the_mmproj(conv)),
                                   params["eval_parity"]["n_ctx"], llama_prompt=app_prompt)
    assert metrics["layout"]["identical_rate"] == 0.0
    fails = gates(metrics, params["eval_parity"], offenders)
    assert any(f.startswith("rung layout") and rows[0]["name"] in f for f in fails), fails  # named as the user knows it


def test_longest_edge_changed_on_one_side_fails_the_stage(tiny_repo: Path, tmp_path: Path) -> None:
    repo = copy(tiny_repo, tmp_path / "repo")
    cfg_path = repo / "models/finetune/processor_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["image_processor"]["size"]["longest_edge"] *= 2  # transformers side only; the mmproj keeps the old one
    cfg_path.write_text(json.dumps(cfg))
    res = run(eval_cmd(repo), repo, check=False)
    assert res.returncode != 0
    assert "rung layout" in res.stderr and "identical_rate 0.000" in res.stderr


def test_eos_left_as_im_end_fails_the_stage(tiny_repo: Path, tmp_path: Path) -> None:
    repo = copy(tiny_repo, tmp_path / "repo")
    model = repo / "models/finetune"
    tok = json.loads((model / "tokenizer_config.json").read_text())
    tok["eos_token"] = "<|im_end|>"
    (model / "tokenizer_config.json").write_text(json.dumps(tok))
    gen = json.loads((model / "generation_config.json").read_text())
    vocab = json.loads((model / "tokenizer.json").read_text())["added_tokens"]
    gen["eos_token_id"] = next(t["id"] for t in vocab if t["content"] == "<|im_end|>")
    (model / "generation_config.json").write_text(json.dumps(gen))
    for stage in ("convert_gguf", "quantize_q8"):  # export the model as it now is
        run(["dvc", "repro", "--single-item", stage], repo)
    res = run(eval_cmd(repo), repo, check=False)
    assert res.returncode != 0
    assert "rung eos" in res.stderr and "'<|im_end|>'" in res.stderr
