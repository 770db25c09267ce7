"""What changed between two revisions, as plain data: params, stages, metrics, answers, tolerances.

Pure functions of what `Revision` read; `src.tools.review.report` renders them. The release gates are
`src.quality.gates`' own functions, applied to HEAD's metrics with HEAD's params: never restated here.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from typing import Any

from src.quality import plots
from src.quality.gates import gates, quality_gates

# ---- params --------------------------------------------------------------------------------------


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: leaf value}; a list is one leaf (a param like finetune.lora.targets is one value)."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@dataclass
class ParamChange:
    file: str
    key: str
    base: Any
    head: Any
    stages: list[str]  # the HEAD stages that declare it (none: read outside the pipeline, e.g. review.*)


ABSENT = "(absent)"


def param_changes(base: dict[str, dict[str, Any]], head: dict[str, dict[str, Any]],
                  stages: dict[str, Any]) -> list[ParamChange]:
    """Changed leaves of each params file ({"params.yaml": tree, "runtime.yaml": tree})."""
    readers: dict[tuple[str, str], list[str]] = {}
    for name, stage in stages.items():
        for entry in stage.get("params", []) or []:
            for file, keys in ([("params.yaml", [entry])] if isinstance(entry, str) else entry.items()):
                for key in keys:
                    readers.setdefault((file, key), []).append(name)
    out = []
    for file in head:
        b, h = flatten(base.get(file) or {}), flatten(head.get(file) or {})
        for key in sorted(set(b) | set(h)):
            if b.get(key, ABSENT) != h.get(key, ABSENT):
                out.append(ParamChange(file, key, b.get(key, ABSENT), h.get(key, ABSENT), readers.get((file, key), [])))
    return out


# ---- stages, from the two dvc.locks ----------------------------------------------------------------


@dataclass
class StageChange:
    stage: str
    why: list[str]          # params (key: base -> head), deps (path) and cmd that differ
    outs: list[str]         # outputs whose hash differs
    status: str = "reran"   # reran | added | removed


def _hashes(items: list[dict[str, Any]] | None) -> dict[str, str]:
    return {i["path"]: i.get("md5") or i.get("etag") or "" for i in items or []}


def stage_changes(base: dict[str, Any], head: dict[str, Any], order: list[str]) -> list[StageChange]:
    """The stages whose recorded inputs or outputs differ between the two dvc.locks, in `order` (dvc.yaml's)."""
    out = []
    for stage in dict.fromkeys([*order, *head, *base]):
        if stage not in head and stage not in base:
            continue
        b, h = base.get(stage), head.get(stage)
        if b is None or h is None:
            out.append(StageChange(stage, [], [], "added" if b is None else "removed"))
            continue
        why = []
        bp, hp = b.get("params") or {}, h.get("params") or {}
        for file in sorted(set(bp) | set(hp)):
            fb, fh = bp.get(file) or {}, hp.get(file) or {}
            why += [f"{key}: {_short(fb.get(key, ABSENT))} -> {_short(fh.get(key, ABSENT))}"
                    for key in sorted(set(fb) | set(fh)) if fb.get(key, ABSENT) != fh.get(key, ABSENT)]
        bd, hd = _hashes(b.get("deps")), _hashes(h.get("deps"))
        why += [path for path in sorted(set(bd) | set(hd)) if bd.get(path) != hd.get(path)]
        if b.get("cmd") != h.get("cmd"):
            why.append("cmd")
        bo, ho = _hashes(b.get("outs")), _hashes(h.get("outs"))
        outs = [path for path in sorted(set(bo) | set(ho)) if bo.get(path) != ho.get(path)]
        if why or outs:
            out.append(StageChange(stage, why, outs))
    return out


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


# ---- metrics ----------------------------------------------------------------------------------------

# How a reviewer reads them: is the model good, do the runtimes agree, what data, how training went.
GROUPS = ("quality", "parity", "data", "training", "other")
QUALITY_KEYS = ("accuracy.", "invalid_rate.every_runtime", "invalid_rate.hf", "invalid_rate.f16", "invalid_rate.q8_0")


def group_of(paths: dict[str, str], file: str, key: str) -> str:
    """The group of metric `key` in `file` (a path of dvc.yaml's `vars: paths`)."""
    if file == paths.get("m_parity"):
        if key == "n_test":
            return "data"
        if any(key == q or (q.endswith(".") and key.startswith(q)) for q in QUALITY_KEYS):
            return "quality"
        return "parity"
    if file == paths.get("m_finetune"):
        return "data" if key.startswith("n_") else "training"
    if file in (paths.get("m_download"), paths.get("m_label")):
        return "data"
    return "other"


@dataclass
class MetricRow:
    group: str
    file: str
    key: str
    base: Any
    head: Any
    changed: bool

    @property
    def delta(self) -> float | None:
        if _number(self.base) and _number(self.head):
            return float(self.head) - float(self.base)
        return None


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def differs(b: Any, h: Any, noise: float) -> bool:
    """A change a reviewer should see: numbers beyond `noise` (relative), anything else when unequal.

    0.0 and -0.0 are the same number; a rerun on another CPU moves a loss by about 1e-4 relative.
    """
    if _number(b) and _number(h):
        return not math.isclose(float(b), float(h), rel_tol=noise, abs_tol=1e-12)
    return b != h


def metric_rows(base: dict[str, Any], head: dict[str, Any], paths: dict[str, str], noise: float) -> list[MetricRow]:
    """Every metric of both revisions ({file: parsed json}), grouped, changed first within a group."""
    rows = []
    for file in [*head, *(f for f in base if f not in head)]:
        b, h = flatten(base.get(file) or {}), flatten(head.get(file) or {})
        for key in [*h, *(k for k in b if k not in h)]:
            bv, hv = b.get(key, ABSENT), h.get(key, ABSENT)
            rows.append(MetricRow(group_of(paths, file, key), file, key, bv, hv, differs(bv, hv, noise)))
    return sorted(rows, key=lambda r: (GROUPS.index(r.group), not r.changed))


# ---- answers: per class, confusion, the photos that changed ----------------------------------------


@dataclass
class Answers:
    """eval_parity's Q8_0 answers on the test split (`parity_images.csv`), by photo id."""
    labels: tuple[str, ...]
    rows: dict[str, dict[str, str]] = field(default_factory=dict)  # id -> {name, canvas, truth, pred}

    @classmethod
    def parse(cls, text: str | None, labels: tuple[str, ...]) -> Answers:
        rows = {}
        for r in csv.DictReader(io.StringIO(text or "")):
            # an answer that is not a label is wrong on the phone too: one `invalid` column
            rows[r["id"]] = {"name": r.get("name") or r["id"], "canvas": r.get("canvas", ""), "truth": r["truth"],
                             "pred": r["q8_0"] if r["q8_0"] in labels else plots.INVALID}
        return cls(labels, rows)

    def truth_pred(self) -> tuple[list[str], list[str]]:
        return [r["truth"] for r in self.rows.values()], [r["pred"] for r in self.rows.values()]

    def per_class(self) -> dict[str, dict[str, float]]:
        return plots.per_class_accuracy(*self.truth_pred(), self.labels)

    def accuracy(self) -> float:
        t, p = self.truth_pred()
        return round(sum(a == b for a, b in zip(t, p)) / len(t), 4) if t else 0.0

    def confusion(self) -> tuple[list[str], list[list[int]]]:
        t, p = self.truth_pred()
        cols, m = plots.confusion_counts(t, p, self.labels)
        return cols, m.tolist()


@dataclass
class Flip:
    id: str
    name: str
    canvas: str
    truth: str
    base: str
    head: str


def flips(base: Answers, head: Answers) -> tuple[list[Flip], int, int]:
    """(photos in both revisions whose Q8_0 answer changed, photos only in BASE, only in HEAD)."""
    out = [Flip(i, h["name"], h["canvas"], h["truth"], base.rows[i]["pred"], h["pred"])
           for i, h in head.rows.items() if i in base.rows and base.rows[i]["pred"] != h["pred"]]
    out.sort(key=lambda f: (f.head == f.truth, f.name))  # photos that became wrong first
    return out, len(set(base.rows) - set(head.rows)), len(set(head.rows) - set(base.rows))


# ---- the release gates on HEAD, and the tolerances of a change ---------------------------------------


def release_fails(parity: dict[str, Any] | None, answers: Answers, params: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(parity gate failures, quality gate failures) of one revision, by src.quality.gates with its own params."""
    if not parity:
        return ["no parity metrics (eval_parity has not run)"], []
    return (gates(parity, params["eval_parity"], {}),
            quality_gates(answers.accuracy(), answers.per_class(), params["release"]))


@dataclass
class Tolerance:
    """A review tolerance: `what` (a metric) may move against the model by at most `limit`."""
    param: str      # review.max_drop.accuracy
    what: str       # accuracy.q8_0 (parity)
    base: float
    head: float
    limit: float
    rise_is_bad: bool = False

    @property
    def breached(self) -> bool:
        worse = self.head - self.base if self.rise_is_bad else self.base - self.head
        return worse > self.limit + 1e-9

    def line(self) -> str:
        verb = "rises" if self.rise_is_bad else "drops"
        return (f"review: {self.what} {verb} {_n(self.base)} -> {_n(self.head)} ({self.head - self.base:+.4g}), "
                f"more than {self.param} = {self.limit:g}")


def _n(x: float) -> str:
    return f"{x:.1f}" if x.is_integer() else f"{x:.4g}"


def tolerances(review: dict[str, Any], parity: tuple[dict[str, Any], dict[str, Any]],
               finetune: tuple[dict[str, Any], dict[str, Any]], answers: tuple[Answers, Answers]) -> list[Tolerance]:
    """Each tolerance of `review` (params.yaml `review:`) that both revisions can be judged on."""
    drop, rise = review["max_drop"], review["max_rise"]
    out = []

    def add(param: str, what: str, b: Any, h: Any, limit: float, rise_is_bad: bool = False) -> None:
        if _number(b) and _number(h):
            out.append(Tolerance(param, what, float(b), float(h), limit, rise_is_bad))

    (pb, ph), (fb, fh) = parity, finetune
    g = lambda m, dotted: flatten(m or {}).get(dotted)  # noqa: E731
    add("review.max_drop.accuracy", "accuracy.q8_0 (Q8_0, test split)", g(pb, "accuracy.q8_0"), g(ph, "accuracy.q8_0"),
        drop["accuracy"])
    for side in ("f16", "q8_0"):
        add("review.max_drop.agreement", f"agreement.{side}", g(pb, f"agreement.{side}"), g(ph, f"agreement.{side}"),
            drop["agreement"])
    add("review.max_drop.val_acc", "val_acc (finetune)", g(fb, "val_acc"), g(fh, "val_acc"), drop["val_acc"])
    add("review.max_rise.invalid_rate", "invalid_rate.q8_0", g(pb, "invalid_rate.q8_0"), g(ph, "invalid_rate.q8_0"),
        rise["invalid_rate"], True)
    add("review.max_rise.val_loss", "val_loss (finetune)", g(fb, "val_loss"), g(fh, "val_loss"), rise["val_loss"], True)
    ab, ah = answers[0].per_class(), answers[1].per_class()
    for label in answers[1].labels:
        if ab.get(label, {}).get("n") and ah.get(label, {}).get("n"):
            add("review.max_drop.class_accuracy", f"class {label} accuracy", ab[label]["accuracy"], ah[label]["accuracy"],
                drop["class_accuracy"])
    return out
