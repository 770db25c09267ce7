"""Typed params sections that code receives, besides the contract (`src/contract.py`).

A stage validates the params it declares into these models and hands its code the typed object;
`src/schema.py` assembles them, with the sections no code receives typed, into the whole file's
schema. Like the contract, this module states types and rules, never a value, and imports no
feature code: feature modules import their types from here.
"""

from __future__ import annotations

from typing import Literal

# The teacher's enums (label.teacher.*): src/teacher reads them, the schema refuses anything else.
Mode = Literal["online", "batch"]
Detail = Literal["low", "high", "auto"]
ResponseFormat = Literal["json_schema", "json_object", "json_schema_bounded"]
MaxTokensField = Literal["max_completion_tokens", "max_tokens"]
