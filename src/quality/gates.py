"""The release gates: parity (the runtimes agree) and, apart from it, quality (the model is good enough).

eval_parity applies the parity gates and release applies both. A parity message names the rung,
which runtime disagrees with which, and the photos (by the name the user knows: file name or
URL); a quality message says it is about the model, not the runtimes, and diagnoses why from what
the run measured (`quality_diagnosis`): each cause with its evidence and the param that addresses it. The same
invalid answer on every runtime is a quality failure (the model did not learn the answer
format), never a parity one: parity only counts photos where the runtimes differ.
"""

from __future__ import annotations

import math
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


# What to try when the run's measurements point to no single cause; the params are the ones a user changes.
QUALITY_ADVICE = ("more photos per class (download.*), more training (finetune.epochs), another learning rate "
                  "(finetune.lr), a real base model (base.source: hub with base.revision)")

# Bases whose vision tower is random (and frozen while finetuning): they separate the demo's generated colours and
# textures, not photos (docs/release.md, the quality gate: 0.2 accuracy, chance, on 35 real photos).
RANDOM_VISION = {"builder": "the demo base (base.source builder) is a small SmolVLM built with random weights",
                 "smollm2": "base.source smollm2 is SmolLM2's real text model with a randomly initialised vision tower"}
# A val accuracy that guessing among the labels reaches at least this often shows no sign that the model sees
# (one-sided binomial test at the usual 5 %).
CHANCE_P = 0.05
# Greedy decoding answers a token once its probability passes 1/2, i.e. once its cross-entropy is below ln 2.
ANSWER_LOSS = math.log(2)
# Memorised: the best weights answer the training photos this much more often right than the val photos.
MEMORISED_GAP = 0.25
# A model that learned yet answers a few training photos as another class points at those labels; when it
# disagrees with more than this share, the labels are not the first suspect.
MISLABELLED_MAX_SHARE = 0.3
# Test photos enough to measure accuracy to +-0.1 at the gate, 95 % (normal approximation of the binomial).
MARGIN, Z95 = 0.1, 1.96


def guessing_p(correct: int, n: int, n_labels: int) -> float:
    """P(at least `correct` of `n` right by picking one of `n_labels` labels at random)."""
    q = 1 / n_labels
    return sum(math.comb(n, i) * q**i * (1 - q) ** (n - i) for i in range(correct, n + 1))


def epochs_advised(epochs: int, last: float, previous: float) -> tuple[int, int | None]:
    """(finetune.epochs to try, epochs for val_loss to reach ANSWER_LOSS at the last epoch's rate of fall, or None
    when it is below already): doubling at least, ten times at most (a slow fall is not a schedule)."""
    if last <= ANSWER_LOSS:
        return 2 * epochs, None
    more = math.ceil(math.log(ANSWER_LOSS / last) / math.log(last / previous))
    return epochs + min(max(more, epochs), 9 * epochs), more


def photos_per_class_needed(min_accuracy: float, n_labels: int, n_test: int, n_all: int) -> tuple[int, int]:
    """(photos a class needs, of which in the test split) for the test split to measure accuracy to +-MARGIN at
    release.min_accuracy, when the split holds out n_test of n_all photos for test (as it did)."""
    need_test = math.ceil(Z95**2 * max(min_accuracy * (1 - min_accuracy), 0.01) / MARGIN**2)
    per_class_test = math.ceil(need_test / n_labels)
    return -(-per_class_test * n_all // max(1, n_test)), per_class_test


def quality_diagnosis(ft: dict[str, Any], counts: dict[str, dict[str, int]], p: dict[str, Any],
                      labels: tuple[str, ...], test_wrong: tuple[str, ...] = ()) -> list[str]:
    """Why the model is not good enough, from what the run measured: one line per cause found, each with its
    evidence and what to change.

    `ft` is finetune's metrics (the val curve from the untrained model on, the best epoch, how its weights answer
    the training photos), `counts` the split's photos per part and class ({part: {"n": .., label: ..}}), `p` the
    release stage's params (base.source, download.source, finetune.epochs and lr, release.min_accuracy),
    `test_wrong` the test photos Q8_0 answers with another label ("name (labelled x, model y)"). The
    causes: the model did not learn at all; a base that cannot learn photos; too few photos (memorised); under-
    training (val_loss still falling at the last epoch); labels to check. None found: QUALITY_ADVICE.
    """
    if "history" not in ft:
        return [f"no diagnosis: finetune's metrics hold no val curve (rerun finetune); try {QUALITY_ADVICE}"]
    epochs, lr = p["finetune"]["epochs"], p["finetune"]["lr"]
    losses = [ft["val_loss_start"]] + [h["val_loss"] for h in ft["history"]]
    start, last, previous = losses[0], losses[-1], losses[-2]
    if min(losses[1:]) >= start:
        fix = ("a learning rate of 0 changes nothing: set finetune.lr above 0 (0.002 is the demo's)" if lr == 0 else
               "try another finetune.lr (lower if val_loss rose)")
        return [f"did not learn: val_loss never fell below the untrained model's {start:.3f} in {epochs} "
                f"epoch{'' if epochs == 1 else 's'} (finetune.lr {lr}); {fix}"]
    causes = []
    n_val, n_train, k = ft["n_val"], ft["n_train"], len(labels)
    val_right = round(ft["val_acc"] * n_val)
    guess = guessing_p(val_right, n_val, k)
    source, photos = p["base"]["source"], p["download"]["source"]
    if source in RANDOM_VISION and photos != "demo" and guess > CHANCE_P:
        causes.append(
            f"the base cannot learn real photos: {RANDOM_VISION[source]}; a random vision tower, frozen while "
            f"finetuning, separates the demo's generated colours and textures, not photos (download.source "
            f"{photos}). Measured: val_acc {ft['val_acc']:.3f} ({val_right}/{n_val}) at the best epoch, which "
            f"guessing among {k} labels reaches "
            f"{guess:.0%} of the time. No number of epochs or photos fixes this: use a base with trained vision "
            f"weights, the real base: base.source hub, base.hub_id {p['base']['hub_id']} at a pinned base.revision "
            f"(or base.source local; docs/real-size.md: Training)")
    falling = ft["val_loss_falling"]
    if falling:
        advised, more = epochs_advised(epochs, last, previous)
        why = (f"at the last epoch's rate it reaches ln 2 = {ANSWER_LOSS:.3f}, where greedy decoding answers the "
               f"label, after about {more} more" if more is not None else f"it is below ln 2 = {ANSWER_LOSS:.3f} "
               "and still falling")
        was = f"{previous:.3f} at epoch {len(losses) - 2}" if len(losses) > 2 else f"{previous:.3f} untrained"
        causes.append(f"under-trained: val_loss was still falling at the last epoch ({was} -> {last:.3f} at epoch "
                      f"{len(losses) - 1}); {why}: set finetune.epochs={advised}")
    per_class = {label: sum(c[label] for c in counts.values()) for label in labels}
    n_all, n_test = sum(c["n"] for c in counts.values()), counts["test"]["n"]
    if ft["train_acc"] - ft["val_acc"] >= MEMORISED_GAP and not falling:
        need, need_test = photos_per_class_needed(p["release"]["min_accuracy"], k, n_test, n_all)
        fewest = min(per_class, key=lambda label: per_class[label])
        causes.append(
            f"too few photos: the best weights answer {ft['train_acc']:.0%} of the {n_train} training photos right "
            f"but {ft['val_acc']:.0%} of the {n_val} val photos: the model memorised them. The fewest photos of a "
            f"class: {per_class[fewest]} ({fewest}; test {counts['test'][fewest]}); add photos until every class "
            f"has about {need} ({need_test} of them in test: enough to measure accuracy to +-{MARGIN} at "
            f"release.min_accuracy {p['release']['min_accuracy']}, 95 %)")
    share = ft["train_disagree"] / max(1, n_train)
    if guess <= CHANCE_P and not falling and share <= MISLABELLED_MAX_SHARE and (ft["train_disagree"] or test_wrong):
        # the test photos too: a wrong test label fails the gate however well the model learned
        named = [f"{ft['train_disagree']}/{n_train} training photos as another class"
                 f"{': ' + _listed(ft['train_disagree_photos'], ft['train_disagree']) if ft['train_disagree'] else ''}"]
        if test_wrong:
            named.append(f"{len(test_wrong)}/{n_test} test photos: {_listed(list(test_wrong), len(test_wrong))}")
        causes.append(
            f"labels to check: the model learned (val_acc {ft['val_acc']:.3f}, not guessing) yet answers "
            f"{'; and '.join(named)}. Where the photo shows what the model says, correct its label in "
            f"data/label_overrides.csv (by its name; data/label/review.csv lists the review queue's suspects)")
    return causes or [f"no single cause in this run's measurements (val_loss {start:.3f} untrained -> {min(losses):.3f}"
                      f" best, levelled off; val_acc {ft['val_acc']:.3f}); try {QUALITY_ADVICE}"]


def _listed(photos: list[str], n: int, shown: int = 10) -> str:
    return ", ".join(photos[:shown]) + (" ..." if n > shown else "")


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
