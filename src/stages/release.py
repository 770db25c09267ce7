"""release: assemble the bundle the app ships, once the parity and quality gates pass, with its model card and plots.

Inputs:  QUANTIZE_Q8/text-q8_0.gguf, the mmproj in CONVERT_GGUF, SPLIT/*.jsonl (data counts),
         RESIZE256 (test canvases for the sample grid), PARITY (eval_parity metrics: re-checked
         against the gates), IMAGES (eval_parity's per-image answers), FINETUNE_METRICS.
Outputs: OUT/ (the bundle; dvc.yaml `artifacts:` names it):
           model.gguf       the Q8_0 text GGUF          mmproj.gguf    the vision projector
           contract.json    src/config/contract.py Contract    grammar.gbnf   exactly the labels (src/runtime/grammar.py)
           model_card.json  metrics, base model, data counts, params, runtime versions, DVC hashes,
                            the kernels that proved it (x86 flags, arm64 -march, llama.cpp revision)
           model_card.md    the same for people
         PLOTS/ confusion.png, per_class_accuracy.png, sample_grid.png (Q8_0 answers on the test split).
Params:  contract.* (all of it: it ships), eval_parity gates (arm64's too) and n_ctx, base.source/hub_id/revision/local_dir/smollm2.seed and the
         training params the card reports, quantize_q8.ftype, release.grid.*, release.min_accuracy,
         release.min_class_accuracy, download.source (the quality gate's diagnosis: demo photos or not)

Two gates, apart: parity (eval_parity's, re-checked: the runtimes agree) and quality (the Q8_0
answers on the test split reach release.min_accuracy overall and release.min_class_accuracy in
every class; an invalid answer counts as wrong). A quality failure still writes the review plots,
so the confusion matrix and the sample grid show what the model gets wrong, but no bundle, and says
why from what the run measured (src/quality/gates.py quality_diagnosis: finetune's val curve and training
answers, the split's counts, the base and the photos' source).
Command: python -m src.stages.release models/quantize_q8 models/convert_gguf data/split data/resize256 \
             metrics/parity.json metrics/parity_images.csv metrics/finetune.json models/release \
             metrics/release

Reproducibility: everything in the bundle is a function of the stage's deps and params, so the
same inputs give the same bytes on any machine. The card's provenance is what the bundle was
built from: the DVC md5 of each dep (as `dvc.lock` records the upstream stages' outs), the
params, and the runtime versions (runtime.yaml, checked against what is installed). It holds no
git commit: the bundle is written before the commit that records it exists, so the commit is
named by the release's git tag (GTO), which points at the commit holding this dvc.lock.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path
from typing import Any

from src.config.artifacts import BUNDLE, PLOTS, SPLITS, mmproj_of, text_gguf
from src.config.contract import Contract
from src.config.params import stage_params
from src.data.files import copy_atomic, read_jsonl, write_json, write_text_atomic
from src.quality import plots
from src.quality.card import card_markdown, dvc_hashes, file_hashes, model_card
from src.quality.gates import gates, quality_diagnosis, quality_gates
from src.runtime.grammar import gbnf
from src.runtime.supervise import at, supervise


def parity_rows(images_csv: str, labels: tuple[str, ...]) -> list[dict[str, str]]:
    """eval_parity's rows as {id, name, canvas, truth, pred}; pred is the Q8_0 answer or `invalid`."""
    rows = list(csv.DictReader(io.StringIO(images_csv)))
    return [{"id": r["id"], "name": r.get("name") or r["id"], "canvas": r["canvas"], "truth": r["truth"],
             "pred": r["q8_0"] if r["q8_0"] in labels else plots.INVALID} for r in rows]


def data_counts(split_dir: Path, labels: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """{split: {"n": total, label: count}} from the split stage's files."""
    out = {}
    for name in SPLITS:
        rows = read_jsonl(split_dir / f"{name}.jsonl")
        out[name] = {"n": len(rows), **{label: sum(r["element"] == label for r in rows) for label in labels}}
    return out


def check_grammar(model: Path, grammar: str, contract: Contract) -> None:
    """The shipped grammar parses with the shipped model's vocabulary and admits each label, then the EOS.

    Token by token, as the app tokenizes the answer: a label split into tokens the grammar
    cannot follow would make constrained decoding unable to say it.
    """
    import llama_cpp

    from src.runtime.grammar import Constraint, admits
    from src.runtime.llama_vlm import silence

    silence()
    at("llama.cpp", f"the grammar check of {model.name}")
    llm = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)
    try:
        n, vocab = llm.n_vocab(), llm._model.vocab
        (eos,) = llm.tokenize(contract.target.eos.encode(), add_bos=False, special=True)
        for label in contract.labels:
            tokens = llm.tokenize(contract.target.text(label).encode(), add_bos=False, special=False)
            with Constraint(vocab, grammar, n) as c:
                if not admits(c, tokens, eos, n):
                    raise SystemExit(f"release: {BUNDLE['grammar']} does not admit {contract.target.text(label)!r} "
                                     f"(tokens {tokens}) followed by {contract.target.eos!r}")
    finally:
        llm.close()


def quality_gate(args: argparse.Namespace, p: dict[str, Any], contract: Contract, rows: list[dict[str, str]],
                 per_class: dict[str, Any]) -> None:
    """Stop with the quality gate's report and diagnosis when the Q8_0 answers are not good enough."""
    truth, pred = [r["truth"] for r in rows], [r["pred"] for r in rows]
    accuracy = round(sum(t == x for t, x in zip(truth, pred)) / len(rows), 4) if rows else 0.0
    fails = quality_gates(accuracy, per_class, p["release"])
    if not fails:
        return
    invalid = sum(x == plots.INVALID for x in pred)
    ft = p["finetune"]
    wrong = tuple(f"{r['name']} (labelled {r['truth']}, model {r['pred']})" for r in rows
                  if r["pred"] not in (r["truth"], plots.INVALID))
    causes = quality_diagnosis(json.loads(args.finetune_metrics.read_text()),
                               data_counts(args.split, contract.labels), p, contract.labels, wrong)
    raise SystemExit(
        "release: QUALITY gate failed (not parity: the runtimes agree; the model is not good enough), nothing "
        "released\n  " + "\n  ".join(fails) + "\n"
        f"  {invalid}/{len(rows)} Q8_0 answers were not a label (counted as wrong). Review {args.plots}/"
        f"{PLOTS['confusion']} and {PLOTS['grid']}.\n"
        f"  Diagnosis, from this run's measurements (now finetune.epochs {ft['epochs']}, finetune.lr {ft['lr']}, "
        f"base.source {p['base']['source']}, download.source {p['download']['source']}):\n    - "
        + "\n    - ".join(causes))


def bundle(args: argparse.Namespace, p: dict[str, Any], contract: Contract, parity: dict[str, Any],
           per_class: dict[str, Any]) -> dict[str, Any]:
    """Write the bundle the app ships and its model card into `args.out`; the card."""
    args.out.mkdir(parents=True, exist_ok=True)
    copy_atomic(text_gguf(args.quantize_q8, p["quantize_q8"]["ftype"]), args.out / BUNDLE["model"])
    copy_atomic(mmproj_of(args.convert_gguf), args.out / BUNDLE["mmproj"])
    write_text_atomic(args.out / BUNDLE["contract"], contract.to_json())
    grammar = gbnf(contract.labels, contract.target)
    check_grammar(args.out / BUNDLE["model"], grammar, contract)
    write_text_atomic(args.out / BUNDLE["grammar"], grammar)
    files = {BUNDLE[k]: file_hashes(args.out / BUNDLE[k]) for k in ("model", "mmproj", "contract", "grammar")}
    deps = [args.quantize_q8, args.convert_gguf, args.split, args.resize256, args.parity, args.images,
            args.finetune_metrics]
    card = model_card(contract, p, parity, json.loads(args.finetune_metrics.read_text()), per_class,
                      data_counts(args.split, contract.labels), files,
                      dvc_hashes(Path("dvc.lock"), deps))
    write_json(args.out / BUNDLE["card"], card)
    write_text_atomic(args.out / BUNDLE["card_md"], card_markdown(card))
    return card


def run(args: argparse.Namespace, p: dict[str, Any]) -> dict[str, Any]:
    """Re-check parity, draw the review plots, apply the quality gate, then write the bundle: its card."""
    contract = Contract.from_dict(p["contract"])
    parity = json.loads(args.parity.read_text())
    fails = gates(parity, p["eval_parity"], {})  # the DAG already orders release after a green eval_parity;
    if fails:                                    # this also stops `dvc repro -s release` on stale metrics
        raise SystemExit("release: PARITY gate failed (the runtimes disagree), nothing released\n  "
                         + "\n  ".join(fails))
    rows = parity_rows(args.images.read_text(), contract.labels)
    per_class = plots.per_class_accuracy([r["truth"] for r in rows], [r["pred"] for r in rows], contract.labels)
    title = f"Q8_0 on the test split (n={len(rows)})"
    plots.review_plots(args.plots, args.resize256, rows, per_class, contract.labels, p["release"]["grid"], title)
    quality_gate(args, p, contract, rows, per_class)
    return bundle(args, p, contract, parity, per_class)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("quantize_q8", "convert_gguf", "split", "resize256", "parity", "images", "finetune_metrics",
                 "out", "plots"):
        ap.add_argument(name, type=Path)
    args = ap.parse_args()
    card = run(args, stage_params("release"))
    print(f"release: {', '.join(BUNDLE.values())} -> {args.out}; {', '.join(PLOTS.values())} -> {args.plots} "
          f"(Q8_0 test accuracy {card['metrics']['test_q8_0']['accuracy']})")


if __name__ == "__main__":
    supervise("release", main)
