"""Naming the items a stage refused, on the console: the user sees which photos and why, not only a count.

Every refused item is already in the stage's record file with its cause; the console shows the first
`LIMIT` of them, one a line, then how many more and the file that lists them all.
"""

from __future__ import annotations

from pathlib import Path

LIMIT = 10


def name_refused(stage: str, what: str, lines: list[str], listing: Path, limit: int = LIMIT) -> str:
    """'' when `lines` is empty; else a header, the first `limit` lines (each `NAME: cause`) and the rest's count."""
    if not lines:
        return ""
    shown = [f"  {line}" for line in lines[:limit]]
    rest = len(lines) - len(shown)
    if rest:
        shown.append(f"  ... and {rest} more")
    return "\n".join([f"{stage}: {len(lines)} {what} (every one with its cause in {listing}):", *shown])
