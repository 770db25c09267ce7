"""audit: one self-contained HTML page to review labels before a release.

Used by src/label.py, which writes OUT/audit.html next to labels.jsonl.
Canvases are grouped by element (in the contract's order, then the failures), each
with its name (file name or URL), canvas sha256 prefix, provider and the teacher's reason; human overrides
are marked. Thumbnails are embedded, so the page can be mailed or archived alone.
"""

from __future__ import annotations

import base64
import html
import io
from collections import defaultdict
from pathlib import Path
from typing import Any

from PIL import Image

THUMB = 128
FAILED = "failed"


def thumbnail(png: Path) -> str:
    """A data URL of a small JPEG of the canvas ('' if it cannot be read: the row still shows)."""
    try:
        with Image.open(png) as im:
            im = im.convert("RGB")
            im.thumbnail((THUMB, THUMB))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=80)
    except OSError:
        return ""
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def audit_html(rows: list[dict[str, Any]], resize256: Path, labels: tuple[str, ...], title: str) -> str:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[r["element"] if r["status"] == "ok" else FAILED].append(r)
    order = [g for g in (*labels, FAILED) if groups.get(g)]
    e = html.escape
    out = [f"<!doctype html><meta charset=utf-8><title>{e(title)}</title>",
           "<style>body{font:13px sans-serif;margin:1em}figure{display:inline-block;width:150px;margin:4px;"
           "vertical-align:top}img{width:128px;height:128px;background:#000}figcaption{word-wrap:break-word}"
           ".override{outline:3px solid #e80}.failed{outline:3px solid #c00}small{color:#666}</style>",
           f"<h1>{e(title)}</h1><p>" + " · ".join(f"<a href='#{e(g)}'>{e(g)}</a> {len(groups[g])}" for g in order)
           + "</p>"]
    for g in order:
        out.append(f"<h2 id='{e(g)}'>{e(g)} ({len(groups[g])})</h2>")
        for r in sorted(groups[g], key=lambda r: r.get("name") or r["id"]):
            cls = "failed" if r["status"] != "ok" else "override" if r["provider"] == "override" else ""
            why = r["reason"] if r["status"] == "ok" else r["error"]
            src = thumbnail(resize256 / r["canvas"]) if r.get("canvas") else ""
            name = r.get("name") or r["id"]  # the photo as the user knows it (file name, URL)
            out.append(f"<figure class='{cls}'><img src='{src}' alt='{e(name)}'><figcaption><b>{e(name)}</b> "
                       f"<small>{e((r['canvas_sha256'] or '')[:12])} · {e(r['provider'])}</small><br>"
                       f"{e(why or '')}</figcaption></figure>")
    return "\n".join(out) + "\n"
