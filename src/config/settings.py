"""Typed params sections that code receives, besides the contract (`src/config/contract.py`).

A stage validates the params it declares into these models and hands its code the typed object;
`src/config/schema.py` assembles them, with the sections no code receives typed, into the whole file's
schema. Like the contract, this module states types and rules, never a value, and imports no
feature code: feature modules import their types from here.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, model_validator

from src.config.contract import NonNegF, Pos, PosF, Section, Text, rule

Rate = Annotated[float, Field(ge=0, le=1)]
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# The teacher's enums (label.teacher.*): src/labeling/teacher reads them, the schema refuses anything else.
Mode = Literal["online", "batch"]
Detail = Literal["low", "high", "auto"]
ResponseFormat = Literal["json_schema", "json_object", "json_schema_bounded"]
MaxTokensField = Literal["max_completion_tokens", "max_tokens"]


# ---- download.http -----------------------------------------------------------------------------

class Http(Section):
    """download.http: how download fetches URLs."""

    workers: Annotated[int, Field(ge=1, le=64)]
    timeout_s: PosF  # per attempt, whole response: a slow-dripping host cannot hold a worker forever
    retries: Annotated[int, Field(ge=0, le=10)]
    backoff_s: NonNegF
    max_bytes: Pos
    user_agent: Text
    snapshot: str  # the URL refresh policy: see src/stages/download.py's docstring


# ---- label -------------------------------------------------------------------------------------

class Teacher(Section):
    base_url: Annotated[str, Field(pattern=r"^https?://\S+$")]
    model: Text
    api_key_env: Text
    detail: Detail
    max_tokens: Pos
    max_tokens_field: MaxTokensField
    response_format: ResponseFormat
    temperature: NonNegF | None
    timeout_s: PosF
    mode: Mode
    prompt: Text

    @model_validator(mode="after")
    def env_name(self) -> Teacher:
        if not ENV_NAME.fullmatch(self.api_key_env):
            # the key itself must never sit in params.yaml: this holds the variable's name
            raise rule("api_key_env", "<hidden>", "not an environment variable name (is it the key itself?)",
                       "the NAME of the variable that holds the key, e.g. OPENAI_API_KEY")
        return self


class Batch(Section):
    poll_s: PosF
    wait_s: NonNegF


class Price(Section):
    input_per_1m: NonNegF
    output_per_1m: NonNegF
    batch_discount: Rate


class Queue(Section):
    folds: Annotated[int, Field(ge=2, le=50)]
    seed: int
    C: PosF
    batch_size: Pos


class Label(Section):
    """label: the labelling stage's params; src/labeling/teacher receives them whole."""

    provider: Literal["manifest", "teacher"]
    max_failure_rate: Rate
    concurrency: Annotated[int, Field(ge=1, le=1000)]
    max_attempts: Annotated[int, Field(ge=1, le=20)]
    answer_attempts: Annotated[int, Field(ge=1, le=10)]
    backoff_s: NonNegF
    teacher: Teacher
    batch: Batch
    price: Price
    queue: Queue


# ---- base.builder ------------------------------------------------------------------------------

class Builder(Section):
    """base.builder: sizes of the offline SmolVLM (src/model/hf_vlm.py build); tiny in tests, small in the demo."""

    vision_hidden: Pos
    vision_layers: Pos
    vision_heads: Pos
    patch: Pos
    scale_factor: Pos
    text_hidden: Pos
    text_layers: Pos
    text_heads: Pos
    text_kv_heads: Pos
    seed: int

    @model_validator(mode="after")
    def heads_divide(self) -> Builder:
        for hidden, heads in (("vision_hidden", "vision_heads"), ("text_hidden", "text_heads")):
            if getattr(self, hidden) % getattr(self, heads):
                raise rule(heads, getattr(self, heads), f"does not divide {hidden} = {getattr(self, hidden)}",
                           f"a divisor of {getattr(self, hidden)}")
        if self.text_heads % self.text_kv_heads:
            raise rule("text_kv_heads", self.text_kv_heads, f"does not divide text_heads = {self.text_heads}",
                       f"a divisor of {self.text_heads}")
        return self
