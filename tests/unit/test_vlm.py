"""The transformers side on a tiny SmolVLM built in-process with the real SmolLM2 tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from src.config.contract import Vision
from src.model import hf_vlm
from testkit.project import CONTRACT


@pytest.fixture(scope="module")
def tiny(tiny_model: tuple[Any, Any]) -> tuple[Any, Any]:
    return tiny_model


def canvas(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (CONTRACT.canvas.size, CONTRACT.canvas.size, 3), dtype=np.uint8))


def test_each_label_is_one_token(tiny: tuple[Any, Any]) -> None:
    ids = hf_vlm.label_token_ids(tiny[1].tokenizer, CONTRACT.labels, CONTRACT.target)
    assert len(set(ids)) == len(CONTRACT.labels)


def test_only_the_answer_is_supervised(tiny: tuple[Any, Any]) -> None:
    _, processor = tiny
    tok = processor.tokenizer
    a = hf_vlm.training_example(processor, CONTRACT.prompt, CONTRACT.labels, CONTRACT.target, canvas(0), CONTRACT.labels[0])
    b = hf_vlm.training_example(processor, CONTRACT.prompt, CONTRACT.labels, CONTRACT.target, canvas(1), CONTRACT.labels[2])
    b["input_ids"], b["labels"] = b["input_ids"][:-1], b["labels"][:-1]  # make it shorter, so collate pads it
    batch = hf_vlm.collate([a, b], tok.pad_token_id)
    eos = tok.convert_tokens_to_ids(CONTRACT.target.eos)
    answer = [tok(CONTRACT.target.text(CONTRACT.labels[0]), add_special_tokens=False).input_ids[0], eos]
    sup = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert sup == answer
    # every prompt, image and padding position is -100
    image_id = tok.convert_tokens_to_ids(hf_vlm.HF_IMAGE_TOKEN)
    assert (batch["labels"][batch["input_ids"] == image_id] == -100).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    n_prompt = len(hf_vlm.prompt_inputs(processor, CONTRACT.prompt, CONTRACT.labels, canvas(0))["input_ids"][0])
    assert (batch["labels"][0][:n_prompt] == -100).all() and (batch["labels"][0][n_prompt:] != -100).all()


def test_configure_writes_geometry_and_eos_that_survive_saving(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    model, processor = tiny
    hf_vlm.save(model, processor, tmp_path)
    proc = json.loads((tmp_path / "processor_config.json").read_text())
    ip = proc["image_processor"]
    assert ip["size"]["longest_edge"] == CONTRACT.vision.longest_edge and ip["max_image_size"]["longest_edge"] == CONTRACT.vision.tile
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == \
        processor.tokenizer.convert_tokens_to_ids(CONTRACT.target.eos)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["eos_token"] == CONTRACT.target.eos
    # SmolVLM's chat template, not SmolLM2's text-only one: llama.cpp's converter copies this file into the GGUF
    assert (tmp_path / "chat_template.jinja").read_text() == hf_vlm.SMOLVLM_CHAT_TEMPLATE
    # the hub loading path, pointed at a local directory
    loaded, lproc = hf_vlm.load(str(tmp_path))
    chat = [{"role": "user", "content": [{"type": "text", "text": "Which?"}, {"type": "image"}]}]
    assert lproc.apply_chat_template(chat, add_generation_prompt=True) == \
        f"<|im_start|>User: Which?{hf_vlm.HF_IMAGE_TOKEN}{CONTRACT.target.eos}\nAssistant:"
    inputs = hf_vlm.prompt_inputs(lproc, CONTRACT.prompt, CONTRACT.labels, canvas(3))
    torch.testing.assert_close(hf_vlm.first_logits(loaded, inputs), hf_vlm.first_logits(model, inputs))


def test_a_tile_the_encoder_does_not_take_is_refused(tiny: tuple[Any, Any]) -> None:
    model, processor = tiny
    with pytest.raises(ValueError, match="tile"):
        hf_vlm.configure(model, processor, Vision.model_construct(tile=CONTRACT.vision.tile * 2, longest_edge=CONTRACT.vision.longest_edge), CONTRACT.target)


def test_cached_features_give_the_same_loss(tiny: tuple[Any, Any]) -> None:
    model, processor = tiny
    exs = [hf_vlm.training_example(processor, CONTRACT.prompt, CONTRACT.labels, CONTRACT.target, canvas(i), CONTRACT.labels[i]) for i in range(2)]
    b = hf_vlm.collate(exs, processor.tokenizer.pad_token_id)
    text = {k: b[k] for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        full = model(pixel_values=b["pixel_values"], pixel_attention_mask=b["pixel_attention_mask"], **text).loss
        hidden = hf_vlm.vision_hidden(model, b["pixel_values"], b["pixel_attention_mask"])
        cached = hf_vlm.forward_from_hidden(model, hidden, **text).loss
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-6)


def test_generation_stops_at_any_of_the_stop_tokens_it_is_given(tiny: tuple[Any, Any]) -> None:
    """eval_parity hands transformers llama.cpp's end-of-generation set: a stop token that is not the
    EOS must end the answer there, as it does on the phone."""
    model, processor = tiny
    inputs = hf_vlm.prompt_inputs(processor, CONTRACT.prompt, CONTRACT.labels, Image.new("RGB", (CONTRACT.canvas.size, CONTRACT.canvas.size), 7))
    text, ids, stopped = hf_vlm.generate(model, processor, inputs, CONTRACT.generation)
    assert ids, "the tiny model must say something for this test to mean anything"
    eos = model.generation_config.eos_token_id
    assert ids[0] != eos
    text2, ids2, stopped2 = hf_vlm.generate(model, processor, inputs, CONTRACT.generation, stop_ids=[eos, ids[0]])
    assert (text2, ids2, stopped2) == ("", [], True)


def test_the_tokenizer_memo_is_named_by_the_gguf_bytes(tmp_path: Path) -> None:
    gguf = tmp_path / "a.gguf"
    gguf.write_bytes(b"GGUF one")
    first = hf_vlm.tokenizer_memo_key(gguf)
    gguf.write_bytes(b"GGUF two")
    assert hf_vlm.tokenizer_memo_key(gguf) != first
    gguf.write_bytes(b"GGUF one")
    assert hf_vlm.tokenizer_memo_key(gguf) == first


@pytest.mark.slow
def test_a_fresh_tokenizer_memo_reads_the_gguf_and_hands_out_the_same_tokenizer(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The memo is an optimisation only: what it hands out saves the same files and tokenizes the same
    as the tokenizer transformers builds from the GGUF, whether this call built the memo, found it, or
    could not keep one."""
    from transformers import AutoTokenizer

    gguf = hf_vlm.smollm2_gguf()
    direct = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    direct.add_tokens(hf_vlm.IMAGE_TOKENS, special_tokens=True)
    memo = tmp_path / "memo"
    built = hf_vlm.load_smollm2_tokenizer(memo)  # a miss: reads the GGUF
    assert [p.name for p in memo.iterdir()] == [hf_vlm.tokenizer_memo_key(gguf)]  # no temporary folder left
    found = hf_vlm.load_smollm2_tokenizer(memo)  # a hit
    image = f"<fake_token_around_image><row_1_col_1>{hf_vlm.HF_IMAGE_TOKEN * 4}<fake_token_around_image>"
    text = CONTRACT.prompt.render(image, CONTRACT.labels) + CONTRACT.target.text(CONTRACT.labels[2]) + CONTRACT.target.eos

    def saved(tok: Any, name: str) -> dict[str, bytes]:
        tok.save_pretrained(tmp_path / name)
        return {p.name: p.read_bytes() for p in (tmp_path / name).iterdir()}

    blocked = tmp_path / "a-file"
    blocked.write_text("")  # a memo folder that cannot be made: the tokenizer still comes, from the GGUF
    unkept = hf_vlm.load_smollm2_tokenizer(blocked / "memo")
    assert "vlm: cannot keep the tokenizer memo in" in capsys.readouterr().err
    chat = [{"role": "user", "content": "hi"}]
    want = saved(direct, "direct"), direct(text).input_ids, direct.apply_chat_template(chat, tokenize=False)
    for name, tok in (("built", built), ("found", found), ("unkept", unkept)):
        assert (saved(tok, name), tok(text).input_ids, tok.apply_chat_template(chat, tokenize=False)) == want, name
