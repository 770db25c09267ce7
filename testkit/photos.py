"""Photos and canvases tests make: distinct canvases with their records, a decompression-bomb header, a file tree."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from PIL import Image

from src.data.files import read_jsonl, sha256, write_jsonl
from testkit.project import CONTRACT

LABELS = CONTRACT.labels


def make_canvases(resize256: Path, n: int, start: int = 0) -> dict[str, str]:
    """n distinct canvases + records.jsonl (appended to any already there); canvas sha256 -> true element."""
    rows = read_jsonl(resize256 / "records.jsonl")
    truth = {}
    for i in range(start, start + n):
        img = Image.new("RGB", (CONTRACT.canvas.size,) * 2, ((i * 37) % 256, (i * 91) % 256, (i * 53 + 7) % 256))
        img.putpixel((i % 256, 0), (255, 255, 255))  # distinct even where the colours wrap
        path = resize256 / "tmp.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
        digest = sha256(path.read_bytes())
        (resize256 / "canvases").mkdir(exist_ok=True)
        path.rename(resize256 / f"canvases/{digest}.png")
        element = LABELS[i % len(LABELS)]
        truth[digest] = element
        rows.append({"id": f"img-{i:03d}", "url": f"test:{i}", "sha256": digest, "label": element, "status": "ok",
                     "reason": None, "canvas": f"canvases/{digest}.png", "canvas_sha256": digest})
    rows.append({"id": f"bad-{start}", "url": "test:bad", "sha256": "0" * 64, "label": None, "status": "rejected",
                 "reason": "not an image", "canvas": None, "canvas_sha256": None})
    write_jsonl(resize256 / "records.jsonl", rows)
    return truth


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries almost no data: a decompression-bomb header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root (relative path -> bytes): two runs are identical iff their trees are."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
