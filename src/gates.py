"""The release gates: parity (the runtimes agree) and, apart from it, quality (the model is good enough).

eval_parity applies the parity gates and release applies both. A parity message names the rung,
which runtime disagrees with which, and the photos (by the name the user knows: file name or
URL); a quality message says it is about the model, not the runtimes, and what to try. The same
invalid answer on every runtime is a quality failure (the model did not learn the answer
format), never a parity one: parity only counts photos where the runtimes differ.
"""

from __future__ import annotations

from typing import Any

# Which runtime each side of the ladder is, in words a reader of a failed gate knows.
RUNTIME = {"hf": "transformers", "f16": "llama.cpp F16", "q8_0": "llama.cpp Q8_0"}


def gates(m: dict[str, Any], g: dict[str, Any], offenders: dict[str, list[str]]) -> list[str]:
    """One message per failed parity rung, naming it and up to ten offending photos.

    `offenders` maps a rung to photo names, optionally with what differed (`beach.jpg (transformers
    fire, llama.cpp Q8_0 water)`); release re-checks stale metrics without them.
    """
    def names(rung: str) -> str:
        return _names(offenders, rung)

    n = m["n_test"]
    fails = []
    if not m["eos"]["ok"]:
        fails.append(f"rung eos: contract EOS {m['eos']['contract']!r}, HF generation config {m['eos']['hf']!r}, "
                     f"GGUF {m['eos']['gguf']!r}")
    if m["canvas"]["max_abs_diff"] > g["max_canvas_abs_diff"]:
        fails.append(f"rung canvas: max_abs_diff {m['canvas']['max_abs_diff']:g} > {g['max_canvas_abs_diff']} "
                     "(training canvas vs the Skia drawing of the app's canvas)" + names("canvas"))
    if m["layout"]["identical_rate"] < g["min_layout_identical_rate"]:
        fails.append(f"rung layout: identical_rate {m['layout']['identical_rate']:.3f} < "
                     f"{g['min_layout_identical_rate']}: llama.cpp's prompt tokens and image positions differ from "
                     f"transformers' on {_count(1 - m['layout']['identical_rate'], n)}/{n} photos" + names("layout"))
    for side in ("f16", "q8_0"):
        rate, gate = m["agreement"][side], g[f"min_agreement_{side}"]
        if rate < gate:
            fails.append(f"rung agreement.{side}: {rate:.3f} < {gate}: {RUNTIME[side]} disagrees with "
                         f"{RUNTIME['hf']} on {_count(1 - rate, n)}/{n} photos" + names(side))
    only = m["invalid_rate"]["q8_0_only"]
    if only > g["max_invalid_rate_q8_0"]:
        fails.append(f"rung invalid_rate.q8_0_only: {only:.3f} > {g['max_invalid_rate_q8_0']}: {RUNTIME['q8_0']} "
                     f"answers no label where {RUNTIME['hf']} does on {_count(only, n)}/{n} photos"
                     + names("invalid_q8_0"))
    return fails + arm64_gates(m, g, offenders)


def arm64_gates(m: dict[str, Any], g: dict[str, Any], offenders: dict[str, list[str]]) -> list[str]:
    """The arm64 rung's gates (eval_parity.arm64.*), per variant; metrics without the rung pass only when it is off."""
    a = g["arm64"]
    if not a["sample"]:
        return []
    ran = m.get("arm64", {}).get("variants", {})
    fails = [f"rung arm64.{v}: not in the metrics (eval_parity did not run it; rerun eval_parity)"
             for v in a["variants"] if v not in ran]
    n = m.get("arm64", {}).get("n", 0)
    for v, r in ran.items():
        if v not in a["variants"]:
            continue
        who = f"llama.cpp Q8_0 arm64 {v} (-march={r['march']})"
        for ref, key in (("hf", "min_agreement_hf"), ("x86_q8_0", "min_agreement_x86_q8_0")):
            rate = r["agreement"][ref]
            if rate < a[key]:
                side = "hf" if ref == "hf" else "q8_0"
                fails.append(f"rung arm64.{v}.agreement.{ref}: {rate:.3f} < {a[key]}: {who} disagrees with "
                             f"{RUNTIME[side]} (x86) on {_count(1 - rate, n)}/{n} photos"
                             + _names(offenders, f"arm64.{v}.{side}"))
        only = r["invalid_rate"]["arm64_only"]
        if only > a["max_invalid_rate"]:
            fails.append(f"rung arm64.{v}.invalid_rate: {only:.3f} > {a['max_invalid_rate']}: {who} answers no label "
                         f"where {RUNTIME['hf']} does on {_count(only, n)}/{n} photos"
                         + _names(offenders, f"arm64.{v}.invalid"))
        if r["logits"]["kl_hf"] > a["max_kl_hf"]:
            fails.append(f"rung arm64.{v}.logits.kl_hf: {r['logits']['kl_hf']:g} > {a['max_kl_hf']}: {who}'s first-token "
                         f"label probabilities drift from {RUNTIME['hf']}'s (max {r['logits']['kl_hf_max']:g})")
    return fails


def _names(offenders: dict[str, list[str]], rung: str) -> str:
    """': a, b, ...' naming up to ten of the rung's offending photos; '' when there are none."""
    ids = offenders.get(rung, [])
    return f": {', '.join(ids[:10])}{' ...' if len(ids) > 10 else ''}" if ids else ""


def _count(rate: float, n: int) -> int:
    return round(rate * n)


def class_coverage_gate(per_class: dict[str, int]) -> str | None:
    """None when every class has a photo in the test split; else why the ladder cannot be judged."""
    n = sum(per_class.values())
    missing = [label for label, k in per_class.items() if k == 0]
    if not missing:
        return None
    counts = ", ".join(f"{label} {k}" for label, k in per_class.items())
    return (f"the test split has {n} photos ({counts}): no photo of {', '.join(missing)}, so neither parity nor "
            f"accuracy can be judged for {'it' if len(missing) == 1 else 'them'}. Add photos, or raise split.test "
            f"or split.min_per_class in params.yaml, then rerun from split")


# What to try when the model is not good enough; the params are the ones a user changes.
QUALITY_ADVICE = ("more photos per class (download.*), more training (finetune.epochs), another learning rate "
                  "(finetune.lr), a real base model (base.source: smollm2, or hub with base.revision)")


def quality_gates(accuracy: float, per_class: dict[str, dict[str, Any]], q: dict[str, Any]) -> list[str]:
    """One message per missed quality gate: overall Q8_0 test accuracy, then each class below its minimum.

    Invalid answers count as wrong (they are wrong on the phone too). `q` holds release.min_accuracy
    and release.min_class_accuracy.
    """
    fails = []
    if accuracy < q["min_accuracy"]:
        fails.append(f"accuracy {accuracy:.3f} < release.min_accuracy {q['min_accuracy']} (Q8_0, test split)")
    for label, c in per_class.items():
        if c["accuracy"] < q["min_class_accuracy"]:
            fails.append(f"class {label}: {c['correct']}/{c['n']} = {c['accuracy']:.3f} < "
                         f"release.min_class_accuracy {q['min_class_accuracy']}")
    return fails
