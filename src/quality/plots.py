"""PNG plots a reviewer looks at instead of reading tables: confusion matrix, per-class accuracy, sample grid.

Pure functions from data to PNG bytes (the release stage writes them atomically).
They use matplotlib's object API with the Agg canvas, never pyplot's global
state, and strip the `Software` metadata so the bytes depend on the data (and
the matplotlib version) only.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from src.config.artifacts import PLOTS
from src.data.files import write_bytes_atomic

INVALID = "invalid"


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def confusion_counts(truth: list[str], pred: list[str], labels: tuple[str, ...]) -> tuple[list[str], np.ndarray]:
    """(column names, counts[truth, predicted]); an `invalid` column only when some answer was invalid."""
    cols = [*labels, INVALID] if any(p not in labels for p in pred) else list(labels)
    m = np.zeros((len(labels), len(cols)), dtype=int)
    for t, p in zip(truth, pred, strict=True):
        m[labels.index(t), cols.index(p if p in labels else INVALID)] += 1
    return cols, m


def confusion_png(truth: list[str], pred: list[str], labels: tuple[str, ...], title: str) -> bytes:
    cols, m = confusion_counts(truth, pred, labels)
    fig = Figure(figsize=(1.2 + 0.9 * len(cols), 1.2 + 0.8 * len(labels)), layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(m, cmap="Blues", vmin=0, vmax=max(int(m.max()), 1))
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > m.max() / 2 else "black")
    ax.set_xticks(range(len(cols)), cols, rotation=30)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    ax.set_title(title)
    return _png(fig)


def per_class_accuracy(truth: list[str], pred: list[str], labels: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """{label: {n, correct, accuracy}} over the rows whose truth is that label."""
    out = {}
    for label in labels:
        hits = [p == t for t, p in zip(truth, pred, strict=True) if t == label]
        out[label] = {"n": len(hits), "correct": sum(hits), "accuracy": round(sum(hits) / len(hits), 4) if hits else 0.0}
    return out


def per_class_png(acc: dict[str, dict[str, float]], title: str) -> bytes:
    labels = list(acc)
    fig = Figure(figsize=(1.5 + 1.0 * len(labels), 3.2), layout="constrained")
    ax = fig.add_subplot()
    bars = ax.bar(labels, [acc[x]["accuracy"] for x in labels], color="tab:blue")
    # n on each bar: 1.0 over 3 photos and 1.0 over 300 are different claims
    ax.bar_label(bars, [f"{acc[x]['correct']}/{acc[x]['n']}" for x in labels])
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    return _png(fig)


def short_name(name: str, width: int = 24) -> str:
    """A photo's name cut to fit under a tile, keeping the end (the file name of a path or URL)."""
    return name if len(name) <= width else "…" + name[-(width - 1):]


def sample_grid_png(tiles: list[tuple[Image.Image, str, str, str]], cols: int, title: str) -> bytes:
    """Canvases with the photo's name, `truth -> predicted` under each; wrong answers in red."""
    if not tiles:
        raise ValueError("sample grid: no canvases")
    rows = -(-len(tiles) // cols)
    fig = Figure(figsize=(1.6 * cols, 1.85 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (img, name, truth, pred) in zip(axes.flat, tiles):
        ax.imshow(np.asarray(img.convert("RGB")))
        ax.set_title(f"{short_name(name)}\n{truth} -> {pred}", fontsize=8, color="black" if truth == pred else "red")
    fig.suptitle(title)
    return _png(fig)


def grid_rows(rows: list[dict[str, str]], labels: tuple[str, ...], n: int) -> list[dict[str, str]]:
    """Up to `n` rows: every mistake first (what a reviewer needs to see), then classes in turn."""
    wrong = sorted((r for r in rows if r["pred"] != r["truth"]), key=lambda r: r["name"])
    right = {label: sorted((r for r in rows if r["pred"] == r["truth"] == label), key=lambda r: r["name"])
             for label in labels}
    picked = wrong[:n]
    i = 0
    while len(picked) < n and any(i < len(v) for v in right.values()):
        picked += [v[i] for v in right.values() if i < len(v)][: n - len(picked)]
        i += 1
    return picked


def review_plots(out: Path, resize256: Path, rows: list[dict[str, str]], per_class: dict[str, Any],
                 labels: tuple[str, ...], grid: dict[str, Any], title: str) -> None:
    """confusion.png, per_class_accuracy.png, sample_grid.png (photos by name) into `out`."""
    truth, pred = [r["truth"] for r in rows], [r["pred"] for r in rows]
    write_bytes_atomic(out / PLOTS["confusion"], confusion_png(truth, pred, labels, title))
    write_bytes_atomic(out / PLOTS["per_class"], per_class_png(per_class, title))
    tiles = [(Image.open(resize256 / r["canvas"]), r["name"], r["truth"], r["pred"])
             for r in grid_rows(rows, labels, grid["n"])]
    write_bytes_atomic(out / PLOTS["grid"], sample_grid_png(tiles, grid["cols"], title))
