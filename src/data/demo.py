"""The embedded demo: deterministic synthetic photos of the five elements.

No network, no key: `photo(i, labels, seed)` draws the same picture on every
machine. Each element has its own palette and texture (waves, strata, flames,
trunks, brushed plates) so a small model can learn them, and the set varies what
real photos vary: size, aspect ratio, JPEG or PNG, and transparency.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class DemoPhoto:
    id: str
    label: str
    data: bytes
    format: str


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    return y / h, x / w


def _water(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    y, x = _grid(h, w)
    f, p = rng.uniform(6, 14), rng.uniform(0, 6.3)
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * f * (y + 0.05 * np.sin(2 * np.pi * 3 * x + p)))
    rgb = np.stack([20 + 40 * wave, 90 + 70 * wave + 60 * y, 170 + 70 * wave], -1)
    return rgb


def _land(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    y, x = _grid(h, w)
    horizon = rng.uniform(0.25, 0.45)
    strata = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 8) * y + 2 * np.sin(2 * np.pi * x))
    sky = np.stack([150 + 0 * y, 190 + 0 * y, 225 + 0 * y], -1)
    ground = np.stack([120 + 60 * strata, 90 + 40 * strata, 40 + 20 * strata], -1)
    return np.where((y < horizon)[..., None], sky, ground)


def _fire(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    y, x = _grid(h, w)
    heat = np.zeros_like(y)
    for _ in range(rng.integers(3, 7)):
        cx, s = rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.2)
        heat += np.exp(-((x - cx) ** 2) / (2 * s**2)) * np.clip(y * 1.4 - 0.1, 0, 1)
    heat = np.clip(heat, 0, 1)
    return np.stack([40 + 215 * heat, 10 + 180 * heat**2, 5 + 40 * heat**4], -1)


def _wood(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    y, x = _grid(h, w)
    rgb = np.stack([40 + 60 * y, 110 + 50 * y, 40 + 20 * y], -1)  # foliage
    for _ in range(rng.integers(2, 5)):
        cx, half = rng.uniform(0.1, 0.9), rng.uniform(0.03, 0.08)
        trunk = np.abs(x - cx) < half
        grain = 0.5 + 0.5 * np.sin(2 * np.pi * 40 * x)
        bark = np.stack([100 + 30 * grain, 60 + 20 * grain, 25 + 10 * grain], -1)
        rgb = np.where(trunk[..., None], bark, rgb)
    return rgb


def _metal(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    y, x = _grid(h, w)
    angle = rng.uniform(0, np.pi)
    t = np.cos(angle) * x + np.sin(angle) * y
    brushed = 0.5 + 0.5 * np.sin(2 * np.pi * 60 * t)
    shine = np.exp(-((t - rng.uniform(0.3, 0.7)) ** 2) / 0.01)
    grey = 110 + 30 * brushed + 100 * shine
    return np.stack([grey, grey + 5, grey + 12], -1)


_PAINTERS = {"water": _water, "land": _land, "fire": _fire, "wood": _wood, "metal": _metal}


def photo(i: int, labels: tuple[str, ...], seed: int) -> DemoPhoto:
    """The i-th demo photo: label `labels[i % len]`, size, format and alpha from (seed, i)."""
    label = labels[i % len(labels)]
    if label not in _PAINTERS:
        raise ValueError(f"the demo can draw {sorted(_PAINTERS)}, not {label!r}")
    rng = np.random.default_rng([seed, i])
    w, h = int(rng.integers(160, 900)), int(rng.integers(160, 900))
    rgb = _PAINTERS[label](rng, h, w) + rng.normal(0, 6, (h, w, 3))  # sensor noise
    rgb8 = np.clip(rgb, 0, 255).astype(np.uint8)
    kind = i % 4
    if kind == 3:  # a cut-out with a transparent border whose hidden colour is white
        alpha = np.full((h, w), 255, np.uint8)
        b = max(1, min(h, w) // 8)
        alpha[:b], alpha[-b:], alpha[:, :b], alpha[:, -b:] = 0, 0, 0, 0
        rgb8[alpha == 0] = 255
        img, fmt = Image.fromarray(np.dstack([rgb8, alpha]), "RGBA"), "PNG"
    else:
        img, fmt = Image.fromarray(rgb8, "RGB"), ("JPEG" if kind < 2 else "PNG")
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return DemoPhoto(id=f"demo-{i:05d}", label=label, data=buf.getvalue(), format=fmt)
