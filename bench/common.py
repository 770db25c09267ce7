"""Shared pieces of `python -m bench.run`: the contract, demo canvases, timers, tables and sized models."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from src.config.contract import Contract
from src.config.paths import ROOT
from src.config.settings import Builder
from src.data import demo
from src.data.canvas import decode, to_canvas
from src.model import hf_vlm

# Big files (a 1 GB random SmolVLM-256M and its GGUFs) go here: gitignored, outside the tracked tree.
CACHE = ROOT / ".cache" / "bench"
OUT = ROOT / "bench" / "out"

# SmolVLM-256M's pixel shuffle (its shapes live in src/model/hf_vlm.py: SMOLVLM_256M_*).
STOCK_SCALE = hf_vlm.SMOLVLM_256M_SCALE
# The same shapes for the offline builder (its intermediates are 2 x hidden: a little lighter than SigLIP's 4 x).
SMOLVLM_256M_SHAPES = Builder(vision_hidden=768, vision_layers=12, vision_heads=12, patch=16, scale_factor=4,
                                      text_hidden=576, text_layers=30, text_heads=9, text_kv_heads=3, seed=0)
STOCK_LONGEST_EDGE = 2048


def params() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def contract() -> Contract:
    return Contract.from_dict(params()["contract"])


def demo_canvases(n: int, c: Contract, seed: int = 7) -> list[tuple[Image.Image, str]]:
    """(canvas, label) for n demo photos, drawn as the app draws them (the contract's canvas)."""
    out = []
    for i in range(n):
        p = demo.photo(i, c.labels, seed)
        out.append((to_canvas(decode(p.data, c.canvas), c.canvas).convert("RGB"), p.label))
    return out


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    res = fn()
    return time.perf_counter() - t0, res


def median_time(fn: Callable[[], Any], reps: int, warmup: int = 1) -> float:
    """Median of `reps` timings after `warmup` untimed calls; the median resists the shared CPU's spikes."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn)[0] for _ in range(reps))


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table; floats to 3 significant figures."""
    def cell(x: Any) -> str:
        return f"{x:.3g}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)




def rel(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)
