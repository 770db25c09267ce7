"""Issue 7 benchmark: image tokens, prefill, decode steps and stage speed, each against its baseline.

Command: python -m bench.run [--quick] [--skip tokens,decode,stages]   (or `make bench`)
Outputs: tables on stdout, bench/out/results.json and bench/out/results.md (gitignored; the README
         table in bench/README-results.md is copied from a run of this command).

Every ratio is measured within this one run on this machine (2 shared cores: absolute seconds
move with the load, ratios much less). Big files (a random SmolVLM-256M-sized model and its
GGUFs, the 10,000-photo DVC repo) are built once under .cache/bench and reused.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from PIL import Image

from bench import decode, stages, tokens
from bench.common import CACHE, OUT, SMOLVLM_256M_SHAPES, contract, demo_canvases, rel, table
from src.config.contract import Contract, Vision
from src.config.paths import ROOT
from src.data.files import read_jsonl
from src.model import hf_vlm
from src.runtime.grammar import gbnf
from src.runtime.llama_vlm import LlamaVLM


def section_tokens(c: Contract, quick: bool) -> tuple[dict[str, Any], str]:
    canvas = demo_canvases(1, c)[0][0]
    cands = tokens.geometry_candidates(c, canvas, CACHE / "proxy")
    scale = tokens.at_scale(c, canvas, reps_stock=1, reps_chosen=2 if quick else 4)
    md = "### Image tokens per photo (patch 16, pixel shuffle 4; 256 px canvas)\n\n" + table(
        ["tile", "longest_edge", "transformers tokens", "llama.cpp tokens", "layout identical"],
        [[r.tile, r.longest_edge, r.hf_tokens, r.llama_tokens, r.identical] for r in cands])
    md += ("\n\n### Per photo in llama.cpp at real size: the real-size base (SmolVLM-256M architecture, SmolLM2-135M "
           "text weights, seeded vision tower), f16, 2 threads\n\n" + table(
        ["geometry", "image tokens", "prompt tokens", "layout identical", "s per photo (median)", "first call s",
         "time / stock", "tokens / stock"],
        [[f"{name}: tile {r['tile']} / edge {r['longest_edge']}", r["image_tokens"], r["prompt_tokens"],
          r["layout_identical"], r["prefill_s"], r["first_call_s"], r["time_ratio_to_stock"],
          r["token_ratio_to_stock"]] for name, r in ((k, scale[k]) for k in tokens.AT_SCALE)]))
    md += ("\n\ns per photo: image encode + prefill to the first answer logits (label scoring needs no more; "
           f"the grammar adds one decode call). Chosen: image tokens {scale['token_ratio']:.1f}x fewer, "
           f"{scale['prefill_ratio']:.1f}x faster than stock")
    return {"candidates": [r.__dict__ for r in cands], "at_scale": scale}, md


def demo_photos(c: Contract, quick: bool) -> tuple[list[tuple[Any, str]], Path, Path] | None:
    """The demo test split and the shipped GGUFs (Q8_0 text + mmproj), if the pipeline has run."""
    split, canvases = ROOT / "data/split/test.jsonl", ROOT / "data/resize256"
    text, mm = ROOT / "models/quantize_q8/text-q8_0.gguf", sorted((ROOT / "models/convert_gguf").glob("mmproj-*.gguf"))
    if not (split.exists() and text.exists() and mm):
        return None
    rows = read_jsonl(split)[: 10 if quick else None]
    return [(Image.open(canvases / r["canvas"]).convert("RGB"), r["element"]) for r in rows], text, mm[0]


def section_decode(c: Contract, quick: bool, scale_files: dict[str, str] | None) -> tuple[dict[str, Any], str]:
    label_ids = hf_vlm.label_token_ids(hf_vlm.smollm2_tokenizer(), c.labels, c.target)
    res: dict[str, Any] = {"grammar": gbnf(c.labels, c.target)}
    rows, md = [], "### Decode per photo, four ways (llama.cpp, greedy)\n\n"
    demo = demo_photos(c, quick)
    if demo is None:
        print("  decode: no demo pipeline outputs (data/split, models/quantize_q8): skipping the trained-model rows")
    else:
        photos, text, mm = demo
        with LlamaVLM(text, mm, n_ctx=1024, n_threads=2) as v:
            res["demo"] = decode.four_ways(v, c, label_ids, photos)
        rows += [[f"demo, trained (Q8_0, {len(photos)} test photos)", m, r["tokens_mean"], r["tokens_max"],
                  r["decodes_mean"], r["seconds"], r["accuracy"]] for m, r in res["demo"].items()]
    if scale_files:
        photos = demo_canvases(2 if quick else 3, c)
        with LlamaVLM(Path(scale_files["text"]), Path(scale_files["chosen"]), n_ctx=1024, n_threads=2) as v:
            res["at_scale"] = decode.four_ways(v, c, label_ids, photos)
        rows += [["real-size base (untrained), re-tiled 256/512", m, r["tokens_mean"], r["tokens_max"], r["decodes_mean"],
                  r["seconds"], "n/a (random)"] for m, r in res["at_scale"].items()]
    md += table(["model", "mode", "tokens (mean)", "tokens (max)", "llama_decode calls", "s per photo (median)",
                 "accuracy"], rows)
    md += ("\n\ntokens count the stop token; unconstrained ignores EOS (the stock <|im_end|> never follows a label); "
           "a random model never emits EOS, so its eos row also runs to 32.")
    return res, md


def section_stages(c: Contract, quick: bool) -> tuple[dict[str, Any], str]:
    res: dict[str, Any] = {}
    print("  resize ...", flush=True)
    res["resize"] = stages.resize(quick)
    print("  label (loopback, 50 ms latency) ...", flush=True)
    res["label"] = stages.label(c, 32 if quick else 64, [1, 4, 8])
    print("  finetune epoch, feature cache on/off ...", flush=True)
    res["finetune"] = stages.finetune_epoch(c, 32, 1 if quick else 2)
    print("  finetune epoch at SmolVLM-256M shapes (tile 256 / edge 512), feature cache on/off ...", flush=True)
    res["finetune_256m"] = stages.finetune_epoch(c, 4 if quick else 8, 1 if quick else 2, SMOLVLM_256M_SHAPES,
                                                 Vision(tile=256, longest_edge=512))
    n = 1000 if quick else 10000
    print(f"  dvc repro on {n} demo photos (built once under .cache/bench) ...", flush=True)
    res["dvc"] = stages.dvc_repro(n, CACHE / f"dvc-{n}" / "repo")
    lab, ft, ft256, d = res["label"], res["finetune"], res["finetune_256m"], res["dvc"]
    md = "### Stage speed\n\n" + table(["stage", "baseline", "ours", "ratio"], [
        ["label, items/s (loopback 50 ms)", f"{lab['concurrency_1']['items_per_s']:.1f} (sequential)",
         f"{lab['concurrency_8']['items_per_s']:.1f} (8 in flight); {lab['concurrency_4']['items_per_s']:.1f} (4)",
         f"{lab['speedup'][8]:.1f}x / {lab['speedup'][4]:.1f}x"],
        [f"finetune epoch, {ft['n']} canvases", f"{ft['epoch_s_no_cache']:.2f} s (encoder every step)",
         f"{ft['epoch_s_cache']:.2f} s (+{ft['cache_fill_s']:.2f} s once)", f"{ft['epoch_speedup']:.2f}x"],
        [f"finetune epoch, SmolVLM-256M shapes, {ft256['n']} canvases", f"{ft256['epoch_s_no_cache']:.2f} s (encoder every step)",
         f"{ft256['epoch_s_cache']:.2f} s (+{ft256['cache_fill_s']:.2f} s once)", f"{ft256['epoch_speedup']:.2f}x"],
        [f"dvc repro, no change, {d['n']} photos", f"{d['first_repro_s']:.1f} s (first run)",
         f"{d['nochange_repro_s']:.1f} s (dvc status {d['status_s']:.1f} s)", f"{d['first_speedup']:.0f}x"]])
    resize = res["resize"]
    md += "\n\nresize (bench/resize.py):\n\n```\n" + resize.get("output", resize.get("skipped", "")) + "\n```"
    return res, md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and photos, 1,000-photo DVC repo")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: tokens, decode, stages")
    args = ap.parse_args()
    skip, c, t0 = set(filter(None, args.skip.split(","))), contract(), time.perf_counter()
    results: dict[str, Any] = {"quick": args.quick}
    parts = []
    if "tokens" not in skip:
        print("[1/3] image tokens and prefill", flush=True)
        results["tokens"], md = section_tokens(c, args.quick)
        parts.append(md)
    if "decode" not in skip:
        print("[2/3] decode four ways", flush=True)
        files = results.get("tokens", {}).get("at_scale", {}).get("files")
        results["decode"], md = section_decode(c, args.quick, files)
        parts.append(md)
    if "stages" not in skip:
        print("[3/3] stage speed", flush=True)
        results["stages"], md = section_stages(c, args.quick)
        parts.append(md)
    results["wall_s"] = time.perf_counter() - t0
    report = "\n\n".join(parts) + f"\n\n`python -m bench.run{' --quick' if args.quick else ''}`: " \
                                   f"{results['wall_s'] / 60:.1f} min\n"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (OUT / "results.md").write_text(report)
    print("\n" + report)
    print(f"-> {rel(OUT / 'results.json')}, {rel(OUT / 'results.md')}")


if __name__ == "__main__":
    main()
