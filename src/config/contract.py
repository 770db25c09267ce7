"""The inference contract: everything training and the app must agree on.

The values live in `params.yaml: contract:` (one source of truth, hashed by DVC)
and ship next to the model as `contract.json`. This module only gives them
types and renders them for each runtime; it never states a value itself.

Why the prompt is a template and not the app's literal string: `<__media__>`
is llama.cpp's media *marker*, which mtmd replaces by the image chunk. Written
into a transformers prompt it is just text, and the model would train without
ever seeing the picture. So the template holds `{image}`, rendered as the
processor's `<image>` token for transformers and as `mtmd_default_marker()`
for llama.cpp, and eval_parity checks both give the same token ids.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

Resample = Literal["bilinear", "lanczos", "skia_bilinear"]
Alpha = Literal["composite_black", "drop"]
Exif = Literal["ignore", "apply"]

IMAGE_SLOT = "{image}"
LABELS_SLOT = "{labels}"


@dataclass(frozen=True)
class CanvasSpec:
    """How a photo becomes the square canvas the app draws.

    size: canvas side; the photo is scaled by min(size/w, size/h) (float32, as
        Kotlin computes it), each side truncated like Kotlin's `toInt()`, and
        drawn centred with integer offsets on black.
    resample: filter of the scaling step.
    alpha: `composite_black` is what drawing an ARGB_8888 bitmap onto a black
        canvas does; `drop` keeps whatever colour transparent pixels carry.
    exif: `ignore` is what `BitmapFactory.decode*` does; `apply` rotates first.
    max_pixels: photos above this are refused before decoding (a decompression
        bomb guard the app shares, not a rendering choice).
    """

    size: int
    resample: Resample
    alpha: Alpha
    exif: Exif
    max_pixels: int


@dataclass(frozen=True)
class PromptSpec:
    """The app prompt. `template` holds `{image}` once and may hold `{labels}`."""

    template: str
    chat_template: bool

    def render(self, image_marker: str, labels: tuple[str, ...]) -> str:
        if self.template.count(IMAGE_SLOT) != 1:
            raise ValueError(f"prompt template must hold {IMAGE_SLOT} exactly once: {self.template!r}")
        if self.chat_template:
            raise NotImplementedError("contract.prompt.chat_template: true is not supported; the app sends the raw prompt")
        return self.template.replace(LABELS_SLOT, ", ".join(labels)).replace(IMAGE_SLOT, image_marker)


@dataclass(frozen=True)
class TargetSpec:
    """How an answer is written: `prefix + label`, then the `eos` token."""

    prefix: str
    eos: str

    def text(self, label: str) -> str:
        return self.prefix + label


@dataclass(frozen=True)
class GenerationSpec:
    """Decoding as the app runs it. Greedy means temperature 0, top-k 1, no repeat penalty."""

    max_new_tokens: int
    temperature: float
    top_k: int
    repeat_penalty: float

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 and self.top_k == 1 and self.repeat_penalty == 1


@dataclass(frozen=True)
class VisionSpec:
    """Vision geometry written into the processor config before conversion.

    tile: the vision encoder's input side (`vision_config.image_size`).
    longest_edge: both runtimes resize the canvas so its longest edge is this,
        then cut tiles. llama.cpp always adds an overview tile, transformers
        only when it splits, so longest_edge must be at least 2 x tile for
        their layouts to agree (eval_parity's layout rung checks it).
    """

    tile: int
    longest_edge: int


@dataclass(frozen=True)
class Contract:
    canvas: CanvasSpec
    prompt: PromptSpec
    labels: tuple[str, ...]
    target: TargetSpec
    generation: GenerationSpec
    vision: VisionSpec

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Contract:
        return cls(
            canvas=CanvasSpec(**d["canvas"]),
            prompt=PromptSpec(**d["prompt"]),
            labels=labels_of(d),
            target=TargetSpec(**d["target"]),
            generation=GenerationSpec(**d["generation"]),
            vision=VisionSpec(**d["vision"]),
        )

    def prompt_for(self, image_marker: str) -> str:
        return self.prompt.render(image_marker, self.labels)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def load(cls, path: Path) -> Contract:
        return cls.from_dict(json.loads(path.read_text()))


def labels_of(contract: dict[str, Any]) -> tuple[str, ...]:
    labels = tuple(contract["labels"])
    if len(set(labels)) != len(labels) or not all(isinstance(x, str) and x for x in labels):
        raise ValueError(f"contract.labels must be distinct non-empty strings: {labels}")
    return labels
