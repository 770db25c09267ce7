"""Each stage's code dependencies, derived from its imports, so `dvc.yaml` cannot miss one.

DVC reruns a stage when a file in its `deps` changes. A stage's code is its module
under `src/stages/` plus every `src/` module it imports, directly or through another
module; a list kept by hand goes stale the day someone adds an import. This walks the
imports (the AST, nothing is executed) and writes the list into `dvc.yaml`, keeping
the data deps and the comments as they are.

Command: python -m src.tools.deps            # check: exit 1 and name what differs
         python -m src.tools.deps --write    # rewrite the code deps of every stage in dvc.yaml
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path
from typing import Any

from src.config.paths import ROOT

STAGES = "src/stages"
# Imported by every stage but unable to change what a stage computes: the schema only accepts or
# refuses params (it never alters a value), so a new range or enum must not rerun the pipeline. The
# models a stage's code receives (src/config/contract.py, src/config/settings.py) are not here: they are deps. The
# report only words the console lines that name refused photos: no output holds what it prints.
NOT_DEPS = {"src/config/schema.py", "src/data/refused.py"}


def module_file(name: str, root: Path) -> Path | None:
    """`src.model.hf_vlm` -> src/model/hf_vlm.py (or a package's __init__.py); None outside `src`."""
    if name != "src" and not name.startswith("src."):
        return None
    base = root / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports(path: Path, root: Path) -> set[Path]:
    """The `src` files `path` imports (at any depth of the file: lazy imports count too)."""
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            # `from src import vlm` imports src/model/hf_vlm.py; `from src.x import f` imports src/x.py;
            # `from . import x` and `from .x import f` are the same, counted from the file's own package
            module = node.module or ""
            if node.level:
                package = path.relative_to(root).parent.parts
                package = package[:len(package) - node.level + 1]
                module = ".".join([*package, module] if module else package)
            names = [module] + [f"{module}.{a.name}" for a in node.names]
        # importing src.labeling.teacher.client first runs src/labeling/teacher/__init__.py: every parent package counts
        names = [".".join(n.split(".")[:i]) for n in names for i in range(2, n.count(".") + 2)]
        for name in names:
            f = module_file(name, root)
            if f is not None:  # a package's __init__.py runs on import: it counts
                found.add(f)
    return found


def closure(start: Path, root: Path) -> set[Path]:
    """`start` and every `src` file reachable from it by imports, not counting NOT_DEPS nor what only they import."""
    seen, todo = {start}, [start]
    while todo:
        for f in imports(todo.pop(), root) - seen:
            if f.relative_to(root).as_posix() not in NOT_DEPS:
                seen.add(f)
                todo.append(f)
    return seen


def code_deps(stage: str, root: Path = ROOT) -> list[str]:
    """The sorted repo-relative code files stage `stage` runs."""
    start = root / STAGES / f"{stage}.py"
    return sorted(p.relative_to(root).as_posix() for p in closure(start, root))


def is_code(dep: str) -> bool:
    return dep.startswith("src/") and dep.endswith(".py")


def stage_imports_stage(root: Path = ROOT) -> list[str]:
    """'a imports b' for every stage module that imports another stage module."""
    out = []
    for f in sorted((root / STAGES).glob("*.py")):
        for g in sorted(imports(f, root)):
            if g.parent == root / STAGES and g != f and g.name != "__init__.py":
                out.append(f"{f.relative_to(root)} imports {g.relative_to(root)}")
    return out


# src/ holds packages only, one a kind of file; the pipeline's own never reach into the tools, the
# client or the stages (a stage is an entry point, not a library), and src never imports test support.
APART = ("src/tools", "src/client", "src/stages")
NEVER = ("tests", "testkit", "bench")


def layout_problems(root: Path = ROOT) -> list[str]:
    """One line per break of the layout rules above, and per package `__init__.py` that holds code
    (it runs on every import from its package, so it would be a code dep of every stage that imports one)."""
    out = []
    src = root / "src"
    out += [f"{f.relative_to(root)}: a module outside a package (put it in the package it belongs to)"
            for f in sorted(src.glob("*.py")) if f.name != "__init__.py"]
    for init in sorted(src.rglob("__init__.py")):
        body = ast.parse(init.read_text()).body
        if body[1:] or (body and not (isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant))):
            out.append(f"{init.relative_to(root)}: holds code; a package's __init__.py is its docstring only")
    for f in sorted(src.rglob("*.py")):
        rel = f.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for name in names:
                if name.split(".")[0] in NEVER:
                    out.append(f"{rel} imports {name}: src never imports test or benchmark code")
        if not rel.startswith(APART):
            for g in sorted(imports(f, root)):
                grel = g.relative_to(root).as_posix()
                if grel.startswith(APART):
                    out.append(f"{rel} imports {grel}: pipeline code never imports the tools, the client or a stage")
    return out


def diff(dvc_yaml: Path, root: Path = ROOT) -> dict[str, tuple[list[str], list[str]]]:
    """{stage: (missing, extra)} for every stage whose declared code deps differ from the derived ones."""
    import yaml

    out = {}
    for name, st in yaml.safe_load(dvc_yaml.read_text())["stages"].items():
        declared = {d for d in st.get("deps", []) if is_code(d)}
        derived = set(code_deps(name, root))
        if declared != derived:
            out[name] = (sorted(derived - declared), sorted(declared - derived))
    return out


def _moved_comments(deps: Any, n_code: int) -> dict[int, Any]:
    """The comments of `deps` re-keyed to the item indexes they will have once `n_code` code deps lead.

    ruamel keeps a comment on the item above it. A comment below the last code dep (one that explains
    the data deps that follow) stays below the last code dep; a data dep's comment follows its item.
    """
    if not hasattr(deps, "ca"):
        return {}
    data_at = {i: n_code + k for k, i in enumerate(i for i, d in enumerate(deps) if not is_code(d))}
    return {data_at.get(i, n_code - 1): c for i, c in deps.ca.items.items()}


def write(dvc_yaml: Path, root: Path = ROOT) -> list[str]:
    """Rewrite each stage's code deps in place (round-trip YAML: comments and order survive)."""
    from ruamel.yaml import YAML  # DVC's own YAML library, so it is always installed with DVC

    y = YAML()
    y.preserve_quotes = True
    y.width = 120
    y.indent(mapping=2, sequence=4, offset=2)  # the layout dvc.yaml is written in
    doc = y.load(dvc_yaml.read_text())
    changed = []
    for name, st in doc["stages"].items():
        deps = st.get("deps", [])
        data = [d for d in deps if not is_code(d)]
        new = code_deps(name, root) + data
        if list(deps) != new:
            changed.append(name)
            comments = _moved_comments(deps, len(new) - len(data))
            deps.clear()
            deps.extend(new)
            if hasattr(deps, "ca"):
                deps.ca.items.clear()
                deps.ca.items.update(comments)
            if hasattr(deps, "fa"):
                deps.fa.set_block_style()
    if changed:
        with dvc_yaml.open("w") as f:
            y.dump(doc, f)
    return changed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="rewrite dvc.yaml's code deps")
    args = ap.parse_args()
    dvc_yaml = ROOT / "dvc.yaml"
    if args.write:
        changed = write(dvc_yaml)
        print(f"deps: {'rewrote ' + ', '.join(changed) if changed else 'nothing to change'} in {dvc_yaml}")
        return
    problems = [f"{s}: missing {m or '-'}; not imported {x or '-'}" for s, (m, x) in diff(dvc_yaml).items()]
    problems += stage_imports_stage() + layout_problems()
    if problems:
        sys.exit("deps: dvc.yaml's code deps differ from the imports (run `python -m src.tools.deps --write`):\n  "
                 + "\n  ".join(problems))
    print("deps: every stage's code deps in dvc.yaml match its imports")


if __name__ == "__main__":
    main()
