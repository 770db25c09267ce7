"""The teacher's request and its answer: config, the body in the server's own form, parsing, refusals, tally.

The request: the canvas as a base64 PNG (`detail` low by default) after the teacher
prompt, and a JSON schema whose `element` is an enum of the contract's labels, plus a
short `reason`. OpenAI-compatible servers differ in two fields, so params choose them:

  label.teacher.response_format  json_schema: OpenAI's strict Structured Outputs, unchanged (OpenAI)
                                 json_schema_bounded: the same form, `reason` bounded (vLLM, llama-server)
                                 json_object: {"type": "json_object", "schema": ...} (llama-cpp-python)
  label.teacher.max_tokens_field max_completion_tokens (OpenAI; its reasoning models refuse max_tokens)
                                 max_tokens (vLLM, llama-cpp-python, which ignores the other name)

Named by the form on the wire, not by server: a form is what a server reads, and one
form fits several servers. In the two bounded forms the schema also bounds `reason`
(`reason_bound`): servers that compile the schema into a grammar (llama.cpp's, vLLM's
guided decoding) then close every answer within max_tokens. The json_schema form stays
within OpenAI's strict subset, unchanged: `reason` unbounded.

The answer is still checked: servers differ in how strictly they honour a schema. A
server that refuses one of these fields (or ignores the token limit) is named in one
line by `refusal_line`, not retried: every request would be refused the same way. An
answer cut off at the token budget is asked once more with `retry_budget(cfg)` tokens
(online: at once; batch: in a follow-up batch).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, get_args

from src.config.settings import Label, MaxTokensField, ResponseFormat

SCHEMA_NAME = "element_label"
RESPONSE_FORMATS: tuple[str, ...] = get_args(ResponseFormat)
# The forms whose schema bounds `reason` (`reason_bound`), and which servers each suits (docs/labels.md: Teacher servers).
BOUNDED_FORMS = ("json_object", "json_schema_bounded")
SERVERS_OF_FORM = {"json_schema": "OpenAI", "json_schema_bounded": "vLLM/llama-server",
                   "json_object": "llama-cpp-python"}
MAX_TOKENS_FIELDS: tuple[str, ...] = get_args(MaxTokensField)
# Request fields whose form or value a param chooses: a refusal of one of them is a config error.
PARAM_OF_FIELD = {"response_format": "label.teacher.response_format",
                  "max_completion_tokens": "label.teacher.max_tokens_field",
                  "max_tokens": "label.teacher.max_tokens_field",
                  "temperature": "label.teacher.temperature",
                  "detail": "label.teacher.detail"}
_LOC = re.compile(r"""['"]loc['"]:\s*[(\[]([^)\]]*)[)\]]""")          # a pydantic error quoted in a message
_MSG = re.compile(r"""['"]msg['"]:\s*(?:"([^"]*)"|'([^']*)')""")
_COMPLAINT = re.compile(r"validation error|input should be|extra inputs|unrecognized|unsupported|unknown "
                        r"(?:parameter|field|argument)|not supported|not permitted|not allowed|invalid", re.I)


def cost(cfg: Label, tokens_in: int, tokens_out: int, batch: bool) -> float:
    """USD for one answer at label.price (batch_discount applies in batch mode)."""
    usd = (tokens_in * cfg.price.input_per_1m + tokens_out * cfg.price.output_per_1m) / 1e6
    return usd * (cfg.price.batch_discount if batch else 1.0)


@dataclass(frozen=True)
class Item:
    """One distinct request: records sharing a canvas share it."""

    key: str
    canvas_sha256: str
    png: Path


class TeacherFatal(RuntimeError):
    """No request can succeed (bad key, unknown model, no quota, a refused field): stop the run."""


class ItemFailed(RuntimeError):
    """This canvas got no valid answer within its attempts."""


class BadAnswer(ValueError):
    """The teacher answered, but not with one of the labels."""


class CutOff(BadAnswer):
    """The answer ran to the token budget before it closed."""


class BatchPending(RuntimeError):
    """Submitted batches are still running; a rerun resumes polling them."""


# -- the request -------------------------------------------------------------------------------

# The bound on `reason` in the bounded forms. Not `maxLength` alone: it counts characters,
# and one character can take several tokens (an escape like \u00e9, a 4-byte UTF-8 character
# in byte tokens). A pattern of printable ASCII without `"` `\` `[` `]` has no escapes and no
# multi-byte characters, and every token a llama.cpp grammar admits adds at least one byte
# (it masks empty pieces), so N characters take at most N tokens. Both converters llama.cpp's
# servers use (llama_grammar.py in llama-cpp-python 0.3.36, common/json-schema-to-grammar.cpp)
# read `pattern` before `maxLength`; in the json_object form `maxLength` stays for servers that
# read only that. The json_schema_bounded form sends the pattern alone: its `{0,N}` is the
# bound, and vLLM's xgrammar backend drops `maxLength` beside a `pattern`, so its validation
# flags the pair as unsupported (vllm/v1/structured_output/backend_xgrammar.py,
# has_xgrammar_unsupported_json_features): `auto` then falls back to another backend, and a
# server pinned to xgrammar refuses the request. Older vLLMs flagged `maxLength` alone.
REASON_CHARS = "[ !#-Z^-~]"
# Whitespace the grammar admits after each of the answer's 9 JSON tokens (JSON's, not the
# model's: { "element" : "water" , "reason" : "..." }): llama-cpp-python's SPACE_RULE is `" "?`;
# llama.cpp's llama-server's is `| " " | "\n"{1,2} [ \t]{0,20}`, up to 22 characters; vLLM's
# none with disable_any_whitespace, else any (xgrammar's any_whitespace, guidance's
# whitespace_flexible), which no bound can size. Both bounded forms are sized for one: what
# llama-cpp-python admits, more than vLLM's compact JSON needs, and what a model writing
# JSON the usual way uses ({"element": "fire", "reason": "..."}: three). The retry's budget
# covers llama-server's 22.
JSON_TOKENS = 9
SPACE_LLAMA_CPP_PYTHON, SPACE_LLAMA_SERVER = 1, 22
SPACE_OF_FORM = {"json_object": SPACE_LLAMA_CPP_PYTHON, "json_schema_bounded": SPACE_LLAMA_CPP_PYTHON}


def answer_schema(labels: tuple[str, ...], reason_chars: int | None = None, max_length: bool = True) -> dict[str, Any]:
    """The answer's JSON schema; with `reason_chars`, `reason` is at most that many characters of REASON_CHARS
    (a `pattern`, and `maxLength` unless `max_length` is False)."""
    reason: dict[str, Any] = {"type": "string", "description": "a few words: what in the image decided it"}
    if reason_chars is not None:
        reason |= {"maxLength": reason_chars} if max_length else {}
        reason |= {"pattern": f"^{REASON_CHARS}{{0,{reason_chars}}}$"}
    return {"type": "object",
            "properties": {"element": {"type": "string", "enum": list(labels)}, "reason": reason},
            "required": ["element", "reason"], "additionalProperties": False}


def answer_tokens(labels: tuple[str, ...], reason_chars: int, space: int) -> int:
    """The most tokens an answer takes whose reason is at most `reason_chars` characters of REASON_CHARS.

    One token per character at worst, `space` characters of whitespace after each JSON token,
    and one more: llama-cpp-python ends an answer with finish_reason `length` as soon as it
    holds max_tokens tokens, and vLLM counts the end-of-text token among its output tokens
    (some versions test the length before it), so it needs room in the budget too.
    """
    skeleton = json.dumps({"element": max(labels, key=len), "reason": ""}, separators=(",", ":"))
    return len(skeleton) + reason_chars + JSON_TOKENS * space + 1


def reason_bound(cfg: Label, labels: tuple[str, ...]) -> int:
    """Characters of `reason` that fit in label.teacher.max_tokens beside the rest of the answer, in a
    bounded form (BOUNDED_FORMS); ValueError when none do."""
    rest = answer_tokens(labels, 0, SPACE_OF_FORM[cfg.teacher.response_format])
    if cfg.teacher.max_tokens <= rest:
        raise ValueError(f"label.teacher.max_tokens={cfg.teacher.max_tokens} leaves no room for the reason: the rest of the "
                         f"answer takes up to {rest} tokens in the {cfg.teacher.response_format} form; set it above {rest}")
    return cfg.teacher.max_tokens - rest


def retry_budget(cfg: Label) -> int:
    """The budget for the one retry of a cut-off answer: max_tokens plus the whitespace llama.cpp's
    llama-server admits beyond the one character the bound was sized for, which is what the bounded
    answer needs there. In the json_schema form nothing bounds the reason; the retry gets the same room."""
    return cfg.teacher.max_tokens + JSON_TOKENS * (SPACE_LLAMA_SERVER - SPACE_LLAMA_CPP_PYTHON)


def render_prompt(template: str, labels: tuple[str, ...]) -> str:
    return template.replace("{labels}", ", ".join(labels))


def cache_key(canvas_sha256: str, cfg: Label, labels: tuple[str, ...]) -> str:
    """What decides the answer, hashed: the canvas, the model, the prompt, the schema, the detail.

    Not the request's form (response_format, max_tokens_field, the bound on `reason`): the
    same schema in another wrapper asks the same question, so answers cached before stay valid.
    """
    what = {"canvas": canvas_sha256, "model": cfg.teacher.model, "prompt": render_prompt(cfg.teacher.prompt, labels),
            "schema": answer_schema(labels), "detail": cfg.teacher.detail}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def response_format(cfg: Label, labels: tuple[str, ...]) -> dict[str, Any]:
    # The bounded forms go to servers that turn the schema into a grammar: bound the reason there.
    if cfg.teacher.response_format == "json_object":
        return {"type": "json_object", "schema": answer_schema(labels, reason_bound(cfg, labels))}
    schema = (answer_schema(labels, reason_bound(cfg, labels), max_length=False)
              if cfg.teacher.response_format == "json_schema_bounded" else answer_schema(labels))
    return {"type": "json_schema", "json_schema": {"name": SCHEMA_NAME, "strict": True, "schema": schema}}


def request_body(cfg: Label, labels: tuple[str, ...], png: bytes, budget: int | None = None) -> dict[str, Any]:
    """The chat completion body, the same for an online request and a batch line; `budget` replaces max_tokens."""
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    body: dict[str, Any] = {
        "model": cfg.teacher.model,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": render_prompt(cfg.teacher.prompt, labels)},
            {"type": "image_url", "image_url": {"url": url, "detail": cfg.teacher.detail}}]}],
        "response_format": response_format(cfg, labels),
        cfg.teacher.max_tokens_field: cfg.teacher.max_tokens if budget is None else budget,
    }
    if cfg.teacher.temperature is not None:  # reasoning models refuse any temperature; null leaves it out
        body["temperature"] = cfg.teacher.temperature
    return body


# -- the answer --------------------------------------------------------------------------------

def parse_completion(resp: dict[str, Any], labels: tuple[str, ...]) -> tuple[str, str, int, int]:
    """(element, reason, tokens in, tokens out) of a chat completion body; BadAnswer if it is not a label.

    Tokens are counted before the answer is checked: a bad answer is paid for too.
    BadAnswer carries them in `args[1:]`.
    """
    usage = resp.get("usage") or {}
    t_in, t_out = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    try:
        choice = resp["choices"][0]
        message = choice["message"]
    except (KeyError, IndexError, TypeError):
        raise BadAnswer("no choices in the response", t_in, t_out) from None
    if message.get("refusal"):
        raise BadAnswer(f"refused: {message['refusal'][:200]}", t_in, t_out)
    if choice.get("finish_reason") == "length":
        raise CutOff("answer cut off at max_tokens", t_in, t_out)
    content = message.get("content")
    try:
        answer = json.loads(content or "")
    except json.JSONDecodeError:
        raise BadAnswer(f"answer is not JSON: {str(content)[:120]!r}", t_in, t_out) from None
    if not isinstance(answer, dict):
        raise BadAnswer(f"answer is not an object: {str(content)[:120]!r}", t_in, t_out)
    element, reason = answer.get("element"), answer.get("reason")
    if element not in labels:
        raise BadAnswer(f"element {element!r} is not one of {list(labels)}", t_in, t_out)
    if not isinstance(reason, str):
        raise BadAnswer(f"reason is {type(reason).__name__}, not a string", t_in, t_out)
    return element, reason.strip(), t_in, t_out


def answer_record(item_key: str, canvas: str, cfg: Label, element: str, reason: str,
                  t_in: int, t_out: int, via: str) -> dict[str, Any]:
    """One line of the answer cache (src/labeling/answer_cache.py)."""
    return {"key": item_key, "canvas_sha256": canvas, "model": cfg.teacher.model, "element": element, "reason": reason,
            "tokens_in": t_in, "tokens_out": t_out, "via": via,
            "cost_usd": cost(cfg, t_in, t_out, via == "batch"),
            "at": datetime.now(UTC).isoformat(timespec="seconds")}


# -- a refused request -------------------------------------------------------------------------

def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def refused_field(status: int, body: object, message: str) -> tuple[str, str] | None:
    """(field, complaint) when the server refuses a request field that a param chooses, else None.

    Read from OpenAI's `error.param`, FastAPI's `detail[].loc`, a pydantic error quoted in
    the message (llama-cpp-python sends those as HTTP 500), or, in a 4xx complaint, the
    field's name. Any other 5xx is the server's trouble, retried as before.
    """
    paths: list[list[str]] = []
    complaints: list[str] = []
    if isinstance(body, dict):
        if isinstance(body.get("param"), str):
            paths.append(re.split(r"[.\[\]]+", body["param"]))
        for d in body.get("detail") if isinstance(body.get("detail"), list) else []:
            if isinstance(d, dict) and isinstance(d.get("loc"), list):
                paths.append([str(x) for x in d["loc"]])
                complaints.append(str(d.get("msg") or ""))
    paths += [re.findall(r"""['"]([^'"]+)['"]""", loc) for loc in _LOC.findall(message)]
    complaints += [a or b for a, b in _MSG.findall(message)]
    complaint = _one_line(next((c for c in complaints if c), "") or re.sub(r"^Error code: \d+ - ", "", message))
    for path in paths:
        for part in path:
            if part in PARAM_OF_FIELD:
                return part, complaint
    if status >= 500 or not _COMPLAINT.search(message):
        return None
    # the longest name first: "max_completion_tokens" must not be read as "max_tokens"
    for name in sorted(PARAM_OF_FIELD, key=len, reverse=True):
        if name != "detail" and re.search(rf"\b{name}\b", message):
            return name, complaint
    return None


def refusal_line(cfg: Label, status: int, name: str, complaint: str) -> str:
    """The one line the stage stops with when the server refuses a field the params choose."""
    param = PARAM_OF_FIELD[name]
    now = {"label.teacher.response_format": cfg.teacher.response_format, "label.teacher.max_tokens_field": cfg.teacher.max_tokens_field,
           "label.teacher.temperature": cfg.teacher.temperature, "label.teacher.detail": cfg.teacher.detail}[param]
    hint = {"label.teacher.response_format": f"try {param}={_other_forms(cfg.teacher.response_format)}",
            "label.teacher.max_tokens_field": f"try {param}={_other(cfg.teacher.max_tokens_field, MAX_TOKENS_FIELDS)}",
            "label.teacher.temperature": f"try {param}: null",
            "label.teacher.detail": f"try another {param}"}[param]
    return (f"{cfg.teacher.base_url} refused the request's {name} ({param}={now}): HTTP {status}: {complaint}; {hint} "
            f"(docs/labels.md: Teacher servers)")


def ignored_limit_line(cfg: Label, tokens_out: int, budget: int) -> str:
    """The one line for a server that ignored the token limit: its answers run to the context's end."""
    over = f"label.teacher.max_tokens={cfg.teacher.max_tokens}" if budget == cfg.teacher.max_tokens else f"the retry's budget of {budget}"
    return (f"{cfg.teacher.base_url} ignored {cfg.teacher.max_tokens_field}: an answer ran to {tokens_out} tokens, over "
            f"{over}; try label.teacher.max_tokens_field="
            f"{_other(cfg.teacher.max_tokens_field, MAX_TOKENS_FIELDS)} (docs/labels.md: Teacher servers)")


def cut_off_line(cfg: Label, labels: tuple[str, ...], budget: int) -> str:
    """Why a canvas failed whose answer was cut off twice, and the param to change."""
    if cfg.teacher.response_format in BOUNDED_FORMS:
        why = (f"the schema bounds the reason to {reason_bound(cfg, labels)} characters, so this server does "
               f"not honour the schema's pattern")
        if cfg.teacher.response_format == "json_schema_bounded":  # vLLM's default grammar admits any whitespace
            why += " or pads the JSON with whitespace (vLLM: set disable_any_whitespace)"
    else:
        why = "label.teacher.response_format=json_schema leaves the reason unbounded"
    return (f"answer cut off at {cfg.teacher.max_tokens_field}={cfg.teacher.max_tokens} and again at {budget}: {why}; raise "
            f"label.teacher.max_tokens (docs/labels.md: Teacher servers)")


def _other(value: str, choices: tuple[str, ...]) -> str:
    """The other of two choices."""
    return choices[1] if value == choices[0] else choices[0]


# The form to try when a server refuses one, first the likeliest: llama-cpp-python refuses the
# json_schema type (it takes text or json_object); a server with OpenAI's strict subset may refuse
# the bound's `pattern`; one that refuses json_object's `schema` speaks OpenAI's json_schema form.
ALTERNATIVE_FORMS = {"json_schema": ("json_object",),
                     "json_schema_bounded": ("json_object", "json_schema"),
                     "json_object": ("json_schema_bounded", "json_schema")}


def _other_forms(value: str) -> str:
    return " or ".join(f"{f} for {SERVERS_OF_FORM[f]}" for f in ALTERNATIVE_FORMS[value])


def redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "[redacted]") if secret else text


# -- bookkeeping -------------------------------------------------------------------------------

@dataclass
class Tally:
    """What this run did and paid; thread-safe counters."""

    requests: int = 0          # HTTP requests sent to the teacher's server, retries included
    rate_limited: int = 0
    server_errors: int = 0
    timeouts: int = 0          # timeouts and dropped connections
    invalid_answers: int = 0   # malformed or off-enum answers (paid, then asked again)
    batch_lines: int = 0
    batches_submitted: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **kw: float) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def paid(self, cfg: Label, t_in: int, t_out: int, batch: bool) -> None:
        self.add(tokens_in=t_in, tokens_out=t_out, cost_usd=cost(cfg, t_in, t_out, batch))

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 9) if isinstance(v, float) else v) for k, v in vars(self).items() if not k.startswith("_")}
