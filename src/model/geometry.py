"""Vision geometry: what a photo costs in image tokens, and re-tiling an encoder to a smaller tile.

Image tokens are the phone's main cost. Both runtimes resize the canvas so its
longest edge is `longest_edge`, cut it into `tile` x `tile` crops and encode each
crop into (tile / patch / scale_factor)^2 tokens. llama.cpp's idefics3 path always
adds an overview tile; transformers adds one only when it splits. So the layouts
agree only when the resized canvas is larger than one tile (longest_edge > tile,
in practice >= 2 x tile for square canvases).

`retile` is lever (b) of issue 7: SigLIP's learned position embeddings form a
(tile/patch)^2 grid; interpolating that grid to a new tile lets the same encoder
take, say, 256 px crops instead of 512 px ones, so a 256 px canvas need not be
upscaled to 2048. llama.cpp's idefics3 graph adds the stored table as-is (it
does not interpolate at run time), so the table itself must be re-gridded
before conversion, and `vision_config.image_size` must say the new tile.

Used by bench/run.py (`python -m bench.run`) and tests/unit/test_geometry.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Layout:
    """Tiles of one square canvas on one runtime: grid rows x cols, plus an overview tile or not."""

    rows: int
    cols: int
    overview: bool

    @property
    def tiles(self) -> int:
        return self.rows * self.cols + int(self.overview)


def tokens_per_tile(tile: int, patch: int, scale_factor: int) -> int:
    """(tile / patch / scale)^2: pixel shuffle merges scale x scale patches into one token."""
    side = tile // patch
    if tile % patch or side % scale_factor:
        raise ValueError(f"tile {tile} must be a multiple of patch {patch} x scale_factor {scale_factor}")
    return (side // scale_factor) ** 2


def hf_layout(tile: int, longest_edge: int) -> Layout:
    """transformers' Idefics3 splitting of a square canvas (both runtimes first scale it, up or down,
    to longest_edge, whatever its size): no overview when it fits one tile."""
    n = math.ceil(longest_edge / tile)
    return Layout(1, 1, overview=False) if longest_edge <= tile else Layout(n, n, overview=True)


def llama_layout(tile: int, longest_edge: int) -> Layout:
    """llama.cpp's idefics3 (llava-uhd) slicing of a square canvas: grid rounded up, overview always."""
    n = math.ceil(longest_edge / tile)
    return Layout(n, n, overview=True)


def image_tokens(layout: Layout, tile: int, patch: int, scale_factor: int) -> int:
    return layout.tiles * tokens_per_tile(tile, patch, scale_factor)


def layouts_agree(tile: int, longest_edge: int) -> bool:
    """Predicted layout parity; the bench and the test confirm it on the real runtimes."""
    return hf_layout(tile, longest_edge) == llama_layout(tile, longest_edge)


def interpolate_grid(table: torch.Tensor, new_side: int) -> torch.Tensor:
    """A (side^2, D) position table resampled to (new_side^2, D), bicubic on the 2-D grid.

    Antialiased when shrinking, so a coarser grid averages its neighbours instead of
    picking every other one.
    """
    n, dim = table.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"position table of {n} rows is not a square grid")
    if new_side == side:
        return table.clone()
    grid = table.detach().float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    out = nn.functional.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False,
                                    antialias=new_side < side)
    return out.permute(0, 2, 3, 1).reshape(new_side * new_side, dim).to(table.dtype)


def retile(model: Any, processor: Any, new_tile: int) -> None:
    """Make an Idefics3/SmolVLM encoder take `new_tile` px crops, in place.

    Interpolates `model.model.vision_model.embeddings.position_embedding` to the new
    patch grid and updates every place that states the tile: the embedding module,
    `vision_config.image_size` (the converter writes it into the mmproj), the model's
    `image_seq_len`, and the processor's tile (`max_image_size`) and `image_seq_len`.
    `size.longest_edge` stays the contract's business (`hf_vlm.configure`).
    """
    vcfg = model.config.vision_config
    patch, scale = vcfg.patch_size, model.config.scale_factor
    per_tile = tokens_per_tile(new_tile, patch, scale)
    emb = model.model.vision_model.embeddings
    new_side = new_tile // patch
    old = emb.position_embedding
    table = interpolate_grid(old.weight.data, new_side)
    emb.position_embedding = nn.Embedding(new_side * new_side, table.shape[1], device=table.device, dtype=table.dtype)
    emb.position_embedding.weight.data.copy_(table)
    emb.position_embedding.weight.requires_grad_(old.weight.requires_grad)
    emb.image_size, emb.num_patches_per_side = new_tile, new_side
    emb.num_patches = emb.num_positions = new_side * new_side
    vcfg.image_size = new_tile
    model.model.image_seq_len = per_tile
    processor.image_processor.max_image_size = {"longest_edge": new_tile}
    processor.image_seq_len = per_tile
