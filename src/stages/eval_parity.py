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

The ladder (src/parity/ladder.py), each rung a key of the metrics:
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

# isort: split

import argparse
from pathlib import Path
from typing import Any

from src.config.artifacts import mmproj_of, text_gguf
from src.config.contract import Contract
from src.config.params import stage_params
from src.data.files import read_jsonl, write_json, write_text_atomic
from src.parity.ladder import Arm64Rung, climb, images_csv
from src.quality.gates import class_coverage_gate, gates
from src.runtime import arm64
from src.runtime.supervise import supervise


class ParityError(SystemExit):
    """A rung below its gate; the message names the rung and the offending images."""


def arm64_rung(p: dict[str, Any]) -> Arm64Rung | None:
    """The arm64 rung's probes, built (or taken from the cache) before any model loads: a missing cross
    compiler stops the stage early. None when `eval_parity.arm64.sample` is 0."""
    g = p["eval_parity"]["arm64"]
    marches = p["runtime"].get(arm64.KEY, {})
    unknown = [v for v in g["variants"] if v not in marches]
    if unknown:
        raise SystemExit(f"eval_parity: eval_parity.arm64.variants names {', '.join(unknown)}: no -march for it in "
                         f"runtime.yaml {arm64.KEY} as this stage declares it (dvc.yaml); known: {', '.join(marches)}")
    if not g["sample"]:
        return None
    wanted = {v: marches[v] for v in g["variants"]}
    probes = arm64.build(wanted, p["runtime"]["llama_cpp_python"])
    return Arm64Rung(g["sample"], {v: (m, probes[v]) for v, m in wanted.items()})


def run(args: argparse.Namespace, p: dict[str, Any]) -> dict[str, Any]:
    """Climb the ladder on the test split, write the three outputs, then apply the parity gates."""
    contract, g = Contract.from_dict(p["contract"]), p["eval_parity"]
    rows = read_jsonl(args.split / "test.jsonl")
    refusal = class_coverage_gate({label: sum(r["element"] == label for r in rows) for label in contract.labels})
    if refusal:  # before loading any model: an empty or one-sided test split makes every rung meaningless
        raise SystemExit(f"eval_parity: {refusal} ({args.split / 'test.jsonl'})")
    records = {r["id"]: r for r in read_jsonl(args.download / "manifest.jsonl") if r["status"] == "ok"}
    photos = {r["id"]: (args.download / records[r["id"]]["path"]).read_bytes() for r in rows if r["id"] in records}
    mm = mmproj_of(args.convert_gguf)
    rung = arm64_rung(p)
    metrics, out, offenders = climb(contract, rows, args.resize256, photos, args.finetune,
                                    (text_gguf(args.convert_gguf, "f16"), mm), (text_gguf(args.quantize_q8, "q8_0"), mm),
                                    g["n_ctx"], arm64_run=rung)
    write_json(args.metrics, metrics)
    write_text_atomic(args.images, images_csv(out, contract.labels))
    write_json(args.confusion, [{"truth": r.truth, "predicted": r.answers["q8_0"] or "invalid"} for r in out])
    fails = gates(metrics, g, offenders)
    if fails:
        raise ParityError(f"eval_parity: PARITY gate failed (the runtimes disagree; see {args.images})\n  "
                          + "\n  ".join(fails))
    return metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("split", "resize256", "download", "finetune", "convert_gguf", "quantize_q8", "metrics", "images", "confusion"):
        ap.add_argument(name, type=Path)
    args = ap.parse_args()
    metrics = run(args, stage_params("eval_parity"))
    inv = metrics["invalid_rate"]["every_runtime"]
    if inv:  # not a parity failure: said here so nobody reads it as one; release's quality gate judges it
        print(f"eval_parity: {round(inv * metrics['n_test'])}/{metrics['n_test']} answers are invalid on every "
              "runtime alike: a quality problem of the model (release.min_accuracy judges it), not parity")
    print(f"eval_parity: parity gates pass: n_test {metrics['n_test']}, layout {metrics['layout']['identical_rate']}, "
          f"agreement f16 {metrics['agreement']['f16']} q8_0 {metrics['agreement']['q8_0']}, "
          f"accuracy q8_0 {metrics['accuracy']['q8_0']}, invalid q8_0 {metrics['invalid_rate']['q8_0']} -> {args.metrics}")


if __name__ == "__main__":
    supervise("eval_parity", main)
