"""A native crash (llama.cpp, torch) reported as one line that names the stage, runtime, item and signal.

A segfault inside ggml kills the interpreter before any Python handler runs, and DVC then reports
only `exited with -11`. So a stage that calls native code runs its `main` in a forked child
(`supervise`) and tells it, before each piece of native work, which runtime is about to work on
which item (`at`). The parent only waits: when the child dies from a signal, the parent still
knows the last `at` and prints

    eval_parity: llama.cpp Q8_0 died from SIGSEGV (signal 11) on photo 'beach.jpg'; ...

with the file where `faulthandler` wrote the Python stack of the crash. Any other exit of the child
(success, a one-line SystemExit, a traceback) passes through unchanged.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

# Set in the supervised child only: where `at` writes what the child is doing.
_progress: Path | None = None


def crash_dir() -> Path:
    """Where a supervised stage keeps its progress note and crash stack: the temp folder, never the repo."""
    return Path(tempfile.gettempdir()) / "smolvlm-elements"


def at(runtime: str, item: str) -> None:
    """Record that `runtime` is about to work on `item` (e.g. "llama.cpp Q8_0", "photo 'a.jpg'").

    One small file written and renamed over the last note per call: cheap next to the native work it
    announces. The rename is what makes the note whole at any instant: a signal between `write_text`'s
    truncate and its write would leave an empty note, and the crash line would lose the photo.
    Outside a supervised stage (tests calling stage functions directly) it does nothing.
    """
    if _progress is not None:
        draft = _progress.with_suffix(".draft")
        draft.write_text(f"{runtime}\t{item}")
        os.replace(draft, _progress)


def crash_line(stage: str, sig: int, note: str, stack: Path) -> str:
    """The one line a native crash becomes."""
    runtime, _, item = note.partition("\t")
    name = signal.Signals(sig).name if sig in signal.valid_signals() else f"signal {sig}"
    where = f"{runtime or 'native code'} died from {name} (signal {sig})" + (f" on {item}" if item else "")
    hint = (" This is the runtime's build, not your data: check `llama_cpp.llama_print_system_info()` against "
            "runtime.yaml's llama_cpp_cmake, and rerun `make setup`." if runtime.startswith("llama.cpp") else "")
    return f"{stage}: {where}; Python stack at the crash: {stack}.{hint}"


def _die_with_parent() -> None:
    """A killed stage (DVC's Ctrl-C, a test's SIGKILL) must not leave its child writing outputs."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def supervise(stage: str, main: Callable[[], None]) -> None:
    """Run `main` in a forked child; report a death by signal as `crash_line`, else exit as the child did."""
    global _progress
    folder = crash_dir()
    folder.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child is the stage: it runs main and exits as any Python process would
        _die_with_parent()
        _progress = folder / f"{stage}-{os.getpid()}.progress"
        _progress.write_text("")
        stack = (folder / f"{stage}-{os.getpid()}.stack").open("w")
        faulthandler.enable(file=stack)
        main()
        return
    _, status = os.waitpid(pid, 0)
    progress, stack = folder / f"{stage}-{pid}.progress", folder / f"{stage}-{pid}.stack"
    note = progress.read_text() if progress.exists() else ""
    progress.unlink(missing_ok=True)
    progress.with_suffix(".draft").unlink(missing_ok=True)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        # on a line of its own: the child may have died in the middle of a progress bar's line
        print("\n" + crash_line(stage, sig, note, stack), file=sys.stderr)
        raise SystemExit(128 + sig)
    stack.unlink(missing_ok=True)  # nothing crashed: nothing to look at
    raise SystemExit(os.WEXITSTATUS(status))
