"""Where the project is: one ROOT for every module that needs a path in the clone."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
