"""The parity ladder eval_parity climbs on the test split: one function a rung, then the metrics.

A photo goes through every rung in turn (`photo_rungs`: canvas, layout, transformers, f16, Q8_0,
Android canvas), so each canvas is read once and each runtime stays loaded; the arm64 rung runs after,
on its sample. What each rung measures is in the stage's docstring (src/stages/eval_parity.py) and in
docs/parity.md. `climb` returns the metrics, the rows (`images_csv`) and the offenders by rung, the
photos each gate names when it fails (src/quality/gates.py).
"""

from __future__ import annotations

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

from src.config.contract import Contract
from src.data.canvas import android_canvas, canvas_png, decode, to_canvas
from src.model import hf_vlm
from src.model.answer import kl, label_probs, parse_answer
from src.quality.gates import RUNTIME
from src.runtime import arm64
from src.runtime.llama_vlm import LlamaVLM, expand
from src.runtime.supervise import at

SIDES = ("hf", "f16", "q8_0")  # transformers, then llama.cpp's f16 and Q8_0 text GGUFs


@dataclass
class Row:
    id: str
    name: str  # the photo as the user knows it: file name, URL
    canvas: str
    truth: str
    answers: dict[str, str | None] = field(default_factory=dict)  # side -> label, None if invalid
    raw: dict[str, str] = field(default_factory=dict)  # side -> decoded text
    probs: dict[str, list[float]] = field(default_factory=dict)  # side -> first-token label probabilities


@dataclass
class Tally:
    """What the rungs measure photo by photo, before it becomes the metrics."""

    canvas_diffs: list[float] = field(default_factory=list)
    canvas_psnrs: list[float] = field(default_factory=list)
    stored_same: list[bool] = field(default_factory=list)
    flips: int = 0
    image_tokens: set[int] = field(default_factory=set)
    logit_diffs: list[float] = field(default_factory=list)
    kls: list[float] = field(default_factory=list)
    q8_logits: dict[str, np.ndarray] = field(default_factory=dict)  # x86 Q8_0's first-token logits, arm64 sample
    offenders: dict[str, list[str]] = field(default_factory=lambda: {
        "layout": [], "f16": [], "q8_0": [], "invalid_q8_0": [], "flips": [], "canvas": []})


@dataclass(frozen=True)
class Runtimes:
    """Everything loaded once for the ladder: the transformers model and both GGUFs, and what they agree on."""

    model: Any
    processor: Any
    f16: LlamaVLM
    q8: LlamaVLM
    prompt: str  # llama.cpp's rendering of the contract's prompt
    label_ids: list[int]
    image_token_id: int
    stop_ids: list[int]


@dataclass(frozen=True)
class Arm64Rung:
    """The arm64 rung's run: `sample` test photos through each variant's probe, {variant: (-march, probe)}."""

    sample: int
    probes: dict[str, tuple[str, Path]]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * math.log10(255.0**2 / mse)  # 99 dB stands for identical


def canvas_rung(photo: bytes, stored: bytes, contract: Contract) -> tuple[Image.Image, Image.Image, float, float, bool]:
    """(training canvas, Android canvas, max |diff|, PSNR, training canvas == stored canvas)."""
    img = decode(photo, contract.canvas)
    train, android = to_canvas(img, contract.canvas), android_canvas(img, contract.canvas)
    a, b = np.asarray(train), np.asarray(android)
    return train, android, float(np.abs(a.astype(int) - b.astype(int)).max()), psnr(a, b), canvas_png(train) == stored


def eos_rung(contract: Contract, rt: Runtimes) -> dict[str, Any]:
    """The contract's EOS is the HF generation config's and the GGUF's; and where each runtime stops."""
    tok = rt.processor.tokenizer
    eos = {"contract": contract.target.eos, "hf": tok.convert_ids_to_tokens(rt.model.generation_config.eos_token_id),
           "gguf": rt.q8.llm.detokenize([rt.q8.llm.token_eos()], special=True).decode()}
    eos["ok"] = eos["contract"] == eos["hf"] == eos["gguf"]
    eos["stops_at"] = tok.convert_ids_to_tokens(rt.stop_ids)
    return eos


def android_rung(row: Row, photo: bytes, stored: bytes, contract: Contract, rt: Runtimes, t: Tally) -> None:
    """The photo drawn as training draws it vs as Android does, and Q8_0's answer on the Android canvas."""
    _, android, diff, p, same = canvas_rung(photo, stored, contract)
    t.canvas_diffs.append(diff)
    if diff > 0:
        t.offenders["canvas"].append(row.name)
    t.canvas_psnrs.append(p)
    t.stored_same.append(same)
    at(RUNTIME["q8_0"], f"photo {row.name!r} (Android canvas)")
    a_ans = rt.q8.generate(rt.prompt, android, contract.generation)
    row.answers["q8_0_android"] = parse_answer(a_ans.text, a_ans.stopped, contract)


def layout_rung(row: Row, canvas: Image.Image, hf_ids: list[int], rt: Runtimes, t: Tally) -> None:
    """llama.cpp's mtmd chunks, the image expanded, are transformers' input ids."""
    at(RUNTIME["f16"], f"photo {row.name!r} (layout)")
    layout = rt.f16.layout(rt.prompt, canvas)
    t.image_tokens.add(sum(c.n_tokens for c in layout if c.kind == "image"))
    if expand(layout, rt.image_token_id) != hf_ids:
        t.offenders["layout"].append(row.name)


def hf_rung(row: Row, inputs: Any, contract: Contract, rt: Runtimes) -> np.ndarray:
    """transformers' greedy answer and first-token label probabilities; its first-token logits."""
    at(RUNTIME["hf"], f"photo {row.name!r}")
    hf_logits = hf_vlm.first_logits(rt.model, inputs).numpy()
    text, _, stopped = hf_vlm.generate(rt.model, rt.processor, inputs, contract.generation, stop_ids=rt.stop_ids)
    row.raw["hf"], row.answers["hf"] = text, parse_answer(text, stopped, contract)
    row.probs["hf"] = label_probs(hf_logits, rt.label_ids).tolist()
    return hf_logits


def gguf_rung(row: Row, side: str, canvas: Image.Image, hf_logits: np.ndarray, contract: Contract, rt: Runtimes,
              t: Tally, keep_logits: bool) -> None:
    """One GGUF's greedy answer against transformers': logits for f16, KL over the labels for Q8_0."""
    at(RUNTIME[side], f"photo {row.name!r}")
    ans = (rt.f16 if side == "f16" else rt.q8).generate(rt.prompt, canvas, contract.generation)
    row.raw[side], row.answers[side] = ans.text, parse_answer(ans.text, ans.stopped, contract)
    row.probs[side] = label_probs(ans.first_logits, rt.label_ids).tolist()
    if side == "f16":
        t.logit_diffs.append(float(np.abs(ans.first_logits[: len(hf_logits)] - hf_logits).max()))
    else:
        t.kls.append(kl(np.array(row.probs["hf"]), np.array(row.probs["q8_0"])))
        if keep_logits:
            t.q8_logits[row.id] = ans.first_logits
    if row.answers[side] != row.answers["hf"]:
        t.offenders[side].append(f"{row.name} ({RUNTIME['hf']} {_said(row, 'hf')}, {RUNTIME[side]} {_said(row, side)})")


def photo_rungs(r: dict[str, Any], canvases: Path, photo: bytes | None, contract: Contract, rt: Runtimes, t: Tally,
                keep_logits: bool) -> Row:
    """Every x86 rung on one test photo (its split row `r`), in the order the runtimes are asked."""
    row = Row(r["id"], r.get("name") or r["id"], r["canvas"], r["element"])
    stored = (canvases / r["canvas"]).read_bytes()
    canvas = Image.open(io.BytesIO(stored)).convert("RGB")
    if photo is not None:
        android_rung(row, photo, stored, contract, rt, t)
    inputs = hf_vlm.prompt_inputs(rt.processor, contract.prompt, contract.labels, canvas)
    layout_rung(row, canvas, inputs["input_ids"][0].tolist(), rt, t)
    hf_logits = hf_rung(row, inputs, contract, rt)
    for side in ("f16", "q8_0"):
        gguf_rung(row, side, canvas, hf_logits, contract, rt, t, keep_logits)
    if row.answers["q8_0"] is None and row.answers["hf"] is not None:
        t.offenders["invalid_q8_0"].append(f"{row.name} ({RUNTIME['hf']} {row.answers['hf']}, "
                                           f"{RUNTIME['q8_0']} {row.raw['q8_0']!r})")
    if "q8_0_android" in row.answers and row.answers["q8_0_android"] != row.answers["q8_0"]:
        t.flips += 1
        t.offenders["flips"].append(row.name)
    return row


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


def ladder_metrics(out: list[Row], t: Tally, eos: dict[str, Any]) -> dict[str, Any]:
    """The metrics eval_parity writes (metrics/parity.json), rung by rung, from the rows and the tally."""
    n = len(out)

    def rate(pred: Any) -> float:
        return round(sum(pred(x) for x in out) / n, 4) if n else 0.0

    return {
        "n_test": n,
        "canvas": {"max_abs_diff": max(t.canvas_diffs, default=0.0), "psnr": round(min(t.canvas_psnrs, default=99.0), 2),
                   "psnr_mean": round(float(np.mean(t.canvas_psnrs)) if t.canvas_psnrs else 99.0, 2),
                   "prediction_flips": t.flips,
                   "stored_identical_rate": round(sum(t.stored_same) / len(t.stored_same), 4) if t.stored_same else 0.0},
        "eos": eos,
        "layout": {"identical_rate": round(1 - len(t.offenders["layout"]) / n, 4) if n else 0.0,
                   "image_tokens_per_photo": max(t.image_tokens, default=0)},
        "logits": {"max_abs_diff_f16": round(max(t.logit_diffs, default=0.0), 6),
                   "kl_q8_0": round(float(np.mean(t.kls)) if t.kls else 0.0, 6),
                   "kl_q8_0_max": round(max(t.kls, default=0.0), 6)},
        "accuracy": {s: rate(lambda x, s=s: x.answers[s] == x.truth) for s in SIDES},
        "agreement": {s: rate(lambda x, s=s: x.answers[s] == x.answers["hf"]) for s in ("f16", "q8_0")},
        "invalid_rate": {**{s: rate(lambda x, s=s: x.answers[s] is None) for s in SIDES},
                         # parity: Q8_0 without a label where transformers has one; invalid everywhere is quality
                         "q8_0_only": rate(lambda x: x.answers["q8_0"] is None and x.answers["hf"] is not None),
                         "every_runtime": rate(lambda x: all(x.answers[s] is None for s in SIDES))},
    }


def climb(contract: Contract, rows: list[dict[str, Any]], canvases: Path, photos: dict[str, bytes],
          model_dir: Path, f16: tuple[Path, Path], q8: tuple[Path, Path], n_ctx: int,
          llama_prompt: str | None = None,
          arm64_run: Arm64Rung | None = None) -> tuple[dict[str, Any], list[Row], dict[str, list[str]]]:
    """Every rung on `rows`: (metrics, rows, offenders). `llama_prompt` overrides the rendered llama.cpp
    prompt (tests break parity with it). `arm64_run` adds the arm64 rung (metrics key `arm64`) on its
    sample of `rows`, with the same prompt."""
    model, processor = hf_vlm.load(str(model_dir))
    tok = processor.tokenizer
    t = Tally()
    arm_sample = arm64_sample(rows, arm64_run.sample, contract.labels) if arm64_run else []
    arm = None
    with LlamaVLM(*f16, n_ctx=n_ctx) as vf16, LlamaVLM(*q8, n_ctx=n_ctx) as vq8:
        # The app stops at any end-of-generation token of the GGUF's vocabulary (with SmolLM2's real
        # weights an undertrained model ends " fire" with <|im_end|>): transformers stops at the same set.
        rt = Runtimes(model, processor, vf16, vq8,
                      llama_prompt if llama_prompt is not None else contract.prompt_for(vf16.marker()),
                      hf_vlm.label_token_ids(tok, contract.labels, contract.target),
                      tok.convert_tokens_to_ids(hf_vlm.HF_IMAGE_TOKEN), vq8.eog_ids())
        eos = eos_rung(contract, rt)
        out = [photo_rungs(r, canvases, photos.get(r["id"]), contract, rt, t, r["id"] in arm_sample)
               for r in tqdm(rows, desc="eval_parity")]
        if arm64_run is not None:
            by_id = {r.id: r for r in out}
            arm = arm64_rung(arm64_run, [by_id[i] for i in arm_sample], canvases, q8, rt.prompt, contract, n_ctx, rt.label_ids, t.q8_logits,
                             t.offenders)
    metrics = ladder_metrics(out, t, eos)
    if arm is not None:
        metrics["arm64"] = arm
    return metrics, out, t.offenders


def _said(row: Row, side: str) -> str:
    """What a runtime answered, for a message: the label, or the invalid text it produced."""
    return row.answers[side] or f"invalid {row.raw[side]!r}"


def images_csv(rows: list[Row], labels: tuple[str, ...]) -> str:
    """metrics/parity_images.csv: a row a test photo, each runtime's answer and label probabilities."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    arm = sorted({s for r in rows for s in r.answers if s.startswith("arm64_")})  # the arm64 sample's rows only
    w.writerow(["id", "name", "canvas", "truth", *SIDES, "q8_0_android",
                *[f"p_{s}_{label}" for s in ("hf", "q8_0") for label in labels], *arm])
    for r in rows:
        w.writerow([r.id, r.name, r.canvas, r.truth, *[r.answers[s] or f"INVALID:{r.raw[s]!r}" for s in SIDES],
                    r.answers.get("q8_0_android", ""), *[f"{p:.4f}" for s in ("hf", "q8_0") for p in r.probs[s]],
                    *[(r.answers[s] or f"INVALID:{r.raw[s]!r}") if s in r.answers else "" for s in arm]])
    return buf.getvalue()
