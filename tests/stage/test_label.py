"""label: the manifest provider, overrides, the audit page, and the VLM teacher against a real
loopback OpenAI-compatible server (testkit/openai_server.py) through the real `openai` client,
and (slow) against llama-cpp-python's own server serving a tiny SmolVLM built here."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from src.config.paths import ROOT
from src.data.files import read_jsonl, write_jsonl
from src.stages.label import run as label_stage
from testkit.http_server import wait_for
from testkit.openai_server import LLAMA_CPP_REFUSAL, FakeOpenAI
from testkit.photos import make_canvases
from testkit.project import CONTRACT, params_for, project_params

LABELS = CONTRACT.labels
KEY = "sk-test-LEAKCANARY-" + uuid.uuid4().hex


def params(base_url: str = "http://127.0.0.1:1/v1", **changes: Any) -> dict[str, Any]:
    """The repo's declared label params, pointed at the fake server, with test-sized delays."""
    p = copy.deepcopy(params_for("label"))
    lp = p["label"]
    lp.update(provider="teacher", concurrency=3, backoff_s=0.05, max_failure_rate=0.0)
    lp["teacher"].update(base_url=base_url, timeout_s=3.0)  # room for a loaded CI machine
    lp["batch"].update(poll_s=0.05, wait_s=5)
    for dotted, value in changes.items():
        node = lp
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return p


def run_stage(tmp: Path, p: dict[str, Any], overrides: Path | None = None) -> dict[str, Any]:
    out = tmp / "label"
    shutil.rmtree(out, ignore_errors=True)  # as DVC does before a run: the cache must not live here
    return label_stage(tmp / "resize256", out, tmp / "metrics/label.json", tmp / "cache", overrides, p)


def labels_by_sha(tmp: Path) -> dict[str, dict[str, Any]]:
    return {r["canvas_sha256"]: r for r in read_jsonl(tmp / "label/labels.jsonl")}


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    return KEY


# -- manifest (the default), overrides, audit ------------------------------------------------------

def test_default_provider_is_manifest_and_needs_no_key_or_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    truth = make_canvases(tmp_path / "resize256", 6)
    p = params_for("label")
    assert p["label"]["provider"] == "manifest"
    m = run_stage(tmp_path, p)
    rows = labels_by_sha(tmp_path)
    assert {s: r["element"] for s, r in rows.items()} == truth
    assert {r["provider"] for r in rows.values()} == {"manifest"}
    assert m["canvases"] == 6 and m["failed"] == 0 and m["requests"] == 0 and m["cost_usd"] == 0
    assert set(read_jsonl(tmp_path / "label/labels.jsonl")[0]) == {
        "id", "name", "canvas", "canvas_sha256", "element", "status", "error", "provider", "reason"}


def test_overrides_win_and_the_audit_page_lists_by_element(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_canvases(tmp_path / "resize256", 6)
    recs = read_jsonl(tmp_path / "resize256/records.jsonl")
    sha0 = recs[0]["canvas_sha256"]
    ov = tmp_path / "overrides.csv"
    ov.write_text("# reviewed 2024-05\nkey,element,note\n"
                  f"{sha0},metal,rusty bucket\nimg-001,fire,\nimg-999,wood,gone\n")
    recs[2]["label"] = "plasma"  # a bad source label: failed, and shown as failed
    write_jsonl(tmp_path / "resize256/records.jsonl", recs)
    p = params_for("label")
    p["label"]["max_failure_rate"] = 0.5
    capsys.readouterr()
    m = run_stage(tmp_path, p, ov)
    # below the gate too, the failed canvas is named on the console with its cause
    assert (f"label: 1 failed (every one with its cause in {tmp_path / 'label' / 'labels.jsonl'}):\n"
            "  img-002: source label 'plasma' is not one of") in capsys.readouterr().out
    rows = {r["id"]: r for r in read_jsonl(tmp_path / "label/labels.jsonl")}
    by_sha = labels_by_sha(tmp_path)
    assert by_sha[sha0]["element"] == "metal" and by_sha[sha0]["provider"] == "override"
    assert "rusty bucket" in by_sha[sha0]["reason"] and "manifest said water" in by_sha[sha0]["reason"]
    assert rows["img-001"]["element"] == "fire" and rows["img-001"]["provider"] == "override"
    assert rows["img-002"]["status"] == "failed" and "plasma" in rows["img-002"]["error"]
    assert m["overrides_applied"] == 2 and m["overrides_unused"] == 1 and m["failed"] == 1
    page = (tmp_path / "label/audit.html").read_text()
    assert page.count("<img ") == 6 and page.count("data:image/jpeg;base64,") == 6
    for element in set(rows[i]["element"] for i in rows if rows[i]["status"] == "ok"):
        assert f"data-label='{element}'" in page and f"<option>{element}</option>" in page
    assert "data-label='failed'" in page and "rusty bucket" in page and "class='override'" in page
    # the gate: one failure in six is over 10 %, and the outputs are still there to review
    p["label"]["max_failure_rate"] = 0.1
    with pytest.raises(SystemExit, match=r"1/6 canvases failed .*img-002"):
        run_stage(tmp_path, p, ov)
    assert (tmp_path / "label/labels.jsonl").exists() and (tmp_path / "label/audit.html").exists()
    ov.write_text("key,element,note\nimg-001,plasma,\n")
    with pytest.raises(SystemExit, match=r"row 2 .*plasma"):
        run_stage(tmp_path, p, ov)


# -- the teacher, online -----------------------------------------------------------------------------

def test_teacher_survives_every_fault_and_caches_every_answer(tmp_path: Path, key: str) -> None:
    truth = make_canvases(tmp_path / "resize256", 10)
    s = sorted(truth)
    faults = {s[0]: ["429"], s[1]: ["500", "500"], s[2]: ["timeout"], s[3]: ["malformed"], s[4]: ["offenum"],
              s[5]: ["garbage"], s[6]: ["429", "offenum", "500"]}
    with FakeOpenAI(truth, key, faults=faults, retry_after=1.0, hang_s=6.0) as srv:
        m = run_stage(tmp_path, params(srv.base_url))
        rows = labels_by_sha(tmp_path)
        assert {sha: r["element"] for sha, r in rows.items()} == truth  # every canvas right, despite the faults
        assert all(r["status"] == "ok" and r["provider"] == "teacher" and r["reason"] for r in rows.values())
        assert srv.chat_requests == 10 + 10 == m["requests"]  # one per canvas, one per fault
        assert (m["rate_limited"], m["server_errors"], m["timeouts"], m["invalid_answers"]) == (2, 4, 1, 3)
        assert m["asked"] == 10 and m["cache_hits"] == 0 and m["tokens_in"] > 0 and m["tokens_out"] > 0
        assert m["cost_usd"] == pytest.approx((m["tokens_in"] * 0.15 + m["tokens_out"] * 0.60) / 1e6, rel=1e-4)
        (t429, f429), (t_ok, _) = srv.times(s[0])
        assert f429 == "429" and t_ok - t429 >= 1.0  # Retry-After: 1 honoured
        # ... by every worker, not only the refused one: within the pause, only the requests the other two workers
        # had already sent when the 429 reached the client (one each) arrive; and never more than `concurrency` at once
        assert len([r for r in srv.log if t429 < r.at < t429 + 1.0]) <= 3 - 1
        assert srv.max_in_flight <= 3
        # DVC deletes the outs; the cache outlives them: a second run asks nothing
        m2 = run_stage(tmp_path, params(srv.base_url))
        assert srv.chat_requests == 20 and m2["requests"] == 0 and m2["cache_hits"] == 10
        assert {sha: r["element"] for sha, r in labels_by_sha(tmp_path).items()} == truth
        paid_for_labels = sum(r["cost_usd"] for r in read_jsonl(tmp_path / "cache/answers.jsonl"))
        assert m2["cost_usd"] == 0 and paid_for_labels > 0 and m2["cost_labels_usd"] == pytest.approx(paid_for_labels)
        # a week's new photos: k new canvases, exactly k requests
        truth.update(make_canvases(tmp_path / "resize256", 3, start=10))
        m3 = run_stage(tmp_path, params(srv.base_url))
        assert srv.chat_requests == 23 and m3["requests"] == 3 and m3["cache_hits"] == 10
        # a new teacher prompt re-labels everything
        m4 = run_stage(tmp_path, params(srv.base_url, teacher__prompt="Which element? {labels}"))
        assert srv.chat_requests == 36 and m4["requests"] == 13 and m4["cache_hits"] == 0
        assert m4["distribution"] == {e: list(truth.values()).count(e) for e in LABELS}


def test_teacher_records_what_never_succeeds_as_failed_and_gates_on_it(tmp_path: Path, key: str) -> None:
    truth = make_canvases(tmp_path / "resize256", 6)
    s = sorted(truth)
    always = {s[0]: "offenum", s[1]: "malformed", s[2]: "500", s[3]: "echo_key"}
    with FakeOpenAI(truth, key, always=always) as srv:
        p = params(srv.base_url, max_attempts=3, answer_attempts=2, max_failure_rate=0.7)
        m = run_stage(tmp_path, p)
        rows = labels_by_sha(tmp_path)
        assert len(rows) == 6 and m["labelled"] == 2 and m["failed"] == 4  # each labelled or recorded failed
        assert "'plasma' is not one of" in rows[s[0]]["error"] and "not JSON" in rows[s[1]]["error"]
        assert "HTTP 500" in rows[s[2]]["error"] and "HTTP 400" in rows[s[3]]["error"]
        assert key not in rows[s[3]]["error"] and "[redacted]" in rows[s[3]]["error"]
        # answer_attempts, answer_attempts, max_attempts, and no retry of a 400
        assert [len(srv.times(x)) for x in s[:4]] == [2, 2, 3, 1]
        assert all(rows[x]["status"] == "ok" for x in s[4:])
        # failures are not cached: the next run asks for those four again, and only those
        before = srv.chat_requests
        p["label"]["max_failure_rate"] = 0.5
        with pytest.raises(SystemExit, match=r"4/6 canvases failed \(66.7% > label.max_failure_rate 50.0%\)"):
            run_stage(tmp_path, p)
        assert srv.chat_requests - before == 8
        assert json.loads((tmp_path / "metrics/label.json").read_text())["asked"] == 4


def test_teacher_fails_fast_on_a_missing_or_wrong_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    truth = make_canvases(tmp_path / "resize256", 3)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with FakeOpenAI(truth, KEY) as srv:
        with pytest.raises(SystemExit, match="environment variable OPENAI_API_KEY"):
            run_stage(tmp_path, params(srv.base_url))
        assert srv.count() == 0
        monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
        with pytest.raises(SystemExit, match="HTTP 401"):
            run_stage(tmp_path, params(srv.base_url, concurrency=1))
        assert srv.count() == 1  # stopped at the first refusal, not one 401 per canvas


def test_the_cache_survives_a_line_torn_by_a_kill(tmp_path: Path) -> None:
    from src.labeling.answer_cache import AnswerCache

    (tmp_path / "answers.jsonl").write_text('{"key": "a", "element": "fire"}\n{"key": "b", "elem')
    cache = AnswerCache(tmp_path)
    assert "a" in cache and "b" not in cache
    cache.put({"key": "c", "element": "wood"})
    assert [r["key"] for r in read_jsonl(tmp_path / "answers.jsonl")] == ["a", "c"]


def test_cache_key_is_canvas_model_prompt_schema() -> None:
    from src.config.settings import Label
    from src.labeling.teacher.request import cache_key

    cfg = Label.model_validate(params("http://127.0.0.1:1/v1")["label"])
    k = cache_key("a" * 64, cfg, LABELS)
    assert k == cache_key("a" * 64, Label.model_validate(params("http://elsewhere/v1", concurrency=9)["label"]), LABELS)
    assert k != cache_key("b" * 64, cfg, LABELS)
    assert k != cache_key("a" * 64, Label.model_validate(params(teacher__model="other")["label"]), LABELS)
    assert k != cache_key("a" * 64, Label.model_validate(params(teacher__prompt="x {labels}")["label"]), LABELS)
    assert k != cache_key("a" * 64, cfg, (*LABELS, "void"))  # the schema's enum


# -- servers that take another form of the request --------------------------------------------------

def test_a_refused_field_stops_the_stage_in_one_line_naming_it(tmp_path: Path, key: str) -> None:
    truth = make_canvases(tmp_path / "resize256", 4)
    with FakeOpenAI(truth, key, dialect="llama-cpp-python") as srv:
        # OpenAI's json_schema, sent to llama-cpp-python: a complaint about the request, sent as a 500
        with pytest.raises(SystemExit) as e:
            run_stage(tmp_path, params(srv.base_url, concurrency=1))
        line = str(e.value)
        assert "\n" not in line and srv.base_url in line
        assert ("refused the request's response_format (label.teacher.response_format=json_schema): HTTP 500: "
                "Input should be 'text' or 'json_object'; try label.teacher.response_format=json_object for llama-cpp-python "
                "(docs/labels.md: Teacher servers)") in line
        assert srv.chat_requests == 1  # not retried six times, nor asked again for the next canvas
        # its own form, but the token limit in the field it does not read: the answer ran to the context's end
        with pytest.raises(SystemExit, match=r"ignored max_completion_tokens: an answer ran to \d+ tokens, over "
                                             r"label.teacher.max_tokens=100; try label.teacher.max_tokens_field=max_tokens"):
            run_stage(tmp_path, params(srv.base_url, concurrency=1, teacher__response_format="json_object"))
        assert srv.chat_requests == 2
        m = run_stage(tmp_path, params(srv.base_url, teacher__response_format="json_object",
                                       teacher__max_tokens_field="max_tokens"))
        assert {sha: r["element"] for sha, r in labels_by_sha(tmp_path).items()} == truth
        assert m["requests"] == 4 and srv.chat_requests == 6 and m["failed"] == 0
        # vLLM's bounded form is OpenAI's wrapper too: refused the same way; the line names both other forms
        with pytest.raises(SystemExit, match=r"\(label.teacher.response_format=json_schema_bounded\): HTTP 500: Input "
                                             r"should be 'text' or 'json_object'; try label.teacher.response_format="
                                             r"json_object for llama-cpp-python or json_schema for OpenAI \(docs/labels.md: Teacher servers\)"):
            run_stage(tmp_path, params(srv.base_url, concurrency=1, teacher__prompt="again: {labels}",
                                       teacher__response_format="json_schema_bounded"))
        assert srv.chat_requests == 7
    with FakeOpenAI(truth, key, dialect="openai-reasoning") as srv:  # max_tokens refused with a 400 naming it
        with pytest.raises(SystemExit, match=r"refused the request's max_tokens \(label.teacher.max_tokens_field="
                                             r"max_tokens\): HTTP 400: Unsupported parameter"):
            run_stage(tmp_path, params(srv.base_url, concurrency=1, teacher__prompt="again: {labels}",
                                       teacher__max_tokens_field="max_tokens"))
        assert srv.chat_requests == 1


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("response_format", "xml", "json_schema, json_object, json_schema_bounded"),
    ("max_tokens_field", "n_predict", "max_completion_tokens, max_tokens")])
def test_an_unknown_request_form_is_one_line_before_any_request(field: str, value: str, expected: str) -> None:
    """The schema refuses it as the stage starts (src.config.params.stage_params validates first): one line, no request."""
    from src.config.schema import ParamsError, validate

    p = project_params()
    p["label"]["teacher"][field] = value
    with pytest.raises(ParamsError) as e:
        validate(p)
    assert e.value.lines == [f"params.yaml: label.teacher.{field} = {value!r}: not a known value; expected one of {expected}"]


def test_the_openai_request_is_unchanged_and_the_grammar_form_bounds_the_reason(tmp_path: Path, key: str) -> None:
    from src.config.settings import Label
    from src.labeling.teacher.request import request_body

    body = request_body(Label.model_validate(params("http://127.0.0.1:1/v1")["label"]), LABELS, b"png")
    # OpenAI's strict form, as it was before the bound: nothing outside the subset OpenAI accepts
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "element_label", "strict": True, "schema": {
        "type": "object", "properties": {"element": {"type": "string", "enum": list(LABELS)},
                                         "reason": {"type": "string", "description": "a few words: what in the image decided it"}},
        "required": ["element", "reason"], "additionalProperties": False}}}
    assert body["max_completion_tokens"] == 100 and "max_tokens" not in body
    local = request_body(Label.model_validate(params(teacher__response_format="json_object",
                                                          teacher__max_tokens_field="max_tokens")["label"]), LABELS, b"png")
    # 59 = 100 - len('{"element":"metal","reason":""}') (31) - 9 optional spaces - 1 end-of-text token
    assert local["response_format"]["schema"]["properties"]["reason"] == {
        "type": "string", "description": "a few words: what in the image decided it",
        "maxLength": 59, "pattern": "^[ !#-Z^-~]{0,59}$"}
    assert local["max_tokens"] == 100
    # vLLM's form: OpenAI's wrapper, the same bound as a pattern alone (xgrammar drops maxLength beside a pattern)
    vllm = request_body(Label.model_validate(params(teacher__response_format="json_schema_bounded",
                                                         teacher__max_tokens_field="max_tokens")["label"]), LABELS, b"png")
    bounded = copy.deepcopy(body["response_format"])
    bounded["json_schema"]["schema"]["properties"]["reason"]["pattern"] = "^[ !#-Z^-~]{0,59}$"
    assert vllm["response_format"] == bounded and vllm["max_tokens"] == 100
    # a budget with no room for a reason is a config error, before any request
    make_canvases(tmp_path / "resize256", 2)
    for form in ("json_object", "json_schema_bounded"):
        with pytest.raises(SystemExit, match=rf"^label: label.teacher.max_tokens=41 leaves no room for the reason: the "
                                             rf"rest of the answer takes up to 41 tokens in the {form} form; set it above 41$"):
            run_stage(tmp_path, params("http://127.0.0.1:1/v1", teacher__response_format=form, teacher__max_tokens=41))


def test_a_cut_off_answer_is_asked_once_more_with_room_then_names_the_param(tmp_path: Path, key: str) -> None:
    from src.config.settings import Label
    from src.labeling.teacher.request import retry_budget

    truth = make_canvases(tmp_path / "resize256", 4)
    s = sorted(truth)
    with FakeOpenAI(truth, key, faults={s[0]: ["cutoff"]}, always={s[1]: "cutoff"}) as srv:
        p = params(srv.base_url, answer_attempts=1, max_failure_rate=0.5)
        room = retry_budget(Label.model_validate(p["label"]))
        assert room == 100 + 9 * 21  # llama-server's grammar: up to 22 whitespace characters after each JSON token
        m = run_stage(tmp_path, p)
        rows = labels_by_sha(tmp_path)
        # the retry is not one of label.answer_attempts (1 here): the same question, with room to finish
        assert rows[s[0]]["element"] == truth[s[0]] and srv.budgets(s[0]) == [100, room]
        assert rows[s[1]]["status"] == "failed" and srv.budgets(s[1]) == [100, room]  # once, not again and again
        assert rows[s[1]]["error"] == (f"answer cut off at max_completion_tokens=100 and again at {room}: "
                                       "label.teacher.response_format=json_schema leaves the reason unbounded; "
                                       "raise label.teacher.max_tokens (docs/labels.md: Teacher servers)")
        assert srv.budgets(s[2]) == [100] and m["failed"] == 1 and m["invalid_answers"] == 3
    # a grammar server that did not honour the bound: the line says so
    with FakeOpenAI(truth, key, dialect="llama-cpp-python", always={s[2]: "cutoff"}) as srv:
        run_stage(tmp_path, params(srv.base_url, max_failure_rate=0.5, teacher__prompt="again: {labels}",
                                   teacher__response_format="json_object", teacher__max_tokens_field="max_tokens"))
        assert srv.budgets(s[2]) == [100, room]
        assert labels_by_sha(tmp_path)[s[2]]["error"] == (
            f"answer cut off at max_tokens=100 and again at {room}: the schema bounds the reason to 59 characters, "
            "so this server does not honour the schema's pattern; raise label.teacher.max_tokens (docs/labels.md: Teacher servers)")


def test_the_vllm_form_bounds_the_reason_on_the_wire_and_a_rambler_closes(tmp_path: Path, key: str) -> None:
    """json_schema_bounded against a server that decodes the schema as a grammar with a rambling model
    ("ramble": the reason as long as the schema's pattern allows, else to the budget). The bounded form
    closes every answer in one request; OpenAI's form, as the server receives it unchanged, is cut off twice."""
    truth = make_canvases(tmp_path / "resize256", 4)
    with FakeOpenAI(truth, key, always={s: "ramble" for s in truth}) as srv:
        m = run_stage(tmp_path, params(srv.base_url, teacher__response_format="json_schema_bounded",
                                       teacher__max_tokens_field="max_tokens"))
        rows = labels_by_sha(tmp_path)
        assert {s: r["element"] for s, r in rows.items()} == truth and m["failed"] == 0
        assert all(len(r["reason"]) == 59 for r in rows.values())  # it rambled up to the bound, and closed
        assert srv.chat_requests == 4 == m["requests"] and {b for s in truth for b in srv.budgets(s)} == {100}
        received = srv.response_formats()
        assert len(received) == 4 and all(
            rf["type"] == "json_schema" and rf["json_schema"]["strict"] is True
            and rf["json_schema"]["schema"]["properties"]["reason"]["pattern"] == "^[ !#-Z^-~]{0,59}$"
            and "maxLength" not in rf["json_schema"]["schema"]["properties"]["reason"] for rf in received)
        # OpenAI's form: received as it always was, no bound; the same rambler runs through both budgets
        p = params(srv.base_url, max_failure_rate=1.0, teacher__prompt="again: {labels}")
        m = run_stage(tmp_path, p)
        openai_form = {"type": "json_schema", "json_schema": {"name": "element_label", "strict": True, "schema": {
            "type": "object", "properties": {"element": {"type": "string", "enum": list(LABELS)},
                                             "reason": {"type": "string",
                                                        "description": "a few words: what in the image decided it"}},
            "required": ["element", "reason"], "additionalProperties": False}}}
        assert srv.response_formats()[4:] == [openai_form] * 8
        assert m["failed"] == 4 and m["requests"] == 8
        assert {r["error"] for r in labels_by_sha(tmp_path).values()} == {
            "answer cut off at max_completion_tokens=100 and again at 289: label.teacher.response_format=json_schema "
            "leaves the reason unbounded; raise label.teacher.max_tokens (docs/labels.md: Teacher servers)"}
        # a server that ignores the pattern (or pads the JSON): cut off twice, the line says which param
        srv.always.update({x: "cutoff" for x in truth})
        run_stage(tmp_path, params(srv.base_url, max_failure_rate=1.0, teacher__prompt="third: {labels}",
                                   teacher__response_format="json_schema_bounded", teacher__max_tokens_field="max_tokens"))
        assert {r["error"] for r in labels_by_sha(tmp_path).values()} == {
            "answer cut off at max_tokens=100 and again at 289: the schema bounds the reason to 59 characters, so this "
            "server does not honour the schema's pattern or pads the JSON with whitespace (vLLM: set "
            "disable_any_whitespace); raise label.teacher.max_tokens (docs/labels.md: Teacher servers)"}


def test_the_bounded_schema_closes_every_answer_within_max_tokens_under_llama_cpp_pythons_grammar() -> None:
    """The schema the json_object request sends, compiled as llama-cpp-python's server compiles it
    (llama_grammar.json_schema_to_gbnf), decoded on the real SmolLM2 vocabulary by the worst rambler:
    it prefers the shortest tokens, escapes and whitespace above all, and a quote only when nothing else is allowed.
    The unbounded schema (OpenAI's form) lets the same rambler run past the budget."""
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    from src.config.settings import Label
    from src.labeling.teacher.request import answer_schema, request_body
    from src.model.hf_vlm import smollm2_gguf
    from src.runtime.grammar import Constraint
    from src.runtime.llama_vlm import silence

    cfg = Label.model_validate(params(teacher__response_format="json_object", teacher__max_tokens_field="max_tokens")["label"])
    bounded = request_body(cfg, LABELS, b"png")["response_format"]["schema"]
    silence()
    llm = Llama(str(smollm2_gguf()), vocab_only=True, verbose=False)
    try:
        n, vocab = llm.n_vocab(), llm._model.vocab
        # A token's length as the grammar may see it: its piece, or its text where the piece is empty (some
        # tokens, 48 dashes among them, detokenize to nothing yet match the grammar as their text).
        pieces = [llm.detokenize([i], special=True) or llama_cpp.llama_vocab_get_text(vocab, i) for i in range(n)]
        # shortest first; a backslash (an escape: two or six tokens for one character) and whitespace above all
        rambler = np.array([-len(x) + (0.9 if x == b"\\" else 0.5 if x and not x.strip() else 0.0)
                            - (100.0 if b'"' in x else 0.0) for x in pieces], dtype=np.float32)
        end = [i for i in range(n) if llama_cpp.llama_vocab_is_eog(vocab, i)]
        rambler[end] = -1000.0  # ends only when the grammar allows nothing else

        def ramble(schema: dict[str, Any]) -> tuple[list[int], bool]:
            out: list[int] = []
            with Constraint(vocab, json_schema_to_gbnf(json.dumps(schema)), n) as c:
                while len(out) < cfg.teacher.max_tokens:
                    tok = int(np.argmax(c.mask(rambler)))
                    if tok in end:  # llama-cpp-python stops at any end-of-generation token
                        return out, True
                    c.accept(tok)
                    out.append(tok)
            return out, False

        out, closed = ramble(bounded)
        answer = json.loads(llm.detokenize(out))
        # llama-cpp-python stops at `length` once it holds max_tokens tokens: the end-of-text token needs one more
        assert closed and len(out) <= cfg.teacher.max_tokens - 1, (len(out), llm.detokenize(out))
        assert answer["element"] in LABELS and len(answer["reason"]) == 59  # it rambled up to the bound
        out, closed = ramble(answer_schema(LABELS))
        assert not closed  # unbounded, the same rambler runs through the whole budget
    finally:
        llm.close()


def test_refused_field_reads_each_servers_complaint() -> None:
    from src.labeling.teacher.request import refused_field

    # llama-cpp-python: pydantic's error quoted in a 500
    assert refused_field(500, {"message": LLAMA_CPP_REFUSAL}, "Error code: 500 - " + LLAMA_CPP_REFUSAL) == (
        "response_format", "Input should be 'text' or 'json_object'")
    # FastAPI's own 422; OpenAI's `param`, which names the field even where the message names two
    assert refused_field(422, {"detail": [{"loc": ["body", "max_tokens"], "msg": "Input should be a valid integer"}]},
                         "Error code: 422") == ("max_tokens", "Input should be a valid integer")
    msg = "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead."
    assert refused_field(400, {"param": "max_tokens", "message": msg}, f"Error code: 400 - {msg}")[0] == "max_tokens"
    assert refused_field(400, {"message": "x"}, "Error code: 400 - temperature: unsupported value 0.0")[0] == "temperature"
    # not a refused field: a crash, a complaint about this canvas, a field no param chooses
    assert refused_field(500, {"message": "CUDA error: out of memory"}, "Error code: 500 - CUDA error: out of memory") is None
    assert refused_field(500, {"message": "max_tokens went wrong"}, "Error code: 500 - invalid max_tokens state") is None
    assert refused_field(400, {"message": "bad request from Bearer sk-1"}, "Error code: 400 - bad request") is None
    assert refused_field(400, {"param": "messages", "message": "Invalid image"}, "Error code: 400 - Invalid image") is None


# -- the teacher, batch mode ---------------------------------------------------------------------------

def test_batch_mode_submits_once_resumes_after_restart_and_imports_into_the_cache(tmp_path: Path, key: str) -> None:
    truth = make_canvases(tmp_path / "resize256", 8)
    s = sorted(truth)
    with FakeOpenAI(truth, key, faults={s[0]: ["offenum"]}, batch_polls=2) as srv:
        p = params(srv.base_url, teacher__mode="batch", max_failure_rate=0.2)
        p["label"]["batch"]["wait_s"] = 0
        with pytest.raises(SystemExit, match="still running .* rerun to resume polling"):
            run_stage(tmp_path, p)
        assert len(srv.batches) == 1 and srv.chat_requests == 0
        first = srv.count()
        log = tmp_path / "cache/batches.jsonl"
        assert [r["event"] for r in read_jsonl(log)] == ["uploaded", "submitted"]
        # killed after the upload, before the batch id was logged: the restart finds the batch, not a new one
        log.write_text(log.read_text().splitlines()[0] + "\n")
        p["label"]["batch"]["wait_s"] = 5
        m = run_stage(tmp_path, p)
        assert len(srv.batches) == 1 and srv.chat_requests == 0
        rows = labels_by_sha(tmp_path)
        assert rows[s[0]]["status"] == "failed" and "plasma" in rows[s[0]]["error"]
        assert {x: rows[x]["element"] for x in s[1:]} == {x: truth[x] for x in s[1:]}
        assert m["cost_usd"] == pytest.approx((m["tokens_in"] * 0.15 + m["tokens_out"] * 0.60) / 1e6 * 0.5, rel=1e-4)
        assert m["requests"] == srv.count() - first  # list (to adopt), polls, result download
        # the failure was not cached: a rerun submits a batch of one, and gets it right
        m2 = run_stage(tmp_path, p)
        assert len(srv.batches) == 2 and m2["batch_lines"] == 1 and m2["failed"] == 0
        assert {sha: r["element"] for sha, r in labels_by_sha(tmp_path).items()} == truth
        before = srv.count()
        m3 = run_stage(tmp_path, p)
        assert srv.count() == before and m3["requests"] == 0 and m3["cache_hits"] == 8


def test_batch_mode_asks_a_cut_off_answer_once_more_in_a_follow_up_batch_and_resumes_without_paying_twice(
        tmp_path: Path, key: str) -> None:
    from src.config.settings import Label
    from src.labeling.teacher.request import retry_budget

    truth = make_canvases(tmp_path / "resize256", 4)
    s = sorted(truth)
    with FakeOpenAI(truth, key, faults={s[0]: ["cutoff"]}, always={s[1]: "cutoff"}) as srv:
        p = params(srv.base_url, teacher__mode="batch", max_failure_rate=0.5, answer_attempts=1)
        room = retry_budget(Label.model_validate(p["label"]))
        m = run_stage(tmp_path, p)
        rows = labels_by_sha(tmp_path)
        # the follow-up batch holds the two cut-off requests only, with the room the bound needs
        assert len(srv.batches) == 2 and m["batches_submitted"] == 2 and m["batch_lines"] == 4 + 2
        assert srv.budgets(s[0]) == srv.budgets(s[1]) == [100, room] and srv.budgets(s[2]) == [100]
        assert rows[s[0]]["element"] == truth[s[0]] and rows[s[0]]["status"] == "ok"
        assert rows[s[1]]["status"] == "failed" and rows[s[1]]["error"] == (
            f"batch batch_0002: answer cut off at max_completion_tokens=100 and again at {room}: "
            "label.teacher.response_format=json_schema leaves the reason unbounded; raise label.teacher.max_tokens "
            "(docs/labels.md: Teacher servers)")
        assert {x: rows[x]["element"] for x in s[2:]} == {x: truth[x] for x in s[2:]}
        assert m["failed"] == 1 and m["invalid_answers"] == 3  # two cut off in the first batch, one in the follow-up
        log = tmp_path / "cache/batches.jsonl"
        events = [(r["event"], r.get("batch_id"), r.get("budget")) for r in read_jsonl(log)]
        assert [e for e, _, _ in events] == ["uploaded", "submitted", "uploaded", "submitted", "imported", "imported"]
        assert events[3] == ("submitted", "batch_0002", room) and events[4][1] == "batch_0001"
        # killed after the follow-up was submitted, before the first batch was logged imported (and so before the
        # follow-up's answers landed): the restart imports the first batch again, and asks nothing again
        log.write_text("".join(line + "\n" for line in log.read_text().splitlines()[:4]))
        answers = tmp_path / "cache/answers.jsonl"
        write_jsonl(answers, [r for r in read_jsonl(answers) if r["canvas_sha256"] != s[0]])
        lines_before = srv.count("BATCH", "batch-line")
        m2 = run_stage(tmp_path, p)
        assert len(srv.batches) == 2 and srv.count("BATCH", "batch-line") == lines_before and m2["batch_lines"] == 0
        rows = labels_by_sha(tmp_path)
        assert rows[s[0]]["element"] == truth[s[0]] and rows[s[1]]["error"].startswith("batch batch_0002: answer cut off")
        assert m2["failed"] == 1


# -- as DVC runs it: a subprocess in a copy of the repo ----------------------------------------------

def repo_copy(tmp: Path, **changes: Any) -> Path:
    """src/, dvc.yaml and params.yaml (label params changed) in tmp/repo, where stage_params reads them."""
    repo = tmp / "repo"
    shutil.copytree(ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    params_yaml = project_params()
    params_yaml["label"] = params(**changes)["label"]  # every label leaf is declared, so this is all of it
    (repo / "params.yaml").write_text(yaml.safe_dump(params_yaml, sort_keys=False))
    return repo


def stage_cmd(repo: Path) -> list[str]:
    return [sys.executable, "-m", "src.stages.label", "data/resize256", "data/label", "metrics/label.json",
            "--cache", ".cache/label", "--overrides", "data/label_overrides.csv"]


def env_with(key: str) -> dict[str, str]:
    return {**os.environ, "OPENAI_API_KEY": key, "PYTHONPATH": ""}


def test_a_killed_run_resumes_without_paying_twice(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    truth = make_canvases(repo / "data/resize256", 12)
    with FakeOpenAI(truth, KEY, hold_from=6) as srv:
        repo_copy(tmp_path, teacher__base_url=srv.base_url, concurrency=1)
        proc = subprocess.Popen(stage_cmd(repo), cwd=repo, env=env_with(KEY),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # the sixth request is held unanswered: killed then, the run has five answers paid for and one in flight
        answers = repo / ".cache/label/answers.jsonl"
        assert wait_for(lambda: srv.chat_requests >= 6 and len(read_jsonl(answers)) >= 5 or proc.poll() is not None,
                        timeout_s=120), "the run neither asked six times nor cached five answers"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        srv.release()
        paid = srv.chat_requests
        cached = read_jsonl(answers)
        assert (paid, len(cached)) == (6, 5)  # every answer received was journalled; only the one in flight is lost
        res = subprocess.run(stage_cmd(repo), cwd=repo, env=env_with(KEY), capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert srv.chat_requests - paid == 12 - len(cached)  # the rest, and nothing already answered
        assert srv.max_in_flight == 1  # label.concurrency
        assert json.loads((repo / "metrics/label.json").read_text())["cache_hits"] == len(cached)
        rows = read_jsonl(repo / "data/label/labels.jsonl")
        assert {r["canvas_sha256"]: r["element"] for r in rows} == truth


def test_the_api_key_is_never_written_anywhere(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    truth = make_canvases(repo / "data/resize256", 6)
    s = sorted(truth)
    faults = {s[0]: ["429", "echo_key"], s[1]: ["500", "timeout"], s[2]: ["malformed"], s[3]: ["offenum"]}
    with FakeOpenAI(truth, KEY, faults=faults, always={s[4]: "echo_key"}, hang_s=5.0) as srv:
        outputs = []
        for mode in ("online", "batch"):  # a prompt per mode, so the batch run asks for everything again
            repo_copy(tmp_path, teacher__base_url=srv.base_url, teacher__mode=mode, max_failure_rate=0.5,
                      teacher__prompt=f"{mode}: {{labels}}")
            res = subprocess.run(stage_cmd(repo), cwd=repo, env=env_with(KEY), capture_output=True, text=True, timeout=60)
            assert res.returncode == 0, res.stderr
            outputs += [res.stdout, res.stderr]
            if mode == "online":  # the server echoed the key in two errors: there was something to leak
                errors = [r["error"] for r in read_jsonl(repo / "data/label/labels.jsonl") if r["error"]]
                assert len(errors) == 2 and all("Bearer [redacted]" in e for e in errors)
        assert srv.count("POST", "/v1/chat/completions") > 6 and srv.count("POST", "/v1/batches") == 1
    written = [p for p in repo.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert len(written) > 10
    for p in written:
        assert KEY.encode() not in p.read_bytes(), p
    for text in outputs:
        assert KEY not in text


@pytest.mark.slow
def test_dvc_repro_keeps_the_cache_and_never_records_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real thing: `dvc repro label` in a fresh git + DVC repo, twice (the second --force, so DVC
    deletes data/label first). The second pays for nothing; no file DVC or git wrote holds the key."""
    from testkit.project import make_repo, run

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with FakeOpenAI({}, KEY, faults={}) as srv:  # unknown canvases all answer the first label
        repo = make_repo(tmp_path / "repo", {"download.demo.n": 12, "label.provider": "teacher",
                                             "label.teacher.base_url": srv.base_url})
        (repo / "data").mkdir(exist_ok=True)
        shutil.copy(ROOT / "data/label_overrides.csv", repo / "data/label_overrides.csv")
        run(["git", "add", "-A"], repo)
        first = run(["dvc", "repro", "label"], repo)
        asked = srv.chat_requests
        m = json.loads((repo / "metrics/label.json").read_text())
        assert asked == m["requests"] == m["canvases"] > 0 and m["failed"] == 0
        second = run(["dvc", "repro", "--force", "-s", "label"], repo)
        assert "Running stage 'label'" in second.stdout
        assert srv.chat_requests == asked  # DVC removed data/label; the cache outside it answered everything
        assert json.loads((repo / "metrics/label.json").read_text())["cache_hits"] == m["canvases"]
    lock = (repo / "dvc.lock").read_text()
    assert "label.teacher.api_key_env: OPENAI_API_KEY" in lock and "label.teacher.prompt" in lock
    for p in (p for p in repo.rglob("*") if p.is_file()):
        assert KEY.encode() not in p.read_bytes(), p
    for text in (first.stdout, first.stderr, second.stdout, second.stderr):
        assert KEY not in text


# -- a real local teacher: llama-cpp-python's own server --------------------------------------------


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """`python -m llama_cpp.server` on loopback, serving a tiny SmolVLM built, configured, converted and
    quantised here as the release's is (random weights, untouched): a teacher that rambles.
    Yields (base URL, server log)."""
    import gguf

    from src.config.contract import Contract
    from src.config.settings import Builder
    from src.model import hf_vlm
    from src.runtime.llama_build import convert
    from src.stages.quantize_q8 import quantize
    from testkit.project import TINY_MODEL

    tmp = tmp_path_factory.mktemp("llama")
    params_yaml = project_params()
    c = Contract.from_dict(params_yaml["contract"])
    model, processor = hf_vlm.build(Builder.model_validate(TINY_MODEL), c.vision)
    hf_vlm.configure(model, processor, c.vision, c.target)
    hf_vlm.save(model, processor, tmp / "hf")
    # the release's path: f32, then llama.cpp's Q8_0 quantiser; the mmproj in the release's outtype
    convert(tmp / "hf", tmp / "text-f32.gguf", "f32")
    quantize(tmp / "text-f32.gguf", tmp / "model.gguf", params_yaml["quantize_q8"]["ftype"])
    convert(tmp / "hf", tmp / "mmproj.gguf", params_yaml["convert_gguf"]["mmproj_outtype"], mmproj=True)
    # SmolVLM's chat template travels into the GGUF: what the server renders image parts with
    field = gguf.GGUFReader(tmp / "model.gguf").get_field("tokenizer.chat_template")
    assert field is not None and field.contents() == hf_vlm.SMOLVLM_CHAT_TEMPLATE
    log = (tmp / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(tmp / "model.gguf"),
                             "--clip_model_path", str(tmp / "mmproj.gguf"), "--chat_format", "mtmd",
                             "--host", "127.0.0.1", "--port", "0", "--n_threads", "1"],
                            stdout=log, stderr=subprocess.STDOUT)
    base_url = ""

    def up() -> bool:  # uvicorn binds port 0 itself and logs the port the kernel gave it
        nonlocal base_url
        if not base_url:
            port = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", (tmp / "server.log").read_text())
            if port is None:
                return proc.poll() is not None
            base_url = f"http://127.0.0.1:{port[1]}/v1"
        try:
            with urllib.request.urlopen(base_url + "/models", timeout=1) as r:
                return r.status == 200
        except OSError:
            return proc.poll() is not None  # died: stop waiting, the assert below says so

    try:
        assert wait_for(up, timeout_s=120, every_s=0.2) and proc.poll() is None, (tmp / "server.log").read_text()[-3000:]
        yield base_url, tmp / "server.log"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def served_chat_requests(log: Path) -> list[str]:
    """The server's own access log (uvicorn's): the status of every chat completion it answered."""
    return [line.rsplit('" ', 1)[1].split()[0] for line in log.read_text().splitlines()
            if '"POST /v1/chat/completions HTTP/1.1"' in line]


@pytest.mark.slow
def test_the_label_stage_against_llama_cpp_python_server(tmp_path: Path, key: str, llama_server: tuple[str, Path]) -> None:
    """An untrained tiny SmolVLM rambles; the grammar keeps its elements labels and the bounded
    reason closes every answer within label.teacher.max_tokens (docs/labels.md's settings, 10 canvases)."""
    base_url, log = llama_server
    truth = make_canvases(tmp_path / "resize256", 10)
    # OpenAI's form: the server refuses it (as a 500), and the stage says which field, after one request
    with pytest.raises(SystemExit, match=r"refused the request's response_format \(label.teacher.response_format="
                                         r"json_schema\): HTTP 500: Input should be 'text' or 'json_object'"):
        run_stage(tmp_path, params(base_url, concurrency=1))
    before = len(served_chat_requests(log))
    p = params(base_url, concurrency=1, max_failure_rate=0.2, teacher__response_format="json_object",
               teacher__max_tokens_field="max_tokens", teacher__timeout_s=60.0)
    m = run_stage(tmp_path, p)
    served = served_chat_requests(log)[before:]
    rows = labels_by_sha(tmp_path)
    assert set(rows) == set(truth) and m["canvases"] == 10 == m["labelled"] + m["failed"]
    assert m["labelled"] >= 8, [r["error"] for r in rows.values() if r["error"]]
    assert all(r["element"] in LABELS and len(r["reason"]) <= 59 for r in rows.values() if r["status"] == "ok")
    assert m["requests"] == len(served) and set(served) == {"200"} and m["server_errors"] == m["timeouts"] == 0
    assert m["invalid_answers"] == 0 and m["tokens_out"] <= 99 * m["requests"]  # every answer closed within max_tokens
    print(f"llama-cpp-python server: {m['labelled']}/10 labelled, {m['failed']} failed, {len(served)} chat requests "
          f"served (HTTP 200), {m['invalid_answers']} invalid answers, {m['tokens_out']} tokens out; reasons: "
          f"{sorted({r['reason'] for r in rows.values() if r['reason']})[:3]}")
