"""The typed schema of the whole `params.yaml`: a typo is one clear line before any work starts.

Every stage validates the whole file once, at start, through `src.config.params.stage_params`, so a
misspelt key, a value outside its enum or range, a path that does not exist or a
contradiction between keys stops the run before a photo is fetched or a step is trained.
Unknown keys are refused (a misspelt key would otherwise be silently ignored, and its
default silently used). Each problem becomes one line:

    params.yaml: <key> = <value>: <why>; expected <what>

The schema states types, enums, ranges and rules; the values themselves live in
params.yaml only.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, model_validator

from src.config.contract import Contract, NonNeg, NonNegF, Pos, PosF, Section, Text, rule
from src.config.settings import Builder, Http, Label, Rate

SHA = re.compile(r"[0-9a-f]{40}")
# base.source's values: src/model/bases.py builds each one
BaseSource = Literal["builder", "smollm2", "hub", "local"]


def is_commit(revision: str) -> bool:
    """A hub revision that cannot move: a full commit sha (a branch or tag would let the same params
    train on other weights)."""
    return SHA.fullmatch(revision or "") is not None


def commit_hint(hub_id: str) -> str:
    """How to find the commit sha to pin a hub model to."""
    return (f"a 40-hex commit sha: `hf models info {hub_id} --expand sha`, or "
            f"https://huggingface.co/{hub_id}/commits/main (copy the full commit id)")


class ParamsError(Exception):
    """params.yaml is not valid; `lines` holds one message per problem."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


# ---- contract: src/config/contract.py, its one typed definition (stages and the client receive those models)

# ---- download ------------------------------------------------------------------------------------

class Demo(Section):
    n: Pos
    seed: int


class Manifest(Section):
    path: str


class Folder(Section):
    path: str
    class_subfolders: bool


class Hf(Section):
    local_dir: str
    hub_id: str
    revision: str
    split: Text
    image_column: Text
    label_column: str


class Download(Section):
    source: Literal["demo", "manifest", "folder", "hf"]
    demo: Demo
    manifest: Manifest
    folder: Folder
    hf: Hf
    http: Http
    max_failure_rate: Rate

    @model_validator(mode="after")
    def source_is_there(self) -> Download:
        if self.source == "manifest":
            p = Path(self.manifest.path)
            if not p.is_file():
                raise rule("manifest.path", self.manifest.path, "no such file", "an existing .csv or .jsonl URL list")
            if p.suffix.lower() not in (".csv", ".jsonl", ".ndjson", ".json"):
                raise rule("manifest.path", self.manifest.path, f"a {p.suffix or 'suffix-less'} file",
                           "a .csv or .jsonl URL list")
        elif self.source == "folder":
            if not self.folder.path or not Path(self.folder.path).is_dir():
                raise rule("folder.path", self.folder.path, "no such folder" if self.folder.path else "empty",
                           "the folder of photos (one subfolder per class with class_subfolders: true)")
        elif self.source == "hf":
            if self.hf.hub_id and not is_commit(self.hf.revision):
                raise rule("hf.revision", self.hf.revision, "a hub dataset must be pinned (a branch moves)",
                           "the dataset's 40-hex commit sha (its page's 'History' tab)")
            if not self.hf.hub_id and not Path(self.hf.local_dir).is_dir():
                raise rule("hf.local_dir", self.hf.local_dir, "no such folder and no hf.hub_id",
                           "a datasets save_to_disk folder, or hf.hub_id with hf.revision")
        return self


class Resize256(Section):
    workers: NonNeg


# ---- label: src/config/settings.py Label (the teacher code receives it)

# ---- split ---------------------------------------------------------------------------------------

class Split(Section):
    seed: int
    val: Annotated[float, Field(ge=0, lt=1)]
    test: Annotated[float, Field(gt=0, lt=1)]
    min_per_class: Pos

    @model_validator(mode="after")
    def leaves_train(self) -> Split:
        if self.val + self.test >= 1:
            raise rule("test", self.test, f"val + test = {self.val + self.test:g} leaves nothing to train on",
                       f"val + test below 1 (e.g. test {min(self.test, 0.15)})")
        return self


# ---- model ---------------------------------------------------------------------------------------

class Smollm2(Section):
    seed: int


class Base(Section):
    source: BaseSource
    hub_id: str
    revision: str
    local_dir: str
    builder: Builder
    smollm2: Smollm2

    @model_validator(mode="after")
    def pinned_or_there(self) -> Base:
        if self.source == "hub" and not is_commit(self.revision):
            raise rule("revision", self.revision, "a hub model must be pinned to a commit (a branch moves)",
                       commit_hint(self.hub_id or "<hub_id>"))
        if self.source == "local" and not (Path(self.local_dir) / "config.json").is_file():
            raise rule("local_dir", self.local_dir, "no config.json there",
                       "a model folder in the hub's layout (save_pretrained)")
        return self


class Lora(Section):
    r: Pos
    alpha: PosF
    dropout: Annotated[float, Field(ge=0, lt=1)]
    targets: Annotated[list[Text], Field(min_length=1)]


class Finetune(Section):
    lora: Lora
    train_full: list[Literal["connector", "norm", "vision_model", "lm_head"]]
    train_answer_tokens: bool
    feature_cache: bool
    epochs: Annotated[int, Field(ge=1, le=10000)]
    batch_size: Annotated[int, Field(ge=1, le=4096)]
    lr: NonNegF
    seed: int


class ConvertGguf(Section):
    text_outtypes: list[Literal["f32", "f16"]]
    mmproj_outtype: Literal["f32", "f16"]

    @model_validator(mode="after")
    def both(self) -> ConvertGguf:
        if sorted(set(self.text_outtypes)) != ["f16", "f32"]:
            raise rule("text_outtypes", self.text_outtypes, "quantize_q8 reads f32 and eval_parity's f16 rung reads f16",
                       "[f32, f16]")
        return self


class QuantizeQ8(Section):
    ftype: Literal["q8_0"]


class Arm64(Section):
    """eval_parity's arm64 rung: which variants (runtime.yaml llama_cpp_arm64 keys) on how many photos, and its gates."""

    sample: NonNeg  # 0: no arm64 rung
    variants: list[Text]
    min_agreement_hf: Rate
    min_agreement_x86_q8_0: Rate
    max_invalid_rate: Rate
    max_kl_hf: NonNegF

    @model_validator(mode="after")
    def something_to_run(self) -> Arm64:
        if self.sample and not self.variants:
            raise rule("variants", self.variants, "a sample to run needs a variant to run it on",
                       "at least one of runtime.yaml llama_cpp_arm64's variants (or sample: 0)")
        if len(set(self.variants)) != len(self.variants):
            raise rule("variants", self.variants, "a variant is named twice", "distinct variants")
        return self


class EvalParity(Section):
    n_ctx: Annotated[int, Field(ge=512, le=131072)]
    min_agreement_f16: Rate
    min_agreement_q8_0: Rate
    max_invalid_rate_q8_0: Rate
    min_layout_identical_rate: Rate
    max_canvas_abs_diff: Annotated[float, Field(ge=0, le=255)]
    arm64: Arm64


class Grid(Section):
    n: NonNeg
    cols: Pos


class Release(Section):
    grid: Grid
    min_accuracy: Rate
    min_class_accuracy: Rate


# params.yaml sections read by a command outside the pipeline, never by a stage: they decide no output,
# so no dvc.yaml stage declares them and changing one reruns nothing (tests/unit/test_params.py).
COMMANDS = ("review",)


class MaxDrop(Section):
    accuracy: Rate
    class_accuracy: Rate
    agreement: Rate
    val_acc: Rate


class MaxRise(Section):
    invalid_rate: Rate
    val_loss: NonNegF


class Review(Section):
    """The review command's tolerances (`python -m src.tools.review`), not a stage's params."""
    max_drop: MaxDrop
    max_rise: MaxRise
    noise: Annotated[float, Field(ge=0, lt=1)]
    share_photos: bool


class Params(Section):
    contract: Contract
    download: Download
    resize256: Resize256
    label: Label
    split: Split
    base: Base
    finetune: Finetune
    convert_gguf: ConvertGguf
    quantize_q8: QuantizeQ8
    eval_parity: EvalParity
    release: Release
    review: Review


# ---- messages ------------------------------------------------------------------------------------

def _known(loc: tuple[Any, ...]) -> list[str]:
    """The keys the schema allows at `loc`'s parent (for 'did you mean')."""
    model: Any = Params
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "{...}"
    text = repr(value)
    # text is shown whole (repr keeps it on one line): a long path cut short would hide which folder is missing
    return text if len(text) <= 80 or isinstance(value, str) else text[:77] + "..."


def _expected(err: dict[str, Any]) -> str:
    t, ctx = err["type"], err.get("ctx", {})
    if t == "literal_error":  # pydantic says "'a', 'b' or 'c'"
        return "one of " + ctx.get("expected", "").replace(" or ", ", ").replace("'", "")
    bounds = {"greater_than": "> {gt}", "greater_than_equal": ">= {ge}", "less_than": "< {lt}",
              "less_than_equal": "<= {le}"}
    if t in bounds:
        return bounds[t].format(**ctx)
    if t in ("too_short", "too_long"):
        return f"{'at least' if t == 'too_short' else 'at most'} {ctx.get('min_length', ctx.get('max_length'))} items"
    if t == "string_pattern_mismatch":
        return "an http(s) URL" if "http" in ctx.get("pattern", "") else f"text matching {ctx.get('pattern')}"
    kinds = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
             "string_type": "text", "list_type": "a list", "tuple_type": "a list", "model_type": "a mapping of keys",
             "dict_type": "a mapping of keys", "missing": "a value", "string_too_short": "non-empty text",
             "int_from_float": "an integer", "none_required": "null"}
    return kinds.get(t, err["msg"])


def _line(err: dict[str, Any], source: str) -> str:
    loc, ctx, value = tuple(err["loc"]), err.get("ctx", {}), err.get("input")
    # pydantic names the branch of a union or a model in the loc; keep only keys and list indices
    loc = tuple(p for p in loc if isinstance(p, int) or not str(p)[:1].isupper() and "[" not in str(p))
    if err["type"] == "rule":
        loc += tuple(ctx["key"].split(".")) if ctx["key"] else ()
        value, why, expected = ctx["value"], ctx["why"], ctx["expected"]
    elif err["type"] == "extra_forbidden":
        known = _known(loc)
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        why = "unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")
        expected = "one of " + ", ".join(known)
    elif err["type"] == "missing":
        return f"{source}: {'.'.join(map(str, loc))}: missing; expected {_expected(err)}"
    elif err["type"] == "literal_error":
        why, expected = "not a known value", _expected(err)
    else:
        why = err["msg"].replace("Input should be", "should be").replace("String should", "should")
        if err["type"] in ("int_type", "float_type", "bool_type", "string_type", "list_type", "tuple_type", "int_from_float"):
            why = f"a {type(value).__name__}"
        expected = _expected(err)
    return f"{source}: {'.'.join(map(str, loc))} = {_show(value)}: {why}; expected {expected}"


def validate(params: Any, source: str = "params.yaml") -> Params:
    """The typed params, or ParamsError with one line per problem."""
    try:
        return Params.model_validate(params)
    except ValidationError as e:
        raise ParamsError([_line(err, source) for err in e.errors()]) from None
