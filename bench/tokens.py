"""Section 1 of `python -m bench.run`: image tokens per photo and llama.cpp prefill time.

Two parts:
  geometry_candidates  every candidate (tile, longest_edge) on a tiny proxy with SmolVLM-256M's
                       patch 16 / scale 4 (layout depends on geometry only, not on width): transformers
                       ids vs llama.cpp's mtmd chunks, token counts, layout parity.
  at_scale             SmolVLM-256M-sized random model, stock geometry (tile 512, longest_edge 2048)
                       vs the chosen one (the same encoder re-tiled to 256, longest_edge 512): tokens,
                       layout parity and prefill time per photo in llama.cpp, same text GGUF, one run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench.common import (CACHE, STOCK_LONGEST_EDGE, STOCK_SCALE, STOCK_TEXT, STOCK_VISION, median_time,
                          timed)
from src import geometry, vlm
from src.contract import Contract, VisionSpec
from src.llama_build import convert
from src.llama_runtime import LlamaVLM, expand

# (tile, longest_edge): stock, stock tile at smaller edges, and re-tiled encoders.
CANDIDATES = [(512, 2048), (512, 1024), (512, 512), (256, 512), (256, 256), (128, 256)]
CHOSEN = VisionSpec(tile=256, longest_edge=512)
STOCK = VisionSpec(tile=512, longest_edge=STOCK_LONGEST_EDGE)
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
    image_id = processor.tokenizer.convert_tokens_to_ids(vlm.HF_IMAGE_TOKEN)
    ids = vlm.prompt_inputs(processor, c.prompt, c.labels, canvas)["input_ids"][0].tolist()
    chunks = v.layout(c.prompt_for(v.marker()), canvas)
    return ids.count(image_id), sum(ch.n_tokens for ch in chunks if ch.kind == "image"), expand(chunks, image_id) == ids


def geometry_candidates(c: Contract, canvas: Any, work: Path) -> list[LayoutResult]:
    """Convert a tiny proxy once per geometry and compare both runtimes' layouts on one canvas."""
    work.mkdir(parents=True, exist_ok=True)
    out = []
    text_gguf = work / "proxy-text.gguf"
    for tile, edge in tqdm(CANDIDATES, desc="geometry candidates"):
        model, processor = vlm.build_sized(PROXY_VISION, PROXY_TEXT, STOCK_SCALE, seed=0)
        if tile != PROXY_VISION["image_size"]:
            geometry.retile(model, processor, tile)
        vlm.configure(model, processor, VisionSpec(tile, edge), c.target)
        d = work / f"proxy-{tile}-{edge}"
        vlm.save(model, processor, d)
        if not text_gguf.exists():  # the text GGUF holds no vision geometry: one serves every candidate
            convert(d, text_gguf, "f32")
        mm = work / f"proxy-mmproj-{tile}-{edge}.gguf"
        convert(d, mm, "f32", mmproj=True)
        with LlamaVLM(text_gguf, mm, n_ctx=4096, n_threads=2) as v:
            out.append(LayoutResult(tile, edge, *layout_check(model, processor, v, c, canvas)))
        shutil.rmtree(d)
    return out


def _fingerprint(c: Contract) -> str:
    spec = [STOCK_VISION, STOCK_TEXT, STOCK_SCALE, STOCK.__dict__, CHOSEN.__dict__, c.target.__dict__, 1]
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def stock_ggufs(c: Contract) -> dict[str, Path]:
    """Text GGUF + stock mmproj + re-tiled mmproj of the random SmolVLM-256M, built once and cached.

    The text model is untouched by re-tiling, so one text GGUF serves both geometries: the prefill
    ratio compares image cost on the same model. f16 is what convert_gguf ships for the mmproj.
    """
    root = CACHE / f"stock-{_fingerprint(c)}"
    files = {"text": root / "text-f16.gguf", "stock": root / "mmproj-stock-f16.gguf",
             "chosen": root / "mmproj-chosen-f16.gguf", "stock_hf": root / "hf-stock", "chosen_hf": root / "hf-chosen"}
    if all(files[k].exists() for k in ("text", "stock", "chosen")):
        return files
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    steps = tqdm(total=6, desc="SmolVLM-256M-sized model (random)")
    model, processor = vlm.build_sized(STOCK_VISION, STOCK_TEXT, STOCK_SCALE, seed=0)
    vlm.configure(model, processor, STOCK, c.target)
    vlm.save(model, processor, files["stock_hf"]); steps.update()  # noqa: E702
    convert(files["stock_hf"], files["text"], "f16"); steps.update()  # noqa: E702
    convert(files["stock_hf"], files["stock"], "f16", mmproj=True); steps.update()  # noqa: E702
    geometry.retile(model, processor, CHOSEN.tile)
    vlm.configure(model, processor, CHOSEN, c.target)
    vlm.save(model, processor, files["chosen_hf"]); steps.update()  # noqa: E702
    convert(files["chosen_hf"], files["chosen"], "f16", mmproj=True); steps.update()  # noqa: E702
    # keep only the processors (small) for the layout check; the 1 GB safetensors are not needed again
    for k in ("stock_hf", "chosen_hf"):
        for f in files[k].glob("*.safetensors"):
            f.unlink()
    steps.update()
    steps.close()
    return files


def at_scale(c: Contract, canvas: Any, reps_stock: int, reps_chosen: int) -> dict[str, Any]:
    """Tokens, layout parity and median prefill seconds per photo, stock vs chosen, one process."""
    from transformers import Idefics3Processor

    files = stock_ggufs(c)
    res: dict[str, Any] = {}
    for name, spec, reps in (("chosen", CHOSEN, reps_chosen), ("stock", STOCK, reps_stock)):
        processor = Idefics3Processor.from_pretrained(files[f"{name}_hf"])
        with LlamaVLM(files["text"], files[name], n_ctx=2048, n_threads=2) as v:
            prompt = c.prompt_for(v.marker())
            image_id = processor.tokenizer.convert_tokens_to_ids(vlm.HF_IMAGE_TOKEN)
            ids = vlm.prompt_inputs(processor, c.prompt, c.labels, canvas)["input_ids"][0].tolist()
            chunks = v.layout(prompt, canvas)
            n_img = sum(ch.n_tokens for ch in chunks if ch.kind == "image")
            print(f"  prefill {name} (tile {spec.tile}, longest_edge {spec.longest_edge}, {n_img} image tokens) "
                  f"x{reps} ...", flush=True)
            # the first call allocates the compute graphs; time it too, as the app's first photo pays it
            first, _ = timed(lambda: v.first_logits(prompt, canvas))
            sec = median_time(lambda: v.first_logits(prompt, canvas), reps, warmup=0)
            res[name] = {"tile": spec.tile, "longest_edge": spec.longest_edge, "image_tokens": n_img,
                         "prompt_tokens": len(ids), "layout_identical": expand(chunks, image_id) == ids,
                         "prefill_s": sec, "first_call_s": first}
    res["token_ratio"] = res["stock"]["image_tokens"] / res["chosen"]["image_tokens"]
    res["prefill_ratio"] = res["stock"]["prefill_s"] / res["chosen"]["prefill_s"]
    res["files"] = {k: str(v) for k, v in files.items()}
    return res
