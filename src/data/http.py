"""download's HTTP client: one photo's bytes from a URL, under the limits of `download.http`.

http and https only (also as a redirect target, each hop checked by hand), a total deadline per attempt
that holds against a host dripping bytes, a byte cap checked against Content-Length and while streaming,
retries with exponential backoff on transient errors (timeouts, connection errors, 408/425/429/5xx), and
conditional GETs (If-None-Match / If-Modified-Since: 304 keeps the stored copy). A failure is a
`FetchError` whose kind groups it in download's metrics and whose message names the cause.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import requests
import urllib3

from src.config.settings import Http

SCHEMES = ("http", "https")
MAX_REDIRECTS = 5
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


class FetchError(Exception):
    """A failed item: `kind` groups it in the metrics, the message names the cause."""

    def __init__(self, kind: str, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.kind, self.transient = kind, transient


def root_cause(e: BaseException) -> str:
    """The innermost OS-level cause, without object addresses (messages must be reproducible)."""
    seen = e
    while True:
        nxt = seen.__cause__ or seen.__context__ or next((a for a in seen.args if isinstance(a, BaseException)), None)
        if nxt is None or nxt is seen:
            break
        seen = nxt
    if isinstance(seen, OSError) and seen.strerror:
        return f"{type(seen).__name__}: {seen.strerror}"
    return type(seen).__name__


def check_scheme(url: str, via: str | None = None) -> None:
    scheme = urlsplit(url).scheme.lower()
    if scheme not in SCHEMES:
        how = f"redirect from {via} to" if via else "url"
        raise FetchError("scheme", f"refused {how} {url!r}: scheme {scheme or '(none)'!r} is not http or https")


_local = threading.local()


def _session(cfg: Http) -> requests.Session:
    """One Session per worker thread (Sessions are not thread-safe), reusing connections per host."""
    if getattr(_local, "session", None) is None:
        s = requests.Session()
        s.headers["User-Agent"] = cfg.user_agent
        _local.session = s
    return _local.session


@dataclass(frozen=True)
class Fetched:
    """A response body (None: 304, the stored copy is current) and the validators to revalidate it with."""
    body: bytes | None
    etag: str | None
    last_modified: str | None


def _get_once(url: str, cfg: Http, validators: dict[str, str]) -> Fetched:
    """One attempt: follow redirects by hand (each hop's scheme is checked), stream under the caps."""
    deadline = time.monotonic() + cfg.timeout_s
    via = None
    for _ in range(MAX_REDIRECTS + 1):
        check_scheme(url, via)
        try:
            with _session(cfg).get(url, stream=True, allow_redirects=False, headers=validators,
                                   timeout=(cfg.timeout_s, cfg.timeout_s)) as r:
                if r.is_redirect:
                    via, url = url, urljoin(url, r.headers["location"])
                    continue
                tags = {"etag": r.headers.get("etag"), "last_modified": r.headers.get("last-modified")}
                if r.status_code == 304 and validators:
                    return Fetched(None, **tags)
                if r.status_code >= 400:
                    raise FetchError(f"http_{r.status_code}", f"HTTP {r.status_code} {r.reason}",
                                     transient=r.status_code in RETRY_STATUS)
                declared = r.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > cfg.max_bytes:
                    raise FetchError("too_large", f"Content-Length {declared} exceeds max_bytes {cfg.max_bytes}")
                buf = bytearray()
                while True:
                    # read1 returns what has arrived, so the deadline holds against a host dripping bytes.
                    chunk = r.raw.read1(65536, decode_content=True)
                    if not chunk:
                        break
                    buf += chunk
                    if len(buf) > cfg.max_bytes:
                        raise FetchError("too_large", f"body exceeds max_bytes {cfg.max_bytes} (stopped reading)")
                    if time.monotonic() > deadline:
                        raise FetchError("timeout", f"slow host: body not complete within {cfg.timeout_s:g} s", transient=True)
                return Fetched(bytes(buf), **tags)
        except FetchError:
            raise
        except urllib3.exceptions.ReadTimeoutError:  # raised by r.raw while streaming the body
            raise FetchError("timeout", f"read timeout: host stalled for {cfg.timeout_s:g} s mid-body", transient=True) from None
        except urllib3.exceptions.ProtocolError as e:  # e.g. closed before Content-Length bytes arrived
            raise FetchError("connection", f"connection broken mid-body: {root_cause(e)}", transient=True) from None
        except requests.Timeout as e:
            what = "connect" if isinstance(e, requests.ConnectTimeout) else "read"
            raise FetchError("timeout", f"{what} timeout: no data within {cfg.timeout_s:g} s", transient=True) from None
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as e:
            # urllib3 wraps read timeouts during streaming as connection errors; name them as timeouts.
            if "timed out" in str(e).lower():
                raise FetchError("timeout", f"read timeout: no data within {cfg.timeout_s:g} s", transient=True) from None
            raise FetchError("connection", f"connection failed: {root_cause(e)}", transient=True) from None
        except requests.RequestException as e:
            raise FetchError("request", f"bad request: {type(e).__name__}: {root_cause(e)}") from None
    raise FetchError("redirect", f"more than {MAX_REDIRECTS} redirects")


def fetch(url: str, cfg: Http, validators: dict[str, str] | None = None) -> Fetched:
    """`url`'s body, retrying transient failures with exponential backoff; else FetchError.

    With `validators` (If-None-Match / If-Modified-Since) a 304 answers `Fetched(None, ...)`.
    """
    for attempt in range(cfg.retries + 1):
        try:
            return _get_once(url, cfg, validators or {})
        except FetchError as e:
            if not e.transient or attempt == cfg.retries:
                if e.transient:
                    raise FetchError(e.kind, f"{e} (after {attempt + 1} attempts)", transient=True) from None
                raise
            time.sleep(cfg.backoff_s * 2**attempt)
    raise AssertionError("unreachable")
