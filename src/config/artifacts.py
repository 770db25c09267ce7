"""Names of the files stages hand each other and the bundle the app ships.

The folders come from `dvc.yaml` (`vars: paths`); the file names inside them are
stated here once, so a stage that writes a file and a stage or client that reads
it cannot disagree.
"""

from __future__ import annotations

from pathlib import Path

# The bundle's file names: the app and src/client/fortune.py open these, whatever the upstream names were.
BUNDLE = {"model": "model.gguf", "mmproj": "mmproj.gguf", "contract": "contract.json", "grammar": "grammar.gbnf",
          "card": "model_card.json", "card_md": "model_card.md"}
# release's review plots
PLOTS = {"confusion": "confusion.png", "per_class": "per_class_accuracy.png", "grid": "sample_grid.png"}
SPLITS = ("train", "val", "test")


def text_gguf(folder: Path, outtype: str) -> Path:
    """convert_gguf's (f32, f16) or quantize_q8's (q8_0) text model."""
    return folder / f"text-{outtype}.gguf"


def mmproj_gguf(folder: Path, outtype: str) -> Path:
    return folder / f"mmproj-{outtype}.gguf"


def mmproj_of(folder: Path) -> Path:
    """The one mmproj a conversion wrote, whatever its outtype."""
    found = sorted(folder.glob("mmproj-*.gguf"))
    if len(found) != 1:
        raise FileNotFoundError(f"{folder}: expected one mmproj-*.gguf, found {[f.name for f in found]}")
    return found[0]
