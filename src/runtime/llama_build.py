"""llama.cpp's own converter, taken from the sdist of the pinned llama-cpp-python.

The wheel ships the runtime but not `convert_hf_to_gguf.py`; the sdist vendors
it, with `conversion/` and `gguf-py/`, at the runtime's own revision. Using that
copy means converter and runtime are the same llama.cpp. The converter puts its
vendored gguf-py first on sys.path (PyPI gguf 0.19.0 breaks it), so it runs as
a subprocess of this interpreter.

Command: python -m src.runtime.llama_build unpack .cache/sdist/llama_cpp_python-X.tar.gz  (make does this)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
from pathlib import Path

import llama_cpp

from src.config.paths import ROOT

VENDOR = ROOT / ".cache" / f"llama.cpp-{llama_cpp.__version__}"
MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def converter() -> Path:
    path = VENDOR / "convert_hf_to_gguf.py"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `make setup` to unpack llama-cpp-python "
                                f"{llama_cpp.__version__}'s sdist")
    return path


def unpack(sdist: Path) -> Path:
    """Extract the converter, its package and gguf-py from the sdist into VENDOR."""
    prefix = f"llama_cpp_python-{llama_cpp.__version__}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                   and any(m.name[len(prefix):].startswith(x) for x in MEMBERS)]
        if not members:
            raise SystemExit(f"{sdist} holds no {prefix}convert_hf_to_gguf.py: not llama-cpp-python "
                             f"{llama_cpp.__version__}'s sdist?")
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(VENDOR, members=members, filter="data")
    return VENDOR


def convert(model_dir: Path, out: Path, outtype: str, mmproj: bool = False) -> None:
    """One converter call: the text model, or with `mmproj` the vision projector."""
    cmd = [sys.executable, str(converter()), str(model_dir), "--outtype", outtype, "--outfile", str(out)]
    if mmproj:
        cmd.append("--mmproj")
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0 or not out.exists():
        raise RuntimeError(f"convert_hf_to_gguf failed for {model_dir} ({outtype}{', mmproj' if mmproj else ''}):\n"
                           + res.stderr[-3000:])


def main() -> None:
    ap = argparse.ArgumentParser(description="unpack llama.cpp's converter from the llama-cpp-python sdist")
    ap.add_argument("action", choices=["unpack"])
    ap.add_argument("sdist", type=Path)
    args = ap.parse_args()
    vendor = unpack(args.sdist)
    # transformers reads GGUF tokenizers through `gguf`; give it the same revision as the converter.
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", str(vendor / "gguf-py")], check=True)
    print(f"llama_build: converter and gguf-py of llama.cpp {llama_cpp.__version__} -> {vendor}")


if __name__ == "__main__":
    main()
