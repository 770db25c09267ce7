"""A native crash in a stage is one line naming the stage, runtime, item and signal (src/runtime/supervise.py).

The crashes are real: a NULL read through ctypes in a supervised function, and a SIGSEGV delivered
to the real eval_parity stage while llama.cpp works on a photo.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from src.data.files import read_jsonl
from src.runtime import supervise
from testkit.http_server import wait_for
from testkit.project import BIN, ROOT

SCRIPT = """
import ctypes, sys, time
from src.runtime.supervise import at, supervise

def main():
    at("llama.cpp Q8_0", "photo 'beach.jpg'")
    if sys.argv[1] == "segv":
        ctypes.string_at(0)  # a real NULL read: the process dies from SIGSEGV, as a ggml kernel bug does
    if sys.argv[1] == "refuse":
        raise SystemExit("demo: one line of a user's mistake")
    if sys.argv[1] == "sleep":
        time.sleep(600)
    if sys.argv[1] == "bug":
        raise ValueError("a Python bug keeps its traceback")
    print("done")

supervise("demo", main)
"""


def supervised(mode: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=ROOT, env=env, capture_output=True, text=True)


def test_a_segfault_is_one_line_naming_stage_runtime_item_and_signal(tmp_path: Path) -> None:
    res = supervised("segv", tmp_path)
    assert res.returncode == 128 + signal.SIGSEGV
    line = res.stderr.strip().splitlines()[-1]
    m = re.fullmatch(r"demo: llama\.cpp Q8_0 died from SIGSEGV \(signal 11\) on photo 'beach\.jpg'; "
                     r"Python stack at the crash: (\S+)\. This is the runtime's build, not your data: .*", line)
    assert m, line
    stack = Path(m.group(1))
    assert stack.parent == tmp_path / "smolvlm-elements"
    assert "Segmentation fault" in stack.read_text()  # faulthandler wrote the stack where the line points
    assert not list(stack.parent.glob("*.progress"))  # the progress note is gone once reported


@pytest.mark.parametrize(("mode", "rc", "stdout", "stderr_tail"), [
    ("ok", 0, "done\n", ""),
    ("refuse", 1, "", "demo: one line of a user's mistake"),
    ("bug", 1, "", "ValueError: a Python bug keeps its traceback"),
])
def test_any_other_exit_passes_through_unchanged(tmp_path: Path, mode: str, rc: int, stdout: str,
                                                  stderr_tail: str) -> None:
    res = supervised(mode, tmp_path)
    assert (res.returncode, res.stdout) == (rc, stdout)
    assert res.stderr.strip().endswith(stderr_tail)
    assert "died from" not in res.stderr
    assert not list((tmp_path / "smolvlm-elements").iterdir())  # nothing crashed: nothing left to look at


def test_a_killed_stage_takes_its_worker_with_it(tmp_path: Path) -> None:
    """DVC's Ctrl-C or a test's SIGKILL hits the stage's pid: the worker must not go on writing outputs."""
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, "sleep"], cwd=ROOT, env=env)
    folder = tmp_path / "smolvlm-elements"
    try:
        assert wait_for(lambda: any(p.read_text() for p in folder.glob("demo-*.progress")), timeout_s=60)
        worker = int(next(folder.glob("demo-*.progress")).stem.split("-")[-1])
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert wait_for(lambda: not Path(f"/proc/{worker}").exists() or "Z" in _state(worker), timeout_s=60)
    finally:
        proc.kill()


def _state(pid: int) -> str:
    """The process state letter from /proc (Z: a zombie, dead and waiting to be reaped by init)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return "gone"


def test_a_signal_at_any_instant_leaves_the_whole_last_note(tmp_path: Path) -> None:
    """A worker killed between two notes still names what it was on.

    The worker does nothing but announce photos, so every kill lands inside `at` itself; the note
    must then hold one of the announcements whole, never an empty or half-written file.
    """
    progress = tmp_path / "stage.progress"
    rng = random.Random(0)
    notes = []
    for _ in range(40):
        progress.unlink(missing_ok=True)
        pid = os.fork()
        if pid == 0:
            supervise._progress = progress
            i = 0
            while True:
                supervise.at("llama.cpp Q8_0", f"photo 'p{i}.jpg'")
                i += 1
        wait_for(progress.exists, timeout_s=10, every_s=0.0005)
        time.sleep(rng.uniform(0.0, 0.005))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        notes.append(progress.read_text())
    torn = [n for n in notes if not re.fullmatch(r"llama\.cpp Q8_0\tphoto 'p\d+\.jpg'", n)]
    assert not torn, f"{len(torn)} of {len(notes)} kills left a torn note: {torn[:3]}"


@pytest.mark.slow
def test_eval_parity_killed_by_a_signal_in_llama_cpp_names_the_photo(tiny_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo, symlinks=True)
    cmd = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["eval_parity"]["cmd"].split()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(repo), "TMPDIR": str(tmp)}
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    folder = tmp / "smolvlm-elements"

    def in_llama_cpp() -> list[Path]:
        return [p for p in folder.glob("eval_parity-*.progress") if p.read_text().startswith("llama.cpp Q8_0\t")]

    try:
        assert wait_for(lambda: bool(folder.exists() and in_llama_cpp()), timeout_s=300, every_s=0.05)
        (progress,) = in_llama_cpp()
        os.kill(int(progress.stem.split("-")[-1]), signal.SIGSEGV)  # the stage's worker, where llama.cpp runs
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGSEGV
    line = err.strip().splitlines()[-1]
    names = {r.get("name") or r["id"] for r in read_jsonl(repo / "data/split/test.jsonl")}
    m = re.fullmatch(r"eval_parity: llama\.cpp Q8_0 died from SIGSEGV \(signal 11\) on photo '([^']+)'"
                     r"(?: \(Android canvas\))?; Python stack at the crash: \S+\. .*runtime\.yaml's llama_cpp_cmake.*", line)
    assert m and m.group(1) in names, line
