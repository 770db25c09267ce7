"""eval_parity: the ladder's pieces on their own; then parity broken on purpose, and eval_parity failing, naming the rung."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from src.config.artifacts import mmproj_of, text_gguf
from src.config.contract import Contract
from src.data.canvas import canvas_png, decode, to_canvas
from src.data.demo import photo
from src.data.files import read_jsonl
from src.parity.ladder import Row, canvas_rung, climb, images_csv, psnr
from src.quality.gates import gates
from src.runtime.llama_vlm import LlamaVLM
from testkit.project import CONTRACT, run


def test_psnr_is_99_for_identical_and_follows_the_mse() -> None:
    a = np.zeros((4, 4, 3), np.uint8)
    assert psnr(a, a) == 99.0
    b = a.copy()
    b[0, 0, 0] = 255  # mse = 255^2 / 48
    assert psnr(a, b) == pytest.approx(10 * np.log10(48))


def test_canvas_rung_on_a_demo_photo() -> None:
    """The stored canvas is the training canvas; the Android emulation is close to it but drawn apart."""
    data = photo(0, CONTRACT.labels, seed=0).data
    stored = canvas_png(to_canvas(decode(data, CONTRACT.canvas), CONTRACT.canvas))
    train, android, diff, p, same = canvas_rung(data, stored, CONTRACT)
    assert same and train.size == android.size == (CONTRACT.canvas.size, CONTRACT.canvas.size)
    assert 0 <= diff <= 255 and p > 30
    assert canvas_rung(data, canvas_png(Image.new("RGB", train.size)), CONTRACT)[4] is False


def test_images_csv_writes_invalid_answers_with_their_text() -> None:
    labels = CONTRACT.labels
    probs = {s: [1 / len(labels)] * len(labels) for s in ("hf", "q8_0")}
    rows = [Row("a", "beach/a.jpg", "a.png", labels[0], {"hf": labels[0], "f16": labels[0], "q8_0": None},
                {"hf": "x", "f16": "x", "q8_0": "oops"}, probs),
            Row("b", "b.jpg", "b.png", labels[1], {"hf": labels[1], "f16": labels[1], "q8_0": labels[1],
                                                   "q8_0_android": labels[2]}, {}, probs)]
    out = list(csv.DictReader(io.StringIO(images_csv(rows, labels))))
    assert [r["q8_0"] for r in out] == ["INVALID:'oops'", labels[1]]
    assert [r["name"] for r in out] == ["beach/a.jpg", "b.jpg"]
    assert [r["q8_0_android"] for r in out] == ["", labels[2]]
    assert out[0][f"p_hf_{labels[0]}"] == f"{1 / len(labels):.4f}"


def eval_cmd(repo: Path) -> list[str]:
    """eval_parity's command exactly as DVC ran it (from dvc.lock)."""
    return yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["eval_parity"]["cmd"].split()


def copy(repo: Path, dest: Path) -> Path:
    shutil.copytree(repo, dest, symlinks=True)
    return dest


@pytest.mark.slow
def test_stray_space_in_the_app_prompt_fails_the_layout_rung(tiny_repo: Path) -> None:
    params = yaml.safe_load((tiny_repo / "params.yaml").read_text())
    contract = Contract.from_dict(params["contract"])
    rows = read_jsonl(tiny_repo / "data/split/test.jsonl")[:3]
    head, last = contract.prompt_for(LlamaVLM.marker()).rsplit("\n", 1)
    app_prompt = f"{head}\n {last}"  # a stray space before the prompt's last line
    conv, q8 = tiny_repo / "models/convert_gguf", tiny_repo / "models/quantize_q8"
    metrics, _, offenders = climb(contract, rows, tiny_repo / "data/resize256", {}, tiny_repo / "models/finetune",
                                   (text_gguf(conv, "f16"), mmproj_of(conv)), (text_gguf(q8, "q8_0"), mmproj_of(conv)),
                                   params["eval_parity"]["n_ctx"], llama_prompt=app_prompt)
    assert metrics["layout"]["identical_rate"] == 0.0
    fails = gates(metrics, params["eval_parity"], offenders)
    assert any(f.startswith("rung layout") and rows[0]["name"] in f for f in fails), fails  # named as the user knows it


@pytest.mark.slow
def test_longest_edge_changed_on_one_side_fails_the_stage(tiny_repo: Path, tmp_path: Path) -> None:
    repo = copy(tiny_repo, tmp_path / "repo")
    cfg_path = repo / "models/finetune/processor_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["image_processor"]["size"]["longest_edge"] *= 2  # transformers side only; the mmproj keeps the old one
    cfg_path.write_text(json.dumps(cfg))
    res = run(eval_cmd(repo), repo, check=False)
    assert res.returncode != 0
    assert "rung layout" in res.stderr and "identical_rate 0.000" in res.stderr


@pytest.mark.slow
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
