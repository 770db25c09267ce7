"""Fine-tuning pieces: LoRA, examples, the loss, one epoch (on one process or several),
evaluation and resumable checkpoints. The base model is the base stage's output.

`src/stages/finetune.py` runs them as a stage; the benchmark times the same functions.

Several processes (torchrun or `accelerate launch`, which set the torch.distributed environment)
split every batch between them, and their gradients are summed so each step is the one a single
process takes on the whole batch. This is plain torch.distributed, not accelerate's `prepare`:
its DataLoader either repeats examples to even out a short batch (`even_batches`) or leaves the
ranks' losses weighted alike although their shares differ, and its DDP wrapper needs every
forward to go through the wrapped model, while the feature cache calls the language model alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from src.config.contract import Prompt, Target
from src.data.files import write_text_atomic
from src.model import hf_vlm


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


def load_examples(rows: list[dict[str, Any]], canvases: Path, processor: Any, prompt: Prompt,
                  labels: tuple[str, ...], target: Target, desc: str) -> list[Example]:
    out = []
    for r in tqdm(rows, desc=f"render {desc}"):
        with Image.open(canvases / r["canvas"]) as img:
            t = hf_vlm.training_example(processor, prompt, labels, target, img.convert("RGB"), r["element"])
        out.append(Example(r["id"], r["element"], t))
    return out


def batch_loss(model: Any, batch: list[Example], pad_id: int, cached: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss over answer tokens, first-answer-position logits) for a batch."""
    b = {k: v.to(model.device) for k, v in hf_vlm.collate([e.tensors for e in batch], pad_id).items()}
    text = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": b["labels"]}
    if cached:
        out = hf_vlm.forward_from_hidden(model, torch.stack([e.hidden for e in batch]).to(model.device), **text)
    else:
        out = model(pixel_values=b["pixel_values"], pixel_attention_mask=b["pixel_attention_mask"], **text)
    first = (b["labels"] != -100).int().argmax(dim=1) - 1  # position that predicts the label token
    return out.loss, out.logits[torch.arange(len(batch)), first].cpu()


@dataclass(frozen=True)
class Procs:
    """This process's place among the training processes (rank 0 of 1 without a launcher)."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def start_processes() -> Procs:
    """Join the process group a launcher (torchrun, `accelerate launch`) describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world == 1:
        return Procs(0, 1, torch.device("cuda" if cuda else "cpu"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    return Procs(dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if cuda else "cpu"))


def stop_processes() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def answer_tokens(e: Example) -> int:
    """Supervised positions of an example (the answer tokens): what the loss averages over."""
    return int((e.tensors["labels"] != -100).sum())


def sync_gradients(params: list[torch.Tensor], loss: torch.Tensor, procs: Procs) -> float:
    """Sum gradients and `loss` over the processes in one all-reduce; returns the summed loss.

    Each process scaled its loss by its share of the batch's answer tokens, so the sum is the
    whole batch's mean. A parameter keeps `grad=None` only if no process gave it a gradient
    (AdamW skips those; a zero gradient would still move it through the Adam moments).
    """
    if procs.world == 1:
        return float(loss.detach())
    has = torch.tensor([q.grad is not None for q in params], dtype=torch.int32, device=procs.device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    synced = [q for q, h in zip(params, has.tolist()) if h]
    flat = torch.cat([(q.grad if q.grad is not None else torch.zeros_like(q)).reshape(-1) for q in synced]
                     + [loss.detach().reshape(1).to(procs.device, torch.float32)])
    dist.all_reduce(flat)
    offset = 0
    for q in synced:
        q.grad = flat[offset:offset + q.numel()].view_as(q).clone()
        offset += q.numel()
    return float(flat[-1])


def train_epoch(net: Any, opt: torch.optim.Optimizer, params: list[torch.Tensor], train: list[Example],
                order: list[int], batch_size: int, pad_id: int, cached: bool, procs: Procs, desc: str) -> float:
    """One pass over `train` in `order`; returns the mean answer loss (the same on every process).

    Each batch of `batch_size` is dealt to the processes in turn (`batch[rank::world]`); a process
    whose share is empty (a last batch smaller than the process count) contributes no gradient.
    """
    net.train()
    total = 0.0
    for i in tqdm(range(0, len(order), batch_size), desc=desc, disable=not procs.main):
        batch = [train[j] for j in order[i:i + batch_size]]
        share = batch[procs.rank::procs.world]
        opt.zero_grad()
        loss = torch.zeros(())
        if share:
            loss, _ = batch_loss(net, share, pad_id, cached)
            if len(share) < len(batch):  # weight by the share of answer tokens: the sum over processes is the mean
                loss = loss * (sum(map(answer_tokens, share)) / sum(map(answer_tokens, batch)))
            loss.backward()
        total += sync_gradients(params, loss, procs) * len(batch)
        opt.step()
    return total / max(1, len(order))


def evaluate(model: Any, examples: list[Example], pad_id: int, cached: bool, label_ids: list[int],
             labels: tuple[str, ...], batch_size: int) -> tuple[float, float, list[str]]:
    """(accuracy of the argmax over label tokens, mean answer loss, that argmax for each example)."""
    model.eval()
    preds, losses = [], []
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = examples[i:i + batch_size]
            loss, logits = batch_loss(model, batch, pad_id, cached)
            preds += [labels[int(p)] for p in logits[:, label_ids].argmax(dim=1)]
            losses.append(float(loss) * len(batch))
    correct = sum(p == e.label for p, e in zip(preds, examples))
    return correct / max(1, len(examples)), sum(losses) / max(1, len(examples)), preds


def better(new: dict[str, Any], best: dict[str, Any]) -> bool:
    """Whether epoch `new` replaces `best` as the epoch merged: the lower val_loss wins; on equal loss the higher
    val_acc, then the earlier epoch.

    val_loss is the mean cross-entropy of the answer tokens (label and EOS) on the val photos: what greedy
    decoding has to produce, on a continuous scale. val_acc is not a fit ranking: it is the argmax among the label
    tokens only, so it credits an epoch whose answer is no label at all, and on a few val photos it moves in steps
    of 1/n_val (on 5 photos, 0.4 at epoch 1 beat 29 later epochs whose val_loss was lower, and Q8_0 then
    answered no label on 5/5 test photos).
    """
    return (new["val_loss"], -new["val_acc"]) < (best["val_loss"], -best["val_acc"])


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
