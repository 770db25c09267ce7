"""Reading an answer: what counts as a label, and the label probabilities of the first token.

eval_parity, the reading client and the benchmark read answers through these functions, so
"valid answer" means the same thing in the parity gates, in the app's reference client and in
the timings.
"""

from __future__ import annotations

import numpy as np

from src.contract import Contract


def parse_answer(text: str, stopped: bool, contract: Contract) -> str | None:
    """The label, if the answer is exactly one label and generation stopped within the budget."""
    for label in contract.labels:
        if stopped and text == contract.target.text(label):
            return label
    return None


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12))))
