"""finetune: teach the base SmolVLM to answer the app prompt with one element, then merge.

Inputs:  SPLIT/{train,val}.jsonl and the canvases under RESIZE256.
Outputs: OUT/ a merged safetensors checkpoint with processor and tokenizer, configured by the
         contract (geometry, EOS, text architecture) for conversion; METRICS (val accuracy,
         val loss, samples/s, epochs); LIVE/ DVCLive logs for `dvc plots`.
         CKPT/ (scratch outside DVC's outputs) holds the last epoch, so a killed run resumes where it
         stopped; it is keyed by a fingerprint of params and data and ignored when they differ.
Params:  finetune.* and contract.prompt.*, contract.labels, contract.target.*, contract.vision.*
Command: python -m src.finetune data/split data/resize256 models/finetune metrics/finetune.json \
             metrics/finetune_live .cache/finetune_ckpt
         accelerate launch --num_processes N -m src.finetune ...   (the same script on N GPUs)

LoRA adapts the language model; the modules in finetune.train_full train fully:
the connector, and the final norm, which lets a small model's answers become
confident enough for greedy decoding to stop after the label. With the vision tower frozen its output is a pure function of the
canvas, so it is computed once and reused every epoch (finetune.feature_cache).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from accelerate import Accelerator
from dvclive import Live
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from src import vlm
from src.contract import PromptSpec, TargetSpec, VisionSpec, labels_of
from src.params import stage_params
from src.records import read_jsonl, write_json, write_text_atomic


class NullLive:
    """Stands in for DVCLive on processes other than the main one."""

    def __enter__(self) -> NullLive:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def log_metric(self, name: str, value: float) -> None:
        pass

    def next_step(self) -> None:
        pass


@dataclass
class Example:
    id: str
    label: str
    tensors: dict[str, torch.Tensor]  # input_ids, labels, pixel_values, pixel_attention_mask
    hidden: torch.Tensor | None = None  # cached vision encoder output


def base_model(base: dict[str, Any], vision: VisionSpec, target: TargetSpec) -> tuple[Any, Any]:
    """The base model named by finetune.base.source, configured by the contract."""
    source = base["source"]
    if source == "builder":
        model, processor = vlm.build(vlm.BuilderSpec(**base["builder"]), vision)
    elif source == "hub":
        # A branch name would let the same params train on different weights tomorrow.
        if not re.fullmatch(r"[0-9a-f]{40}", base["revision"] or ""):
            raise SystemExit(f"finetune.base.revision={base['revision']!r}: pin the hub model to a 40-hex commit sha")
        model, processor = vlm.load(base["hub_id"], base["revision"])
    elif source == "local":
        model, processor = vlm.load(base["local_dir"])
    else:
        raise SystemExit(f"finetune.base.source={source!r}: expected builder, hub or local")
    vlm.configure(model, processor, vision, target)
    return model, processor


def lora(model: Any, ft: dict[str, Any], answer_ids: list[int]) -> Any:
    """LoRA on the language model; `train_full` modules and the answer tokens' embedding rows train fully.

    Training the label and EOS rows of the (tied) embedding lets even a small randomly initialised
    model make its answers confident, so greedy decoding and Q8_0 rounding agree on them.
    """
    from peft import LoraConfig, get_peft_model

    targets = "|".join(ft["lora"]["targets"])
    config = LoraConfig(r=ft["lora"]["r"], lora_alpha=ft["lora"]["alpha"], lora_dropout=ft["lora"]["dropout"],
                        target_modules=rf".*text_model.*\.({targets})", modules_to_save=list(ft["train_full"]),
                        trainable_token_indices={"embed_tokens": answer_ids} if ft["train_answer_tokens"] else None)
    return get_peft_model(model, config)


def load_examples(rows: list[dict[str, Any]], canvases: Path, processor: Any, prompt: PromptSpec,
                  labels: tuple[str, ...], target: TargetSpec, desc: str) -> list[Example]:
    out = []
    for r in tqdm(rows, desc=f"render {desc}"):
        with Image.open(canvases / r["canvas"]) as img:
            t = vlm.training_example(processor, prompt, labels, target, img.convert("RGB"), r["element"])
        out.append(Example(r["id"], r["element"], t))
    return out


def batch_loss(model: Any, batch: list[Example], pad_id: int, cached: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss over answer tokens, first-answer-position logits) for a batch."""
    b = {k: v.to(model.device) for k, v in vlm.collate([e.tensors for e in batch], pad_id).items()}
    text = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": b["labels"]}
    if cached:
        out = vlm.forward_from_hidden(model, torch.stack([e.hidden for e in batch]).to(model.device), **text)
    else:
        out = model(pixel_values=b["pixel_values"], pixel_attention_mask=b["pixel_attention_mask"], **text)
    first = (b["labels"] != -100).int().argmax(dim=1) - 1  # position that predicts the label token
    return out.loss, out.logits[torch.arange(len(batch)), first].cpu()


def evaluate(model: Any, examples: list[Example], pad_id: int, cached: bool, label_ids: list[int],
             labels: tuple[str, ...], batch_size: int) -> tuple[float, float]:
    """(accuracy of the argmax over label tokens, mean answer loss)."""
    model.eval()
    correct, losses = 0, []
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = examples[i:i + batch_size]
            loss, logits = batch_loss(model, batch, pad_id, cached)
            pred = logits[:, label_ids].argmax(dim=1)
            correct += sum(labels[int(p)] == e.label for p, e in zip(pred, batch))
            losses.append(float(loss) * len(batch))
    return correct / max(1, len(examples)), sum(losses) / max(1, len(examples))


def trainable(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def fingerprint(params: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """What a checkpoint was trained on; a checkpoint with another fingerprint is not resumed."""
    blob = json.dumps([params, [(r["canvas_sha256"], r["element"]) for r in rows]], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def save_checkpoint(ckpt: Path, model: Any, opt: torch.optim.Optimizer, params: list[torch.Tensor],
                    best: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Safetensors for tensors (no pickles), JSON for the rest; state.json last marks it complete."""
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable(model), tmp / "last.safetensors")
    save_file(best, tmp / "best.safetensors")
    # keyed by the parameter's index, not by opt.state order: a parameter without a gradient has no state
    opt_tensors = {f"{i}.{k}": v for i, q in enumerate(params) for k, v in opt.state.get(q, {}).items()}
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    write_text_atomic(tmp / "state.json", json.dumps(state, indent=2))
    shutil.rmtree(ckpt, ignore_errors=True)
    tmp.rename(ckpt)


def load_checkpoint(ckpt: Path, model: Any, opt: torch.optim.Optimizer, params: list[torch.Tensor],
                    fp: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    if not (ckpt / "state.json").exists():
        return None
    state = json.loads((ckpt / "state.json").read_text())
    if state["fingerprint"] != fp:
        print(f"finetune: {ckpt} was trained on other data or params; starting afresh")
        return None
    model.load_state_dict(load_file(ckpt / "last.safetensors"), strict=False)
    flat = load_file(ckpt / "optimizer.safetensors")
    for i, p in enumerate(params):
        if f"{i}.step" in flat:
            opt.state[p] = {k: flat[f"{i}.{k}"] for k in ("step", "exp_avg", "exp_avg_sq")}
    return load_file(ckpt / "best.safetensors"), state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("split", "canvases", "out", "metrics", "live", "ckpt"):
        ap.add_argument(name, type=Path)
    args = ap.parse_args()
    p = stage_params("finetune")
    ft, c = p["finetune"], p["contract"]
    prompt, labels, target, vision = PromptSpec(**c["prompt"]), labels_of(c), TargetSpec(**c["target"]), VisionSpec(**c["vision"])
    torch.manual_seed(ft["seed"])
    # One script for one CPU, one GPU or `accelerate launch` on several: each process takes its share
    # of every batch and gradients are averaged across processes (a no-op for one).
    acc = Accelerator(cpu=not torch.cuda.is_available())
    main_process = acc.is_main_process

    model, processor = base_model(ft["base"], vision, target)
    model.to(acc.device)
    label_ids = vlm.label_token_ids(processor.tokenizer, labels, target)
    train_rows, val_rows = read_jsonl(args.split / "train.jsonl"), read_jsonl(args.split / "val.jsonl")
    train = load_examples(train_rows, args.canvases, processor, prompt, labels, target, "train")
    val = load_examples(val_rows, args.canvases, processor, prompt, labels, target, "val")
    pad_id = processor.tokenizer.pad_token_id

    cached = ft["feature_cache"] and "vision_model" not in ft["train_full"]
    if cached:
        with torch.no_grad():
            for e in tqdm(train + val, desc="feature cache"):
                e.hidden = vlm.vision_hidden(model, e.tensors["pixel_values"][None].to(acc.device),
                                             e.tensors["pixel_attention_mask"][None].to(acc.device))[0]

    eos_id = processor.tokenizer.convert_tokens_to_ids(target.eos)
    peft_model = lora(model, ft, label_ids + [eos_id])
    net = peft_model.get_base_model()  # LoRA layers are injected in place; call the model directly
    params = [q for q in net.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=ft["lr"], weight_decay=0.0)
    fp = fingerprint(p, train_rows + val_rows)
    resumed = load_checkpoint(args.ckpt, net, opt, params, fp)
    best, state = resumed if resumed else (trainable(net), {"fingerprint": fp, "epoch": 0, "history": [],
                                                           "best": {"val_acc": -1.0, "val_loss": float("inf"), "epoch": 0}})
    if resumed:
        print(f"finetune: resuming after epoch {state['epoch']} from {args.ckpt}")

    if main_process:
        shutil.rmtree(args.live, ignore_errors=True)
    with (Live(str(args.live), save_dvc_exp=False, dvcyaml=None, report=None) if main_process else NullLive()) as live:
        for h in state["history"]:  # replay a resumed run's epochs, so the logs are whole
            for k in ("train_loss", "val_loss", "val_acc"):
                live.log_metric(k, h[k])
            live.next_step()
        train_time, train_seen = 0.0, 0
        for epoch in range(state["epoch"] + 1, ft["epochs"] + 1):
            torch.manual_seed(ft["seed"] + epoch)  # per-epoch seed: a resumed epoch shuffles as the original
            order = torch.randperm(len(train)).tolist()
            net.train()
            t0, losses = time.perf_counter(), []
            for i in tqdm(range(0, len(order), ft["batch_size"]), desc=f"epoch {epoch}/{ft['epochs']}"):
                batch = [train[j] for j in order[i:i + ft["batch_size"]]]
                share = batch[acc.process_index::acc.num_processes] or batch[:1]
                loss, _ = batch_loss(net, share, pad_id, cached)
                opt.zero_grad()
                loss.backward()
                if acc.num_processes > 1:
                    for q in params:
                        if q.grad is not None:  # the same parameters lack a gradient on every process
                            q.grad = acc.reduce(q.grad, reduction="mean")
                opt.step()
                losses.append(loss.item() * len(batch))
            train_time += time.perf_counter() - t0
            train_seen += len(order)
            val_acc, val_loss = evaluate(net, val, pad_id, cached, label_ids, labels, ft["batch_size"])
            h = {"epoch": epoch, "train_loss": sum(losses) / len(order), "val_loss": val_loss, "val_acc": val_acc}
            state["history"].append(h)
            for k in ("train_loss", "val_loss", "val_acc"):
                live.log_metric(k, h[k])
            live.next_step()
            b = state["best"]
            if (val_acc, -val_loss) > (b["val_acc"], -b["val_loss"]):
                state["best"], best = {"val_acc": val_acc, "val_loss": val_loss, "epoch": epoch}, trainable(net)
            state["epoch"] = epoch
            state["samples_per_s"] = train_seen / train_time
            if main_process:
                save_checkpoint(args.ckpt, net, opt, params, best, state)
            print(f"epoch {epoch}: train_loss {h['train_loss']:.4f} val_loss {val_loss:.4f} val_acc {val_acc:.3f}")

    if not main_process:
        return
    net.load_state_dict(best, strict=False)
    merged = peft_model.merge_and_unload().to("cpu")
    shutil.rmtree(args.out, ignore_errors=True)
    vlm.save(merged, processor, args.out)
    write_json(args.metrics, {"val_acc": state["best"]["val_acc"], "val_loss": state["best"]["val_loss"],
                              "best_epoch": state["best"]["epoch"], "epochs": state["epoch"],
                              "samples_per_s": round(state.get("samples_per_s", 0.0), 2),
                              "feature_cache": cached, "n_train": len(train), "n_val": len(val)})
    print(f"finetune: best val_acc {state['best']['val_acc']:.3f} at epoch {state['best']['epoch']} -> {args.out}")


if __name__ == "__main__":
    main()
