"""audit: one self-contained HTML page to review labels before a release.

Used by src/stages/label.py, which writes OUT/audit.html next to labels.jsonl and queue.csv.
Canvases are in the review queue's order (most suspect first: src/labeling/review_queue.py), each with its name
(file name or URL), its class, canvas sha256 prefix, provider, the teacher's reason and the queue's
out-of-fold guess; suspects and human overrides are outlined, failures come last. Two selects filter the
page by class and by suspected pair (labelled wood, looks like land) in the browser. Thumbnails are
embedded, so the page can be mailed or archived alone.
"""

from __future__ import annotations

import base64
import html
import io
from collections import Counter
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


SCRIPT = """<script>
function show(){const c=document.getElementById('cls').value,p=document.getElementById('pair').value;let n=0;
for(const f of document.querySelectorAll('figure')){const ok=(!c||f.dataset.label===c)&&(!p||f.dataset.pair===p);
f.style.display=ok?'':'none';n+=ok}document.getElementById('shown').textContent=n}
</script>"""


def _options(values: list[str], everything: str) -> str:
    e = html.escape
    return f"<option value=''>{e(everything)}</option>" + "".join(f"<option>{e(v)}</option>" for v in values)


def audit_html(rows: list[dict[str, Any]], resize256: Path, labels: tuple[str, ...],
               queue: list[dict[str, Any]] | None, title: str) -> str:
    """The page: with a queue, every canvas in queue order (most suspect first) with its out-of-fold guess,
    then the failures; without one, by class. Filters by class and by suspected pair run in the page itself."""
    e = html.escape
    by_id = {r["id"]: r for r in rows}
    if queue is not None:
        seen = {q["id"] for q in queue}
        entries = [(by_id[q["id"]], q) for q in queue] + [(r, None) for r in rows if r["id"] not in seen]
    else:
        order = {g: i for i, g in enumerate((*labels, FAILED))}
        entries = [(r, None) for r in sorted(rows, key=lambda r: (order[r["element"] if r["status"] == "ok" else FAILED],
                                                                  r.get("name") or r["id"]))]
    count = Counter(r["element"] if r["status"] == "ok" else FAILED for r in rows)
    pairs = Counter(f"{q['label']}->{q['guess']}" for _, q in entries if q and q["suspect"])
    out = [f"<!doctype html><meta charset=utf-8><title>{e(title)}</title>",
           "<style>body{font:13px sans-serif;margin:1em}figure{display:inline-block;width:150px;margin:4px;"
           "vertical-align:top}img{width:128px;height:128px;background:#000}figcaption{word-wrap:break-word}"
           ".override{outline:3px solid #e80}.failed{outline:3px solid #c00}.suspect{outline:3px solid #80c}"
           "small{color:#666}</style>", SCRIPT, f"<h1>{e(title)}</h1>",
           "<p>" + " · ".join(f"{e(g)} {count[g]}" for g in (*labels, FAILED) if count[g]) + "</p>",
           "<p>" + ("Ordered by the review queue: most suspect first (a model that never saw the photo's label "
                    f"disagrees with it); {sum(pairs.values())} suspects, outlined. " if queue is not None else "")
           + "<label>class <select id=cls onchange=show()>"
           + _options([g for g in (*labels, FAILED) if count[g]], "all") + "</select></label> "
           + "<label>suspected (labelled->looks like) <select id=pair onchange=show()>"
           + _options([f"{k}" for k, _ in pairs.most_common()], "any or none") + "</select></label> "
           + f"<span id=shown>{len(entries)}</span> shown</p>"]
    for r, q in entries:
        status = r["element"] if r["status"] == "ok" else FAILED
        cls = ("failed" if r["status"] != "ok" else "override" if r["provider"] == "override"
               else "suspect" if q and q["suspect"] else "")
        why = r["reason"] if r["status"] == "ok" else r["error"]
        src = thumbnail(resize256 / r["canvas"]) if r.get("canvas") else ""
        name = r.get("name") or r["id"]  # the photo as the user knows it (file name, URL)
        pair = f"{q['label']}->{q['guess']}" if q and q["suspect"] else ""
        guess = (f"<br>#{q['rank']} looks like <b>{e(q['guess'])}</b> {q['p_guess']:.2f} "
                 f"({e(q['label'])} {q['p_label']:.2f})") if q else ""
        out.append(f"<figure class='{cls}' data-label='{e(status)}' data-pair='{e(pair)}'><img src='{src}' "
                   f"alt='{e(name)}'><figcaption><b>{e(name)}</b> <small>{e(status)} · "
                   f"{e((r['canvas_sha256'] or '')[:12])} · {e(r['provider'])}</small>{guess}<br>"
                   f"{e(why or '')}</figcaption></figure>")
    return "\n".join(out) + "\n"
