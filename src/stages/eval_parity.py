"""eval_parity: prove on the test split that the app sees what training saw, rung by rung.

Inputs:  SPLIT/test.jsonl, the canvases (RESIZE256) and original photos (DOWNLOAD), the merged
         transformers model (FINETUNE), the f16 text GGUF + mmproj (CONVERT_GGUF), the Q8_0 text
         GGUF (QUANTIZE_Q8).
Outputs: METRICS (nested JSON, the ladder below), IMAGES (per-image CSV: id, name (file name or URL),
         truth, answers, first-token label probabilities; arm64 answers on the rung's sample), CONFUSION (truth vs Q8_0 answer, for `dvc plots`).
Params:  contract.*, eval_parity.* (eval_parity.arm64.*: the arm64 rung's sample, variants and gates),
         runtime.yaml llama_cpp_arm64.* (each variant's -march)
Command: python -m src.stages.eval_parity data/split data/resize256 data/download models/finetune \
             models/convert_gguf models/quantize_q8 metrics/parity.json metrics/parity_images.csv \
             metrics/parity_confusion.json

The ladder, each rung a key of the metrics:
  canvas   training canvas vs the Skia emulation of Android (max_abs_diff, psnr, prediction_flips)
           and vs the stored canvas (stored_identical_rate: resize256 is reproducible).
  eos      the EOS the contract names is the EOS of the HF generation config and of the GGUF.
  layout   transformers input ids (image expanded) == llama.cpp's mtmd chunks, per image.
  logits   first-token logits, HF vs f16 GGUF (max |diff|) and KL over the labels, HF vs Q8_0.
  accuracy / agreement / invalid_rate   greedy answers of HF, f16 and Q8_0. invalid_rate.q8_0_only
           counts photos where Q8_0 answers no label but transformers does: the same invalid answer
           on every runtime is the model's quality (release's gate), not parity.
  arm64    the Q8_0 GGUF + mmproj on the phone's instruction set: llama.cpp cross-built for each
           variant of runtime.yaml `llama_cpp_arm64` (src/runtime/arm64.py) and run under qemu on
           `eval_parity.arm64.sample` test photos (classes in turn): agreement with transformers and
           with x86 Q8_0, invalid rate, first-token KL against transformers over the labels. Emulation
           is slow: the seconds per photo are printed, never written (no clocks in outputs).
Before any rung, every class must have a photo in the test split (else there is nothing to judge).
A rung below its gate fails the stage with a report naming the rung, the runtimes that disagree and
the photos by the names the user knows.
"""

from __future__ import annotations

from src.model import torch_pin  # noqa: F401  (first: torch's kernels are pinned before torch loads)

import argparse
import csv
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from src.runtime import arm64

from src.model import hf_vlm
from src.data.canvas import android_canvas, canvas_png, decode, to_canvas
from src.config.contract import Contract
from src.config.artifacts import text_gguf, mmproj_of
from src.model.answer import kl, label_probs, parse_answer
from src.quality.gates import RUNTIME, class_coverage_gate, gates
from src.runtime.llama_vlm import LlamaVLM, expand
from src.runtime.supervise import at, supervise
from src.config.params import stage_params
from src.data.files import read_jsonl, write_json, write_text_atomic


class ParityError(SystemExit):
    """A rung below its gate; the message names the rung and the offending images."""


@dataclass
class Row:
    id: str
    name: str  # the photo as the user knows it: file name, URL
    canvas: str
    truth: str
    answers: dict[str, str | None] = field(default_factory=dict)  # side -> label, None if invalid
    raw: dict[str, str] = field(default_factory=dict)  # side -> decoded text
    probs: dict[str, list[float]] = field(default_factory=dict)  # side -> first-token label probabilities


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * math.log10(255.0**2 / mse)  # 99 dB stands for identical


def canvas_rung(photo: bytes, stored: bytes, contract: Contract) -> tuple[Image.Image, Image.Image, float, float, bool]:
    """(training canvas, Android canvas, max |diff|, PSNR, training canvas == stored canvas)."""
    img = decode(photo, contract.canvas)
    train, android = to_canvas(img, contract.canvas), android_canvas(img, contract.canvas)
    a, b = np.asarray(train), np.asarray(android)
    return train, android, float(np.abs(a.astype(int) - b.astype(int)).max()), psnr(a, b), canvas_png(train) == stored


@dataclass(frozen=True)
class Arm64Rung:
    """The arm64 rung's run: `sample` test photos through each variant's probe, {variant: (-march, probe)}."""

    sample: int
    probes: dict[str, tuple[str, Path]]


def arm64_sample(rows: list[dict[str, Any]], n: int, labels: tuple[str, ...]) -> list[str]:
    """The ids of `n` test photos, the classes in turn (in test-split order within a class)."""
    by_class = {label: [r["id"] for r in rows if r["element"] == label] for label in labels}
    picked: list[str] = []
    i = 0
    while len(picked) < n and any(i < len(v) for v in by_class.values()):
        picked += [v[i] for v in by_class.values() if i < len(v)][: n - len(picked)]
        i += 1
    return picked


def arm64_rung(rung: Arm64Rung, rows: list[Row], canvases: Path, q8: tuple[Path, Path], prompt: str,
               contract: Contract, n_ctx: int, label_ids: list[int], q8_logits: dict[str, np.ndarray],
               offenders: dict[str, list[str]]) -> dict[str, Any]:
    """Each variant's answers on `rows` (already judged on x86) against transformers' and x86 Q8_0's."""
    images = [Image.open(canvases / r.canvas).convert("RGB") for r in rows]
    out: dict[str, Any] = {"n": len(rows), "variants": {}}
    for variant, (march, probe) in rung.probes.items():
        start = time.monotonic()
        answers = arm64.run(probe, variant, *q8, prompt, images, contract.generation.max_new_tokens, n_ctx)
        per_photo = (time.monotonic() - start) / max(len(rows), 1)
        side, who = f"arm64_{variant}", f"llama.cpp Q8_0 arm64 {variant}"
        for k in ("hf", "q8_0", "invalid"):
            offenders[f"arm64.{variant}.{k}"] = []
        kls, kls_x86, diffs = [], [], []
        for row, ans in zip(rows, answers):
            row.raw[side], row.answers[side] = ans.text, parse_answer(ans.text, ans.stopped, contract)
            row.probs[side] = label_probs(ans.first_logits, label_ids).tolist()
            kls.append(kl(np.array(row.probs["hf"]), np.array(row.probs[side])))
            kls_x86.append(kl(np.array(row.probs["q8_0"]), np.array(row.probs[side])))
            diffs.append(float(np.abs(ans.first_logits - q8_logits[row.id]).max()))
            for ref in ("hf", "q8_0"):
                if row.answers[side] != row.answers[ref]:
                    offenders[f"arm64.{variant}.{ref}"].append(f"{row.name} ({RUNTIME[ref]} {_said(row, ref)}, "
                                                               f"{who} {_said(row, side)})")
            if row.answers[side] is None and row.answers["hf"] is not None:
                offenders[f"arm64.{variant}.invalid"].append(f"{row.name} ({RUNTIME['hf']} {row.answers['hf']}, "
                                                             f"{who} {row.raw[side]!r})")
        n = len(rows)
        out["variants"][variant] = {
            "march": march, "qemu_cpu": arm64.QEMU_CPU.get(variant, "max"),
            "agreement": {"hf": round(1 - len(offenders[f"arm64.{variant}.hf"]) / n, 4) if n else 0.0,
                          "x86_q8_0": round(1 - len(offenders[f"arm64.{variant}.q8_0"]) / n, 4) if n else 0.0},
            "invalid_rate": {"arm64": round(sum(r.answers[side] is None for r in rows) / n, 4) if n else 0.0,
                             "arm64_only": round(len(offenders[f"arm64.{variant}.invalid"]) / n, 4) if n else 0.0},
            "logits": {"kl_hf": round(float(np.mean(kls)) if kls else 0.0, 6), "kl_hf_max": round(max(kls, default=0.0), 6),
                       "kl_x86_q8_0_max": round(max(kls_x86, default=0.0), 6),
                       "max_abs_diff_x86_q8_0": round(max(diffs, default=0.0), 6)},
        }
        # a clock, so printed and never written (the metrics hold no timings)
        print(f"eval_parity: arm64 {variant} (-march={march}, qemu -cpu {arm64.QEMU_CPU.get(variant, 'max')}): "
              f"{per_photo:.1f} s per photo under emulation, {n} photos", flush=True)
    return out


def ladder(contract: Contract, rows: list[dict[str, Any]], canvases: Path, photos: dict[str, bytes],
           model_dir: Path, f16: tuple[Path, Path], q8: tuple[Path, Path], n_ctx: int,
           llama_prompt: str | None = None,
           arm64_run: Arm64Rung | None = None) -> tuple[dict[str, Any], list[Row], dict[str, list[str]]]:
    """Run every rung on `rows`. `llama_prompt` overrides the rendered llama.cpp prompt (tests break parity with it).

    `arm64_run` adds the arm64 rung (metrics key `arm64`) on its sample of `rows`, with the same prompt.
    """
    model, processor = hf_vlm.load(str(model_dir))
    tok = processor.tokenizer
    image_token_id = tok.convert_tokens_to_ids(hf_vlm.HF_IMAGE_TOKEN)
    label_ids = hf_vlm.label_token_ids(tok, contract.labels, contract.target)
    gen = contract.generation
    out: list[Row] = []
    offenders: dict[str, list[str]] = {"layout": [], "f16": [], "q8_0": [], "invalid_q8_0": [], "flips": [],
                                       "canvas": []}
    canvas_diffs, canvas_psnrs, stored_same, flips, image_tokens = [], [], [], 0, set()
    logit_diffs, kls = [], []
    arm_ids = set(arm64_sample(rows, arm64_run.sample, contract.labels)) if arm64_run else set()
    q8_logits: dict[str, np.ndarray] = {}  # x86 Q8_0's first-token logits of the arm64 sample
    arm = None
    with LlamaVLM(*f16, n_ctx=n_ctx) as vf16, LlamaVLM(*q8, n_ctx=n_ctx) as vq8:
        prompt = llama_prompt if llama_prompt is not None else contract.prompt_for(vf16.marker())
        eos = {"contract": contract.target.eos, "hf": tok.convert_ids_to_tokens(model.generation_config.eos_token_id),
               "gguf": vq8.llm.detokenize([vq8.llm.token_eos()], special=True).decode()}
        eos["ok"] = eos["contract"] == eos["hf"] == eos["gguf"]
        # The app stops at any end-of-generation token of the GGUF's vocabulary (with SmolLM2's real
        # weights an undertrained model ends " fire" with <|im_end|>): transformers stops at the same set.
        stop_ids = vq8.eog_ids()
        eos["stops_at"] = tok.convert_ids_to_tokens(stop_ids)
        for r in tqdm(rows, desc="eval_parity"):
            row = Row(r["id"], r.get("name") or r["id"], r["canvas"], r["element"])
            stored = (canvases / r["canvas"]).read_bytes()
            canvas = Image.open(io.BytesIO(stored)).convert("RGB")
            photo = f"photo {row.name!r}"
            if r["id"] in photos:
                _, android, diff, p, same = canvas_rung(photos[r["id"]], stored, contract)
                canvas_diffs.append(diff)
                if diff > 0:
                    offenders["canvas"].append(row.name)
                canvas_psnrs.append(p)
                stored_same.append(same)
                at(RUNTIME["q8_0"], f"{photo} (Android canvas)")
                a_ans = vq8.generate(prompt, android, gen)
                row.answers["q8_0_android"] = parse_answer(a_ans.text, a_ans.stopped, contract)
            inputs = hf_vlm.prompt_inputs(processor, contract.prompt, contract.labels, canvas)
            hf_ids = inputs["input_ids"][0].tolist()
            at(RUNTIME["f16"], f"{photo} (layout)")
            layout = vf16.layout(prompt, canvas)
            image_tokens.add(sum(c.n_tokens for c in layout if c.kind == "image"))
            if expand(layout, image_token_id) != hf_ids:
                offenders["layout"].append(row.name)
            at(RUNTIME["hf"], photo)
            hf_logits = hf_vlm.first_logits(model, inputs).numpy()
            text, _, stopped = hf_vlm.generate(model, processor, inputs, gen, stop_ids=stop_ids)
            row.raw["hf"], row.answers["hf"] = text, parse_answer(text, stopped, contract)
            row.probs["hf"] = label_probs(hf_logits, label_ids).tolist()
            for side, v in (("f16", vf16), ("q8_0", vq8)):
                at(RUNTIME[side], photo)
                ans = v.generate(prompt, canvas, gen)
                row.raw[side], row.answers[side] = ans.text, parse_answer(ans.text, ans.stopped, contract)
                row.probs[side] = label_probs(ans.first_logits, label_ids).tolist()
                if side == "f16":
                    logit_diffs.append(float(np.abs(ans.first_logits[: len(hf_logits)] - hf_logits).max()))
                else:
                    kls.append(kl(np.array(row.probs["hf"]), np.array(row.probs["q8_0"])))
                    if row.id in arm_ids:
                        q8_logits[row.id] = ans.first_logits
                if row.answers[side] != row.answers["hf"]:
                    offenders[side].append(f"{row.name} ({RUNTIME['hf']} {_said(row, 'hf')}, "
                                           f"{RUNTIME[side]} {_said(row, side)})")
            if row.answers["q8_0"] is None and row.answers["hf"] is not None:
                offenders["invalid_q8_0"].append(f"{row.name} ({RUNTIME['hf']} {row.answers['hf']}, "
                                                 f"{RUNTIME['q8_0']} {row.raw['q8_0']!r})")
            if "q8_0_android" in row.answers and row.answers["q8_0_android"] != row.answers["q8_0"]:
                flips += 1
                offenders["flips"].append(row.name)
            out.append(row)
        if arm64_run is not None:
            by_id = {r.id: r for r in out}
            sample = [by_id[i] for i in arm64_sample(rows, arm64_run.sample, contract.labels)]
            arm = arm64_rung(arm64_run, sample, canvases, q8, prompt, contract, n_ctx, label_ids, q8_logits,
                             offenders)

    n = len(out)

    def rate(pred: Any) -> float:
        return round(sum(pred(x) for x in out) / n, 4) if n else 0.0

    metrics = {
        "n_test": n,
        "canvas": {"max_abs_diff": max(canvas_diffs, default=0.0), "psnr": round(min(canvas_psnrs, default=99.0), 2),
                   "psnr_mean": round(float(np.mean(canvas_psnrs)) if canvas_psnrs else 99.0, 2),
                   "prediction_flips": flips,
                   "stored_identical_rate": round(sum(stored_same) / len(stored_same), 4) if stored_same else 0.0},
        "eos": eos,
        "layout": {"identical_rate": round(1 - len(offenders["layout"]) / n, 4) if n else 0.0,
                   "image_tokens_per_photo": max(image_tokens, default=0)},
        "logits": {"max_abs_diff_f16": round(max(logit_diffs, default=0.0), 6),
                   "kl_q8_0": round(float(np.mean(kls)) if kls else 0.0, 6),
                   "kl_q8_0_max": round(max(kls, default=0.0), 6)},
        "accuracy": {s: rate(lambda x, s=s: x.answers[s] == x.truth) for s in ("hf", "f16", "q8_0")},
        "agreement": {s: rate(lambda x, s=s: x.answers[s] == x.answers["hf"]) for s in ("f16", "q8_0")},
        "invalid_rate": {**{s: rate(lambda x, s=s: x.answers[s] is None) for s in ("hf", "f16", "q8_0")},
                         # parity: Q8_0 without a label where transformers has one; invalid everywhere is quality
                         "q8_0_only": rate(lambda x: x.answers["q8_0"] is None and x.answers["hf"] is not None),
                         "every_runtime": rate(lambda x: all(x.answers[s] is None for s in ("hf", "f16", "q8_0")))},
    }
    if arm is not None:
        metrics["arm64"] = arm
    return metrics, out, offenders


def _said(row: Row, side: str) -> str:
    """What a runtime answered, for a message: the label, or the invalid text it produced."""
    return row.answers[side] or f"invalid {row.raw[side]!r}"


def images_csv(rows: list[Row], labels: tuple[str, ...]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    sides = ("hf", "f16", "q8_0")
    arm = sorted({s for r in rows for s in r.answers if s.startswith("arm64_")})  # the arm64 sample's rows only
    w.writerow(["id", "name", "canvas", "truth", *sides, "q8_0_android",
                *[f"p_{s}_{label}" for s in ("hf", "q8_0") for label in labels], *arm])
    for r in rows:
        w.writerow([r.id, r.name, r.canvas, r.truth, *[r.answers[s] or f"INVALID:{r.raw[s]!r}" for s in sides],
                    r.answers.get("q8_0_android", ""), *[f"{p:.4f}" for s in ("hf", "q8_0") for p in r.probs[s]],
                    *[(r.answers[s] or f"INVALID:{r.raw[s]!r}") if s in r.answers else "" for s in arm]])
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("split", "resize256", "download", "finetune", "convert_gguf", "quantize_q8", "metrics", "images", "confusion"):
        ap.add_argument(name, type=Path)
    args = ap.parse_args()
    p = stage_params("eval_parity")
    contract, g = Contract.from_dict(p["contract"]), p["eval_parity"]
    rows = read_jsonl(args.split / "test.jsonl")
    refusal = class_coverage_gate({label: sum(r["element"] == label for r in rows) for label in contract.labels})
    if refusal:  # before loading any model: an empty or one-sided test split makes every rung meaningless
        raise SystemExit(f"eval_parity: {refusal} ({args.split / 'test.jsonl'})")
    records = {r["id"]: r for r in read_jsonl(args.download / "manifest.jsonl") if r["status"] == "ok"}
    photos = {r["id"]: (args.download / records[r["id"]]["path"]).read_bytes() for r in rows if r["id"] in records}
    mm = mmproj_of(args.convert_gguf)
    marches = p["runtime"].get(arm64.KEY, {})
    unknown = [v for v in g["arm64"]["variants"] if v not in marches]
    if unknown:
        raise SystemExit(f"eval_parity: eval_parity.arm64.variants names {', '.join(unknown)}: no -march for it in "
                         f"runtime.yaml {arm64.KEY} as this stage declares it (dvc.yaml); known: {', '.join(marches)}")
    # built (or taken from the cache) before any model loads: a missing cross compiler stops the stage early
    rung = None
    if g["arm64"]["sample"]:
        wanted = {v: marches[v] for v in g["arm64"]["variants"]}
        probes = arm64.build(wanted, p["runtime"]["llama_cpp_python"])
        rung = Arm64Rung(g["arm64"]["sample"], {v: (m, probes[v]) for v, m in wanted.items()})
    metrics, out, offenders = ladder(contract, rows, args.resize256, photos, args.finetune,
                                     (text_gguf(args.convert_gguf, "f16"), mm), (text_gguf(args.quantize_q8, "q8_0"), mm),
                                     g["n_ctx"], arm64_run=rung)
    write_json(args.metrics, metrics)
    write_text_atomic(args.images, images_csv(out, contract.labels))
    write_json(args.confusion, [{"truth": r.truth, "predicted": r.answers["q8_0"] or "invalid"} for r in out])
    fails = gates(metrics, g, offenders)
    if fails:
        raise ParityError(f"eval_parity: PARITY gate failed (the runtimes disagree; see {args.images})\n  "
                          + "\n  ".join(fails))
    inv = metrics["invalid_rate"]["every_runtime"]
    if inv:  # not a parity failure: said here so nobody reads it as one; release's quality gate judges it
        print(f"eval_parity: {round(inv * metrics['n_test'])}/{metrics['n_test']} answers are invalid on every "
              "runtime alike: a quality problem of the model (release.min_accuracy judges it), not parity")
    print(f"eval_parity: parity gates pass: n_test {metrics['n_test']}, layout {metrics['layout']['identical_rate']}, "
          f"agreement f16 {metrics['agreement']['f16']} q8_0 {metrics['agreement']['q8_0']}, "
          f"accuracy q8_0 {metrics['accuracy']['q8_0']}, invalid q8_0 {metrics['invalid_rate']['q8_0']} -> {args.metrics}")


if __name__ == "__main__":
    supervise("eval_parity", main)
