"""finetune: teach the base SmolVLM to answer the app prompt with one element, then merge.

Inputs:  BASE/ the base model as the base stage fitted it to the contract, SPLIT/{train,val}.jsonl and
         the canvases under RESIZE256.
Outputs: OUT/ a merged safetensors checkpoint with processor and tokenizer, configured by the
         contract (geometry, EOS, text architecture) for conversion; METRICS (the best epoch, the one of
         lowest val loss, and its val accuracy; the val curve from the untrained model on; the training
         photos the best weights answer as another class: what release's quality gate diagnoses from);
         LIVE/ DVCLive logs for `dvc plots`.
         CKPT/ (scratch outside DVC's outputs) holds the last epoch, so a killed run resumes where it
         stopped; it is keyed by a fingerprint of params and data and ignored when they differ.
Params:  finetune.* and contract.prompt.*, contract.labels, contract.target.*, contract.vision.*
         (the base model's own params, base.*, are the base stage's)
Command: python -m src.stages.finetune models/base data/split data/resize256 models/finetune metrics/finetune.json \
             metrics/finetune_live .cache/finetune_ckpt
         torchrun --nproc_per_node N -m src.stages.finetune ...   (or `accelerate launch`: the same script
             on N processes; each takes its share of every batch, see src/model/training.py)

LoRA adapts the language model; the modules in finetune.train_full train fully:
the connector, and the final norm, which lets a small model's answers become
confident enough for greedy decoding to stop after the label. With the vision tower frozen its output is a pure function of the
canvas, so it is computed once and reused every epoch (finetune.feature_cache).
"""

from __future__ import annotations

from src.model import torch_pin  # noqa: F401  (first: torch's kernels are pinned before torch loads)

# isort: split

import argparse
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from dvclive import Live
from tqdm import tqdm

from src.config.contract import LABELS, Prompt, Target, Vision
from src.config.params import stage_params
from src.data.files import read_jsonl, sha256_file, write_json
from src.model import hf_vlm
from src.model.training import (
    Example,
    NullLive,
    Procs,
    better,
    evaluate,
    fingerprint,
    load_checkpoint,
    load_examples,
    lora,
    save_checkpoint,
    start_processes,
    stop_processes,
    train_epoch,
    trainable,
)
from src.runtime.supervise import at, supervise

LOGGED = ("train_loss", "val_loss", "val_acc")


@dataclass
class Run:
    """Everything an epoch needs: the model being trained, its optimiser, the data and where it stands."""

    peft_model: Any
    net: Any  # the base model with LoRA layers injected in place: called directly
    processor: Any
    opt: torch.optim.Optimizer
    params: list[torch.Tensor]
    train: list[Example]
    val: list[Example]
    names: dict[str, str]  # example id -> the photo's name as the user knows it (file name, URL)
    labels: tuple[str, ...]
    label_ids: list[int]
    cached: bool
    best: dict[str, torch.Tensor]
    state: dict[str, Any]


def fill_feature_cache(model: Any, examples: list[Example], device: torch.device) -> None:
    with torch.no_grad():
        for e in tqdm(examples, desc="feature cache"):
            e.hidden = hf_vlm.vision_hidden(model, e.tensors["pixel_values"][None].to(device),
                                         e.tensors["pixel_attention_mask"][None].to(device))[0]


def prepare(args: argparse.Namespace, p: dict[str, Any], procs: Procs) -> Run:
    """The base model with LoRA, the examples (and their cached features), resumed from the checkpoint if it fits."""
    ft, c = p["finetune"], p["contract"]
    prompt, labels, target, vision = (Prompt.model_validate(c["prompt"]), LABELS.validate_python(c["labels"]),
                                      Target.model_validate(c["target"]), Vision.model_validate(c["vision"]))
    torch.manual_seed(ft["seed"])
    model, processor = hf_vlm.load(str(args.base))
    hf_vlm.configure(model, processor, vision, target)  # a no-op on a base stage output; refuses a stale one
    model.to(procs.device)
    label_ids = hf_vlm.label_token_ids(processor.tokenizer, labels, target)
    train_rows, val_rows = read_jsonl(args.split / "train.jsonl"), read_jsonl(args.split / "val.jsonl")
    train = load_examples(train_rows, args.canvases, processor, prompt, labels, target, "train")
    val = load_examples(val_rows, args.canvases, processor, prompt, labels, target, "val")
    cached = ft["feature_cache"] and "vision_model" not in ft["train_full"]
    if cached:
        fill_feature_cache(model, train + val, procs.device)
    peft_model = lora(model, ft, label_ids + [processor.tokenizer.convert_tokens_to_ids(target.eos)])
    net = peft_model.get_base_model()
    params = [q for q in net.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=ft["lr"], weight_decay=0.0)
    # the base's weights are part of what a checkpoint was trained on; its params are not ours to read
    # state 2: the checkpoint holds the untrained model's val figures ("start"); an older one is not resumed
    fp = fingerprint({**p, "base_sha256": sha256_file(args.base / "model.safetensors"), "state": 2},
                     train_rows + val_rows)
    resumed = load_checkpoint(args.ckpt, net, opt, params, fp)
    if resumed:
        print(f"finetune: resuming after epoch {resumed[1]['epoch']} from {args.ckpt}")
    best, state = resumed or (trainable(net), {"fingerprint": fp, "epoch": 0, "history": [],
                                               "best": {"val_acc": -1.0, "val_loss": float("inf"), "epoch": 0}})
    names = {r["id"]: r.get("name") or r["id"] for r in train_rows + val_rows}
    return Run(peft_model, net, processor, opt, params, train, val, names, labels, label_ids, cached, best, state)


def fit(run: Run, ft: dict[str, Any], procs: Procs, ckpt: Path, live: Any) -> None:
    """The epochs still to run after a resumed checkpoint; each one logged, checkpointed and kept if best."""
    for h in run.state["history"]:  # replay a resumed run's epochs, so the logs are whole
        for k in LOGGED:
            live.log_metric(k, h[k])
        live.next_step()
    pad_id = run.processor.tokenizer.pad_token_id
    if "start" not in run.state:  # the untrained model: what "the loss fell" is measured against, even after 1 epoch
        acc, loss, _ = evaluate(run.net, run.val, pad_id, run.cached, run.label_ids, run.labels, ft["batch_size"])
        run.state["start"] = {"val_acc": acc, "val_loss": loss}
    train_time, train_seen = 0.0, 0
    for epoch in range(run.state["epoch"] + 1, ft["epochs"] + 1):
        torch.manual_seed(ft["seed"] + epoch)  # per-epoch seed: a resumed epoch shuffles as the original
        order = torch.randperm(len(run.train)).tolist()
        at("torch", f"epoch {epoch}")
        t0 = time.perf_counter()
        train_loss = train_epoch(run.net, run.opt, run.params, run.train, order, ft["batch_size"], pad_id, run.cached,
                                 procs, f"epoch {epoch}/{ft['epochs']}")
        train_time += time.perf_counter() - t0
        train_seen += len(order)
        val_acc, val_loss, _ = evaluate(run.net, run.val, pad_id, run.cached, run.label_ids, run.labels, ft["batch_size"])
        h = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_acc": val_acc}
        run.state["history"].append(h)
        for k in LOGGED:
            live.log_metric(k, h[k])
        live.next_step()
        if better(h, run.state["best"]):
            run.state["best"], run.best = {"val_acc": val_acc, "val_loss": val_loss, "epoch": epoch}, trainable(run.net)
        run.state["epoch"] = epoch
        run.state["samples_per_s"] = train_seen / train_time
        if procs.main:
            save_checkpoint(ckpt, run.net, run.opt, run.params, run.best, run.state)
        print(f"epoch {epoch}: train_loss {train_loss:.4f} val_loss {val_loss:.4f} val_acc {val_acc:.3f}")


def fit_record(run: Run, batch_size: int) -> dict[str, Any]:
    """What the run measured, for release's quality gate to diagnose a weak model from: the val curve from the
    untrained model on, whether val_loss was still falling at the last epoch, and how the best epoch's weights
    answer the training photos (a photo the model answers as another class is a candidate for a wrong label)."""
    s = run.state
    _, _, preds = evaluate(run.net, run.train, run.processor.tokenizer.pad_token_id, run.cached, run.label_ids,
                           run.labels, batch_size)
    disagree = [f"{run.names[e.id]} (labelled {e.label}, model {p})" for e, p in zip(run.train, preds) if p != e.label]
    losses = [s["start"]["val_loss"]] + [h["val_loss"] for h in s["history"]]
    return {"val_acc_start": s["start"]["val_acc"], "val_loss_start": s["start"]["val_loss"],
            "history": [{k: h[k] for k in ("epoch", *LOGGED)} for h in s["history"]],
            # the last epoch is the lowest val_loss yet: more epochs would likely lower it further
            "val_loss_falling": len(losses) > 1 and losses[-1] < min(losses[:-1]),
            "train_acc": 1 - len(disagree) / max(1, len(run.train)), "train_disagree": len(disagree),
            "train_disagree_photos": sorted(disagree)[:20]}


def save(run: Run, batch_size: int, out: Path, metrics: Path) -> None:
    """Merge the best epoch's weights and write the checkpoint and the metrics."""
    run.net.load_state_dict(run.best, strict=False)
    record = fit_record(run, batch_size)
    merged = run.peft_model.merge_and_unload().to("cpu")
    shutil.rmtree(out, ignore_errors=True)
    hf_vlm.save(merged, run.processor, out)
    s = run.state
    write_json(metrics, {"val_acc": s["best"]["val_acc"], "val_loss": s["best"]["val_loss"],
                         "best_epoch": s["best"]["epoch"], "epochs": s["epoch"],
                         "feature_cache": run.cached, "n_train": len(run.train), "n_val": len(run.val), **record})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("base", "split", "canvases", "out", "metrics", "live", "ckpt"):
        ap.add_argument(name, type=Path)
    args = ap.parse_args()
    p = stage_params("finetune")
    procs = start_processes()
    try:
        run = prepare(args, p, procs)
        if procs.main:
            shutil.rmtree(args.live, ignore_errors=True)
        with Live(str(args.live), save_dvc_exp=False, dvcyaml=None, report=None) if procs.main else NullLive() as live:
            fit(run, p["finetune"], procs, args.ckpt, live)
    finally:
        stop_processes()
    if procs.main:
        save(run, p["finetune"]["batch_size"], args.out, args.metrics)
        b = run.state["best"]
        # A timing is printed, never written into an output: it would change a hash on every machine.
        print(f"finetune: best val_loss {b['val_loss']:.4f} (val_acc {b['val_acc']:.3f}) at epoch {b['epoch']} "
              f"({run.state.get('samples_per_s', 0.0):.1f} samples/s) -> {args.out}")


if __name__ == "__main__":
    supervise("finetune", main)
