"""The review queue: every labelled photo ranked by how strongly a model that never saw its label disagrees.

Used by src/stages/label.py after the labels (and the human overrides) are final. Confident learning
(cleanlab): out-of-fold class probabilities from a logistic regression on the base's frozen, pooled vision
features (`hf_vlm.pooled_vision`, the same encoder output finetune caches), then cleanlab's label quality
score (the out-of-fold probability of the given label) and its issue filter. CPU only, no teacher call.

Features are cached per base model under the label cache (`features/<base sha256>.npz`, canvas sha256 ->
vector), so a rerun after a review (new overrides) costs the regression alone, not the encoder.
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from src.data.files import sha256_file, write_bytes_atomic

QUEUE_COLUMNS = ("rank", "name", "sha256", "label", "guess", "p_guess", "p_label", "score", "suspect", "provider",
                 "reason")
REVIEW_COLUMNS = ("name", "element", "note", "approve")  # the overrides file's columns (src/stages/label.py)


@dataclass(frozen=True)
class QueueParams:
    folds: int
    seed: int
    C: float
    batch_size: int


def features(base: Path, canvases: list[Path], shas: list[str], cache_dir: Path, batch_size: int) -> np.ndarray:
    """(n, vision hidden) pooled frozen vision features of the canvases, computed only for those not cached."""
    store = cache_dir / "features" / f"{sha256_file(base / 'model.safetensors')[:16]}.npz"
    cached: dict[str, np.ndarray] = {}
    if store.exists():
        with np.load(store) as z:
            cached = dict(zip(z["sha"].tolist(), z["x"]))
    todo = sorted({s: c for s, c in zip(shas, canvases) if s not in cached}.items())
    if todo:
        cached.update(encode(base, [c for _, c in todo], batch_size, [s for s, _ in todo]))
        buf = io.BytesIO()
        keys = sorted(cached)
        np.savez(buf, sha=np.array(keys), x=np.stack([cached[k] for k in keys]))
        write_bytes_atomic(store, buf.getvalue())
    return np.stack([cached[s] for s in shas]).astype(np.float64)


def encode(base: Path, canvases: list[Path], batch_size: int, keys: list[str]) -> dict[str, np.ndarray]:
    """key -> pooled features, the canvases run through the base's frozen vision tower in batches."""
    from PIL import Image
    from tqdm import tqdm

    from src.model import hf_vlm

    model, processor = hf_vlm.load(str(base))
    out: dict[str, np.ndarray] = {}
    for i in tqdm(range(0, len(canvases), batch_size), desc="queue features"):
        images = []
        for path in canvases[i:i + batch_size]:
            with Image.open(path) as img:
                images.append(img.copy())
        out.update(zip(keys[i:i + batch_size], encode_batch(model, processor, images)))
    return out


def encode_batch(model: Any, processor: Any, images: list[Any]) -> np.ndarray:
    """(len(images), vision hidden): the canvases' pooled frozen vision features, in one forward."""
    import torch

    from src.model import hf_vlm

    px = [hf_vlm.canvas_pixels(processor, img) for img in images]
    with torch.no_grad():
        return hf_vlm.pooled_vision(model, torch.stack([p["pixel_values"] for p in px]),
                                 torch.stack([p["pixel_attention_mask"] for p in px])).numpy()


def cannot_hold_out(elements: list[str], labels: tuple[str, ...]) -> str | None:
    """Why no model can hold a photo out of these labels (one class; a class of one photo, the first in the
    contract's order), or None."""
    counts = {label: n for label in labels if (n := elements.count(label))}
    if len(counts) < 2:
        return f"only {list(counts)} labelled: the queue needs two classes or more"
    rare = min(counts, key=lambda label: counts[label])
    if counts[rare] < 2:
        return f"class {rare!r} has {counts[rare]} labelled photo: out-of-fold probabilities need 2 or more a class"
    return None


def out_of_fold(x: np.ndarray, y: np.ndarray, n_classes: int, q: QueueParams,
                names: tuple[str, ...]) -> tuple[np.ndarray, int]:
    """(n, n_classes) probabilities, each row from a model fitted on the other folds; and the folds used.

    A class with fewer photos than q.folds lowers the folds to its count (stratified folds need one of
    each class in every fold); below 2 photos no model can hold one out: a ValueError naming the class.
    A class with no photo gets probability 0.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    why = cannot_hold_out([names[c] for c in y], names)
    if why:
        raise ValueError(why)
    counts = np.bincount(y, minlength=n_classes)
    present = np.flatnonzero(counts)
    folds = int(min(q.folds, counts[present].min()))
    index = np.full(n_classes, -1)
    index[present] = np.arange(len(present))
    # standardised: C then means the same on any encoder's feature scale
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=q.C, max_iter=5000))
    cv = StratifiedKFold(folds, shuffle=True, random_state=q.seed)
    p = cross_val_predict(clf, x, index[y], cv=cv, method="predict_proba")
    probs = np.zeros((len(y), n_classes))
    probs[:, present] = p
    return probs, folds


def scores(y: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(label quality in [0, 1], low = suspect; cleanlab's issue flag) per photo."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    present = np.flatnonzero(probs.sum(axis=0) > 0)  # cleanlab wants every column's class labelled
    index = np.full(probs.shape[1], -1)
    index[present] = np.arange(len(present))
    p = probs[:, present] / probs[:, present].sum(axis=1, keepdims=True)
    return get_label_quality_scores(index[y], p), find_label_issues(index[y], p)


def rank(rows: list[dict[str, Any]], x: np.ndarray, labels: tuple[str, ...],
         q: QueueParams) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The queue (labelled rows, most suspect first) and its metrics.

    A photo a person has already overridden is ranked but never a suspect: its label is the review's answer.
    """
    y = np.array([labels.index(r["element"]) for r in rows])
    probs, folds = out_of_fold(x, y, len(labels), q, labels)
    quality, issue = scores(y, probs)
    guess = probs.argmax(axis=1)
    queue = []
    for i, r in enumerate(rows):
        suspect = bool(issue[i]) and r["provider"] != "override"
        queue.append({"name": r["name"], "sha256": r["canvas_sha256"], "id": r["id"], "canvas": r["canvas"],
                      "label": labels[y[i]], "guess": labels[guess[i]], "p_guess": round(float(probs[i, guess[i]]), 4),
                      "p_label": round(float(probs[i, y[i]]), 4), "score": round(float(quality[i]), 6),
                      "suspect": suspect, "provider": r["provider"], "reason": r.get("reason") or ""})
    queue.sort(key=lambda e: (e["score"], e["name"], e["sha256"]))  # ties by name: the same order on every run
    for n, e in enumerate(queue, start=1):
        e["rank"] = n
    pairs = Counter(f"{e['label']}->{e['guess']}" for e in queue if e["suspect"])
    m = {"photos": len(queue), "folds": folds, "oof_agreement": round(float(np.mean(guess == y)), 6),
         "n_suspects": sum(pairs.values()), "suspects": dict(sorted(pairs.items()))}
    return queue, m


def review_rows(queue: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The suspects as rows of the overrides file, the guess filled in, to approve (or correct) and copy over."""
    return [{"name": e["name"], "element": e["guess"], "approve": "",
             "note": f"queue rank {e['rank']}: labelled {e['label']} (p {e['p_label']:.2f}), "
                     f"looks like {e['guess']} (p {e['p_guess']:.2f})"}
            for e in queue if e["suspect"]]
