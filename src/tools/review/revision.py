"""One revision as the review reads it: git for what git holds, DVC's cache or remote for the rest.

A revision is a git revision (`main`, a sha, `HEAD~1`) or the workspace (`None`). Params, `dvc.lock`,
`dvc.yaml` and the `cache: false` metrics and plots are read from git (the workspace: from disk);
canvases and other DVC outputs through `dvc.api.open`, which reads the DVC cache and then the
default remote. Nothing here runs a stage.
"""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

WORKSPACE = "workspace"


class RevisionError(Exception):
    """A revision that git does not know, or a repository that is not one: one line."""


def git(root: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True)


@dataclass
class Revision:
    root: Path
    rev: str | None  # None: the workspace
    sha: str = ""
    _cache: dict[str, bytes | None] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, root: Path, rev: str | None) -> Revision:
        if rev is None:
            return cls(root, None)
        res = git(root, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
        if res.returncode != 0:
            raise RevisionError(f"review: unknown git revision {rev!r} in {root} (try `git fetch`, or a branch, "
                                "tag or sha that `git log` shows)")
        return cls(root, rev, res.stdout.decode().strip())

    @property
    def label(self) -> str:
        """How the report names it: `main (1a2b3c4)`, or `workspace`."""
        if self.rev is None:
            return WORKSPACE
        return self.sha[:7] if self.sha.startswith(self.rev) else f"{self.rev} ({self.sha[:7]})"

    def read(self, path: str) -> bytes | None:
        """A git-tracked file's bytes at this revision (the workspace: on disk), or None when absent."""
        if path not in self._cache:
            if self.rev is None:
                p = self.root / path
                self._cache[path] = p.read_bytes() if p.is_file() else None
            else:
                res = git(self.root, "show", f"{self.sha}:{path}")
                self._cache[path] = res.stdout if res.returncode == 0 else None
        return self._cache[path]

    def text(self, path: str) -> str | None:
        data = self.read(path)
        return None if data is None else data.decode()

    def yaml(self, path: str) -> Any:
        text = self.text(path)
        return None if text is None else yaml.safe_load(text)

    def listdir(self, path: str) -> list[str]:
        """File names directly under `path` (a git-tracked folder) at this revision."""
        if self.rev is None:
            p = self.root / path
            return sorted(x.name for x in p.iterdir() if x.is_file()) if p.is_dir() else []
        res = git(self.root, "ls-tree", "--name-only", f"{self.sha}:{path}")
        return sorted(res.stdout.decode().split()) if res.returncode == 0 else []

    def dvc_read(self, path: str) -> bytes | None:
        """A file inside a DVC output (cache, then the default remote), or None when neither holds it."""
        import dvc.api  # slow to import; only thumbnails need it

        try:
            with dvc.api.open(path, repo=str(self.root), rev=self.sha or None, mode="rb") as f:
                return f.read()
        except Exception:  # noqa: BLE001 (DVC raises many kinds for "not in the cache or remote")
            return None

    # ---- what the pipeline states ------------------------------------------------------------------

    def paths(self) -> dict[str, str]:
        """dvc.yaml's `vars: paths` (every path is stated once, there)."""
        dvc = self.yaml("dvc.yaml") or {}
        for entry in dvc.get("vars", []):
            if isinstance(entry, dict) and "paths" in entry:
                return dict(entry["paths"])
        return {}

    def stages(self) -> dict[str, Any]:
        return (self.yaml("dvc.yaml") or {}).get("stages", {})

    def lock(self) -> dict[str, Any]:
        return (self.yaml("dvc.lock") or {}).get("stages", {})

    def params(self) -> dict[str, Any]:
        return self.yaml("params.yaml") or {}

    def runtime(self) -> dict[str, Any]:
        return self.yaml("runtime.yaml") or {}


def _get(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _MISSING
        tree = tree[part]
    return tree


_MISSING = object()


def stale_stages(r: Revision) -> list[str]:
    """Stages whose dvc.lock entry does not match this revision: `name (why)`; empty when reproduced.

    What can be checked without the data: a stage in dvc.yaml that the lock lacks, a param whose value
    differs from the lock's, and a git-tracked file (code, a `cache: false` metric) whose md5 differs.
    """
    lock, out = r.lock(), []
    files = {"params.yaml": r.params(), "runtime.yaml": r.runtime()}
    for stage in r.stages():
        entry = lock.get(stage)
        if entry is None:
            out.append(f"{stage} (not in dvc.lock)")
            continue
        why = []
        for source, keys in (entry.get("params") or {}).items():
            for key, value in keys.items():
                if _get(files.get(source, {}), key) != value:
                    why.append(key)
        for item in [*(entry.get("deps") or []), *(entry.get("outs") or [])]:
            md5 = item.get("md5", "")
            if md5 and not md5.endswith(".dir"):
                data = r.read(item["path"])
                if data is not None and hashlib.md5(data).hexdigest() != md5:  # noqa: S324 (DVC's hash)
                    why.append(item["path"])
        if why:
            out.append(f"{stage} ({', '.join(why[:3])}{' ...' if len(why) > 3 else ''} changed)")
    return out
