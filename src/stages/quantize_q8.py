"""quantize_q8: the f32 text GGUF -> Q8_0 with llama.cpp's own quantiser.

Inputs:  CONVERT_GGUF/text-f32.gguf (quantising from f32 avoids rounding twice, via f16).
Outputs: OUT/text-q8_0.gguf
Params:  quantize_q8.ftype
Command: python -m src.stages.quantize_q8 models/convert_gguf models/quantize_q8
"""

from __future__ import annotations

import argparse
from pathlib import Path

import llama_cpp

from src.config.artifacts import text_gguf
from src.config.params import stage_params
from src.runtime.llama_vlm import silence
from src.runtime.supervise import at, supervise

FTYPES = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}


def quantize(src: Path, dst: Path, ftype: str) -> None:
    if ftype not in FTYPES:
        raise SystemExit(f"quantize_q8.ftype={ftype!r}: expected one of {sorted(FTYPES)}")
    silence()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(".tmp")
    at("llama.cpp quantize", f"{src.name} -> {ftype}")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize {src} -> {ftype} failed")
    tmp.replace(dst)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("convert_gguf", type=Path)
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    ftype = stage_params("quantize_q8")["quantize_q8"]["ftype"]
    dst = text_gguf(args.out, ftype)
    quantize(text_gguf(args.convert_gguf, "f32"), dst, ftype)
    print(f"quantize_q8: {dst} ({dst.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    supervise("quantize_q8", main)
