"""Section 3 of `python -m bench.run`: stage speed here, each against its baseline in the same run.

  resize    bench/resize.py (another module) against the seed's resize_for_android
  label     the label client at concurrency N vs 1 against a loopback server with fixed latency
  finetune  one epoch with and without the feature cache, demo-sized builder model, ~32 canvases
  dvc       a no-change `dvc repro` (and `dvc status`) vs the first run, on a throwaway repo holding
            download + resize256 + label + split of N demo photos
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import ROOT, demo_canvases, params, timed
from src.config.contract import Contract, Vision
from src.config.settings import Builder
from src.data.canvas import canvas_png
from src.model import hf_vlm

# -- resize --------------------------------------------------------------------------------------

def resize(quick: bool) -> dict[str, Any]:
    """bench/resize.py prints its own table; run it as written and keep its output."""
    args = ["--n", "30", "--repeat", "1"] if quick else ["--n", "100", "--repeat", "2"]
    res = subprocess.run([sys.executable, "-m", "bench.resize", *args], cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"bench.resize failed:\n{res.stderr[-2000:]}")
    return {"output": res.stdout.strip()}


# -- label ---------------------------------------------------------------------------------------

def label(c: Contract, n: int, workers: list[int], latency_s: float = 0.05) -> dict[str, Any]:
    """Items/s of src.labeling.teacher's online client at each concurrency, same server (the tests' fake, with a
    fixed latency per chat request), same items."""
    from src.config.settings import Label
    from src.labeling.answer_cache import AnswerCache
    from src.labeling.teacher.client import teach
    from src.labeling.teacher.request import Item
    from testkit.openai_server import FakeOpenAI

    key = "sk-loopback"  # a dummy for the loopback server
    os.environ["BENCH_TEACHER_KEY"] = key
    tmp = Path(tempfile.mkdtemp(prefix="bench-label-"))
    try:
        with FakeOpenAI({}, key, delay_s=latency_s) as server:  # unknown canvases answer the first label
            pngs = []
            for i, (canvas, _) in enumerate(demo_canvases(min(n, 10), c)):
                pngs.append(tmp / f"{i}.png")
                pngs[-1].write_bytes(canvas_png(canvas))
            base = params()["label"]
            res: dict[str, Any] = {"n": n, "latency_s": latency_s}
            for w in workers:
                lp = {**base, "concurrency": w, "teacher": {**base["teacher"], "base_url": server.base_url,
                                                            "api_key_env": "BENCH_TEACHER_KEY", "mode": "online"}}
                cfg = Label.model_validate(lp)
                items = [Item(f"{w}-{i}", f"{i}", pngs[i % len(pngs)]) for i in range(n)]
                (tmp / f"cache-{w}").mkdir(exist_ok=True)
                cache = AnswerCache(tmp / f"cache-{w}")
                sec, (errors, _) = timed(lambda: teach(items, c.labels, cfg, cache, tmp / f"cache-{w}"))
                if errors:
                    raise RuntimeError(f"loopback labelling failed: {list(errors.values())[:3]}")
                res[f"concurrency_{w}"] = {"seconds": sec, "items_per_s": n / sec}
            res["speedup"] = {w: res[f"concurrency_{w}"]["items_per_s"] / res[f"concurrency_{workers[0]}"]["items_per_s"]
                              for w in workers}
            return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- finetune ------------------------------------------------------------------------------------

def finetune_epoch(c: Contract, n: int, epochs: int, spec: Builder | None = None,
                   vision: Vision | None = None) -> dict[str, Any]:
    """Seconds per epoch over n canvases with the encoder in every step vs cached once (same model, same LoRA).

    Default: the demo's builder model. `spec`/`vision` give another size, e.g. SmolVLM-256M's shapes.
    """
    from src.model.training import Example, Procs, lora, train_epoch

    p = params()["finetune"]
    vision = vision or c.vision
    model, processor = hf_vlm.build(spec or Builder.model_validate(params()["base"]["builder"]), vision)
    hf_vlm.configure(model, processor, vision, c.target)
    label_ids = hf_vlm.label_token_ids(processor.tokenizer, c.labels, c.target)
    exs = [Example(str(i), lab, hf_vlm.training_example(processor, c.prompt, c.labels, c.target, canvas, lab))
           for i, (canvas, lab) in enumerate(demo_canvases(n, c))]
    eos = processor.tokenizer.convert_tokens_to_ids(c.target.eos)
    net = lora(model, p, label_ids + [eos]).get_base_model()
    trained = [q for q in net.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(trained, lr=p["lr"])
    pad, bs, one = processor.tokenizer.pad_token_id, p["batch_size"], Procs(0, 1, torch.device("cpu"))

    def epoch(cached: bool) -> None:  # the stage's epoch (src/model/training.py), in a fixed order
        train_epoch(net, opt, trained, exs, list(range(len(exs))), bs, pad, cached, one, "bench epoch")

    def fill_cache() -> None:
        with torch.no_grad():
            for e in exs:
                e.hidden = hf_vlm.vision_hidden(net, e.tensors["pixel_values"][None], e.tensors["pixel_attention_mask"][None])[0]

    epoch(False)  # warm-up: first-call allocations would otherwise land on whichever side runs first
    cache_s, _ = timed(fill_cache)
    # Interleaved, best of each: load from other processes then hits both sides alike.
    pairs = [(timed(lambda: epoch(False))[0], timed(lambda: epoch(True))[0]) for _ in range(epochs)]
    no_cache, cached = min(a for a, _ in pairs), min(b for _, b in pairs)
    total = p["epochs"]
    return {"n": n, "batch_size": bs, "epoch_s_no_cache": no_cache, "epoch_s_cache": cached, "cache_fill_s": cache_s,
            "epoch_speedup": no_cache / cached,
            f"run_{total}_epochs_speedup": total * no_cache / (cache_s + total * cached)}


# -- dvc -----------------------------------------------------------------------------------------

DATA_STAGES = ("download", "resize256", "label", "split")


def _run(cmd: list[str], cwd: Path) -> float:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(cwd)}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return time.perf_counter() - t0


def data_repo(dest: Path, n: int) -> Path:
    """A git + DVC repo with this project's code and only the data stages, demo source of n photos."""
    from testkit.project import make_repo  # the one throwaway-repo builder

    return make_repo(dest, {"download.source": "demo", "download.demo.n": n, "label.provider": "manifest"},
                     stages=DATA_STAGES)


def dvc_repro(n: int, keep: Path | None = None) -> dict[str, Any]:
    """First `dvc repro`, then `dvc status` and a no-change `dvc repro` (best of two each).

    With `keep`, the repo is built there once and reused by later bench runs (10,000 demo photos
    take minutes to generate and resize; the no-change repro is what is measured, not the build).
    """
    repo = keep if keep is not None else Path(tempfile.mkdtemp(prefix="bench-dvc-")) / "repo"
    meta = repo.parent / f"{repo.name}.json"
    try:
        if keep is None or not meta.exists():
            shutil.rmtree(repo, ignore_errors=True)
            repo.parent.mkdir(parents=True, exist_ok=True)
            data_repo(repo, n)
            meta.write_text(json.dumps({"first_repro_s": _run(["dvc", "repro", "-q"], repo)}))
        first = json.loads(meta.read_text())["first_repro_s"]
        status = min(_run(["dvc", "status", "-q"], repo) for _ in range(2))
        again = min(_run(["dvc", "repro", "-q"], repo) for _ in range(2))
        return {"n": n, "first_repro_s": first, "status_s": status, "nochange_repro_s": again,
                "first_speedup": first / again, "nochange_vs_status": again / status}
    finally:
        if keep is None:
            shutil.rmtree(repo.parent, ignore_errors=True)
