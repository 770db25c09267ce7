"""Small I/O primitives every stage uses: hashes, atomic writes, JSON lines.

Atomic writes (temp file in the same folder, then `os.replace`) are what make
a stage killed midway safe to rerun: a file either exists whole or not at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """A file's sha256, read in chunks (model weights are too big to read at once)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are shipped and shared, not secrets
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def copy_atomic(src: Path, dst: Path) -> None:
    """Copy a (large) file so that `dst` exists whole or not at all."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; a torn last line (a killed append) is ignored."""
    if not path.exists():
        return []
    rows = []
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines) - 1:
                break
            raise ValueError(f"{path}:{n + 1}: not JSON") from None
    return rows


def cut_torn_tail(path: Path) -> None:
    """Drop a last line that a killed append left without its newline.

    Without this, the next append would glue a whole row onto the fragment, and that line,
    no longer the last, would make the journal unreadable after a second kill.
    """
    if not path.exists():
        return
    with path.open("r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        # walk back to the previous newline (rows are small; read a block at a time)
        end = size
        while end > 0:
            start = max(0, end - 65536)
            f.seek(start)
            block = f.read(end - start)
            i = block.rfind(b"\n")
            if i >= 0:
                f.truncate(start + i + 1)
                break
            end = start
        else:
            f.truncate(0)
        f.flush()
        os.fsync(f.fileno())


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    """Append one row and fsync: a journal that survives SIGKILL, also twice in a row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cut_torn_tail(path)
    with path.open("a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def prune_store(out: Path, store: str, keep: set[str], journal: str) -> None:
    """After a finished run: delete files under `out/store` no record names (`store/<name>` in `keep`),
    temp files of killed writes, and the journal, so a resumed run leaves the same bytes as an
    uninterrupted one."""
    folder = out / store
    if folder.is_dir():
        for p in folder.iterdir():
            if f"{store}/{p.name}" not in keep:
                p.unlink()
    for p in out.glob(".*.tmp"):
        p.unlink()
    (out / journal).unlink(missing_ok=True)
