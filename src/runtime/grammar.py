"""The answer grammar: a GBNF that admits exactly the contract's answers, and llama.cpp's sampler for it.

`gbnf(labels, target)` writes the grammar the release ships as `grammar.gbnf`:
one alternative per label, each `target.prefix + label`, nothing else. The EOS
is not in the grammar: llama.cpp's grammar sampler only lets an end-of-generation
token through once the grammar is complete, so "a label, then EOS" is what a
constrained decode can produce, and nothing else.

`Constraint` wraps `llama_sampler_init_grammar` for a greedy decode loop that
owns its logits (src/runtime/llama_vlm.LlamaVLM.generate(grammar=...)): `mask`
sets the logits of every token the grammar forbids to -inf, `accept` advances
it. With greedy decoding a constraint never changes an answer that already was
a label (the unconstrained argmax is then allowed at every step); it only turns
what would have been an invalid answer into the best-scoring label.
"""

from __future__ import annotations

import ctypes

import llama_cpp
import numpy as np

from src.config.contract import Target

ROOT_RULE = "root"


class GrammarError(ValueError):
    """llama.cpp refused the grammar (its parser logs the reason; the caller silenced the log)."""


def literal(text: str) -> str:
    """A GBNF string literal for `text`: quotes, backslashes and control characters escaped."""
    if not text:
        raise ValueError("GBNF literals here must be non-empty")
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02X}")
        else:
            out.append(ch)  # GBNF literals are UTF-8; non-ASCII needs no escape
    return '"' + "".join(out) + '"'


def gbnf(labels: tuple[str, ...], target: Target) -> str:
    """The grammar text: `root` is exactly one of `target.prefix + label`."""
    if not labels or len(set(labels)) != len(labels):
        raise ValueError(f"labels must be distinct and non-empty: {labels}")
    # Whole answers as alternatives (not prefix then label): the prefix may be empty, and one
    # alternative per answer is what a reader checks against contract.json at a glance.
    # One line: in GBNF a newline outside parentheses ends the rule.
    alts = " | ".join(literal(target.text(label)) for label in labels)
    return ("# The classifier's answer: exactly one label, written as contract.target.prefix + label.\n"
            "# The EOS (contract.target.eos) follows; llama.cpp allows it only once root is complete.\n"
            f"{ROOT_RULE} ::= {alts}\n")


class Constraint:
    """llama.cpp's grammar sampler over one decode; use as a context manager (frees the sampler)."""

    def __init__(self, vocab: llama_cpp.llama_vocab_p, grammar: str, n_vocab: int, root: str = ROOT_RULE):
        self.smpl = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), root.encode())
        if not self.smpl:
            raise GrammarError(f"llama.cpp could not parse the grammar (root {root!r}):\n{grammar}")
        # The candidate array is reused every step: one allocation, filled from numpy, no Python loop.
        self.data = np.zeros(n_vocab, dtype=np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)],
                                                     align=True))
        self.ids = np.arange(n_vocab, dtype=np.intc)

    def __enter__(self) -> Constraint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.smpl:
            llama_cpp.llama_sampler_free(self.smpl)
            self.smpl = None

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """`logits` with every token the grammar forbids next set to -inf."""
        n = len(self.data)
        self.data["id"] = self.ids
        self.data["logit"] = logits[:n]
        self.data["p"] = 0.0
        arr = llama_cpp.llama_token_data_array(data=self.data.ctypes.data_as(llama_cpp.llama_token_data_p),
                                               size=n, selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(self.smpl, ctypes.byref(arr))
        # apply() edits logits in place and never reorders an unsorted array; index by id to be sure
        out = np.full(n, -np.inf, dtype=np.float32)
        out[self.data["id"]] = self.data["logit"]
        return out

    def accept(self, token: int) -> None:
        llama_cpp.llama_sampler_accept(self.smpl, token)


def admits(constraint: Constraint, tokens: list[int], eos: int, n_vocab: int) -> bool:
    """Whether the grammar lets a decode write `tokens` and then stop with `eos` (advances `constraint`)."""
    flat = np.zeros(n_vocab, dtype=np.float32)  # every token equally likely: only the mask decides
    for tok in tokens:
        if not np.isfinite(constraint.mask(flat)[tok]):
            return False
        constraint.accept(tok)
    return bool(np.isfinite(constraint.mask(flat)[eos]))
