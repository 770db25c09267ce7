"""The teacher's entry point: the key from the environment, one client, online or batch.

The API key is read from the environment variable named by label.teacher.api_key_env,
handed to the client, and scrubbed from every error message the teacher records.
"""

from __future__ import annotations

import os
from pathlib import Path

import openai

from src.config.settings import Label
from src.labeling.answer_cache import AnswerCache
from src.labeling.teacher.batch import BatchLog, label_batch
from src.labeling.teacher.online import label_online
from src.labeling.teacher.request import Item, Tally, TeacherFatal, redact, refusal_line, refused_field


def api_key(cfg: Label) -> str:
    key = os.environ.get(cfg.teacher.api_key_env)
    if not key:
        raise TeacherFatal(f"label.provider=teacher needs an API key in the environment variable "
                           f"{cfg.teacher.api_key_env} (label.teacher.api_key_env); it is not set")
    return key


def make_client(cfg: Label, key: str) -> openai.OpenAI:
    # The client's own retries are off: ours count every request, share one 429 pause
    # across workers and retry bad answers too.
    return openai.OpenAI(api_key=key, base_url=cfg.teacher.base_url, timeout=cfg.teacher.timeout_s, max_retries=0)


def teach(todo: list[Item], labels: tuple[str, ...], cfg: Label, cache: AnswerCache,
          cache_dir: Path) -> tuple[dict[str, str], Tally]:
    """Ask the teacher for every item (none of them cached); (errors by key, tally). Raises TeacherFatal."""
    tally = Tally()
    if not todo and not (cfg.teacher.mode == "batch" and any(BatchLog(cache_dir).state())):
        return {}, tally  # all cached: no key, no client, no network
    secret = api_key(cfg)
    client = make_client(cfg, secret)
    try:
        if cfg.teacher.mode == "batch":
            # Few, cheap calls (upload, create, poll): the client's own retries, which honour
            # Retry-After, are enough here; `requests` then counts calls, not their retries.
            batch_client = client.with_options(max_retries=cfg.max_attempts - 1)
            return label_batch(batch_client, todo, labels, cfg, cache, tally, cache_dir, secret), tally
        return label_online(client, todo, labels, cfg, cache, tally, secret), tally
    except openai.APIStatusError as e:  # batch endpoints: no per-item retry; say what failed, without the key
        refused = refused_field(e.status_code, e.body, e.message)
        line = refusal_line(cfg, e.status_code, *refused) if refused else f"{cfg.teacher.base_url}: HTTP {e.status_code}: {e.message}"
        raise TeacherFatal(redact(line, secret)) from None
    except openai.APIConnectionError as e:
        raise TeacherFatal(redact(f"{cfg.teacher.base_url}: {e}", secret)) from None
    finally:
        client.close()
