"""Re-tiling the vision encoder (src/model/geometry.py): the interpolated encoder converts, and llama.cpp
lays out and scores the image exactly as transformers does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from src.config.contract import Vision
from src.config.settings import Builder
from src.model import geometry, hf_vlm
from src.runtime.llama_build import convert
from src.runtime.llama_vlm import LlamaVLM, expand
from testkit.project import CONTRACT, TINY_MODEL

# An encoder pretrained on 128 px tiles (16 x 16 patch grid), re-tiled to 64 px.
TINY = Builder.model_validate(TINY_MODEL)
OLD, NEW = Vision(tile=128, longest_edge=256), Vision(tile=64, longest_edge=128)


def canvas(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (CONTRACT.canvas.size, CONTRACT.canvas.size, 3), dtype=np.uint8))


@pytest.mark.parametrize(("tile", "longest_edge", "tokens", "agree"), [
    (512, 2048, 1088, True),   # stock SmolVLM-256M: 4x4 grid + overview
    (512, 512, 64, False),     # fits one tile: transformers 1 tile, llama.cpp 2
    (256, 512, 80, True),      # re-tiled to 256: 2x2 grid + overview
])
def test_token_arithmetic(tile: int, longest_edge: int, tokens: int, agree: bool) -> None:
    assert geometry.image_tokens(geometry.hf_layout(tile, longest_edge), tile, 16, 4) == tokens
    assert geometry.layouts_agree(tile, longest_edge) is agree


def test_interpolating_to_the_same_grid_is_the_identity_and_a_ramp_stays_a_ramp() -> None:
    table = torch.randn(16 * 16, 8)
    torch.testing.assert_close(geometry.interpolate_grid(table, 16), table)
    ramp = torch.arange(16.0).repeat(16, 1).reshape(-1, 1)  # value = column index
    small = geometry.interpolate_grid(ramp, 8).reshape(8, 8)
    assert (small.diff(dim=1) > 0).all() and torch.allclose(small[0], small[7])


def test_a_tile_that_does_not_divide_is_refused() -> None:
    model, processor = hf_vlm.build(TINY, OLD)
    with pytest.raises(ValueError, match="multiple"):
        geometry.retile(model, processor, 72)


@pytest.fixture(scope="module")
def retiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Path]:
    model, processor = hf_vlm.build(TINY, OLD)
    geometry.retile(model, processor, NEW.tile)
    hf_vlm.configure(model, processor, NEW, CONTRACT.target)
    out = tmp_path_factory.mktemp("retiled")
    hf_vlm.save(model, processor, out / "hf")
    convert(out / "hf", out / "text-f32.gguf", "f32")
    convert(out / "hf", out / "mmproj-f32.gguf", "f32", mmproj=True)
    return model, processor, out


@pytest.mark.slow
def test_retiled_encoder_keeps_layout_and_logit_parity_in_llama_cpp(retiled: tuple[Any, Any, Path]) -> None:
    model, processor, out = retiled
    assert model.model.vision_model.embeddings.position_embedding.num_embeddings == (NEW.tile // TINY.patch) ** 2
    image_id = processor.tokenizer.convert_tokens_to_ids(hf_vlm.HF_IMAGE_TOKEN)
    with LlamaVLM(out / "text-f32.gguf", out / "mmproj-f32.gguf", n_ctx=1024) as v:
        prompt = CONTRACT.prompt_for(v.marker())
        for seed in range(2):
            inputs = hf_vlm.prompt_inputs(processor, CONTRACT.prompt, CONTRACT.labels, canvas(seed))
            layout = v.layout(prompt, canvas(seed))
            assert expand(layout, image_id) == inputs["input_ids"][0].tolist()
            n_image = sum(c.n_tokens for c in layout if c.kind == "image")
            assert n_image == geometry.image_tokens(geometry.llama_layout(NEW.tile, NEW.longest_edge),
                                                    NEW.tile, TINY.patch, TINY.scale_factor) == 80
            # the interpolated table is what llama.cpp adds too: the first-token logits agree at f32
            hf = hf_vlm.first_logits(model, inputs).numpy()
            ll = v.first_logits(prompt, canvas(seed))[: len(hf)]
            assert np.abs(ll - hf).max() < 1e-3
