"""reading: the reference client. Three photos in, three elements and a five-element reading out.

What the app does, from the release bundle alone (src/stages/release.py writes it; `dvc artifacts get`
fetches it): each photo is decoded and drawn on the canvas by contract.json's Canvas
(src/data/canvas.py), then llama.cpp runs the Q8_0 model + mmproj once per photo with the contract's
prompt (rendered with this build's media marker) and greedy decoding constrained by grammar.gbnf.

Inputs:  PHOTO... (one or more; a reading is made of three), --bundle DIR (default: `paths.release`
         of ./dvc.yaml, i.e. the release stage's output when run in this repository).
Outputs: stdout: the elements and the reading, or with --json one JSON object for machines.
         A bad photo is reported on stderr as `reading: PATH: cause` and exits 2, before any model loads.
Command: python -m src.client.fortune photo1.jpg photo2.jpg photo3.jpg [--bundle models/release] [--json]
         smolvlm-read photo1.jpg photo2.jpg photo3.jpg --bundle DIR [--json]   (from any folder: the entry
         point `make setup` installs into .venv, see pyproject.toml)

The relations, with land standing where earth stands in the classical cycles:
  generating (each feeds the next): wood -> fire -> land -> metal -> water -> wood
  overcoming (each restrains one):  wood -> land, land -> water, water -> fire, fire -> metal, metal -> wood
Any two different elements are related exactly once, one way, in one of the two cycles.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from src.config.artifacts import BUNDLE
from src.config.contract import Contract
from src.data.canvas import BadImage, decode, to_canvas
from src.model.answer import label_probs, label_token_ids, parse_answer

GENERATES = {"wood": "fire", "fire": "land", "land": "metal", "metal": "water", "water": "wood"}
OVERCOMES = {"wood": "land", "land": "water", "water": "fire", "fire": "metal", "metal": "wood"}

# What each relation means for the step from one photo to the next (first person: the reader's day).
MEANING = {
    "same": "{a} again: the same force doubles, steady but one-sided.",
    "generates": "{a} feeds {b}: what you have now nourishes what comes next.",
    "generated_by": "{a} is fed by {b}: what comes next gives back to what you have.",
    "overcomes": "{a} restrains {b}: you hold the next thing in check; mind you do not smother it.",
    "overcome_by": "{a} is restrained by {b}: the next thing pushes back; yield a little and go around.",
}
POSITIONS = ("past", "present", "future")


class ReadingError(SystemExit):
    """Bad input or bundle: the message names the file and the cause."""


@dataclass(frozen=True)
class Link:
    a: str
    b: str
    relation: str  # a key of MEANING
    text: str


def relation(a: str, b: str) -> str:
    """How `a` stands to `b` in the two cycles."""
    if a not in GENERATES or b not in GENERATES:
        raise ValueError(f"{a} and {b} are not both among the five elements {sorted(GENERATES)}")
    if a == b:
        return "same"
    if GENERATES[a] == b:
        return "generates"
    if GENERATES[b] == a:
        return "generated_by"
    if OVERCOMES[a] == b:
        return "overcomes"
    if OVERCOMES[b] == a:
        return "overcome_by"
    raise AssertionError(f"the cycles leave {a} -> {b} unrelated")  # unreachable for the tables above


def links(elements: list[str]) -> list[Link]:
    """The relation of each photo's element to the next one's."""
    return [Link(a, b, r, MEANING[r].format(a=a, b=b)) for a, b in zip(elements, elements[1:])
            for r in [relation(a, b)]]


def summary(elements: list[str], ls: list[Link]) -> str:
    """One sentence: the balance of the chain and the element that dominates, if any."""
    feeding = sum(x.relation in ("generates", "generated_by") for x in ls)
    checking = sum(x.relation in ("overcomes", "overcome_by") for x in ls)
    tone = ("a flowing day: the generating cycle carries you" if feeding > checking else
            "a day of friction: the overcoming cycle tests you" if checking > feeding else
            "a balanced day: support and resistance in equal measure" if ls else
            "one photo, one element: bring three for a reading")
    top = max(set(elements), key=lambda e: (elements.count(e), -elements.index(e)))
    lead = f"; {top} leads ({elements.count(top)} of {len(elements)})" if elements.count(top) > 1 else ""
    return f"{tone.capitalize()}{lead}."


def reading_text(elements: list[str]) -> dict[str, Any]:
    ls = links(elements)
    return {"links": [asdict(x) for x in ls], "summary": summary(elements, ls)}


def canvases(photos: list[Path], contract: Contract) -> list[Image.Image]:
    """Every photo's canvas, or ReadingError naming each file that cannot become one (and why)."""
    out, errors = [], []
    for path in photos:
        try:
            out.append(to_canvas(decode(path.read_bytes(), contract.canvas), contract.canvas))
        except BadImage as e:
            errors.append(f"reading: {path}: {e}")
        except OSError as e:
            errors.append(f"reading: {path}: cannot read: {e.strerror or e}")
    if errors:
        raise ReadingError("\n".join(errors))
    return out


def default_bundle(dvc_yaml: Path = Path("dvc.yaml")) -> Path:
    """`paths.release` of dvc.yaml: the path is stated there once."""
    if not dvc_yaml.exists():
        raise ReadingError(f"reading: no --bundle given and no {dvc_yaml} here to find the release stage's output")
    for block in yaml.safe_load(dvc_yaml.read_text()).get("vars", []):
        if isinstance(block, dict) and "release" in block.get("paths", {}):
            return Path(block["paths"]["release"])
    raise ReadingError(f"reading: no --bundle given and {dvc_yaml} has no vars paths.release")


def load_bundle(bundle: Path) -> tuple[Contract, str, dict[str, Any]]:
    """(contract, grammar text, model card) of a bundle, or ReadingError naming what is missing."""
    missing = [name for name in BUNDLE.values() if not (bundle / name).is_file()]
    if missing:
        raise ReadingError(f"reading: {bundle} is not a release bundle: missing {', '.join(missing)}")
    contract = Contract.load(bundle / BUNDLE["contract"])
    if set(contract.labels) != set(GENERATES):
        raise ReadingError(f"reading: {bundle / BUNDLE['contract']}: labels {list(contract.labels)} "
                           f"are not the five elements {sorted(GENERATES)}")
    card = json.loads((bundle / BUNDLE["card"]).read_text())
    return contract, (bundle / BUNDLE["grammar"]).read_text(), card


def llama_label_ids(vlm: Any, contract: Contract) -> list[int]:
    """Each label's one token in the bundle's vocabulary (answers.label_token_ids refuses a split label)."""
    return label_token_ids(lambda text: vlm.llm.tokenize(text.encode(), add_bos=False, special=False),
                           contract.labels, contract.target)


def read_one(vlm: Any, prompt: str, image: Image.Image, contract: Contract, grammar: str,
             label_ids: list[int]) -> tuple[dict[str, Any], Any]:
    """One canvas as the app reads it: greedy decoding constrained by the grammar; ({element, text, p}, the Answer).

    The benchmark times this function: what it measures is what the client runs.
    """
    ans = vlm.generate(prompt, image, contract.generation, grammar=grammar)
    element = parse_answer(ans.text, ans.stopped, contract)
    if element is None:  # the grammar makes this unreachable; say so loudly if it ever is not
        raise RuntimeError(f"constrained decoding gave {ans.text!r} (stopped={ans.stopped}), not a label")
    p = label_probs(ans.first_logits, label_ids)
    return {"element": element, "text": ans.text, "p": {x: round(float(v), 4) for x, v in zip(contract.labels, p)}}, ans


def classify(bundle: Path, contract: Contract, grammar: str, n_ctx: int, images: list[Image.Image]) -> list[dict[str, Any]]:
    """One llama.cpp run per canvas: {element, text, p} with p the first-token label probabilities."""
    from src.runtime.llama_vlm import LlamaVLM  # loads llama.cpp: only once the photos are known good

    with LlamaVLM(bundle / BUNDLE["model"], bundle / BUNDLE["mmproj"], n_ctx=n_ctx) as vlm:
        prompt, label_ids = contract.prompt_for(vlm.marker()), llama_label_ids(vlm, contract)
        return [read_one(vlm, prompt, img, contract, grammar, label_ids)[0] for img in images]


def render(photos: list[Path], results: list[dict[str, Any]], reading: dict[str, Any]) -> str:
    names = POSITIONS if len(photos) == len(POSITIONS) else [f"photo {i + 1}" for i in range(len(photos))]
    lines = [f"{n:>8}: {r['element']:<6} ({r['p'][r['element']]:.0%})  {ph}"
             for n, ph, r in zip(names, photos, results)]
    lines += ["", *[x["text"] for x in reading["links"]], reading["summary"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """The command line (`python -m src.client.fortune`, `smolvlm-read`): a bad photo or bundle is one line each, exit 2."""
    try:
        run(argv)
    except ReadingError as e:
        print(e.code, file=sys.stderr)
        sys.exit(2)


def run(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("photos", type=Path, nargs="+", metavar="PHOTO")
    ap.add_argument("--bundle", type=Path, help="release bundle directory (default: dvc.yaml paths.release)")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = ap.parse_args(argv)
    bundle = args.bundle or default_bundle()
    contract, grammar, card = load_bundle(bundle)
    images = canvases(args.photos, contract)
    results = classify(bundle, contract, grammar, card["runtime"]["n_ctx"], images)
    elements = [r["element"] for r in results]
    reading = reading_text(elements)
    if args.json:
        print(json.dumps({"bundle": str(bundle), "elements": elements,
                          "photos": [{"path": str(p), **r} for p, r in zip(args.photos, results)], **reading},
                         indent=2))
    else:
        print(render(args.photos, results, reading))


if __name__ == "__main__":
    main()
