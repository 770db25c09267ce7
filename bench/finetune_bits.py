"""What decides finetune's bits: the same epochs under torch's thread and instruction-set settings.

Runs the finetune stage's own code (prepare, train_epoch, evaluate) for `--epochs` epochs on the
reproduced demo (models/base, data/split, data/resize256; run `dvc repro` first), once per setting,
each in a fresh process, and prints each setting's val_loss (exactly, as a float hex), a sha256 of
the trained weights, and its epoch time against the baseline's, measured in the same run.

Settings: the baseline twice (same machine, same settings: are the bits repeatable?), one torch
thread instead of the default, and torch's CPU dispatch pinned to AVX2 in ATen, oneDNN and MKL
(what a pin across x86 CPUs would cost and change).

Command: python -m bench.finetune_bits [--epochs 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from src.config.paths import ROOT

SETTINGS: dict[str, dict[str, str]] = {
    "baseline": {},
    "baseline again": {},
    "1 torch thread": {"OMP_NUM_THREADS": "1"},
    "ISA pinned to AVX2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2,STRICT"},
}


def worker(epochs: int) -> dict[str, object]:
    """Train `epochs` epochs as the finetune stage does; the figures that decide its output's bits."""
    import torch

    from src.config.contract import LABELS
    from src.config.params import stage_params
    from src.model.training import evaluate, start_processes, stop_processes, train_epoch
    from src.stages.finetune import prepare

    paths = yaml.safe_load((ROOT / "dvc.yaml").read_text())["vars"][0]["paths"]
    p = stage_params("finetune")
    ft = p["finetune"]
    with tempfile.TemporaryDirectory() as ckpt:  # an empty checkpoint folder: never resume
        args = argparse.Namespace(base=ROOT / paths["base"], split=ROOT / paths["split"],
                                  canvases=ROOT / paths["resize256"], ckpt=Path(ckpt))
        procs = start_processes()
        try:
            run = prepare(args, p, procs)
            pad_id = run.processor.tokenizer.pad_token_id
            seconds = []
            for epoch in range(1, epochs + 1):
                torch.manual_seed(ft["seed"] + epoch)  # as finetune.fit seeds each epoch
                order = torch.randperm(len(run.train)).tolist()
                t0 = time.perf_counter()
                train_epoch(run.net, run.opt, run.params, run.train, order, ft["batch_size"], pad_id, run.cached,
                            procs, f"epoch {epoch}")
                seconds.append(time.perf_counter() - t0)
            val_acc, val_loss = evaluate(run.net, run.val, pad_id, run.cached, run.label_ids,
                                         LABELS.validate_python(p["contract"]["labels"]), ft["batch_size"])
        finally:
            stop_processes()
    h = hashlib.sha256()
    for name, t in sorted(run.net.named_parameters()):
        if t.requires_grad:
            h.update(name.encode() + t.detach().contiguous().numpy().tobytes())
    return {"val_loss": float(val_loss).hex(), "val_loss_dec": float(val_loss), "val_acc": val_acc,
            "weights": h.hexdigest()[:16], "epoch_s": min(seconds), "threads": torch.get_num_threads(),
            "isa": torch.backends.cpu.get_cpu_capability()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.epochs)))
        return
    rows = {}
    for name, env in SETTINGS.items():
        res = subprocess.run([sys.executable, "-m", "bench.finetune_bits", "--worker", "--epochs", str(args.epochs)],
                             cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"finetune_bits: setting {name!r} failed:\n{res.stderr[-2000:]}")
        rows[name] = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"{name}: {rows[name]}", file=sys.stderr)
    base = rows["baseline"]
    print("| setting | torch threads | ATen ISA | val_loss | weights sha256 | same bits as baseline | epoch time / baseline |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        same = r["val_loss"] == base["val_loss"] and r["weights"] == base["weights"]
        print(f"| {name} | {r['threads']} | {r['isa']} | {r['val_loss_dec']!r} | {r['weights']} | "
              f"{'yes' if same else 'no'} | {r['epoch_s'] / base['epoch_s']:.2f} |")


if __name__ == "__main__":
    main()
