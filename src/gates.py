"""The release gates: parity (the runtimes agree) and, apart from it, quality (the model is good enough).

eval_parity applies the parity gates and release applies both; a message names the rung and the
images, so a failed gate says what to look at.
"""

from __future__ import annotations

from typing import Any


def gates(m: dict[str, Any], g: dict[str, Any], offenders: dict[str, list[str]]) -> list[str]:
    """One message per failed rung, naming it and up to ten offending images."""
    def names(rung: str) -> str:
        ids = offenders.get(rung, [])
        return f" ({len(ids)} images: {', '.join(ids[:10])}{' ...' if len(ids) > 10 else ''})" if ids else ""

    fails = []
    if not m["eos"]["ok"]:
        fails.append(f"rung eos: contract EOS {m['eos']['contract']!r}, HF generation config {m['eos']['hf']!r}, "
                     f"GGUF {m['eos']['gguf']!r}")
    if m["canvas"]["max_abs_diff"] > g["max_canvas_abs_diff"]:
        fails.append(f"rung canvas: max_abs_diff {m['canvas']['max_abs_diff']:g} > {g['max_canvas_abs_diff']} "
                     "(training canvas vs the Skia drawing of the app's canvas)" + names("canvas"))
    if m["layout"]["identical_rate"] < g["min_layout_identical_rate"]:
        fails.append(f"rung layout: identical_rate {m['layout']['identical_rate']:.3f} < "
                     f"{g['min_layout_identical_rate']}" + names("layout"))
    if m["agreement"]["f16"] < g["min_agreement_f16"]:
        fails.append(f"rung agreement.f16: {m['agreement']['f16']:.3f} < {g['min_agreement_f16']}" + names("f16"))
    if m["agreement"]["q8_0"] < g["min_agreement_q8_0"]:
        fails.append(f"rung agreement.q8_0: {m['agreement']['q8_0']:.3f} < {g['min_agreement_q8_0']}" + names("q8_0"))
    if m["invalid_rate"]["q8_0"] > g["max_invalid_rate_q8_0"]:
        fails.append(f"rung invalid_rate.q8_0: {m['invalid_rate']['q8_0']:.3f} > {g['max_invalid_rate_q8_0']}"
                     + names("invalid_q8_0"))
    return fails
