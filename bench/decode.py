"""Section 2 of `python -m bench.run`: decode steps and time per photo, four ways, in llama.cpp.

  unconstrained  greedy, EOS ignored, 32 new tokens: what the app pays when EOS is <|im_end|>
  eos            greedy, stop at the contract's EOS (<end_of_utterance>)
  grammar        a GBNF admitting exactly the five " label" tokens, then EOS (forced by the grammar)
  score          no decoding: argmax of the first-token logits over the five label tokens

"tokens" counts sampled tokens (the stop token included); "decodes" counts llama_decode calls after
the prefill (a token needs one only if another token follows it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import llama_cpp
import numpy as np

from src.contract import Contract
from src.llama_runtime import LlamaVLM

MODES = ("unconstrained", "eos", "grammar", "score")


@dataclass(frozen=True)
class Decoded:
    label: str | None
    tokens: int
    decodes: int
    seconds: float


def label_grammar(c: Contract) -> str:
    """The GBNF: src/grammar.py's `gbnf(labels, target)` when present, else one alternative per label."""
    try:
        from src.grammar import gbnf
    except ImportError:
        return "root ::= " + " | ".join(f'"{c.target.text(label)}"' for label in c.labels)
    return gbnf(c.labels, c.target)


def grammar_sampler(v: LlamaVLM, gbnf: str) -> Any:
    """grammar -> greedy chain. A GBNF that fails to parse gives NULL: refuse it rather than run unconstrained."""
    g = llama_cpp.llama_sampler_init_grammar(v.llm._model.vocab, gbnf.encode(), b"root")
    if not g:
        raise ValueError(f"GBNF does not parse: {gbnf!r}")
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    llama_cpp.llama_sampler_chain_add(chain, g)
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
    return chain


def parse(text: str, c: Contract) -> str | None:
    """The label an app would read: the answer's first label, whatever follows it."""
    for label in c.labels:
        if text.startswith(c.target.text(label)):
            return label
    return None


def run_one(v: LlamaVLM, prompt: str, canvas: Any, mode: str, c: Contract, label_ids: list[int],
            sampler: Any, max_new: int) -> Decoded:
    """One photo, prefill included in `seconds`. Uses LlamaVLM's prefill and logits so the prompt path is eval_parity's."""
    t0 = time.perf_counter()
    v._prefill(prompt, canvas)
    ctx, vocab = v.llm._ctx.ctx, v.llm._model.vocab
    if mode == "score":
        logits = v._logits()
        label = c.labels[int(np.argmax(logits[label_ids]))]
        return Decoded(label, 0, 0, time.perf_counter() - t0)
    if sampler is not None:
        llama_cpp.llama_sampler_reset(sampler)
    toks: list[int] = []
    decodes = 0
    for _ in range(max_new):
        if sampler is not None:
            tok = int(llama_cpp.llama_sampler_sample(sampler, ctx, -1))  # applies the grammar, then accepts
        else:
            tok = int(np.argmax(v._logits()))
        if mode != "unconstrained" and llama_cpp.llama_vocab_is_eog(vocab, tok):
            return Decoded(parse(v.llm.detokenize(toks).decode(errors="replace"), c), len(toks) + 1, decodes,
                           time.perf_counter() - t0)
        toks.append(tok)
        if len(toks) == max_new:
            break
        if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one((llama_cpp.llama_token * 1)(tok), 1)) != 0:
            raise RuntimeError("llama_decode failed")
        decodes += 1
    return Decoded(parse(v.llm.detokenize(toks).decode(errors="replace"), c), len(toks), decodes,
                   time.perf_counter() - t0)


def four_ways(v: LlamaVLM, c: Contract, label_ids: list[int], photos: list[tuple[Any, str]],
              modes: tuple[str, ...] = MODES) -> dict[str, dict[str, float]]:
    """Per mode: mean tokens, max tokens, mean decodes, mean seconds per photo, accuracy against the truth."""
    prompt = c.prompt_for(v.marker())
    chain = grammar_sampler(v, label_grammar(c))
    out = {}
    try:
        run_one(v, prompt, photos[0][0], "score", c, label_ids, None, 1)  # warm the graphs once
        for mode in modes:
            rs = [run_one(v, prompt, canvas, mode, c, label_ids, chain if mode == "grammar" else None,
                          c.generation.max_new_tokens) for canvas, _ in photos]
            out[mode] = {"tokens_mean": float(np.mean([r.tokens for r in rs])), "tokens_max": max(r.tokens for r in rs),
                         "decodes_mean": float(np.mean([r.decodes for r in rs])),
                         "seconds": float(np.median([r.seconds for r in rs])),
                         "accuracy": float(np.mean([r.label == truth for r, (_, truth) in zip(rs, photos)])),
                         "invalid": float(np.mean([r.label is None for r in rs]))}
    finally:
        llama_cpp.llama_sampler_free(chain)
    return out
