"""The inference contract: everything training and the app must agree on.

The values live in `params.yaml: contract:` (one source of truth, hashed by DVC)
and ship next to the model as `contract.json`. This module is their one typed
definition: the params schema (`src/config/schema.py`) checks `contract:` with these
models, and every stage and the client receive them. It gives the values types
and rules and renders them for each runtime; it never states a value itself.
Each rule is a validator, so a contract that breaks one cannot be constructed.

Why the prompt is a template and not the app's literal string: `<__media__>`
is llama.cpp's media *marker*, which mtmd replaces by the image chunk. Written
into a transformers prompt it is just text, and the model would train without
ever seeing the picture. So the template holds `{image}`, rendered as the
processor's `<image>` token for transformers and as `mtmd_default_marker()`
for llama.cpp, and eval_parity checks both give the same token ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, model_validator
from pydantic_core import PydanticCustomError

Resample = Literal["bilinear", "lanczos", "skia_bilinear"]
Alpha = Literal["composite_black", "drop"]
Exif = Literal["ignore", "apply"]

IMAGE_SLOT = "{image}"
LABELS_SLOT = "{labels}"

Pos = Annotated[int, Field(gt=0)]
NonNeg = Annotated[int, Field(ge=0)]
PosF = Annotated[float, Field(gt=0)]
NonNegF = Annotated[float, Field(ge=0)]
Text = Annotated[str, Field(min_length=1)]


class Section(BaseModel):
    """A params section: strict types (no coercion), unknown keys refused, immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def rule(key: str, value: Any, why: str, expected: str) -> PydanticCustomError:
    """A rule broken at `key` (dotted, relative to the model that checks it; "" for the checked value itself);
    the schema words it."""
    return PydanticCustomError("rule", "{why}", {"key": key, "value": value, "why": why, "expected": expected})


class Canvas(Section):
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

    size: Annotated[int, Field(ge=16, le=4096)]
    resample: Resample
    alpha: Alpha
    exif: Exif
    max_pixels: Pos


class Prompt(Section):
    """The app prompt. `template` holds `{image}` once and may hold `{labels}`."""

    template: Text
    chat_template: Literal[False]  # the app sends the raw prompt; nothing renders a chat template

    @model_validator(mode="after")
    def one_image(self) -> Prompt:
        if self.template.count(IMAGE_SLOT) != 1:
            raise rule("template", self.template, "the image placeholder must appear exactly once",
                       "one {image} (rendered as each runtime's image marker)")
        return self

    def render(self, image_marker: str, labels: tuple[str, ...]) -> str:
        return self.template.replace(LABELS_SLOT, ", ".join(labels)).replace(IMAGE_SLOT, image_marker)


class Target(Section):
    """How an answer is written: `prefix + label`, then the `eos` token."""

    prefix: str
    eos: Text

    def text(self, label: str) -> str:
        return self.prefix + label


class Generation(Section):
    """Decoding as the app runs it. Greedy means temperature 0, top-k 1, no repeat penalty."""

    max_new_tokens: Annotated[int, Field(ge=1, le=4096)]
    temperature: NonNegF
    top_k: NonNeg
    repeat_penalty: PosF

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 and self.top_k == 1 and self.repeat_penalty == 1


class Vision(Section):
    """Vision geometry written into the processor config before conversion.

    tile: the vision encoder's input side (`vision_config.image_size`).
    longest_edge: both runtimes resize the canvas so its longest edge is this,
        then cut tiles. llama.cpp always adds an overview tile, transformers
        only when it splits, so longest_edge must be at least 2 x tile for
        their layouts to agree (eval_parity's layout rung checks it).
    """

    tile: Annotated[int, Field(ge=16)]
    longest_edge: Annotated[int, Field(ge=16)]

    @model_validator(mode="after")
    def layouts_agree(self) -> Vision:
        if self.longest_edge < 2 * self.tile:
            raise rule("longest_edge", self.longest_edge, f"below 2 x tile ({2 * self.tile}): transformers and "
                       "llama.cpp would lay the image out differently", f"at least {2 * self.tile}")
        return self


def _tuple(value: Any) -> Any:
    """YAML and JSON give a list; the labels are held as a tuple (an ordered, immutable set)."""
    return tuple(value) if isinstance(value, list) else value


def _distinct(labels: tuple[str, ...]) -> tuple[str, ...]:
    if len(set(labels)) != len(labels):
        raise rule("", list(labels), "labels repeat", "distinct labels")
    return labels


Labels = Annotated[tuple[Text, ...], BeforeValidator(_tuple), Field(min_length=2), AfterValidator(_distinct)]
# The labels alone, typed by the same rules, for a stage that declares contract.labels and no other contract key.
LABELS: TypeAdapter[tuple[str, ...]] = TypeAdapter(Labels, config=ConfigDict(strict=True))


class Contract(Section):
    canvas: Canvas
    prompt: Prompt
    labels: Labels
    target: Target
    generation: Generation
    vision: Vision

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Contract:
        return cls.model_validate(d)

    def prompt_for(self, image_marker: str) -> str:
        return self.prompt.render(image_marker, self.labels)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def load(cls, path: Path) -> Contract:
        return cls.model_validate_json(path.read_text())
