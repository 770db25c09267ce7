"""convert_gguf: the merged checkpoint -> text GGUF(s) and the mmproj, with llama.cpp's own converter.

Inputs:  FINETUNE/ (safetensors, config with geometry and EOS written by finetune).
Outputs: OUT/text-<outtype>.gguf for each convert_gguf.text_outtypes, OUT/mmproj-<outtype>.gguf.
Params:  convert_gguf.text_outtypes, convert_gguf.mmproj_outtype
Command: python -m src.stages.convert_gguf models/finetune models/convert_gguf
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from src.config.artifacts import mmproj_gguf, text_gguf
from src.config.params import stage_params
from src.runtime.llama_build import convert


def jobs(out: Path, text_outtypes: list[str], mmproj_outtype: str) -> list[tuple[Path, str, bool]]:
    """(file, outtype, is the mmproj) for each converter call: every text outtype, then the one mmproj."""
    if not text_outtypes or len(set(text_outtypes)) != len(text_outtypes):
        raise SystemExit(f"convert_gguf.text_outtypes={text_outtypes!r}: expected distinct outtypes, at least one")
    return [(text_gguf(out, t), t, False) for t in text_outtypes] + [(mmproj_gguf(out, mmproj_outtype), mmproj_outtype, True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("finetune", type=Path)
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    p = stage_params("convert_gguf")["convert_gguf"]
    args.out.mkdir(parents=True, exist_ok=True)
    todo = jobs(args.out, p["text_outtypes"], p["mmproj_outtype"])
    for path, outtype, mmproj in tqdm(todo, desc="convert_gguf"):
        convert(args.finetune, path, outtype, mmproj)
    print("convert_gguf: " + ", ".join(p.name for p, _, _ in todo) + f" -> {args.out}")


if __name__ == "__main__":
    main()
