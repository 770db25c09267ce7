"""Benchmark: resize256's canvas path against the seed's `resize_for_android`, same images, one run.

Inputs:  the embedded demo photos (default, offline) or every file of --images DIR.
Outputs: a table on stdout: images/s for the seed function (one process, as the seed runs
         it), for our path on one core, and for our path over --workers processes (the
         stage's pool), with the ratios ours / seed.
Command: python -m bench.resize [--n 100] [--images data/download/images] [--workers 2] [--repeat 3]
                                [--resample bilinear|lanczos|skia_bilinear]   (default: the contract's)

Both sides start from file bytes and end with the same lossless PNG encoder, so the
ratio compares decode + scale + draw. The seed uses LANCZOS and drops alpha; ours is
the contract's canvas (params.yaml; skia_bilinear by default: Skia's own drawing of the app's
createScaledBitmap + drawBitmap), premultiplied alpha over black, float32 fit. The best of
--repeat timings is kept: on a shared machine the minimum is the least noisy estimate.
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

from bench.common import contract
from src.config.contract import Canvas
from src.data import demo
from src.data.canvas import BadImage, canvas_png, render_png

SPEC, LABELS = contract().canvas, contract().labels  # what resize256 draws: params.yaml's contract


def resize_for_android(image: Image.Image, target_size: int = 256) -> Image.Image:
    """The seed's reference function, verbatim."""
    scale = min(target_size / image.width, target_size / image.height)
    new_w = int(image.width * scale); new_h = int(image.height * scale)  # noqa: E702 (verbatim)
    resized = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
    padded = Image.new("RGB", (target_size, target_size), (0, 0, 0))
    padded.paste(resized, ((target_size - new_w) // 2, (target_size - new_h) // 2))
    return padded


def seed_path(data: bytes) -> bytes:
    # convert("RGB") first: the seed function cannot LANCZOS-resize palette images.
    return canvas_png(resize_for_android(Image.open(io.BytesIO(data)).convert("RGB")))


def our_path(data: bytes, spec: Canvas = SPEC) -> bytes:
    try:
        return render_png(data, spec)
    except BadImage:
        return b""  # counted like a rendered one: the stage pays for the attempt too


def best_of(repeat: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def load_images(images: Path | None, n: int) -> list[bytes]:
    if images is not None:
        return [p.read_bytes() for p in sorted(images.iterdir()) if p.is_file()][:n]
    return [demo.photo(i, LABELS, 0).data for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, default=None, help="a folder of photos (default: the demo photos)")
    ap.add_argument("--n", type=int, default=100, help="number of photos")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--resample", default=SPEC.resample, help="the canvas filter of our path (default: the contract's)")
    args = ap.parse_args()
    spec = SPEC.model_copy(update={"resample": args.resample})
    ours = functools.partial(our_path, spec=spec)
    photos = load_images(args.images, args.n)
    mpix = sum(Image.open(io.BytesIO(d)).width * Image.open(io.BytesIO(d)).height for d in photos) / 1e6
    print(f"bench.resize: {len(photos)} photos, {mpix:.1f} Mpixel, {os.cpu_count()} cores, best of {args.repeat}, "
          f"ours with resample={spec.resample}")
    seed_s = best_of(args.repeat, lambda: [seed_path(d) for d in photos])
    ours_1 = best_of(args.repeat, lambda: [ours(d) for d in photos])
    with ProcessPoolExecutor(args.workers) as pool:
        list(pool.map(ours, photos[: args.workers * 2]))  # start the workers outside the timing
        ours_n = best_of(args.repeat, lambda: list(pool.map(ours, photos, chunksize=4)))
    rate = {k: len(photos) / v for k, v in (("seed", seed_s), ("ours_1", ours_1), ("ours_n", ours_n))}
    print(f"  seed resize_for_android, 1 process : {rate['seed']:8.1f} images/s")
    print(f"  resize256 path, 1 process          : {rate['ours_1']:8.1f} images/s   ratio {rate['ours_1'] / rate['seed']:.2f}x")
    print(f"  resize256 path, {args.workers} workers          : {rate['ours_n']:8.1f} images/s   "
          f"ratio {rate['ours_n'] / rate['seed']:.2f}x")


if __name__ == "__main__":
    main()
