"""Source readers for download: each turns one kind of source into a list of `Item`s.

Sources (params `download.source`):
  demo      the embedded synthetic photos (src/data/demo.py); offline, the default.
  manifest  a CSV or JSONL URL list: `url` (required), optional `label`, `source`,
            `licence` (or `license`), `id`.
  folder    a local folder of photos; with `class_subfolders` the first subfolder
            under it names the label (fire/0001.jpg -> "fire").
  hf        a Hugging Face `datasets` dataset: a `save_to_disk` folder (load_from_disk)
            or anything `datasets.load_dataset` takes, with an image column and an
            optional label column (ClassLabel ints become their names).

Listing is cheap and eager (every item gets an id and a record, so nothing is lost
silently); reading bytes is lazy (`Item.load`), done by download's worker threads.
An `Item` with `load=None` is remote: download fetches its `url` over http(s).
`Item.name` is how the user knows the photo (its path in the folder, its URL, ...):
every message, table and plot downstream names photos by it.

A source that cannot be listed raises `SourceError`, whose message names the param, its
value and what was expected.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from src.data import demo
from src.data.files import sha256


class SourceError(ValueError):
    """The source named in params cannot be listed; the message is one line for the user."""


@dataclass(frozen=True)
class Item:
    id: str
    url: str  # http(s) URL to fetch, or a locator of a local item (demo:, folder:, hf:)
    name: str  # what the user calls it: relative path, URL, demo id, dataset row
    label: str | None
    source: str | None
    licence: str | None
    load: Callable[[], bytes] | None = None  # local items: how to read the bytes


def unique_ids(ids: Iterable[str]) -> list[str]:
    """Make ids distinct in order: a repeat of `x` becomes `x-2`, `x-3`, ... (the first keeps its id)."""
    taken: set[str] = set()
    out: list[str] = []
    for i in ids:
        new, n = i, 1
        while new in taken:
            n += 1
            new = f"{i}-{n}"
        taken.add(new)
        out.append(new)
    return out


def _opt(value: Any) -> str | None:
    """Empty CSV cells and JSON nulls both mean 'not given'."""
    return None if value is None or str(value).strip() == "" else str(value).strip()


def _manifest_rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as f:
            return list(csv.DictReader(f))
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SourceError(f"{path}:{n}: not a JSON object: {e}") from None
                if not isinstance(row, dict):
                    raise SourceError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
        return rows
    raise SourceError(f"download.manifest.path = {str(path)!r}: a {path.suffix!r} file; expected a .csv or .jsonl URL list")


def manifest_items(path: Path) -> list[Item]:
    """A CSV/JSONL URL list. A row without a url still becomes an item (it fails as 'no url')."""
    rows = _manifest_rows(path)
    if not rows:
        raise SourceError(f"download.manifest.path = {str(path)!r}: no rows; expected one row per photo URL")
    if "url" not in rows[0]:
        raise SourceError(f"download.manifest.path = {str(path)!r}: no 'url' column (columns: {sorted(rows[0])}); "
                          "expected a url column")
    urls = [_opt(r.get("url")) or "" for r in rows]
    ids = unique_ids(_opt(r.get("id")) or f"url-{sha256(u.encode())[:16]}" for r, u in zip(rows, urls))
    return [Item(id=i, url=u, name=u or f"{path.name} row {n}", label=_opt(r.get("label")),
                 source=_opt(r.get("source")) or path.name, licence=_opt(r.get("licence", r.get("license"))))
            for n, (i, u, r) in enumerate(zip(ids, urls, rows), 1)]


def folder_items(root: Path, class_subfolders: bool, labels: tuple[str, ...]) -> list[Item]:
    """Every regular, non-hidden file under `root`, in sorted order; content is checked later, by decoding.

    With `class_subfolders` every photo must sit in a subfolder named after a label: a photo
    directly under `root`, or a subfolder that is not a label, is refused here, naming them, rather
    than failing at label with an unnamed `None`.
    """
    where = f"download.folder.path = {str(root)!r}"
    if not root.is_dir():
        raise SourceError(f"{where}: no such folder; expected the folder of photos")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(root).parts))
    if not files:
        raise SourceError(f"{where}: no photos in it; expected photos" + (" in one subfolder per class "
                          f"({', '.join(x + '/' for x in labels)})" if class_subfolders else ""))
    rels = [p.relative_to(root).as_posix() for p in files]
    if class_subfolders:
        flat = [r for r in rels if "/" not in r]
        if flat:
            raise SourceError(f"{where}: {len(flat)} photos directly in the folder (e.g. {flat[0]}) but "
                              f"download.folder.class_subfolders is true; expected one subfolder per class "
                              f"({', '.join(x + '/' for x in labels)}), or class_subfolders: false")
        unknown = sorted({r.split("/")[0] for r in rels} - set(labels))
        if unknown:
            raise SourceError(f"{where}: subfolders {', '.join(x + '/' for x in unknown)} are not labels; "
                              f"expected subfolders named after contract.labels ({', '.join(labels)})")
    return [Item(id=f"folder-{sha256(rel.encode())[:16]}", url=f"folder:{rel}", name=rel,
                 label=rel.split("/")[0] if class_subfolders else None, source=root.name, licence=None,
                 load=p.read_bytes)
            for p, rel in zip(files, rels)]


def demo_items(n: int, seed: int, labels: tuple[str, ...]) -> list[Item]:
    """The embedded demo, drawn on demand."""
    return [Item(id=f"demo-{i:05d}", url=f"demo:demo-{i:05d}", name=f"demo-{i:05d}", label=labels[i % len(labels)],
                 source="demo", licence="CC0-1.0 (generated)", load=partial(_demo_bytes, i, labels, seed))
            for i in range(n)]


def _demo_bytes(i: int, labels: tuple[str, ...], seed: int) -> bytes:
    return demo.photo(i, labels, seed).data


def _hf_load(local_dir: str, hub_id: str, revision: str, split: str) -> Any:
    """A save_to_disk folder, or a hub dataset at a pinned revision (params.yaml's schema checks the pin)."""
    import datasets  # heavy; only this source needs it

    if hub_id:
        return datasets.load_dataset(hub_id, revision=revision, split=split)
    ds = datasets.load_from_disk(local_dir)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise SourceError(f"download.hf.split = {split!r}: not in {local_dir}; expected one of {sorted(ds)}")
        return ds[split]
    return ds


def _hf_bytes(ds: Any, index: int, column: str) -> bytes:
    value = ds[index][column]
    if isinstance(value, dict):  # datasets.Image(decode=False): {"bytes": ..., "path": ...}
        if value.get("bytes") is not None:
            return bytes(value["bytes"])
        if value.get("path"):
            return Path(value["path"]).read_bytes()
        raise ValueError(f"row {index}: image column {column!r} holds neither bytes nor a path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return Path(value).read_bytes()
    raise ValueError(f"row {index}: image column {column!r} holds a {type(value).__name__}, not image bytes")


def hf_items(local_dir: str, hub_id: str, revision: str, split: str, image_column: str, label_column: str) -> list[Item]:
    """A `datasets` dataset; images are read undecoded, so download sees the original file bytes."""
    import datasets

    where = hub_id or local_dir
    try:
        ds = _hf_load(local_dir, hub_id, revision, split)
    except FileNotFoundError as e:
        key = "download.hf.hub_id" if hub_id else "download.hf.local_dir"
        raise SourceError(f"{key} = {where!r}: {e}; expected a datasets save_to_disk folder or a hub dataset") from None
    if image_column not in ds.column_names:
        raise SourceError(f"download.hf.image_column = {image_column!r}: not a column of {where}; "
                          f"expected one of {ds.column_names}")
    if isinstance(ds.features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    labels: list[str | None] = [None] * len(ds)
    if label_column:
        if label_column not in ds.column_names:
            raise SourceError(f"download.hf.label_column = {label_column!r}: not a column of {where}; "
                              f"expected one of {ds.column_names}, or \"\" for no labels")
        feature = ds.features[label_column]
        raw = ds[label_column]
        names = feature.int2str if isinstance(feature, datasets.ClassLabel) else str
        labels = [None if v is None or v == -1 else names(v) for v in raw]
    if not len(ds):
        raise SourceError(f"download.hf: {where} split {split!r} has no rows; expected photos")
    licence = _opt(getattr(ds.info, "license", None))
    name = Path(where).name or where
    return [Item(id=f"hf-{i:07d}", url=f"hf:{name}/{split}/{i}", name=f"hf:{name}/{split}/{i}", label=lab,
                 source=name, licence=licence, load=partial(_hf_bytes, ds, i, image_column))
            for i, lab in enumerate(labels)]


def items_from_params(d: dict[str, Any], labels: tuple[str, ...]) -> list[Item]:
    """The items of the source `d["source"]` names, configured by the rest of `d` (params `download`)."""
    source = d["source"]
    if source == "demo":
        return demo_items(d["demo"]["n"], d["demo"]["seed"], labels)
    if source == "manifest":
        return manifest_items(Path(d["manifest"]["path"]))
    if source == "folder":
        return folder_items(Path(d["folder"]["path"]), d["folder"]["class_subfolders"], labels)
    h = d["hf"]
    return hf_items(h["local_dir"], h["hub_id"], h["revision"], h["split"], h["image_column"], h["label_column"])
