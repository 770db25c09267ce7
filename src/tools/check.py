"""check: the preflight that `make repro` runs before `dvc repro`: params.yaml and the source paths, one line a problem.

DVC reads params.yaml and every path dvc.yaml names before any stage starts, so without this a
missing photo folder reaches the user as DVC's `[Errno 2] No such file or directory: ...` and an
empty params.yaml as `failed to parse 'stages.download.deps' ...`, and the schema's line, which
says the key and what to put there, is never printed. This check reads the same two files first:

  - params.yaml parses as YAML and holds a mapping (else one line naming the file and why);
  - the whole file passes the schema (src/config/schema.py: one line per problem, as every stage prints);
  - every path dvc.yaml depends on through a param (`${download.folder.path}` and the other
    sources' locations) exists, also for the sources not in use: DVC hashes them all.

Each problem is one line on stderr, exit code 2; all well is one line on stdout, exit 0.
Paths are relative to the working directory, as DVC reads them: run it in the repository root.

Command: python -m src.tools.check [--params params.yaml] [--dvc-yaml dvc.yaml]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from src.config.schema import ParamsError, validate

RESTORE = "`git checkout params.yaml` restores the committed one"
TEMPLATE = re.compile(r"^\$\{\s*([A-Za-z0-9_.]+)\s*\}$")


def read_params(path: Path) -> tuple[Any, list[str]]:
    """(the parsed params, []) or (None, [one line saying why there are none])."""
    if not path.is_file():
        return None, [f"{path}: no such file; expected the pipeline's params ({RESTORE})"]
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        return None, [f"{path}: not valid YAML: {where}{problem}; expected the pipeline's params ({RESTORE})"]
    if params is None:
        return None, [f"{path}: empty; expected the pipeline's params, a mapping of keys (contract, download, ...) "
                      f"({RESTORE})"]
    if not isinstance(params, dict):
        return None, [f"{path}: a {type(params).__name__}, not a mapping of keys; expected the pipeline's params "
                      f"(contract, download, ...) ({RESTORE})"]
    return params, []


def param_deps(dvc_yaml: Path) -> list[tuple[str, str]]:
    """(stage, dotted param) for every dep of dvc.yaml that is a path taken from params.yaml."""
    stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {})
    out = []
    for stage, spec in stages.items():
        for dep in spec.get("deps", []):
            m = TEMPLATE.match(str(dep))
            if m and not m.group(1).startswith("paths."):  # `paths.` is dvc.yaml's own vars block
                out.append((stage, m.group(1)))
    return out


def _get(params: dict[str, Any], dotted: str) -> Any:
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def problems(params_path: Path, dvc_yaml: Path) -> list[str]:
    """One line per problem, the schema's first; [] when DVC and every stage can start."""
    if not dvc_yaml.is_file():
        return [f"{dvc_yaml}: no such file; expected the pipeline (run the check in the repository root)"]
    params, lines = read_params(params_path)
    if params is None:
        return lines
    try:
        validate(params, str(params_path))
    except ParamsError as e:
        lines = list(e.lines)
    for stage, key in param_deps(dvc_yaml):
        if any(line.startswith(f"{params_path}: {key} ") for line in lines):
            continue  # the schema already said what is wrong with it
        value = _get(params, key)
        if not isinstance(value, str) or not value:
            lines.append(f"{params_path}: {key} = {value!r}: not a path; expected an existing file or folder "
                         f"(dvc.yaml lists it as a dep of stage {stage})")
        elif not Path(value).exists():
            lines.append(f"{params_path}: {key} = {value!r}: no such file or folder; expected an existing path "
                         f"(dvc.yaml lists it as a dep of stage {stage}; a source not in use keeps its empty "
                         f"placeholder under data/sources/)")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--dvc-yaml", type=Path, default=Path("dvc.yaml"))
    args = ap.parse_args(argv)
    lines = problems(args.params, args.dvc_yaml)
    if lines:
        print("\n".join(lines), file=sys.stderr)
        raise SystemExit(2)
    print(f"check: {args.params} passes the schema and every source path {args.dvc_yaml} depends on exists")


if __name__ == "__main__":
    main()
