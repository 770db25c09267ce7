"""The base stage: where the base comes from, how it is fitted to the contract, and what reruns it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from src.config.contract import Vision
from src.config.settings import Builder
from src.model import bases, hf_vlm
from testkit.project import CONTRACT, ROOT, make_repo, project_params, run, set_param

TINY = Builder(vision_hidden=32, vision_layers=1, vision_heads=2, patch=8, scale_factor=2,
                       text_hidden=32, text_layers=1, text_heads=2, text_kv_heads=1, seed=0)
HUB_ID = "HuggingFaceTB/SmolVLM-256M-Instruct"
# The real-size profile, as docs/real-size.md's `dvc exp run` states it (a test below keeps the two equal).
STOCK_TILE = hf_vlm.SMOLVLM_256M_VISION["image_size"]  # 512: SigLIP-base's tiles
REAL_SIZE = {
    "base.source": "smollm2",
    "contract.vision.tile": STOCK_TILE // 2,  # re-tiled: 80 image tokens instead of 1088
    "contract.vision.longest_edge": STOCK_TILE,
    "finetune.epochs": 5,
    "finetune.batch_size": 4,
}
DATA_STAGES = {"download", "resize256", "label", "split"}
AFTER_BASE = {"base", "finetune", "convert_gguf", "quantize_q8", "eval_parity", "release"}


def base_params(**over: object) -> dict:
    p = project_params()["base"]
    return {**p, **over}


@pytest.mark.parametrize("revision", ["", "main", "v1.0", "a" * 39, "A" * 40])
def test_hub_base_must_be_pinned_to_a_commit_and_the_error_says_how(revision: str) -> None:
    with pytest.raises(SystemExit) as e:
        bases.source_model(base_params(source="hub", revision=revision), CONTRACT.vision)  # refused before any download
    msg = str(e.value)
    assert "\n" not in msg and f"base.revision={revision!r}" in msg and "40-hex commit sha" in msg
    assert f"hf models info {HUB_ID} --expand sha" in msg and f"huggingface.co/{HUB_ID}/commits/main" in msg


def test_a_40_hex_revision_is_accepted() -> None:
    assert bases.pinned_revision(HUB_ID, "0123456789abcdef0123456789abcdef01234567")


def test_empty_local_dir_and_unknown_source_are_one_line_errors() -> None:
    with pytest.raises(SystemExit, match="base.local_dir is empty"):
        bases.source_model(base_params(source="local", local_dir=""), CONTRACT.vision)
    with pytest.raises(SystemExit, match=r"base.source='gguf': expected one of builder, smollm2, hub, local"):
        bases.source_model(base_params(source="gguf"), CONTRACT.vision)


def test_a_local_directory_is_retiled_and_configured(tmp_path: Path) -> None:
    """A base saved at one tile (the hub's layout) comes out at the contract's tile, configured."""
    model, processor = hf_vlm.build(TINY, Vision(tile=64, longest_edge=128))
    model.save_pretrained(tmp_path / "hub", safe_serialization=True)
    processor.save_pretrained(tmp_path / "hub")
    vision, target = Vision(tile=32, longest_edge=64), CONTRACT.target
    got, proc, info = bases.fitted(base_params(source="local", local_dir=str(tmp_path / "hub")), vision, target)
    assert info["native_tile"] == 64 and info["tile"] == 32 and info["retiled"] is True
    assert got.config.vision_config.image_size == 32
    assert got.model.vision_model.embeddings.position_embedding.weight.shape[0] == (32 // TINY.patch) ** 2
    assert proc.image_processor.size == {"longest_edge": 64} and proc.image_processor.max_image_size == {"longest_edge": 32}
    assert proc.tokenizer.eos_token == CONTRACT.target.eos
    assert info["image_seq_len"] == proc.image_seq_len == (32 // TINY.patch // TINY.scale_factor) ** 2
    # a base already at the contract's tile is not touched
    _, _, same = bases.fitted(base_params(source="local", local_dir=str(tmp_path / "hub")),
                              Vision(tile=64, longest_edge=128), target)
    assert same["retiled"] is False


def test_the_card_says_what_each_base_is() -> None:
    assert "RANDOMLY INITIALISED vision tower" in bases.describe(base_params(source="smollm2"))
    assert "SmolLM2-135M-Instruct" in bases.describe(base_params(source="smollm2"))
    sha = "0123456789abcdef0123456789abcdef01234567"
    assert bases.describe(base_params(source="hub", revision=sha)) == f"{HUB_ID} at revision {sha}"
    assert "random init" in bases.describe(base_params(source="builder"))


def test_the_docs_state_the_real_size_profile_of_these_tests() -> None:
    page = (ROOT / "docs/real-size.md").read_text()
    cmd = re.search(r"dvc exp run -n real-size (.*?)\n```", page, re.S)
    assert cmd, "docs/real-size.md: no `dvc exp run -n real-size -S ...` command in a code block"
    sets = dict(kv.split("=", 1) for kv in re.findall(r"-S (\S+)", cmd.group(1)))
    assert {k: yaml.safe_load(v) for k, v in sets.items()} == REAL_SIZE


@pytest.mark.slow
def test_smollm2_base_has_the_real_text_model() -> None:
    model, processor = hf_vlm.build_smollm2(seed=0)
    v, t = model.config.vision_config, model.config.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size, v.image_size, v.patch_size) \
        == (768, 12, 12, 3072, 512, 16)
    assert model.config.scale_factor == 4
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.intermediate_size) \
        == (576, 30, 9, 3, 1536)
    assert t.vocab_size == len(processor.tokenizer) > 49152 and t.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.text_model.embed_tokens.weight.data_ptr()
    # a trained language model, not a random one: it completes a fact
    tok = processor.tokenizer
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model.lm_head(model.model.text_model(input_ids=ids).last_hidden_state)[0, -1]
    assert tok.decode(logits.argmax().item()).strip() == "Paris"
    # the vision tower is seeded: the same seed builds the same tower
    again, _ = hf_vlm.build_smollm2(seed=0)
    a, b = (m.model.vision_model.embeddings.patch_embedding.weight for m in (model, again))
    assert torch.equal(a, b)


@pytest.mark.slow
def test_status_after_a_geometry_change_names_base_and_after_only(tiny_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo, symlinks=True)
    params_path = repo / "params.yaml"
    original = params_path.read_text()

    def status_after(dotted: str, value: object) -> dict:
        params = yaml.safe_load(original)
        set_param(params, dotted, value)
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        return json.loads(run(["dvc", "status", "--json"], repo).stdout)

    status = status_after("contract.vision.tile", 32)
    print("dvc status --json after contract.vision.tile 64 -> 32:", json.dumps(status))
    assert "base" in status and set(status) <= AFTER_BASE and not set(status) & DATA_STAGES
    # base's own entry names the changed param
    assert any("contract.vision.tile" in json.dumps(e) for e in status["base"])
    status = status_after("base.builder.seed", 1)
    assert "base" in status and not set(status) & DATA_STAGES
    status = status_after("finetune.lora.r", 8)
    print("dvc status --json after finetune.lora.r 16 -> 8:", json.dumps(status))
    assert "finetune" in status and "base" not in status and not set(status) & DATA_STAGES


@pytest.mark.slow
def test_real_size_local_directory_runs_end_to_end(tmp_path: Path) -> None:
    """The way a user with the hub model will run it: a directory in the hub's layout at 512 px tiles,
    re-tiled to 256 by the base stage, then finetune, convert, quantize, eval_parity (its gates) and release."""
    model, processor = hf_vlm.build_smollm2(seed=0)
    hf_vlm.configure(model, processor, Vision(tile=512, longest_edge=2048), CONTRACT.target)  # the stock geometry
    hub = tmp_path / "SmolVLM-256M-layout"
    model.save_pretrained(hub, safe_serialization=True)
    processor.save_pretrained(hub)
    del model
    assert json.loads((hub / "config.json").read_text())["vision_config"]["image_size"] == STOCK_TILE
    repo = make_repo(tmp_path / "repo", {**REAL_SIZE, "base.source": "local", "base.local_dir": str(hub),
                                         "download.demo.n": 30, "split.val": 0.2, "split.test": 0.2, "split.min_per_class": 1,
                                         "release.min_accuracy": 0.0, "release.min_class_accuracy": 0.0,
                                         "finetune.epochs": 2,
                                         # the arm64 rung at real size costs minutes a photo under qemu: the tiny
                                         # pipeline proves the rung (tests/stage/test_arm64.py); this test proves x86 parity
                                         "eval_parity.arm64.sample": 0})
    run(["dvc", "repro"], repo)
    info = json.loads((repo / "models/base/base.json").read_text())
    tile = REAL_SIZE["contract.vision.tile"]
    assert (info["source"], info["native_tile"], info["tile"], info["retiled"]) == ("local", STOCK_TILE, tile, True)
    assert json.loads((repo / "models/base/config.json").read_text())["vision_config"]["image_size"] == tile
    m = json.loads((repo / "metrics/parity.json").read_text())
    print("real-size local-dir parity:", json.dumps(m))
    assert m["layout"]["identical_rate"] == 1.0 and m["agreement"]["f16"] == 1.0
    assert m["layout"]["image_tokens_per_photo"] == 80
    card = json.loads((repo / "models/release/model_card.json").read_text())
    assert card["base_model"]["source"] == "local" and str(hub) in card["base_model"]["description"]
    assert (repo / "models/release/model.gguf").stat().st_size > 100_000_000
