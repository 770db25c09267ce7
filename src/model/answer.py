"""Reading an answer: what counts as a label, and the label probabilities of the first token.

eval_parity, the reading client and the benchmark read answers through these functions, so
"valid answer" means the same thing in the parity gates, in the app's reference client and in
the timings.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from src.config.contract import Contract, Target


def label_token_ids(tokenize: Callable[[str], list[int]], labels: tuple[str, ...], target: Target) -> list[int]:
    """Each label's one token id (`target.prefix + label`, tokenized without special tokens).

    First-token scoring reads one logit per label, so a label the vocabulary splits is refused
    rather than scored by its first piece. `tokenize` is the runtime's: transformers or llama.cpp.
    """
    ids = []
    for label in labels:
        toks = list(tokenize(target.text(label)))
        if len(toks) != 1:
            raise ValueError(f"label {label!r} written as {target.text(label)!r} is {len(toks)} tokens {toks}; "
                             "the contract needs each label to be one token")
        ids.append(toks[0])
    return ids


def parse_answer(text: str, stopped: bool, contract: Contract) -> str | None:
    """The label, if the answer is exactly one label and generation stopped within the budget."""
    for label in contract.labels:
        if stopped and text == contract.target.text(label):
            return label
    return None


def label_probs(first_logits: np.ndarray, label_ids: list[int]) -> np.ndarray:
    """The labels' probabilities from the first answer token's logits (the softmax over the label tokens only)."""
    return softmax(first_logits[label_ids])


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12))))
