"""The model card release writes beside the bundle: what it is, how well it does, what proved it, where it came from.

Everything here is a function of the stage's inputs (no clock, no git commit): the same inputs give
the same card on any machine. The commit is named by the release's git tag (GTO).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml

from src.config.artifacts import BUNDLE
from src.config.contract import Contract
from src.model.bases import describe
from src.runtime import arm64


def file_hashes(path: Path) -> dict[str, Any]:
    """md5 (what DVC records for a file) and sha256 (what an app verifies a download with)."""
    md5, sha = hashlib.md5(), hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            md5.update(block)
            sha.update(block)
    return {"bytes": path.stat().st_size, "md5": md5.hexdigest(), "sha256": sha.hexdigest()}


def dvc_hashes(lock: Path, deps: list[Path]) -> dict[str, str]:
    """The md5 `dvc.lock` records for each dep that an upstream stage outputs ("unknown" outside `dvc repro`)."""
    recorded: dict[str, str] = {}
    if lock.exists():
        for stage in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).values():
            for out in stage.get("outs", []):
                recorded[os.path.normpath(out["path"])] = out.get("md5", "unknown")
    return {str(d): recorded.get(os.path.normpath(d), "unknown") for d in deps}


def kernels(runtime: dict[str, str], parity: dict[str, Any]) -> dict[str, Any]:
    """Which llama.cpp builds proved this bundle: the x86 baseline (every rung) and the arm64 variants (their rung)."""
    arm = parity.get("arm64", {})
    return {"llama_cpp_python": runtime["llama_cpp_python"],
            "llama_cpp_revision": arm64.llama_cpp_revision(runtime["llama_cpp_python"]),
            "x86": {"cmake": runtime["llama_cpp_cmake"], "photos": parity["n_test"]},
            "arm64": {v: {"march": r["march"], "qemu_cpu": r["qemu_cpu"], "photos": arm["n"]}
                      for v, r in arm.get("variants", {}).items()}}


def model_card(contract: Contract, p: dict[str, Any], parity: dict[str, Any], finetune: dict[str, Any],
               per_class: dict[str, Any], counts: dict[str, Any], files: dict[str, Any], dvc: dict[str, str]) -> dict[str, Any]:
    base = p["base"]
    return {
        "name": "SmolVLM five-element classifier",
        "labels": list(contract.labels),
        "base_model": {**base, "description": describe(base)},
        "runtime": {"engine": "llama.cpp mtmd", "text": f"{BUNDLE['model']} ({p['quantize_q8']['ftype']})",
                    "mmproj": BUNDLE["mmproj"], "n_ctx": p["eval_parity"]["n_ctx"],
                    "decoding": "greedy as contract.generation, constrained by grammar.gbnf",
                    "kernels": kernels(p["runtime"], parity)},
        "metrics": {"test_q8_0": {"accuracy": parity["accuracy"]["q8_0"], "agreement_with_hf": parity["agreement"]["q8_0"],
                                  "invalid_rate": parity["invalid_rate"]["q8_0"], "per_class": per_class},
                    "parity": parity, "finetune": finetune},
        "data": counts,
        "params": p,
        "files": files,
        "provenance": {"dvc_deps_md5": dvc, "runtime": p["runtime"],
                       "commit": "the git tag of this release (GTO) names the commit that holds this dvc.lock"},
    }


def card_markdown(card: dict[str, Any]) -> str:
    m, d = card["metrics"]["test_q8_0"], card["data"]
    labels = card["labels"]
    lines = [
        f"# {card['name']}", "",
        f"Labels: {', '.join(labels)}. Base model: {card['base_model']['description']}.",
        f"Runtime: {card['runtime']['engine']}, {card['runtime']['text']} + {card['runtime']['mmproj']}, "
        f"n_ctx {card['runtime']['n_ctx']}, {card['runtime']['decoding']}.", "",
        "## Metrics (test split, Q8_0, eval_parity)", "",
        f"accuracy {m['accuracy']}, agreement with transformers {m['agreement_with_hf']}, "
        f"invalid rate {m['invalid_rate']}", "",
        "| class | n | correct | accuracy |", "|---|---|---|---|",
        *[f"| {k} | {v['n']} | {v['correct']} | {v['accuracy']} |" for k, v in m["per_class"].items()], "",
        "## Kernels that proved it", "",
        *kernel_lines(card["runtime"]["kernels"]), "",
        "## Data", "",
        f"| split | n | {' | '.join(labels)} |", "|---|---|" + "---|" * len(labels),
        *[f"| {s} | {c['n']} | {' | '.join(str(c[label]) for label in labels)} |" for s, c in d.items()], "",
        "## Files", "", "| file | bytes | sha256 |", "|---|---|---|",
        *[f"| {k} | {v['bytes']} | `{v['sha256']}` |" for k, v in card["files"].items()], "",
        "## Provenance", "",
        f"Built from these DVC outputs ({card['provenance']['commit']}):", "",
        *[f"- `{k}` md5 `{v}`" for k, v in card["provenance"]["dvc_deps_md5"].items()], "",
        "Runtime: " + ", ".join(f"{k}.{sub} {x}" if isinstance(v, dict) else f"{k} {v}"
                                for k, v in card["provenance"]["runtime"].items()
                                for sub, x in (v.items() if isinstance(v, dict) else [(None, v)])), "",
        "## Params", "", "```json", json.dumps(card["params"], indent=2, sort_keys=True), "```", "",
    ]
    return "\n".join(lines)


def kernel_lines(k: dict[str, Any]) -> list[str]:
    lines = [f"llama.cpp {k['llama_cpp_revision']} (llama-cpp-python {k['llama_cpp_python']}).",
             f"- x86, every rung on {k['x86']['photos']} test photos: `{k['x86']['cmake']}`"]
    lines += [f"- arm64 {v}, the arm64 rung on {a['photos']} test photos under qemu -cpu {a['qemu_cpu']}: "
              f"`-march={a['march']}`" for v, a in k["arm64"].items()]
    return lines
