"""Hand each stage exactly the params its `dvc.yaml` entry declares.

DVC only reruns a stage when a param it *declares* changes. If a script could
read any key of params.yaml, a change to an undeclared key would silently
leave a stale output behind. `stage_params` makes "declared" and "read" the
same set: it returns a nested dict that holds the declared leaf keys and
nothing else, so reading an undeclared key is a KeyError, not a stale cache.

Before that, the whole params.yaml is checked against its typed schema
(`src/config/schema.py`): a typo stops the stage with one line per problem and exit
code 2, before any work. A stage may also declare pins of `runtime.yaml` (the
software that decides its bytes or its verdict); those are checked against what
is installed, so a stage never runs on another runtime than the one DVC hashed.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from src.config.paths import ROOT

RUNTIME = "runtime.yaml"


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


def declared(stage: str, dvc_yaml: Path) -> dict[str, list[str]]:
    """{params file: keys} that `stage` lists in dvc.yaml (params.yaml and runtime.yaml only)."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    if stage not in stages:
        raise KeyError(f"{dvc_yaml}: no stage {stage!r}")
    keys: dict[str, list[str]] = {"params.yaml": []}
    for entry in stages[stage].get("params", []):
        if isinstance(entry, str):
            keys["params.yaml"].append(entry)
        elif set(entry) == {RUNTIME}:
            keys[RUNTIME] = list(entry[RUNTIME])
        else:  # another params file would be read by nobody here; refuse rather than ignore it
            raise ValueError(f"{dvc_yaml}: stage {stage!r} reads params from another file: {entry}")
    return keys


def declared_keys(stage: str, dvc_yaml: Path) -> list[str]:
    """The params.yaml keys `stage` lists in dvc.yaml."""
    return declared(stage, dvc_yaml)["params.yaml"]


def select(params: dict[str, Any], keys: list[str], source: Path) -> dict[str, Any]:
    """The nested sub-dict of `params` that holds exactly `keys`."""
    out: dict[str, Any] = {}
    for key in keys:
        _set(out, key, _get(params, key, source))
    return out


# runtime.yaml's two keys that are not distributions: the x86 llama.cpp build flags, which `make setup`
# records in the venv beside the wheel it built with them, and the arm64 probe's -march per variant,
# which src/runtime/arm64.py builds and caches per flags (so there is nothing installed to compare).
LLAMA_CPP_CMAKE = "llama_cpp_cmake"
LLAMA_CPP_ARM64 = "llama_cpp_arm64"


def installed(key: str) -> str:
    """What is installed for a runtime.yaml key: a distribution's version, or the llama.cpp build flags."""
    if key == LLAMA_CPP_CMAKE:
        record = Path(sys.prefix) / LLAMA_CPP_CMAKE
        return record.read_text().strip() if record.exists() else "not recorded"
    try:
        return metadata.version(key).split("+")[0]  # 2.13.0+cpu is a build of 2.13.0
    except metadata.PackageNotFoundError:
        return "not installed"


def runtime_mismatches(pins: dict[str, Any]) -> list[str]:
    """One line per runtime.yaml pin whose installed counterpart differs (or is missing)."""
    return [f"{RUNTIME}: {key} = {want!r}: installed is {have}; expected the pinned "
            f"{'build' if key == LLAMA_CPP_CMAKE else 'version'} (run `make setup`, which installs {RUNTIME}'s pins)"
            for key, want in pins.items() if key != LLAMA_CPP_ARM64 and (have := installed(key)) != str(want)]


def fail(lines: list[str]) -> None:
    """A user's mistake: one line each on stderr, exit code 2, no traceback."""
    print("\n".join(lines), file=sys.stderr)
    raise SystemExit(2)


def stage_params(stage: str, root: Path = ROOT) -> dict[str, Any]:
    """The params that `stage` declares in `root/dvc.yaml`, read from `root/params.yaml`.

    The whole file is validated first; runtime pins the stage declares must be the installed ones.
    """
    from src.config.schema import ParamsError, validate  # pydantic: only stages pay for it

    source = root / "params.yaml"
    params = yaml.safe_load(source.read_text())
    try:
        validate(params)
    except ParamsError as e:
        fail(e.lines)
    keys = declared(stage, root / "dvc.yaml")
    out = select(params, keys["params.yaml"], source)
    if RUNTIME in keys:  # handed over as out["runtime"]: the model card reports the versions
        pins = yaml.safe_load((root / RUNTIME).read_text())
        out["runtime"] = {}
        for k in keys[RUNTIME]:  # nested as in runtime.yaml: llama_cpp_arm64.dotprod -> {"llama_cpp_arm64": {"dotprod": ...}}
            _set(out["runtime"], k, str(_get(pins, k, root / RUNTIME)))
        bad = runtime_mismatches(out["runtime"])
        if bad:
            fail(bad)
    return out
