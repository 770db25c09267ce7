"""finetune: teach the base SmolVLM to answer the app prompt with one element, then merge.

Inputs:  BASE/ the base model as the base stage fitted it to the contract, SPLIT/{train,val}.jsonl and
         the canvases under RESIZE256.
Outputs: OUT/ a merged safetensors checkpoint with processor and tokenizer, configured by the
         contract (geometry, EOS, text architecture) for conversion; METRICS (val accuracy,
         val loss, samples/s, epochs); LIVE/ DVCLive logs for `dvc plots`.
         CKPT/ (scratch outside DVC's outputs) holds the last epoch, so a killed run resumes where it
         stopped; it is keyed by a fingerprint of params and data and ignored when they differ.
Params:  finetune.* and contract.prompt.*, contract.labels, contract.target.*, contract.vision.*
         (the base model's own params, base.*, are the base stage's)
Command: python -m src.stages.finetune models/base data/split data/resize256 models/finetune metrics/finetune.json \
             metrics/finetune_live .cache/finetune_ckpt
         accelerate launch --num_processes N -m src.stages.finetune ...   (the same script on N GPUs)

LoRA adapts the language model; the modules in finetune.train_full train fully:
the connector, and the final norm, which lets a small model's answers become
confident enough for greedy decoding to stop after the label. With the vision tower frozen its output is a pure function of the
canvas, so it is computed once and reused every epoch (finetune.feature_cache).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from dvclive import Live
from tqdm import tqdm

from src import vlm
from src.contract import PromptSpec, TargetSpec, VisionSpec, labels_of
from src.params import stage_params
from src.records import read_jsonl, sha256_file, write_json
from src.training import NullLive, batch_loss, evaluate, fingerprint, load_checkpoint, load_examples, lora, \
    save_checkpoint, trainable


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("base", "split", "canvases", "out", "metrics", "live", "ckpt"):
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

    model, processor = vlm.load(str(args.base))
    vlm.configure(model, processor, vision, target)  # a no-op on a base stage output; refuses a stale one
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
    # the base's weights are part of what a checkpoint was trained on; its params are not ours to read
    fp = fingerprint({**p, "base_sha256": sha256_file(args.base / "model.safetensors")}, train_rows + val_rows)
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
