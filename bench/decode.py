"""Section 2 of `python -m bench.run`: decode steps and time per photo, four ways, in llama.cpp.

Each mode times a function the project runs, not a copy of it:

  unconstrained  LlamaVLM.generate(stop_at_eos=False): 32 new tokens, what the app pays when EOS is <|im_end|>
  eos            LlamaVLM.generate: greedy, stop at the contract's EOS (eval_parity's decode)
  grammar        src/client/fortune.read_one: generate(grammar=...) with Constraint.mask, then the answer read
                 and scored by src/model/answer.py (what the reading client runs per photo)
  score          no decoding: LlamaVLM.first_logits, argmax of answers.label_probs

"tokens" counts sampled tokens (the stop token included); "decodes" counts llama_decode calls after
the prefill (generate decodes once per sampled token that is not the stop token).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from src.client.fortune import read_one
from src.config.contract import Contract
from src.model.answer import label_probs, parse_answer
from src.runtime.grammar import gbnf
from src.runtime.llama_vlm import LlamaVLM

MODES = ("unconstrained", "eos", "grammar", "score")


@dataclass(frozen=True)
class Decoded:
    label: str | None
    tokens: int
    decodes: int
    seconds: float


def run_one(v: LlamaVLM, prompt: str, canvas: Any, mode: str, c: Contract, label_ids: list[int],
            grammar: str) -> Decoded:
    """One photo, prefill included in `seconds`."""
    t0 = time.perf_counter()
    if mode == "score":
        label = c.labels[int(np.argmax(label_probs(v.first_logits(prompt, canvas), label_ids)))]
        return Decoded(label, 0, 0, time.perf_counter() - t0)
    if mode == "grammar":
        read, ans = read_one(v, prompt, canvas, c, grammar, label_ids)
        label = read["element"]
    else:
        ans = v.generate(prompt, canvas, c.generation, stop_at_eos=mode != "unconstrained")
        label = parse_answer(ans.text, ans.stopped, c)
    return Decoded(label, len(ans.tokens) + ans.stopped, len(ans.tokens), time.perf_counter() - t0)


def four_ways(v: LlamaVLM, c: Contract, label_ids: list[int], photos: list[tuple[Any, str]],
              modes: tuple[str, ...] = MODES) -> dict[str, dict[str, float]]:
    """Per mode: mean tokens, max tokens, mean decodes, mean seconds per photo, accuracy against the truth."""
    prompt, grammar = c.prompt_for(v.marker()), gbnf(c.labels, c.target)
    run_one(v, prompt, photos[0][0], "score", c, label_ids, grammar)  # warm the graphs once
    out = {}
    for mode in modes:
        rs = [run_one(v, prompt, canvas, mode, c, label_ids, grammar) for canvas, _ in photos]
        out[mode] = {"tokens_mean": float(np.mean([r.tokens for r in rs])), "tokens_max": max(r.tokens for r in rs),
                     "decodes_mean": float(np.mean([r.decodes for r in rs])),
                     "seconds": float(np.median([r.seconds for r in rs])),
                     "accuracy": float(np.mean([r.label == truth for r, (_, truth) in zip(rs, photos)])),
                     "invalid": float(np.mean([r.label is None for r in rs]))}
    return out
