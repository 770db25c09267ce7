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
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch
import yaml

from bench.common import ROOT, demo_canvases, params, timed
from src import vlm
from src.canvas import canvas_png
from src.contract import Contract, VisionSpec

# -- resize --------------------------------------------------------------------------------------

def resize(quick: bool) -> dict[str, Any]:
    """bench/resize.py prints its own table; run it as written and keep its output."""
    if not (ROOT / "bench" / "resize.py").exists():
        return {"skipped": "bench/resize.py is absent (another worker writes it)"}
    args = ["--n", "30", "--repeat", "1"] if quick else ["--n", "100", "--repeat", "2"]
    res = subprocess.run([sys.executable, "-m", "bench.resize", *args], cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        return {"skipped": f"bench.resize failed: {res.stderr[-500:]}"}
    return {"output": res.stdout.strip()}


# -- label ---------------------------------------------------------------------------------------

def _slow_openai(latency_s: float) -> type[BaseHTTPRequestHandler]:
    """A chat-completions handler that sleeps `latency_s`, then answers `fire` with a reason."""
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a: Any) -> None:  # keep the bench output readable
            pass

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            time.sleep(latency_s)
            body = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                               "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                   "role": "assistant", "content": json.dumps({"element": "fire", "reason": "red"})}}],
                               "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
    return Handler


def label(c: Contract, n: int, workers: list[int], latency_s: float = 0.05) -> dict[str, Any]:
    """Items/s of src.teacher's online client at each concurrency, same server, same items."""
    from src import teacher

    server = ThreadingHTTPServer(("127.0.0.1", 0), _slow_openai(latency_s))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    tmp = Path(tempfile.mkdtemp(prefix="bench-label-"))
    os.environ["BENCH_TEACHER_KEY"] = "sk-loopback"  # a dummy: the loopback server takes any key
    try:
        pngs = []
        for i, (canvas, _) in enumerate(demo_canvases(min(n, 10), c)):
            pngs.append(tmp / f"{i}.png")
            pngs[-1].write_bytes(canvas_png(canvas))
        base = params()["label"]
        res: dict[str, Any] = {"n": n, "latency_s": latency_s}
        for w in workers:
            lp = {**base, "concurrency": w, "teacher": {**base["teacher"], "base_url": f"http://127.0.0.1:{server.server_port}/v1",
                                                        "api_key_env": "BENCH_TEACHER_KEY", "mode": "online"}}
            cfg = teacher.TeacherConfig.from_params(lp)
            items = [teacher.Item(f"{w}-{i}", f"{i}", pngs[i % len(pngs)]) for i in range(n)]
            cache = teacher.AnswerCache(tmp / f"cache-{w}")
            (tmp / f"cache-{w}").mkdir(exist_ok=True)
            sec, (errors, _) = timed(lambda: teacher.teach(items, c.labels, cfg, cache, tmp / f"cache-{w}"))
            if errors:
                raise RuntimeError(f"loopback labelling failed: {list(errors.values())[:3]}")
            res[f"concurrency_{w}"] = {"seconds": sec, "items_per_s": n / sec}
        res["speedup"] = {w: res[f"concurrency_{w}"]["items_per_s"] / res[f"concurrency_{workers[0]}"]["items_per_s"]
                          for w in workers}
        return res
    finally:
        server.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


# -- finetune ------------------------------------------------------------------------------------

def finetune_epoch(c: Contract, n: int, epochs: int, spec: vlm.BuilderSpec | None = None,
                   vision: VisionSpec | None = None) -> dict[str, Any]:
    """Seconds per epoch over n canvases with the encoder in every step vs cached once (same model, same LoRA).

    Default: the demo's builder model. `spec`/`vision` give another size, e.g. SmolVLM-256M's shapes.
    """
    from src.training import Example, batch_loss, lora

    p = params()["finetune"]
    vision = vision or c.vision
    model, processor = vlm.build(spec or vlm.BuilderSpec(**params()["base"]["builder"]), vision)
    vlm.configure(model, processor, vision, c.target)
    label_ids = vlm.label_token_ids(processor.tokenizer, c.labels, c.target)
    exs = [Example(str(i), lab, vlm.training_example(processor, c.prompt, c.labels, c.target, canvas, lab))
           for i, (canvas, lab) in enumerate(demo_canvases(n, c))]
    eos = processor.tokenizer.convert_tokens_to_ids(c.target.eos)
    net = lora(model, p, label_ids + [eos]).get_base_model()
    opt = torch.optim.AdamW([q for q in net.parameters() if q.requires_grad], lr=p["lr"])
    pad, bs = processor.tokenizer.pad_token_id, p["batch_size"]

    def epoch(cached: bool) -> None:
        net.train()
        for i in range(0, len(exs), bs):
            loss, _ = batch_loss(net, exs[i:i + bs], pad, cached)
            opt.zero_grad()
            loss.backward()
            opt.step()

    def fill_cache() -> None:
        with torch.no_grad():
            for e in exs:
                e.hidden = vlm.vision_hidden(net, e.tensors["pixel_values"][None], e.tensors["pixel_attention_mask"][None])[0]

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
    shutil.copytree(ROOT / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__"))
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    dvc["stages"] = {k: v for k, v in dvc["stages"].items() if k in DATA_STAGES}
    (dest / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False))
    pr = params()
    pr["download"]["source"], pr["download"]["demo"]["n"], pr["label"]["provider"] = "demo", n, "manifest"
    (dest / "params.yaml").write_text(yaml.safe_dump(pr, sort_keys=False))
    for name in (".dvcignore", "data/label_overrides.csv"):
        if (ROOT / name).exists():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, dest / name)
    (dest / ".gitignore").write_text("/.cache/\n__pycache__/\n")
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"], [*git, "commit", "-q", "-m", "bench"]):
        _run(cmd, dest)
    return dest


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
