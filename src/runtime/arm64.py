"""The phone's own processor: llama.cpp cross-built for arm64 and run under qemu, for eval_parity's arm64 rung.

The app runs llama.cpp on the phone's arm64 cores, whose kernels (NEON dot product, i8mm) are not
the x86 ones that prove parity elsewhere. This builds `src/runtime/arm64_probe/probe.cpp` (the app's mtmd
path, call for call as src/runtime/llama_vlm.py drives it) against the pinned sdist's own llama.cpp
sources, once per instruction-set variant, and runs it under qemu user-mode emulation.

Where things are stated, once:
  runtime.yaml `llama_cpp_arm64.<variant>`   each variant's -march (the phones' instruction sets)
  CMAKE below                                 the rest of the build (static, CPU only, no tools)
  QEMU_CPU below                              the emulated core each variant runs on
Builds are cached outside the clone, in ~/.cache/smolvlm-elements/arm64-<id>/probe, keyed by the
llama-cpp-python version, the -march, CMAKE, the compiler and the probe's sources: a fresh clone
reuses them, and a change to any of these builds anew.

Command: python -m src.runtime.arm64 build   (make setup: every variant of runtime.yaml, or the cached ones)
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from src.config.params import RUNTIME
from src.config.paths import ROOT
from src.runtime.llama_vlm import Answer

KEY = "llama_cpp_arm64"  # runtime.yaml: {variant: -march}
PROBE_SRC = Path(__file__).resolve().parent / "arm64_probe"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "smolvlm-elements"
CROSS = "aarch64-linux-gnu-"
SYSROOT = Path("/usr/aarch64-linux-gnu")
# Static and CPU-only, so qemu needs nothing but the binary; llama.cpp's tools, tests, server and
# common library are not built, only the llama, ggml and mtmd libraries the app links. GGML_NATIVE is
# off: the kernels are chosen by -march (GGML_CPU_ARM_ARCH), never by the build machine. OpenMP is off
# because the cross toolchain's libgomp does not link statically; ggml's own thread pool splits the work
# the same way (by thread index), so the kernels and their results are the same.
CMAKE = ("-DCMAKE_BUILD_TYPE=Release", "-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64",
         f"-DCMAKE_C_COMPILER={CROSS}gcc", f"-DCMAKE_CXX_COMPILER={CROSS}g++", "-DBUILD_SHARED_LIBS=OFF",
         "-DCMAKE_EXE_LINKER_FLAGS=-static", "-DGGML_NATIVE=OFF", "-DLLAMA_BUILD_COMMON=OFF",
         "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_MTMD=ON", "-DLLAMA_BUILD_TESTS=OFF",
         "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_OPENSSL=OFF", "-DGGML_OPENMP=OFF")
# The emulated core: a real phone-class core where qemu has one with exactly the variant's features
# (Cortex-A76: Armv8.2-A with dot product, no i8mm), so an instruction beyond the phone's would trap;
# qemu 7.2 models no core with i8mm, so that variant runs on `max`.
QEMU_CPU = {"dotprod": "cortex-a76", "i8mm": "max"}


class Arm64Error(SystemExit):
    """A missing tool or a failed build or run: one line naming it and the cause."""


def variants(root: Path = ROOT) -> dict[str, str]:
    """{variant: -march} from runtime.yaml."""
    found = yaml.safe_load((root / RUNTIME).read_text()).get(KEY)
    if not isinstance(found, dict) or not found:
        raise Arm64Error(f"{root / RUNTIME}: {KEY} must map each arm64 variant to its -march, e.g. "
                         "dotprod: armv8.2-a+dotprod")
    return {str(k): str(v) for k, v in found.items()}


def llama_cpp_version(root: Path = ROOT) -> str:
    return str(yaml.safe_load((root / RUNTIME).read_text())["llama_cpp_python"])


def sdist(version: str, root: Path = ROOT) -> Path:
    return root / ".cache" / "sdist" / f"llama_cpp_python-{version}.tar.gz"


def cmake_args(march: str) -> list[str]:
    return [*CMAKE, f"-DGGML_CPU_ARM_ARCH={march}"]


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise Arm64Error(f"arm64: {name} is not installed: run `make arm64` as root (Debian packages "
                         "crossbuild-essential-arm64 and qemu-user-static)")
    return path


def compiler() -> str:
    """The cross compiler's version line (part of the build's identity)."""
    out = subprocess.run([_tool(f"{CROSS}g++"), "--version"], capture_output=True, text=True, check=True).stdout
    return out.splitlines()[0]


def build_id(version: str, march: str, probe_src: Path = PROBE_SRC) -> str:
    """What decides the probe's bytes, hashed: the cache key."""
    h = hashlib.sha256()
    for part in (version, march, " ".join(cmake_args(march)), compiler()):
        h.update(part.encode() + b"\0")
    for f in sorted(probe_src.iterdir()):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def probe_path(version: str, march: str) -> Path:
    return CACHE / f"arm64-{build_id(version, march)}" / "probe"


def build(marches: dict[str, str], version: str, root: Path = ROOT, jobs: int = 2) -> dict[str, Path]:
    """{variant: probe} for `marches` ({variant: -march}): from the cache, or built now from the sdist.

    The missing variants share one build tree: -march only reaches ggml's CPU backend, so the second
    variant recompiles that and relinks, not llama.cpp and mtmd again.
    """
    probes = {v: probe_path(version, m) for v, m in marches.items()}
    if all(p.exists() for p in probes.values()):
        return probes
    CACHE.mkdir(parents=True, exist_ok=True)
    # One build at a time on this machine (make setup, and a dvc repro in each clone, may all ask at once):
    # the others wait, then find the probes in the cache.
    with (CACHE / "arm64.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"arm64: waiting for another build to release {CACHE / 'arm64.lock'}", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        _build({v: m for v, m in marches.items() if not probes[v].exists()}, probes, version, root, jobs)
    return probes


def _build(missing: dict[str, str], probes: dict[str, Path], version: str, root: Path, jobs: int) -> None:
    """Build each of `missing` ({variant: -march}) into its path in `probes`, in one build tree (the lock is held)."""
    if not missing:
        return
    src = sdist(version, root)
    if not src.exists():
        raise Arm64Error(f"arm64: {src} is missing: run `make setup` (it downloads llama-cpp-python {version}'s sdist)")
    cmake, ninja = _tool("cmake"), shutil.which("ninja")
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="arm64-build-") as tmp:
        vendor = _unpack_llama_cpp(src, version, Path(tmp))
        b = Path(tmp) / "build"
        gen = ["-G", "Ninja"] if ninja else []
        for variant, march in missing.items():
            start = time.monotonic()
            print(f"arm64: building the {variant} probe (-march={march}) from llama-cpp-python {version}'s sdist",
                  flush=True)
            for cmd in ([cmake, "-S", str(PROBE_SRC), "-B", str(b), *gen, f"-DLLAMA_SRC={vendor}", *cmake_args(march)],
                        [cmake, "--build", str(b), "--target", "probe", "-j", str(jobs)]):
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    tail = (res.stdout + res.stderr).strip().splitlines()[-15:]
                    raise Arm64Error(f"arm64: the {variant} build (-march={march}) failed at `{' '.join(cmd[:3])}`:\n  "
                                     + "\n  ".join(tail))
            out = probes[variant]
            out.parent.mkdir(parents=True, exist_ok=True)
            (out.parent / "flags.txt").write_text(" ".join(cmake_args(march)) + f"\nllama-cpp-python {version}\n"
                                                  f"{compiler()}\n")
            shutil.copy2(b / "probe", out.with_suffix(".tmp"))
            os.replace(out.with_suffix(".tmp"), out)  # last: a killed build leaves no probe behind
            print(f"arm64: {variant} probe built in {time.monotonic() - start:.0f} s -> {out}", flush=True)


def _unpack_llama_cpp(src: Path, version: str, dest: Path) -> Path:
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    with tarfile.open(src) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        if not members:
            raise Arm64Error(f"arm64: {src} holds no {prefix}: not llama-cpp-python {version}'s sdist?")
        tar.extractall(dest, members=members, filter="data")
    return dest / prefix


def llama_cpp_revision(version: str, root: Path = ROOT) -> str:
    """The llama.cpp commit the sdist vendors, as its CHANGELOG states it for `version` ("unknown" if absent)."""
    src = sdist(version, root)
    if not src.exists():
        return "unknown"
    with tarfile.open(src) as tar:
        f = tar.extractfile(f"llama_cpp_python-{version}/CHANGELOG.md")
        text = f.read().decode() if f else ""
    section = text.split(f"## [{version}]", 1)[1].split("\n## [", 1)[0] if f"## [{version}]" in text else ""
    m = re.search(r"llama\.cpp@([0-9a-f]{7,40})", section)
    return m.group(1) if m else "unknown"


def run(probe: Path, variant: str, text_gguf: Path, mmproj: Path, prompt: str, canvases: list[Image.Image],
        max_new_tokens: int, n_ctx: int, n_threads: int | None = None, cpu: str | None = None) -> list[Answer]:
    """Each canvas through the probe under qemu, in one process; answers as LlamaVLM.generate's.

    `cpu` overrides the variant's emulated core (QEMU_CPU).
    """
    qemu = _tool("qemu-aarch64-static")
    cpu = cpu or QEMU_CPU.get(variant, "max")
    n_threads = n_threads or os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "prompt.txt").write_bytes(prompt.encode())
        images: list[str] = []
        for i, c in enumerate(canvases):
            rgb = np.ascontiguousarray(np.asarray(c.convert("RGB"), dtype=np.uint8))
            (t / f"{i}.rgb").write_bytes(rgb.tobytes())
            images += [str(c.width), str(c.height), str(t / f"{i}.rgb")]
        cmd = [qemu, "-cpu", cpu, "-L", str(SYSROOT), str(probe), str(text_gguf), str(mmproj), str(t / "prompt.txt"),
               str(max_new_tokens), str(n_ctx), str(n_threads), tmp, *images]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            why = (res.stderr.strip().splitlines() or [f"exit code {res.returncode}"])[-1]
            raise Arm64Error(f"arm64: the {variant} probe failed under qemu-aarch64 -cpu {cpu}: {why}")
        answers = []
        for line in res.stdout.splitlines():
            r = json.loads(line)
            logits = np.fromfile(t / f"{r['i']}.logits", dtype=np.float32, count=r["n_vocab"])
            text = bytes.fromhex(r["text_hex"]).decode("utf-8", errors="replace")
            answers.append(Answer(text=text, tokens=tuple(r["tokens"]), first_logits=logits, stopped=r["stopped"]))
    if len(answers) != len(canvases):
        raise Arm64Error(f"arm64: the {variant} probe answered {len(answers)} of {len(canvases)} canvases")
    return answers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["build"])
    ap.add_argument("--jobs", type=int, default=2, help="compile jobs (default 2)")
    args = ap.parse_args()
    version, marches = llama_cpp_version(), variants()
    for variant, path in build(marches, version, jobs=args.jobs).items():
        print(f"arm64: {variant} (-march={marches[variant]}, llama-cpp-python {version}) -> {path}")


if __name__ == "__main__":
    main()
