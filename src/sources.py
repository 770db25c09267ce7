"""Source readers for download: each turns one kind of source into a list of `Item`s.

Sources (params `download.source`):
  demo      the embedded synthetic photos (src/demo.py); offline, the default.
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
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from src import demo
from src.records import sha256


@dataclass(frozen=True)
class Item:
    id: str
    url: str  # http(s) URL to fetch, or a locator of a local item (demo:, folder:, hf:)
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
                    raise ValueError(f"{path}:{n}: not a JSON object: {e}") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
        return rows
    raise ValueError(f"{path}: a URL manifest must be .csv or .jsonl, not {path.suffix!r}")


def manifest_items(path: Path) -> list[Item]:
    """A CSV/JSONL URL list. A row without a url still becomes an item (it fails as 'no url')."""
    rows = _manifest_rows(path)
    if rows and "url" not in rows[0]:
        raise ValueError(f"{path}: no 'url' column (columns: {sorted(rows[0])})")
    urls = [_opt(r.get("url")) or "" for r in rows]
    ids = unique_ids(_opt(r.get("id")) or f"url-{sha256(u.encode())[:16]}" for r, u in zip(rows, urls))
    return [Item(id=i, url=u, label=_opt(r.get("label")), source=_opt(r.get("source")) or path.name,
                 licence=_opt(r.get("licence", r.get("license"))))
            for i, u, r in zip(ids, urls, rows)]


def folder_items(root: Path, class_subfolders: bool) -> list[Item]:
    """Every regular, non-hidden file under `root`, in sorted order; content is checked later, by decoding."""
    if not root.is_dir():
        raise ValueError(f"download.folder.path: {root} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(root).parts))
    items = []
    for p in files:
        rel = p.relative_to(root).as_posix()
        label = rel.split("/")[0] if class_subfolders and "/" in rel else None
        items.append(Item(id=f"folder-{sha256(rel.encode())[:16]}", url=f"folder:{rel}", label=label,
                          source=root.name, licence=None, load=p.read_bytes))
    return items


def demo_items(n: int, seed: int, labels: tuple[str, ...]) -> list[Item]:
    """The embedded demo, drawn on demand."""
    return [Item(id=f"demo-{i:05d}", url=f"demo:demo-{i:05d}", label=labels[i % len(labels)],
                 source="demo", licence="CC0-1.0 (generated)", load=partial(_demo_bytes, i, labels, seed))
            for i in range(n)]


def _demo_bytes(i: int, labels: tuple[str, ...], seed: int) -> bytes:
    return demo.photo(i, labels, seed).data


def _hf_load(path: str, split: str) -> Any:
    import datasets  # heavy; only this source needs it

    p = Path(path)
    if p.is_dir() and ((p / "state.json").exists() or (p / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(p))
        return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    return datasets.load_dataset(path, split=split)


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


def hf_items(path: str, split: str, image_column: str, label_column: str) -> list[Item]:
    """A `datasets` dataset; images are read undecoded, so download sees the original file bytes."""
    import datasets

    ds = _hf_load(path, split)
    if image_column not in ds.column_names:
        raise ValueError(f"download.hf: no image column {image_column!r} in {path} (columns: {ds.column_names})")
    if isinstance(ds.features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    labels: list[str | None] = [None] * len(ds)
    if label_column:
        if label_column not in ds.column_names:
            raise ValueError(f"download.hf: no label column {label_column!r} in {path} (columns: {ds.column_names})")
        feature = ds.features[label_column]
        raw = ds[label_column]
        names = feature.int2str if isinstance(feature, datasets.ClassLabel) else str
        labels = [None if v is None or v == -1 else names(v) for v in raw]
    licence = _opt(getattr(ds.info, "license", None))
    name = Path(path).name or path
    return [Item(id=f"hf-{i:07d}", url=f"hf:{name}/{split}/{i}", label=lab, source=name, licence=licence,
                 load=partial(_hf_bytes, ds, i, image_column))
            for i, lab in enumerate(labels)]


def items_from_params(d: dict[str, Any], labels: tuple[str, ...]) -> list[Item]:
    """The items of the source `d["source"]` names, configured by the rest of `d` (params `download`)."""
    source = d["source"]
    if source == "demo":
        return demo_items(d["demo"]["n"], d["demo"]["seed"], labels)
    if source == "manifest":
        return manifest_items(Path(d["manifest"]["path"]))
    if source == "folder":
        return folder_items(Path(d["folder"]["path"]), d["folder"]["class_subfolders"])
    if source == "hf":
        h = d["hf"]
        return hf_items(h["path"], h["split"], h["image_column"], h["label_column"])
    raise ValueError(f"download.source={source!r}: unknown source (known: demo, manifest, folder, hf)")
