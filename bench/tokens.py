"""Section 1 of `python -m bench.run`: image tokens per photo and llama.cpp prefill time.

Two parts:
  geometry_candidates  every candidate (tile, longest_edge) on a tiny proxy with SmolVLM-256M's
                       patch 16 / scale 4 (layout depends on geometry only, not on width): transformers
                       ids vs llama.cpp's mtmd chunks, token counts, layout parity.
  at_scale             the real-size base (base.source smollm2: SmolVLM-256M's architecture, SmolLM2-135M
                       text weights, seeded vision tower) at the three layout-identical geometries: stock
                       (tile 512, longest_edge 2048), chosen (re-tiled to 256, longest_edge 512) and small
                       (re-tiled to 128, longest_edge 256): tokens, layout parity and llama.cpp time per
                       photo (image encode + prefill to the first answer logits), same text GGUF, one run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench.common import CACHE, STOCK_LONGEST_EDGE, STOCK_SCALE, median_time, timed
from src.config.contract import Contract, Vision
from src.model import geometry, hf_vlm
from src.runtime.llama_build import convert
from src.runtime.llama_vlm import LlamaVLM, expand

# (tile, longest_edge): stock, stock tile at smaller edges, and re-tiled encoders.
CANDIDATES = [(512, 2048), (512, 1024), (512, 512), (256, 512), (256, 256), (128, 256)]
CHOSEN = Vision(tile=256, longest_edge=512)
STOCK = Vision(tile=512, longest_edge=STOCK_LONGEST_EDGE)
SMALL = Vision(tile=128, longest_edge=256)
# The layout-identical geometries timed at real size, the stock one first (the ratios' baseline).
AT_SCALE = {"stock": STOCK, "chosen": CHOSEN, "small": SMALL}
PROXY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    patch_size=16, image_size=512)
PROXY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1)


@dataclass(frozen=True)
class LayoutResult:
    tile: int
    longest_edge: int
    hf_tokens: int
    llama_tokens: int
    identical: bool


def layout_check(model: Any, processor: Any, v: LlamaVLM, c: Contract, canvas: Any) -> tuple[int, int, bool]:
    """(transformers image tokens, llama.cpp image tokens, whole id layouts identical)."""
    image_id = processor.tokenizer.convert_tokens_to_ids(hf_vlm.HF_IMAGE_TOKEN)
    ids = hf_vlm.prompt_inputs(processor, c.prompt, c.labels, canvas)["input_ids"][0].tolist()
    chunks = v.layout(c.prompt_for(v.marker()), canvas)
    return ids.count(image_id), sum(ch.n_tokens for ch in chunks if ch.kind == "image"), expand(chunks, image_id) == ids


def geometry_candidates(c: Contract, canvas: Any, work: Path) -> list[LayoutResult]:
    """Convert a tiny proxy once per geometry and compare both runtimes' layouts on one canvas."""
    work.mkdir(parents=True, exist_ok=True)
    out = []
    text_gguf = work / "proxy-text.gguf"
    for tile, edge in tqdm(CANDIDATES, desc="geometry candidates"):
        model, processor = hf_vlm.build_sized(PROXY_VISION, PROXY_TEXT, STOCK_SCALE, seed=0)
        if tile != PROXY_VISION["image_size"]:
            geometry.retile(model, processor, tile)
        # model_construct: some candidates break the contract's 2 x tile rule, on purpose (the layouts they show differ)
        hf_vlm.configure(model, processor, Vision.model_construct(tile=tile, longest_edge=edge), c.target)
        d = work / f"proxy-{tile}-{edge}"
        hf_vlm.save(model, processor, d)
        if not text_gguf.exists():  # the text GGUF holds no vision geometry: one serves every candidate
            convert(d, text_gguf, "f32")
        mm = work / f"proxy-mmproj-{tile}-{edge}.gguf"
        convert(d, mm, "f32", mmproj=True)
        with LlamaVLM(text_gguf, mm, n_ctx=4096, n_threads=2) as v:
            out.append(LayoutResult(tile, edge, *layout_check(model, processor, v, c, canvas)))
        shutil.rmtree(d)
    return out


def _fingerprint(c: Contract) -> str:
    spec = ["smollm2 seed 0", hf_vlm.SMOLVLM_256M_VISION, hf_vlm.SMOLVLM_256M_TEXT, hf_vlm.SMOLVLM_256M_SCALE,
            {k: v.model_dump() for k, v in AT_SCALE.items()}, c.target.model_dump(), 2]
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def stock_ggufs(c: Contract) -> dict[str, Path]:
    """Text GGUF + one mmproj per AT_SCALE geometry of the real-size base, built once and cached.

    Re-tiling leaves the text model untouched, so one text GGUF serves every geometry: the ratios
    compare image cost on the same model. Each geometry is re-tiled from the stock 512 px encoder
    (as the base stage does). f16 is what convert_gguf ships for the mmproj.
    """
    import copy

    root = CACHE / f"real-{_fingerprint(c)}"
    files = {"text": root / "text-f16.gguf"}
    for name in AT_SCALE:
        files[name], files[f"{name}_hf"] = root / f"mmproj-{name}-f16.gguf", root / f"hf-{name}"
    if all(files[k].exists() for k in ("text", *AT_SCALE)):
        return files
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    steps = tqdm(total=1 + 2 * len(AT_SCALE), desc="real-size base (SmolLM2 text weights, seeded vision)")
    stock_model, stock_processor = hf_vlm.build_smollm2(seed=0)
    steps.update()
    for name, spec in AT_SCALE.items():
        model, processor = (stock_model, stock_processor) if name == "stock" else \
            (copy.deepcopy(stock_model), copy.deepcopy(stock_processor))
        if spec.tile != model.config.vision_config.image_size:
            geometry.retile(model, processor, spec.tile)
        hf_vlm.configure(model, processor, spec, c.target)
        hf_vlm.save(model, processor, files[f"{name}_hf"])
        if name == "stock":
            convert(files["stock_hf"], files["text"], "f16")
        convert(files[f"{name}_hf"], files[name], "f16", mmproj=True); steps.update()  # noqa: E702
        # keep only the processor (small) for the layout check; the 1 GB safetensors are not needed again
        for f in files[f"{name}_hf"].glob("*.safetensors"):
            f.unlink()
        steps.update()
    steps.close()
    return files


def at_scale(c: Contract, canvas: Any, reps_stock: int, reps_chosen: int) -> dict[str, Any]:
    """Tokens, layout parity and median seconds per photo for each AT_SCALE geometry, one process."""
    from transformers import Idefics3Processor

    files = stock_ggufs(c)
    res: dict[str, Any] = {}
    for name, spec in AT_SCALE.items():
        reps = reps_stock if name == "stock" else reps_chosen
        processor = Idefics3Processor.from_pretrained(files[f"{name}_hf"])
        with LlamaVLM(files["text"], files[name], n_ctx=2048, n_threads=2) as v:
            prompt = c.prompt_for(v.marker())
            image_id = processor.tokenizer.convert_tokens_to_ids(hf_vlm.HF_IMAGE_TOKEN)
            ids = hf_vlm.prompt_inputs(processor, c.prompt, c.labels, canvas)["input_ids"][0].tolist()
            chunks = v.layout(prompt, canvas)
            n_img = sum(ch.n_tokens for ch in chunks if ch.kind == "image")
            print(f"  per photo {name} (tile {spec.tile}, longest_edge {spec.longest_edge}, {n_img} image tokens) "
                  f"x{reps} ...", flush=True)
            # the first call allocates the compute graphs; time it too, as the app's first photo pays it
            first, _ = timed(lambda: v.first_logits(prompt, canvas))
            sec = median_time(lambda: v.first_logits(prompt, canvas), reps, warmup=0)
            res[name] = {"tile": spec.tile, "longest_edge": spec.longest_edge, "image_tokens": n_img,
                         "prompt_tokens": len(ids), "layout_identical": expand(chunks, image_id) == ids,
                         "prefill_s": sec, "first_call_s": first}
    for name in AT_SCALE:
        res[name]["time_ratio_to_stock"] = res[name]["prefill_s"] / res["stock"]["prefill_s"]
        res[name]["token_ratio_to_stock"] = res[name]["image_tokens"] / res["stock"]["image_tokens"]
    res["token_ratio"] = res["stock"]["image_tokens"] / res["chosen"]["image_tokens"]
    res["prefill_ratio"] = res["stock"]["prefill_s"] / res["chosen"]["prefill_s"]
    res["files"] = {k: str(v) for k, v in files.items()}
    return res
