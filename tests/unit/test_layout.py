"""The house rules that keep the layout honest: stages apart, and DVC told about every line of code a stage runs."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from src.config.params import declared_keys, stage_params
from src.config.paths import ROOT
from src.config.schema import ParamsError, validate
from src.tools import deps
from testkit.project import copy_project, project_params, set_param, stale_after

PINS = yaml.safe_load((ROOT / "runtime.yaml").read_text())


def bump(version: str) -> str:
    """Another version than the pin: its last number plus one."""
    *head, last = str(version).split(".")
    return ".".join([*head, str(int(last) + 1)])


def stages() -> list[str]:
    return list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])


def test_every_stage_has_its_module_and_no_other_module_is_a_stage() -> None:
    modules = {p.stem for p in (ROOT / deps.STAGES).glob("*.py") if p.stem != "__init__"}
    assert modules == set(stages())


def test_no_stage_imports_another_stage() -> None:
    assert deps.stage_imports_stage() == []


def test_src_is_packages_of_one_kind_and_pipeline_code_stays_apart() -> None:
    assert deps.layout_problems() == []


def test_each_layout_rule_can_fail(tmp_path: Path) -> None:
    """A copy of src/ that breaks each rule once: a loose module, an __init__ with code, pipeline code that
    imports a tool, and src importing test support."""
    shutil.copytree(ROOT / "src", tmp_path / "src")
    (tmp_path / "src" / "loose.py").write_text("X = 1\n")
    init = tmp_path / "src" / "data" / "__init__.py"
    init.write_text(init.read_text() + "X = 1\n")
    canvas = tmp_path / "src" / "data" / "canvas.py"
    canvas.write_text(canvas.read_text() + "\nfrom src.tools import deps\nfrom testkit.project import ROOT\n")
    assert deps.layout_problems(tmp_path) == [
        "src/loose.py: a module outside a package (put it in the package it belongs to)",
        "src/data/__init__.py: holds code; a package's __init__.py is its docstring only",
        "src/data/canvas.py imports testkit.project: src never imports test or benchmark code",
        "src/data/canvas.py imports src/tools/__init__.py: pipeline code never imports the tools, the client or a stage",
        "src/data/canvas.py imports src/tools/deps.py: pipeline code never imports the tools, the client or a stage",
    ]


def test_a_stage_importing_a_stage_is_caught(tmp_path: Path) -> None:
    """The rule above can fail: a copy of src/ where split imports download."""
    shutil.copytree(ROOT / "src", tmp_path / "src")
    split = tmp_path / deps.STAGES / "split.py"
    split.write_text(split.read_text().replace("from src.config.params import", "from src.stages.download import run\nfrom src.config.params import"))
    assert deps.stage_imports_stage(tmp_path) == ["src/stages/split.py imports src/stages/download.py"]


def test_dvc_yaml_lists_exactly_the_code_each_stage_imports() -> None:
    assert deps.diff(ROOT / "dvc.yaml") == {}


def test_a_missing_transitive_import_is_caught(tmp_path: Path) -> None:
    """src/model/hf_vlm.py imports src/model/geometry.py: finetune must list it, though finetune never names geometry."""
    assert "src/model/geometry.py" in deps.code_deps("finetune")
    text = (ROOT / "dvc.yaml").read_text().replace("      - src/model/geometry.py\n", "", 1)
    (tmp_path / "dvc.yaml").write_text(text)
    missing = {stage: m for stage, (m, _) in deps.diff(tmp_path / "dvc.yaml").items()}
    assert "src/model/geometry.py" in next(iter(missing.values()))


def test_a_stale_dep_is_caught(tmp_path: Path) -> None:
    """A code dep that no import reaches (left behind when an import went) reruns the stage for nothing."""
    assert "src/runtime/llama_vlm.py" not in deps.code_deps("split")
    split = "python -m src.stages.split ${paths.label} ${paths.split}\n    deps:\n"
    text = (ROOT / "dvc.yaml").read_text()
    assert split in text
    (tmp_path / "dvc.yaml").write_text(text.replace(split, split + "      - src/runtime/llama_vlm.py\n"))
    assert deps.diff(tmp_path / "dvc.yaml") == {"split": ([], ["src/runtime/llama_vlm.py"])}


def test_relative_imports_are_followed(tmp_path: Path) -> None:
    """`from .. import x` and `from .x import y` import src files as surely as `from src import x` does."""
    shutil.copytree(ROOT / "src", tmp_path / "src")
    split = tmp_path / deps.STAGES / "split.py"
    split.write_text(split.read_text().replace("from src.config.params import", "from ..model import geometry\nfrom src.config.params import"))
    (tmp_path / "src" / "model" / "geometry.py").write_text("from ..labeling.teacher.request import x\n")
    found = set(deps.code_deps("split", tmp_path))
    assert {"src/model/geometry.py", "src/labeling/teacher/__init__.py", "src/labeling/teacher/request.py"} <= found
    assert "src/model/geometry.py" not in deps.code_deps("split")  # the real split imports neither


def test_write_restores_what_a_hand_edit_dropped(tmp_path: Path) -> None:
    text = (ROOT / "dvc.yaml").read_text()
    (tmp_path / "dvc.yaml").write_text(text.replace("      - src/model/geometry.py\n", ""))
    assert deps.write(tmp_path / "dvc.yaml") != []
    assert (tmp_path / "dvc.yaml").read_text() == text


def test_write_keeps_the_comments_among_the_deps(tmp_path: Path) -> None:
    """A comment under the last code dep explains the data deps below it: a rewrite keeps it there."""
    text = (ROOT / "dvc.yaml").read_text()
    comments = [line for line in text.splitlines() if line.lstrip().startswith("# ") and line.startswith("      ")]
    assert comments, "dvc.yaml has comments among its deps"
    (tmp_path / "dvc.yaml").write_text(text.replace("      - src/config/paths.py\n", ""))
    assert len(deps.write(tmp_path / "dvc.yaml")) == len(stages())  # every stage imports paths
    assert (tmp_path / "dvc.yaml").read_text() == text


@pytest.mark.slow
def test_a_llama_cpp_upgrade_reruns_conversion_and_reproves_parity_and_nothing_upstream(
        tiny_repo: Path, tmp_path: Path) -> None:
    pin = PINS["llama_cpp_python"]
    assert stale_after(tiny_repo, tmp_path, "runtime.yaml", f'llama_cpp_python: "{pin}"', f'llama_cpp_python: "{bump(pin)}"') \
        == {"convert_gguf", "quantize_q8", "eval_parity", "release"}


@pytest.mark.slow
def test_a_transformers_upgrade_reruns_training_and_everything_after(tiny_repo: Path, tmp_path: Path) -> None:
    pin = PINS["transformers"]
    stale = stale_after(tiny_repo, tmp_path, "runtime.yaml", f'transformers: "{pin}"', f'transformers: "{bump(pin)}"')
    assert "finetune" in stale and {"convert_gguf", "eval_parity", "release"} <= stale
    assert not stale & {"download", "resize256", "label", "split"}


def test_a_stage_refuses_a_runtime_other_than_the_pinned_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = copy_project(tmp_path / "repo", {})
    pins = root / "runtime.yaml"
    pin = PINS["transformers"]
    assert f'transformers: "{pin}"' in pins.read_text()
    pins.write_text(pins.read_text().replace(f'transformers: "{pin}"', 'transformers: "9.9.9"'))
    assert "runtime" not in stage_params("split", root)  # a stage that declares no pin is not held back
    with pytest.raises(SystemExit) as e:
        stage_params("finetune", root)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"runtime.yaml: transformers = '9.9.9': installed is {pin}; expected the pinned version "
        "(run `make setup`, which installs runtime.yaml's pins)")


def doc_files() -> list[Path]:
    """The docs whose commands are checked: README.md and every page of docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def readme_commands(text: str) -> list[str]:
    """A doc's commands (README.md or a docs/ page): its shell lines (continuation lines joined, comments dropped, `&&` chains and
    environment prefixes split off) and its inline code spans that start with a command this project drives."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [" ".join(line.split("#")[0].split()) for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    spans = [" ".join(c.split()) for c in re.findall(r"(?<!`)`([^`\n]+)`(?!`)", re.sub(r"```.*?```", "", text, flags=re.S))]
    starts = ("make ", "dvc ", "gto ", "python -m ", ".venv/bin/python -m ", ".venv/bin/torchrun ")
    commands = []
    for c in [c for c in lines if c] + [c for c in spans if c.startswith(starts)]:
        for part in re.split(r"&&|\|\||;|\(|\)", c):  # `rm -rf X && dvc get ...`: each command on its own
            words = part.split()
            while words and re.match(r"^[A-Z_]+=", words[0]):  # `AWS_ACCESS_KEY_ID=... dvc ...`: the command
                words.pop(0)
            if words:
                commands.append(" ".join(words))
    return commands


def readme_problems(text: str, home: Path) -> list[str]:
    """What in a doc's commands names something the repository lacks: a make target, a stage, a module or
    its option, an artifact, a DVC output; a `-S key=value` a stage does not declare or the schema refuses
    (the overrides of one command are validated together, `$HOME` read as `home`)."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    paths = dvc["vars"][0]["paths"]
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, flags=re.M))
    declared = {k for st in stages() for k in declared_keys(st, ROOT / "dvc.yaml")}
    problems = []
    for c in readme_commands(text):
        words = c.split()
        for i, w in enumerate(words):
            if w in ("make", "dvc", "gto", "-m", "-S") and i + 1 < len(words):
                words[i + 1] = words[i + 1].strip("\"'")
        if words[0] == "make":
            problems += [f"{c}: no make target {t!r}" for t in words[1:]
                         if not t.startswith("-") and "=" not in t and t not in targets]
            problems += [f"{c}: the Makefile reads no variable {t.split('=')[0]!r}" for t in words[1:]
                         if "=" in t and f"$({t.split('=')[0]})" not in makefile]
        if m := re.search(r"-m ([\w.]+)(?=\s|$)(.*)", c):  # not `-m src.stages.<stage>`, a placeholder
            module, rest = m.group(1), m.group(2).split()
            if module.split(".")[0] in ("src", "bench"):
                f = ROOT / (module.replace(".", "/") + ".py")
                package = ROOT / module.replace(".", "/")
                if not f.exists() and not (package / "__main__.py").exists():
                    problems.append(f"{c}: no module {module}")
                elif not module.startswith("src.stages."):  # a stage's arguments are checked against dvc.yaml
                    source = f.read_text() if f.exists() else "".join(x.read_text() for x in package.glob("*.py"))
                    problems += [f"{c}: {module} has no option {w}" for w in rest
                                 if w.startswith("--") and f'"{w.split("=")[0]}"' not in source]
                    if rest and not rest[0].startswith("-") and "add_parser" in source \
                            and f'add_parser("{rest[0]}"' not in source:
                        problems.append(f"{c}: {module} has no command {rest[0]!r}")
        if re.match(r"dvc (repro|commit)\b", c):
            problems += [f"{c}: no stage {w!r}" for w in c.split()[2:] if not w.startswith("-") and w not in dvc["stages"]]
        if m := re.match(r"(?:dvc artifacts get \S+|gto \w+) ([\w-]+)", c):
            if m.group(1) not in dvc["artifacts"]:
                problems.append(f"{c}: no artifact {m.group(1)!r}")
        if m := re.match(r"dvc get \S+ (\S+)", c):
            if m.group(1) not in paths.values():
                problems.append(f"{c}: {m.group(1)} is no path of dvc.yaml")
        if re.match(r"dvc (exp run|repro)\b", c):
            params = project_params()
            overrides = [w for prev, w in zip(c.split(), c.split()[1:]) if prev == "-S"]
            for o in overrides:
                key, _, value = o.strip("\"'").partition("=")
                if key not in declared:
                    problems.append(f"{c}: -S {key}: no stage declares it")
                    continue
                value = value.replace("$HOME", str(home))
                set_param(params, key, yaml.safe_load(value))
                if key.endswith(".path") and value.startswith(str(home)):
                    (Path(value) / "fire").mkdir(parents=True, exist_ok=True)  # the user's photos, one folder per class
            try:
                validate(params)
            except ParamsError as e:
                problems += [f"{c}: {line}" for line in e.lines]
    return problems


def test_every_doc_command_names_what_exists_and_every_override_is_valid(tmp_path: Path) -> None:
    docs = {f.relative_to(ROOT).as_posix(): f.read_text() for f in doc_files()}
    assert "docs/real-size.md" in docs and "docs/labels.md" in docs, sorted(docs)
    commands = [c for text in docs.values() for c in readme_commands(text)]
    assert sum(" -S " in c for c in commands) >= 3 and any(c.startswith("make ") for c in commands)  # it reads them
    assert sum(c.startswith(("python -m src.", ".venv/bin/python -m src.")) for c in commands) >= 3
    assert {name: readme_problems(text, tmp_path) for name, text in docs.items()} == {name: [] for name in docs}
    # the same check on a doc with one mistake of each kind
    broken = ("```bash\nmake tests\nmake review BASES=main\npython -m src.tools.review main --outt r\ndvc exp run -S finetune.epoch=12\ndvc exp run -S finetune.epochs=0\n"
              "dvc exp run -S contract.vision.tile=256\ndvc repro finetun\n.venv/bin/python -m src.client.fortune a.jpg --bundel b\n"
              "python -m src.tools.remotes chek\ndvc get URL models/relase\ngto register element-clasifier\npython -m src.relese\n```\n")
    assert [p.split(": ", 1)[1] for p in readme_problems(broken, tmp_path)] == [
        "no make target 'tests'",
        "the Makefile reads no variable 'BASES'",
        "src.tools.review has no option --outt",
        "-S finetune.epoch: no stage declares it",
        "params.yaml: finetune.epochs = 0: should be greater than or equal to 1; expected >= 1",
        "params.yaml: contract.vision.longest_edge = 128: below 2 x tile (512): transformers and llama.cpp would "
        "lay the image out differently; expected at least 512",
        "no stage 'finetun'",
        "src.client.fortune has no option --bundel",
        "src.tools.remotes has no command 'chek'",
        "models/relase is no path of dvc.yaml",
        "no artifact 'element-clasifier'",
        "no module src.relese",
    ]


def docs_page_problems(name: str, text: str, root: Path = ROOT) -> list[str]:
    """A docs/ page says what it covers under its title, ends with a `Code:` line, names only files that exist
    there, and the README's "More" links it."""
    problems = []
    paras = [p for p in text.strip().split("\n\n") if p.strip()]
    if len(paras) < 2 or not paras[0].startswith("# ") or paras[1].startswith(("#", "|", "```", "-")):
        problems.append(f"{name}: no sentence under the title saying what the page covers")
    if not paras or not paras[-1].startswith("Code: "):
        problems.append(f"{name}: does not end with a `Code:` line")
    else:
        for path in re.findall(r"`([\w./-]+/[\w./-]*|[\w-]+\.(?:py|yaml|toml|txt|csv|md))`", paras[-1]):
            if not (root / path).exists():
                problems.append(f"{name}: Code: names {path}, which does not exist")
    if f"]({name})" not in (root / "README.md").read_text():
        problems.append(f"{name}: README.md's More does not link it")
    return problems


def test_every_docs_page_says_what_it_covers_and_names_its_code() -> None:
    pages = sorted((ROOT / "docs").glob("*.md"))
    assert len(pages) >= 8
    assert [p for f in pages for p in docs_page_problems(f.relative_to(ROOT).as_posix(), f.read_text())] == []
    # and it can fail: a page with no sentence, a Code: line naming a file that is gone, not linked
    broken = "# Gone\n\n## At once a heading\n\nCode: `src/stages/gone.py`, `src/config/contract.py`.\n"
    assert docs_page_problems("docs/gone.md", broken) == [
        "docs/gone.md: no sentence under the title saying what the page covers",
        "docs/gone.md: Code: names src/stages/gone.py, which does not exist",
        "docs/gone.md: README.md's More does not link it",
    ]


def test_docs_run_stages_with_dvc_yaml_arguments_and_the_venv_python() -> None:
    """A stage run by hand from a doc (README.md, docs/) takes the arguments dvc.yaml gives it, and dvc only runs stages
    with the venv active (it runs the first `python` on PATH)."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    paths = dvc["vars"][0]["paths"]
    expected = {name: re.sub(r"\$\{paths\.(\w+)\}", lambda m: paths[m.group(1)], " ".join(s["cmd"].split()))
                for name, s in dvc["stages"].items()}
    commands = [c for f in doc_files() for c in readme_commands(f.read_text())]
    by_hand = [c for c in commands if re.search(r" -m src\.stages\.\w", c)]
    assert by_hand, "no doc runs a stage by hand: nothing checked"
    for c in by_hand:
        stage = re.search(r"-m src\.stages\.(\w+)", c).group(1)
        assert c[c.index("-m src.stages."):] == expected[stage].split("python ", 1)[1], c
    runs_stages = [c for c in commands if re.search(r"\bdvc (repro|exp run)\b", c)]
    assert runs_stages and not [c for c in runs_stages if ".venv/bin/dvc" in c]


def layout_map_problems(readme: str, root: Path = ROOT) -> list[str]:
    """README's Layout names every module and subpackage of every src/ package, and only ones that exist."""
    block = readme.split("## Layout", 1)[1].split("```")[1]
    entries: dict[str, set[str]] = {}
    head = ""
    for line in block.splitlines():
        if line.strip() and not line.startswith(" "):
            head = line.split()[0]
        entries.setdefault(head, set()).update(re.findall(r"(?<![\w/.-])([\w-]+(?:\.py|/))", line.removeprefix(head)))
    problems = []
    for pkg in sorted(p for p in (root / "src").iterdir() if (p / "__init__.py").exists() and p.name != "stages"):
        key = f"src/{pkg.name}/"
        named = entries.get(key, set()) | {h.removeprefix(key) for h in entries if h.startswith(key) and h != key}
        have = {f.name for f in pkg.glob("*.py") if f.name != "__init__.py"} | {
            f"{d.name}/" for d in pkg.iterdir() if d.is_dir() and d.name != "__pycache__"}
        problems += [f"Layout: {key}{m} is not named" for m in sorted(have - named)]
        problems += [f"Layout: {key}{m} does not exist" for m in sorted(named - have)]
    return problems


def test_the_readme_layout_names_every_module_that_exists() -> None:
    readme = (ROOT / "README.md").read_text()
    assert layout_map_problems(readme) == []
    # and it can fail: a module the map forgets, one it names that is gone
    broken = readme.replace("· canvas.py (photo", "· kanvas.py (photo")
    assert layout_map_problems(broken) == ["Layout: src/data/canvas.py is not named",
                                           "Layout: src/data/kanvas.py does not exist"]


def test_the_params_types_import_nothing_outside_config() -> None:
    """The typed params (schema, contract, settings) import only src/config: feature code imports its types from
    them, never the other way; and the models code receives never import the schema (it is not a code dep)."""
    config = ROOT / "src" / "config"
    typed = {config / name for name in ("schema.py", "contract.py", "settings.py")}
    for f in typed:
        assert {g.parent for g in deps.imports(f, ROOT)} <= {config}, (f, deps.imports(f, ROOT))
    for f in typed - {config / "schema.py"}:
        assert config / "schema.py" not in deps.imports(f, ROOT), f
