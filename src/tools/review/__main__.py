"""Review a change to the model: `python -m src.tools.review BASE [HEAD]` (HEAD: the workspace).

Writes a folder (default `review/`): `report.md` (verdict, params, stages that reran, metrics grouped,
per class and confusion, the photos whose answer changed with thumbnails, training curves, release
plots side by side) and `comment.md` (the same text, no images: for the merge request and the job
summary). Reads only what git and the DVC cache or remote hold for both revisions; runs no stage.
Exits 1 with one line per breach when HEAD regresses beyond `params.yaml: review:`'s tolerances (or
newly fails a release gate), 2 on a usage error.

    make review BASE=main
    python -m src.tools.review main HEAD --out review --ci    # CI: no photo leaves the runner unless review.share_photos
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from src.config.params import fail
from src.config.schema import ParamsError, validate
from src.tools.review import compare
from src.tools.review.report import Review, verdict, write
from src.tools.review.revision import Revision, RevisionError, stale_stages

PHOTO_PLOTS = ("sample_grid.png",)  # release plots that show photos (src/stages/release.py's sample grid)
MAX_THUMBS = 50  # a change that flips more photos than this shows the first 50 with thumbnails


def _json(r: Revision, path: str | None) -> dict[str, Any]:
    text = r.text(path) if path else None
    return json.loads(text) if text else {}


def _metric_files(r: Revision) -> list[str]:
    """The `metrics:` files of dvc.yaml's stages, in pipeline order (paths resolved from `vars: paths`)."""
    paths, out = r.paths(), []
    for stage in r.stages().values():
        for entry in stage.get("metrics", []) or []:
            for raw in (entry if isinstance(entry, dict) else {entry: None}):
                out.append(_resolve(raw, paths))
    return out


def _resolve(raw: str, paths: dict[str, str]) -> str:
    for k, v in paths.items():
        raw = raw.replace("${paths.%s}" % k, v)  # noqa: UP031  (an f-string would need ${{paths.{k}}})
    return raw


def _curves(r: Revision, live: str | None) -> dict[str, dict[str, list[float]]]:
    """DVCLive's series ({name: {step, value}}) from `<live>/plots/metrics/*.tsv`."""
    if not live:
        return {}
    out = {}
    folder = f"{live}/plots/metrics"
    for name in r.listdir(folder):
        if name.endswith(".tsv"):
            lines = (r.text(f"{folder}/{name}") or "").splitlines()[1:]
            rows = [line.split("\t") for line in lines if line.strip()]
            out[name[:-4]] = {"step": [float(x[0]) for x in rows], "value": [float(x[1]) for x in rows]}
    return out


def _labels(r: Revision) -> tuple[str, ...]:
    return tuple(((r.params().get("contract") or {}).get("labels")) or ())


def review_params(root: Path, head: Revision) -> tuple[dict[str, Any], list[str]]:
    """HEAD's `review:` tolerances, checked by the schema (one line per problem, exit 2), and any note.

    The workspace's params.yaml is validated whole, as a stage does. A git revision's own `review:` is
    checked in the workspace's tree (its other sections may predate today's schema); one that predates
    the review command is judged by the workspace's tolerances, and the report says so.
    """
    workspace = Revision(root, None).params()
    section = head.params().get("review") if head.rev is not None else workspace.get("review")
    notes = []
    if section is None and head.rev is not None:
        notes.append(f"HEAD {head.label} has no `review:` params: judged by the workspace's tolerances")
        section = workspace.get("review")
    try:
        validate({**workspace, "review": section})
    except ParamsError as e:
        fail([f"review: {line}" for line in e.lines])
    return section, notes


def build(root: Path, base_rev: str, head_rev: str | None, ci: bool) -> tuple[Review, bool, dict, dict]:
    """(the review, whether photos may be written, canvases of the flipped photos, release plots {name: (base, head)}).

    Tolerances and `share_photos` are HEAD's `review:` params (a change to them shows in the params table).
    """
    base, head = Revision.open(root, base_rev), Revision.open(root, head_rev)
    params = head.params()
    review_p, notes = review_params(root, head)
    photos_allowed = not ci or review_p["share_photos"]
    paths = head.paths() or base.paths()
    for side, r in (("BASE", base), ("HEAD", head)):
        stale = stale_stages(r)
        if stale:
            notes.append(f"{side} {r.label} is not reproduced: {'; '.join(stale)} differ from its dvc.lock "
                         "(compared as committed; `dvc repro` there to refresh)")
    metrics = {side: {f: _json(r, f) for f in _metric_files(r)} for side, r in (("base", base), ("head", head))}
    for side, r in (("BASE", base), ("HEAD", head)):
        if not any(metrics[side.lower()].values()):
            notes.append(f"{side} {r.label} holds no metrics: run `dvc repro` there and commit its metrics")
    answers = (compare.Answers.parse(base.text(paths.get("parity_images", "")), _labels(base)),
               compare.Answers.parse(head.text(paths.get("parity_images", "")), _labels(head)))
    flips, only_base, only_head = compare.flips(*answers)
    pm, fm = paths.get("m_parity"), paths.get("m_finetune")
    parity = (metrics["base"].get(pm), metrics["head"].get(pm))
    finetune = (metrics["base"].get(fm), metrics["head"].get(fm))
    base_params = base.params()
    try:
        base_fails = compare.release_fails(parity[0], answers[0], base_params)
    except KeyError:  # BASE predates a gate: nothing to say it passed
        base_fails = (["BASE's params predate the gates"], [])
    try:
        head_fails = compare.release_fails(parity[1], answers[1], params)
    except KeyError as e:
        head_fails = ([f"HEAD's params predate the gates (no {e})"], [])
    curves_b, curves_h = _curves(base, paths.get("live_finetune")), _curves(head, paths.get("live_finetune"))
    plots_dir = paths.get("release_plots")
    pngs = sorted(set(base.listdir(plots_dir) if plots_dir else []) | set(head.listdir(plots_dir) if plots_dir else []))
    pngs = [n for n in pngs if n.endswith(".png") and (photos_allowed or n not in PHOTO_PLOTS)]
    review = Review(
        base=base.label, head=head.label, notes=notes,
        params=compare.param_changes({"params.yaml": base_params, "runtime.yaml": base.runtime()},
                                     {"params.yaml": params, "runtime.yaml": head.runtime()}, head.stages()),
        stages=compare.stage_changes(base.lock(), head.lock(), list(head.stages())),
        metrics=compare.metric_rows(metrics["base"], metrics["head"], paths, review_p["noise"]),
        answers=answers, flips=flips, only=(only_base, only_head),
        fails=head_fails, base_fails=base_fails,
        tolerances=compare.tolerances(review_p, parity, finetune, answers),
        curves={k: (curves_b.get(k, {}), curves_h.get(k, {})) for k in dict.fromkeys([*curves_h, *curves_b])},
        release_pngs=pngs,
    )
    canvases = {}
    if photos_allowed and flips:
        missing = 0
        for f in flips[:MAX_THUMBS]:
            data = head.dvc_read(f"{paths['resize256']}/{f.canvas}") or base.dvc_read(f"{paths['resize256']}/{f.canvas}")
            if data is None:
                missing += 1
            else:
                canvases[f.id] = data
        if missing:
            review.notes.append(f"{missing} thumbnails left out: their canvases are in neither the DVC cache nor the "
                                "remote (`dvc push` from the clone that reproduced them)")
    release = {n: (base.read(f"{plots_dir}/{n}"), head.read(f"{plots_dir}/{n}")) for n in pngs}
    return review, photos_allowed, canvases, release


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m src.tools.review", description=__doc__.splitlines()[0])
    ap.add_argument("base", help="the git revision to compare against (main, a sha, HEAD~1)")
    ap.add_argument("head", nargs="?", help="the git revision under review (default: the workspace)")
    ap.add_argument("--out", type=Path, default=Path("review"), help="the review folder (default: review/)")
    ap.add_argument("--root", type=Path, default=Path.cwd(), help="the repository (default: here)")
    ap.add_argument("--ci", action="store_true",
                    help="for CI: thumbnails and the sample grid only with params.yaml review.share_photos: true")
    ap.add_argument("--json", action="store_true", help="also print the verdict, breaches and notes as JSON")
    args = ap.parse_args(argv)
    try:
        review, photos, canvases, release = build(args.root.resolve(), args.base, args.head, args.ci)
    except RevisionError as e:
        print(e, file=sys.stderr)
        return 2
    out = args.out if args.out.is_absolute() else Path.cwd() / args.out
    write(review, out, canvases, release, photos)
    for note in review.notes:
        print(f"review: {note}", file=sys.stderr)
    print(verdict(review).replace("**", ""))
    breaches = review.breaches
    for line in breaches:
        print(line, file=sys.stderr)
    if args.json:
        print(json.dumps({"verdict": verdict(review), "unchanged": review.unchanged, "breaches": breaches,
                          "notes": review.notes, "flips": len(review.flips)}))
    print(f"review: wrote {out / 'report.md'} and {out / 'comment.md'}")
    return 1 if breaches else 0


if __name__ == "__main__":
    raise SystemExit(main())
