"""The review folder: `report.md` with its images, and `comment.md` (the same, text only, for the forge).

Every image is a local file written here (matplotlib, no network) and linked by a relative path;
nothing in either file loads an http(s) URL. Photos (thumbnails, the sample grid) are written only
when `photos` is true: `--ci` leaves them out unless `review.share_photos` opts in.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.backends.backend_svg import FigureCanvasSVG
from matplotlib.figure import Figure
from PIL import Image

from src.data.files import write_bytes_atomic, write_text_atomic
from src.tools.review.compare import ABSENT, Answers, Flip, MetricRow, ParamChange, StageChange, Tolerance

MARKER = "<!-- smolvlm-elements review -->"  # hidden in the comment: how the forge client finds it again

THUMB = 96  # px: enough to recognise a photo in a table row
FOLD_PARAMS = 10  # more changed params than this are folded too (a new base touches dozens)


@dataclass
class Review:
    base: str
    head: str
    notes: list[str]                          # one line each: a revision not reproduced, data not in the cache
    params: list[ParamChange]
    stages: list[StageChange]
    metrics: list[MetricRow]
    answers: tuple[Answers, Answers]
    flips: list[Flip]
    only: tuple[int, int]                     # photos only in BASE's / HEAD's test split
    fails: tuple[list[str], list[str]]        # HEAD's parity and quality gate failures
    base_fails: tuple[list[str], list[str]]
    tolerances: list[Tolerance]
    curves: dict[str, tuple[dict[str, list[float]], dict[str, list[float]]]] = field(default_factory=dict)
    release_pngs: list[str] = field(default_factory=list)  # names present in metrics/release of either revision

    @property
    def unchanged(self) -> bool:
        return not (self.params or self.stages or self.flips or any(r.changed for r in self.metrics) or any(self.only))

    @property
    def breaches(self) -> list[str]:
        lines = [t.line() for t in self.tolerances if t.breached]
        if not any(self.base_fails):  # a change that makes a releasable model unreleasable
            lines += [f"review: HEAD fails a release gate BASE passed: {f}" for f in [*self.fails[0], *self.fails[1]]]
        return lines


def _metric(rows: list[MetricRow], key: str) -> MetricRow | None:
    return next((r for r in rows if r.key == key and r.group in ("quality", "parity")), None)


def _move(r: MetricRow | None, points: bool = False) -> str:
    if r is None:
        return "n/a"
    if r.delta is None:
        return f"{_fmt(r.base)} -> {_fmt(r.head)}"
    change = f"{r.delta * 100:+.1f} pts" if points else f"{r.delta:+.3g}"
    return f"{_fmt(r.base)} -> {_fmt(r.head)} ({change})" if r.changed else f"{_fmt(r.head)} (unchanged)"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.1f}" if v.is_integer() else f"{v:.4g}"
    return str(v)


def verdict(r: Review) -> str:
    """The first line: would HEAD release, accuracy, agreement, invalid rate, photos that changed."""
    parity_fails, quality_fails = r.fails
    release = ("**would release**" if not parity_fails and not quality_fails else
               "**would NOT release** (" + ", ".join(x for x, f in (("parity gates", parity_fails),
                                                                   ("quality gates", quality_fails)) if f) + " fail)")
    n = len(r.answers[1].rows)
    changed = f"{len(r.flips)}/{n} test photos changed their answer"
    if any(r.only):
        changed += f" ({r.only[0]} only in base, {r.only[1]} only in head)"
    parts = [release, f"accuracy Q8_0 {_move(_metric(r.metrics, 'accuracy.q8_0'), points=True)}",
             f"agreement F16 {_move(_metric(r.metrics, 'agreement.f16'))}, Q8_0 {_move(_metric(r.metrics, 'agreement.q8_0'))}",
             f"invalid Q8_0 {_move(_metric(r.metrics, 'invalid_rate.q8_0'))}", changed]
    if r.breaches:
        parts.insert(1, f"**{len(r.breaches)} tolerance breach{'es' if len(r.breaches) > 1 else ''}**")
    head = "No change: same params, pipeline, metrics and answers. " if r.unchanged else ""
    return head + " · ".join(parts)


def _cell(v: Any) -> str:
    text = ABSENT if v is ABSENT else v if isinstance(v, str) else _fmt(v) if isinstance(v, float) else repr(v) if v is None else str(v)
    return text.replace("|", "\\|").replace("\n", "\\n")


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]]


def _fold(summary: str, lines: list[str]) -> list[str]:
    return [f"<details><summary>{summary}</summary>", "", *lines, "", "</details>"]


def markdown(r: Review, images: bool, thumbs: dict[str, str]) -> str:
    """The report; `images`: link the local images (report.md), or not (comment.md, the job summary)."""
    out = [MARKER, f"## Model review: {r.base} -> {r.head}", "", verdict(r), ""]
    out += [f"> {note}" for note in r.notes] + ([""] if r.notes else [])
    if r.breaches:
        out += ["**Tolerance breached** (`params.yaml: review:`):", "", *[f"- `{b}`" for b in r.breaches], ""]
    elif r.tolerances:
        out += [f"Tolerances (`params.yaml: review:`): all {len(r.tolerances)} hold.", ""]

    out += ["### Params", ""]
    if r.params:
        table = _table(["file", "param", "base", "head", "read by"],
                       [[p.file, f"`{p.key}`", p.base, p.head, ", ".join(p.stages) or "no stage"] for p in r.params])
        out += table if len(r.params) <= FOLD_PARAMS else _fold(f"{len(r.params)} params changed", table)
    else:
        out.append("No param changed (params.yaml, runtime.yaml).")
    out += ["", "### Stages whose recorded inputs or outputs changed (the two dvc.lock files)", ""]
    if r.stages:
        out += _table(["stage", "because", "outputs changed"],
                      [[s.stage if s.status == "reran" else f"{s.stage} ({s.status})",
                        "; ".join(s.why[:6]) + (" ..." if len(s.why) > 6 else "") or "-", ", ".join(s.outs) or "none"]
                       for s in r.stages])
    else:
        out.append("No stage: both dvc.lock files record the same inputs and outputs.")

    out += ["", "### Metrics", ""]
    for group in dict.fromkeys(m.group for m in r.metrics):
        rows = [m for m in r.metrics if m.group == group]
        changed = [m for m in rows if m.changed]
        out += [f"**{group}**: {len(changed)} changed", ""]
        if changed:
            out += [*_table(["metric", "base", "head", "change"],
                            [[f"`{m.key}` ({Path(m.file).stem})", m.base, m.head,
                              "" if m.delta is None else f"{m.delta:+.4g}"] for m in changed]), ""]
        if len(rows) > len(changed):
            same = _table(["metric", "value"], [[f"`{m.key}` ({Path(m.file).stem})", m.head] for m in rows if not m.changed])
            out += [*_fold(f"{len(rows) - len(changed)} unchanged", same), ""]

    ab, ah = r.answers
    pb, ph = ab.per_class(), ah.per_class()
    out += ["### Per class (Q8_0, test split)", ""]
    out += _table(["class", "base", "head", "change"],
                  [[label, _acc(pb.get(label)), _acc(ph.get(label)),
                    f"{(ph[label]['accuracy'] - pb[label]['accuracy']) * 100:+.1f} pts"
                    if label in pb and label in ph and ph[label]["accuracy"] != pb[label]["accuracy"] else ""]
                   for label in ah.labels])
    out += ["", "Confusion (rows: truth, columns: Q8_0 answer); `base -> head` where they differ:", ""]
    out += _confusion(ab, ah)

    out += ["", f"### Photos whose answer changed: {len(r.flips)}", ""]
    if r.flips:
        cols = ["photo", "truth", "base", "head"] + (["thumbnail"] if thumbs else [])
        out += _table(cols, [[f.name, f.truth, _mark(f.base, f.truth), _mark(f.head, f.truth)]
                             + ([f"![{f.name}]({thumbs[f.id]})" if f.id in thumbs else ""] if thumbs else [])
                             for f in r.flips])
    else:
        out.append("None: every test photo in both revisions has the same answer.")

    if images:
        out += ["", "### Training curves (dashed: base, solid: head)", ""]
        out += ["![training curves](curves.svg)"] if r.curves else ["No DVCLive curves in either revision."]
        if r.release_pngs:
            out += ["", "### Release plots", "", *_table(["plot", "base", "head"],
                    [[n, f"![base {n}](base/{n})", f"![head {n}](head/{n})"] for n in r.release_pngs])]
    else:
        out += ["", "Training curves and the release plots: `curves.svg` and `base/`, `head/` in the review folder "
                "(the job's artifact)."]
    return "\n".join(out) + "\n"


def _acc(c: dict[str, Any] | None) -> str:
    return "-" if not c or not c["n"] else f"{c['accuracy']:.3f} ({c['correct']}/{c['n']})"


def _mark(answer: str, truth: str) -> str:
    return f"{answer} (right)" if answer == truth else answer


def _confusion(ab: Answers, ah: Answers) -> list[str]:
    (cb, mb), (ch, mh) = ab.confusion(), ah.confusion()
    cols = list(dict.fromkeys([*ch, *cb]))
    def count(cols_: list[str], m: list[list[int]], labels: tuple[str, ...], t: str, p: str) -> int:
        return m[labels.index(t)][cols_.index(p)] if t in labels and p in cols_ else 0
    rows = []
    for t in ah.labels:
        cells = []
        for p in cols:
            b, h = count(cb, mb, ab.labels, t, p), count(ch, mh, ah.labels, t, p)
            cells.append(f"**{b} -> {h}**" if b != h else str(h))
        rows.append([t, *cells])
    return _table(["truth \\ answer", *cols], rows)


# ---- images ---------------------------------------------------------------------------------------------


def curves_svg(curves: dict[str, tuple[dict[str, list[float]], dict[str, list[float]]]], base: str, head: str) -> bytes:
    """One SVG: a panel per DVCLive series, base dashed and head solid; no fonts or scripts fetched."""
    names = list(curves)
    fig = Figure(figsize=(4.2 * len(names), 3.2), layout="constrained")
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        for series, style, label in ((curves[name][0], "--", f"base {base}"), (curves[name][1], "-", f"head {head}")):
            if series.get("step"):
                ax.plot(series["step"], series["value"], style, marker=".", label=label)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.legend(fontsize="small")
    FigureCanvasSVG(fig)
    buf = io.StringIO()
    # fixed hash salt and no date: the same curves give the same bytes
    with matplotlib.rc_context({"svg.hashsalt": "review", "svg.fonttype": "none"}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    # The DOCTYPE names an external DTD and the RDF metadata cites URLs: a strict XML reader could fetch
    # the first, and neither draws anything. What remains are xmlns names, which nothing loads.
    svg = re.sub(r"<!DOCTYPE[^>]*>\s*", "", buf.getvalue())
    return re.sub(r"\s*<metadata>.*?</metadata>", "", svg, flags=re.S).encode()


def thumbnail(png: bytes) -> bytes:
    im = Image.open(io.BytesIO(png)).convert("RGB")
    im.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def write(r: Review, out: Path, canvases: dict[str, bytes], release: dict[str, tuple[bytes | None, bytes | None]],
          photos: bool) -> list[Path]:
    """Write the review folder (atomically, file by file); returns what was written."""
    out.mkdir(parents=True, exist_ok=True)
    written, thumbs = [], {}
    if photos:
        for fid, png in canvases.items():
            write_bytes_atomic(p := out / "thumbs" / f"{fid}.png", thumbnail(png))
            thumbs[fid], written = f"thumbs/{fid}.png", [*written, p]
    if r.curves:
        write_bytes_atomic(p := out / "curves.svg", curves_svg(r.curves, r.base, r.head))
        written.append(p)
    for name, pair in release.items():
        for side, data in zip(("base", "head"), pair):
            if data is not None:
                write_bytes_atomic(p := out / side / name, data)
                written.append(p)
    write_text_atomic(p := out / "report.md", markdown(r, images=True, thumbs=thumbs))
    write_text_atomic(q := out / "comment.md", markdown(r, images=False, thumbs={}))
    return [*written, p, q]
