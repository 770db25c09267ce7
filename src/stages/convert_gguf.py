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

from src.artifacts import mmproj_gguf, text_gguf
from src.llama_build import convert
from src.params import stage_params



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("finetune", type=Path)
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    p = stage_params("convert_gguf")["convert_gguf"]
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(text_gguf(args.out, t), t, False) for t in p["text_outtypes"]]
    jobs.append((mmproj_gguf(args.out, p["mmproj_outtype"]), p["mmproj_outtype"], True))
    for path, outtype, mmproj in tqdm(jobs, desc="convert_gguf"):
        convert(args.finetune, path, outtype, mmproj)
    print("convert_gguf: " + ", ".join(p.name for p, _, _ in jobs) + f" -> {args.out}")


if __name__ == "__main__":
    main()
