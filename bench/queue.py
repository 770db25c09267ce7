"""The label review queue's cost against one finetune epoch, measured in the same run.

Times, on CPU: the queue's features (the frozen vision tower over N demo canvases: the demo's builder base,
and SmolVLM-256M's shapes at the real-size geometry, tile 256 / longest edge 512, on a few canvases, per photo)
and its ranking (k-fold logistic regression + cleanlab) at the demo's feature width and at SmolVLM-256M's
(768; random features for N photos: the regression's cost depends on the shape, not the values); the
baseline is one finetune epoch over the same N demo canvases (bench/stages.py, feature cache on).

Command: python -m bench.queue [--n 200] [--big 5000]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from bench import stages, tokens
from bench.common import SMOLVLM_256M_SHAPES, contract, demo_canvases, params, table
from src.config.contract import Contract, Vision
from src.config.settings import Builder
from src.labeling import review_queue
from src.model import hf_vlm


def encode_s(c: Contract, n: int, spec: Builder, vision: Vision, batch: int) -> tuple[float, np.ndarray]:
    """(seconds per photo, features) of the queue's feature pass over n demo canvases on a `spec` base."""
    model, processor = hf_vlm.build(spec, vision)
    hf_vlm.configure(model, processor, vision, c.target)
    photos = demo_canvases(n, c)
    t0 = time.perf_counter()
    out = [review_queue.encode_batch(model, processor, [img for img, _ in photos[i:i + batch]])
           for i in range(0, n, batch)]
    return (time.perf_counter() - t0) / n, np.concatenate(out)


def rank_s(x: np.ndarray, labels: tuple[str, ...], q: review_queue.QueueParams) -> float:
    rows = [{"id": str(i), "name": str(i), "canvas_sha256": str(i), "canvas": "", "element": labels[i % len(labels)],
             "provider": "manifest", "reason": ""} for i in range(len(x))]
    t0 = time.perf_counter()
    review_queue.rank(rows, x, labels, q)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=params()["download"]["demo"]["n"], help="photos (the demo's count)")
    ap.add_argument("--big", type=int, default=5000, help="photos for the ranking at scale")
    args = ap.parse_args()
    c, p = contract(), params()
    q = review_queue.QueueParams(**p["label"]["queue"])
    demo_spec = Builder.model_validate(p["base"]["builder"])
    print(f"finetune epoch on {args.n} demo canvases (baseline) ...", flush=True)
    ft = stages.finetune_epoch(c, args.n, 1)
    print("finetune epoch at SmolVLM-256M shapes on 4 canvases (the real-size baseline, per photo) ...", flush=True)
    ft256 = stages.finetune_epoch(c, 4, 1, SMOLVLM_256M_SHAPES, tokens.CHOSEN)
    print("queue features and ranking ...", flush=True)
    enc_demo, x_demo = encode_s(c, args.n, demo_spec, c.vision, q.batch_size)
    enc_real, _ = encode_s(c, 8, SMOLVLM_256M_SHAPES, tokens.CHOSEN, 4)  # the real-size geometry
    rng = np.random.default_rng(0)
    width_real = SMOLVLM_256M_SHAPES.vision_hidden
    res: dict[str, Any] = {
        "n": args.n, "epoch_s": ft["epoch_s_cache"], "epoch_fill_s": ft["cache_fill_s"],
        "epoch_256m_s_per_photo": ft256["epoch_s_cache"] / ft256["n"],
        "fill_256m_s_per_photo": ft256["cache_fill_s"] / ft256["n"],
        "demo": {"width": x_demo.shape[1], "encode_s_per_photo": enc_demo, "rank_s": rank_s(x_demo, c.labels, q)},
        "real": {"width": width_real, "encode_s_per_photo": enc_real,
                 "rank_s": rank_s(rng.normal(size=(args.n, width_real)), c.labels, q),
                 f"rank_s_{args.big}": rank_s(rng.normal(size=(args.big, width_real)), c.labels, q)}}
    d, r, n = res["demo"], res["real"], args.n
    rows = [[f"{name}, width {w['width']}", f"{w['encode_s_per_photo'] * n:.2f}", f"{w['rank_s']:.2f}",
             f"{w['encode_s_per_photo'] * n + w['rank_s']:.2f}",
             f"{(w['encode_s_per_photo'] * n + w['rank_s']) / res['epoch_s']:.2f}x"]
            for name, w in (("demo base", d), ("SmolVLM-256M shapes", r))]
    print(f"\nqueue on {n} photos against one demo finetune epoch on the same photos: {res['epoch_s']:.2f} s "
          f"(feature cache on; +{res['epoch_fill_s']:.2f} s to fill it once)\n")
    print(table(["features", "encode s", "rank s", "queue s", "queue / epoch"], rows))
    e256 = res["epoch_256m_s_per_photo"] * n
    print(f"\nat real size, one finetune epoch on {n} photos (extrapolated from 4, feature cache on): {e256:.1f} s "
          f"(+{res['fill_256m_s_per_photo'] * n:.1f} s to fill the cache: the same encoder pass as the queue's); "
          f"queue / real-size epoch: {(r['encode_s_per_photo'] * n + r['rank_s']) / e256:.2f}x")
    print(f"ranking alone at width {r['width']} on {args.big} photos: {r[f'rank_s_{args.big}']:.2f} s; "
          f"a rerun after a review pays the ranking only (features cached per base)")


if __name__ == "__main__":
    main()
