"""pytest's hooks and the session fixtures: the tiny model and the tiny pipeline, reproduced once.

Tests live by what they exercise:
  tests/unit/  A module's functions on in-process data (tiny models built here, no pipeline run).
  tests/stage/  One stage, tool or the client run as a process on a throwaway repo or against loopback servers.
  tests/pipeline/  `dvc repro` over the tiny pipeline: what reruns, what a gate stops, what a review reports.
Support shared with bench/ (params, repo builder, loopback servers) is in testkit/."""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any

import pytest

from testkit.project import CI, CONTRACT, TINY, TINY_MODEL, make_repo, run

# Under pytest-xdist (`make test-quick`) the workers share the cores: torch's default of a thread per core
# in every worker would put more threads than cores on the machine. Set before any test module imports
# torch; the stages a test starts inherit it.
if workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(workers))))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`make test-quick` runs two workers; `pytest -n 2` for the whole suite), the tests
    that share the session's tiny pipeline run on one worker, so it is reproduced once, not once per worker."""
    for item in items:
        if "tiny_repo" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("tiny_repo"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Under CI, a skip is a failure that says why the test could not run (sshd missing, say): `make test`
    sets up everything the tests need, so a skip there means the setup is broken, not that all is well."""
    outcome = yield
    report = outcome.get_result()
    if CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = f"skipped under CI={os.environ['CI']}, where every test must run: {reason}"


def pytest_unconfigure(config: pytest.Config) -> None:
    """The session is over: spare the interpreter's last garbage collection over every object torch and
    transformers made (about 2 s a process, and xdist waits for each worker to exit). Fixtures are torn down by now."""
    gc.freeze()


@pytest.fixture(scope="session")
def tiny_model() -> tuple[Any, Any]:
    """(model, processor): TINY_MODEL built once per session for the contract's vision and target.

    Building reads SmolLM2's tokenizer from its GGUF (seconds); a test that trains deep-copies the model.
    """
    from src.config.settings import Builder
    from src.model import hf_vlm

    model, processor = hf_vlm.build(Builder.model_validate(TINY_MODEL), CONTRACT.vision)
    hf_vlm.configure(model, processor, CONTRACT.vision, CONTRACT.target)
    return model, processor


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline, reproduced once per test session."""
    repo = make_repo(tmp_path_factory.mktemp("tiny") / "repo", TINY)
    run(["dvc", "repro"], repo)
    return repo
