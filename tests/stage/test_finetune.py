"""finetune: the loss weighting that lets processes share a batch; checkpoints that resume
exactly; and, run as a stage, two processes that learn what one learns (short and uneven batches
included) and a killed run that resumes where an uninterrupted one ends."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from src.data.canvas import decode, render_png, to_canvas
from src.data.demo import photo
from src.data.files import sha256, write_bytes_atomic, write_jsonl
from src.model import hf_vlm
from src.model.training import (
    Example,
    Procs,
    answer_tokens,
    batch_loss,
    better,
    fingerprint,
    load_checkpoint,
    lora,
    save_checkpoint,
    train_epoch,
    trainable,
)
from testkit.project import BIN, CONTRACT, TINY_MODEL, copy_project, project_params

PARAMS = project_params()
C = CONTRACT
FT = PARAMS["finetune"]
ONE = Procs(0, 1, torch.device("cpu"))
# 7 training canvases in batches of 3: batches of 3, 3 and 1, so two processes get shares of
# 2 and 1 examples, then 1 and none.
N_TRAIN, N_VAL = 7, 4
STAGE = {"base.builder": TINY_MODEL, "finetune.epochs": 4, "finetune.batch_size": 3}


def demo_examples(processor: Any, n: int) -> list[Example]:
    out = []
    for i in range(n):
        p = photo(i, C.labels, seed=3)
        img = to_canvas(decode(p.data, C.canvas), C.canvas).convert("RGB")
        out.append(Example(str(i), p.label, hf_vlm.training_example(processor, C.prompt, C.labels, C.target, img, p.label)))
    return out


def tiny_net(tiny_model: tuple[Any, Any]) -> Any:
    """A fresh copy of the session's tiny model with finetune's LoRA, seeded: two calls give the same weights."""
    model, processor = tiny_model
    torch.manual_seed(0)
    ids = hf_vlm.label_token_ids(processor.tokenizer, C.labels, C.target)
    return lora(copy.deepcopy(model), FT, ids + [processor.tokenizer.convert_tokens_to_ids(C.target.eos)]).get_base_model()


@pytest.fixture(scope="module")
def examples(tiny_model: tuple[Any, Any]) -> list[Example]:
    model, processor = tiny_model
    out = demo_examples(processor, 3)
    with torch.no_grad():  # the feature cache, as finetune fills it: epochs then skip the vision tower
        for e in out:
            e.hidden = hf_vlm.vision_hidden(model, e.tensors["pixel_values"][None], e.tensors["pixel_attention_mask"][None])[0]
    return out


def trainable_params(net: Any) -> list[torch.Tensor]:
    return [q for q in net.parameters() if q.requires_grad]


def test_shares_weighted_by_answer_tokens_add_up_to_the_whole_batch(tiny_model: tuple[Any, Any],
                                                                    examples: list[Example]) -> None:
    """What train_epoch relies on to deal a batch to processes: summed, the weighted share gradients
    (and losses) are the whole batch's, for an uneven deal (2 + 1) as for an even one."""
    net, pad, batch = tiny_net(tiny_model), tiny_model[1].tokenizer.pad_token_id, examples[:3]
    whole, _ = batch_loss(net, batch, pad, cached=False)
    whole.backward()
    want = {n: q.grad.clone() for n, q in net.named_parameters() if q.grad is not None}
    net.zero_grad()
    total = 0.0
    for share in (batch[0::2], batch[1::2]):
        loss, _ = batch_loss(net, share, pad, cached=False)
        weighted = loss * (sum(map(answer_tokens, share)) / sum(map(answer_tokens, batch)))
        weighted.backward()
        total += float(weighted.detach())
    got = {n: q.grad for n, q in net.named_parameters() if q.grad is not None}
    assert got.keys() == want.keys() and want
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6)
    assert total == pytest.approx(float(whole.detach()), rel=1e-5)


def test_a_checkpoint_resumes_the_next_epoch_exactly(tiny_model: tuple[Any, Any], examples: list[Example],
                                                     tmp_path: Path) -> None:
    """Two epochs in a row == one epoch, a checkpoint, a fresh model loading it, the second epoch."""
    def epoch(net: Any, opt: torch.optim.Optimizer, pad: int, k: int) -> float:
        torch.manual_seed(k)
        return train_epoch(net, opt, trainable_params(net), examples[:3], torch.randperm(3).tolist(), 2, pad,
                           True, ONE, f"epoch {k}")

    net, pad = tiny_net(tiny_model), tiny_model[1].tokenizer.pad_token_id
    opt = torch.optim.AdamW(trainable_params(net), lr=FT["lr"], weight_decay=0.0)
    first = epoch(net, opt, pad, 1)
    save_checkpoint(tmp_path / "ckpt", net, opt, trainable_params(net), trainable(net), {"fingerprint": "fp", "epoch": 1})
    second = epoch(net, opt, pad, 2)

    again = tiny_net(tiny_model)
    opt2 = torch.optim.AdamW(trainable_params(again), lr=FT["lr"], weight_decay=0.0)
    assert load_checkpoint(tmp_path / "ckpt", again, opt2, trainable_params(again), "another") is None
    best, state = load_checkpoint(tmp_path / "ckpt", again, opt2, trainable_params(again), "fp")
    assert state["epoch"] == 1 and best.keys() == trainable(net).keys()
    assert epoch(again, opt2, pad, 2) == second != first
    a, b = trainable(net), trainable(again)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_best_epoch_is_the_lowest_val_loss_not_a_lucky_val_acc() -> None:
    """The issue's run: 5 val photos; val_acc 0.4 at epoch 1, where the model answered no label yet, then 0.2 at
    epochs whose val_loss was far lower. Ranking by val_acc merged epoch 1."""
    history = [{"epoch": 1, "val_acc": 0.4, "val_loss": 2.9}, {"epoch": 2, "val_acc": 0.2, "val_loss": 1.4},
               {"epoch": 3, "val_acc": 0.2, "val_loss": 1.5}]
    best = {"val_acc": -1.0, "val_loss": float("inf"), "epoch": 0}  # finetune's start
    for h in history:
        if better(h, best):
            best = h
    assert best["epoch"] == 2
    assert better({"val_loss": 1.4, "val_acc": 0.4}, history[1])  # equal loss: the higher val_acc
    assert not better({"val_loss": 1.4, "val_acc": 0.2}, history[1])  # all equal: the earlier epoch stays


def test_fingerprint_follows_params_and_labels() -> None:
    rows = [{"canvas_sha256": "a", "element": "fire"}, {"canvas_sha256": "b", "element": "water"}]
    fp = fingerprint({"finetune": {"lr": 1.0}}, rows)
    assert fp == fingerprint({"finetune": {"lr": 1.0}}, [dict(r) for r in rows])
    assert fp != fingerprint({"finetune": {"lr": 2.0}}, rows)
    assert fp != fingerprint({"finetune": {"lr": 1.0}}, [rows[0], {**rows[1], "element": "wood"}])


# -- the stage, run as DVC runs it (slow: each run starts Python, torch and transformers) --------------

def write_split(repo: Path) -> list[str]:
    """data/split/{train,val}.jsonl and their canvases from demo photos; the stage's arguments."""
    rows = []
    for i in range(N_TRAIN + N_VAL):
        p = photo(i, C.labels, seed=3)
        png = render_png(p.data, C.canvas)
        write_bytes_atomic(repo / "data/resize256" / f"{i:04d}.png", png)
        rows.append({"id": f"{i:04d}", "canvas": f"{i:04d}.png", "canvas_sha256": sha256(png), "element": p.label})
    write_jsonl(repo / "data/split/train.jsonl", rows[:N_TRAIN])
    write_jsonl(repo / "data/split/val.jsonl", rows[N_TRAIN:])
    return ["models/base", "data/split", "data/resize256"]


def outs(name: str) -> list[str]:
    return [f"out-{name}", f"m-{name}.json", f"live-{name}", f".cache/ckpt-{name}"]


ENV = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ONE_PROCESS = ["python", "-m", "src.stages.finetune"]


@pytest.fixture(scope="module")
def stage_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repo holding only a tiny split, and finetune's outputs from one uninterrupted process."""
    repo = copy_project(tmp_path_factory.mktemp("finetune") / "repo", STAGE, stages=("base", "finetune"))
    args = write_split(repo)
    res = subprocess.run(["python", "-m", "src.stages.base", "models/base"], cwd=repo, env=ENV, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    res = subprocess.run([*ONE_PROCESS, *args, *outs("one")], cwd=repo, env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return repo


def weights(repo: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(repo / f"out-{name}" / "model.safetensors")


@pytest.mark.slow
def test_metrics_hold_the_val_curve_from_the_untrained_model_and_the_training_answers(stage_repo: Path) -> None:
    """What release's quality gate diagnoses from: the curve, the best epoch by val_loss, the training photos."""
    m = json.loads((stage_repo / "m-one.json").read_text())
    losses = [h["val_loss"] for h in m["history"]]
    assert [h["epoch"] for h in m["history"]] == list(range(1, STAGE["finetune.epochs"] + 1))
    assert m["best_epoch"] == 1 + losses.index(min(losses)) and m["val_loss"] == min(losses)
    assert m["val_loss_start"] > min(losses)  # it learned from the untrained model
    assert m["val_loss_falling"] == (losses[-1] < min([m["val_loss_start"], *losses[:-1]]))
    assert m["train_acc"] == 1 - m["train_disagree"] / N_TRAIN and len(m["train_disagree_photos"]) == m["train_disagree"]
    assert all(" (labelled " in x and ", model " in x for x in m["train_disagree_photos"])


@pytest.mark.slow
def test_two_processes_train_like_one_with_short_and_uneven_batches(stage_repo: Path) -> None:
    """torchrun on CPU (gloo): every batch dealt to two processes, one of them short or empty."""
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "src.stages.finetune"]
    res = subprocess.run([*cmd, "models/base", "data/split", "data/resize256", *outs("two")], cwd=stage_repo, env=ENV,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    one, two = (json.loads((stage_repo / f"m-{n}.json").read_text()) for n in ("one", "two"))
    assert two["val_acc"] == one["val_acc"] and two["best_epoch"] == one["best_epoch"]
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-4)
    a, b = weights(stage_repo, "one"), weights(stage_repo, "two")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(stage_repo: Path) -> None:
    cmd = [*ONE_PROCESS, "models/base", "data/split", "data/resize256", *outs("killed")]
    proc = subprocess.Popen(cmd, cwd=stage_repo, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("epoch 2:"):  # two epochs checkpointed, the rest still to run
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = json.loads((stage_repo / ".cache/ckpt-killed/state.json").read_text())["epoch"]
    assert 2 <= done < STAGE["finetune.epochs"]
    res = subprocess.run(cmd, cwd=stage_repo, env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming after epoch {done}" in res.stdout
    got, want = (json.loads((stage_repo / f"m-{n}.json").read_text()) for n in ("killed", "one"))
    for key in ("val_acc", "val_loss", "best_epoch", "epochs"):
        assert got[key] == want[key], key
    a, b = weights(stage_repo, "killed"), weights(stage_repo, "one")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
