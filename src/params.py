"""Hand each stage exactly the params its `dvc.yaml` entry declares.

DVC only reruns a stage when a param it *declares* changes. If a script could
read any key of params.yaml, a change to an undeclared key would silently
leave a stale output behind. `stage_params` makes "declared" and "read" the
same set: it returns a nested dict that holds the declared leaf keys and
nothing else, so reading an undeclared key is a KeyError, not a stale cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _get(tree: dict[str, Any], dotted: str, source: Path) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"{source}: no param {dotted!r}")
        node = node[part]
    return node


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def declared_keys(stage: str, dvc_yaml: Path) -> list[str]:
    """The param keys `stage` lists in dvc.yaml (plain keys of params.yaml only)."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    if stage not in stages:
        raise KeyError(f"{dvc_yaml}: no stage {stage!r}")
    keys: list[str] = []
    for entry in stages[stage].get("params", []):
        if isinstance(entry, str):
            keys.append(entry)
        else:  # {"other.yaml": [keys]} is not used here; refuse rather than ignore it
            raise ValueError(f"{dvc_yaml}: stage {stage!r} reads params from another file: {entry}")
    return keys


def select(params: dict[str, Any], keys: list[str], source: Path) -> dict[str, Any]:
    """The nested sub-dict of `params` that holds exactly `keys`."""
    out: dict[str, Any] = {}
    for key in keys:
        _set(out, key, _get(params, key, source))
    return out


def stage_params(stage: str, root: Path = ROOT) -> dict[str, Any]:
    """The params that `stage` declares in `root/dvc.yaml`, read from `root/params.yaml`."""
    source = root / "params.yaml"
    params = yaml.safe_load(source.read_text())
    return select(params, declared_keys(stage, root / "dvc.yaml"), source)
