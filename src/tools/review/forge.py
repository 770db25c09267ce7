"""Post the review as ONE comment per merge request, updated in place on every push.

    python -m src.tools.review.forge review/comment.md            # in GitHub Actions or GitLab CI
    python -m src.tools.review.forge review/comment.md --forge github --api URL --project OWNER/REPO --number 7

The comment is found again by a hidden marker (`report.MARKER`, an HTML comment) among the merge
request's comments: found, it is edited (GitHub: PATCH the issue comment; GitLab: PUT the note);
not found, one is created. The token comes from the environment only (GITHUB_TOKEN, GITLAB_TOKEN: CI
secrets or variables) and is never printed. Any API failure is one line naming the request and the
HTTP status, exit code 1.

Where it runs: GitHub Actions gives GITHUB_API_URL, GITHUB_REPOSITORY and the pull request number in
the event file (GITHUB_EVENT_PATH); GitLab CI gives CI_API_V4_URL, CI_PROJECT_ID and
CI_MERGE_REQUEST_IID (merge request pipelines). The flags override them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import requests

from src.tools.review.report import MARKER

GITHUB_LIMIT = 65536  # characters in one GitHub comment; GitLab's notes take 1,000,000
TIMEOUT_S = 30


class ForgeError(Exception):
    """One line: which request failed and why (never the token)."""


@dataclass
class Target:
    forge: str    # github | gitlab
    api: str      # https://api.github.com, https://gitlab.example.com/api/v4
    project: str  # OWNER/REPO (GitHub), a project id or path (GitLab)
    number: int   # the pull request number / the merge request iid
    token: str

    @property
    def name(self) -> str:
        return {"github": "GitHub", "gitlab": "GitLab"}[self.forge]


def _session(t: Target) -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # a proxy from the environment would see the token; CI talks to its own forge directly
    if t.forge == "github":
        s.headers.update({"Authorization": f"Bearer {t.token}", "Accept": "application/vnd.github+json",
                          "X-GitHub-Api-Version": "2022-11-28"})
    else:
        s.headers.update({"PRIVATE-TOKEN": t.token})
    return s


def _call(s: requests.Session, t: Target, method: str, url: str, **kw: object) -> requests.Response:
    try:
        res = s.request(method, url, timeout=TIMEOUT_S, **kw)
    except requests.RequestException as e:
        raise ForgeError(f"review comment: {t.name} API {method} {url}: {type(e).__name__}: "
                         f"{str(e).replace(t.token, '***')[:200]}") from None
    if res.status_code >= 400:
        try:
            detail = res.json().get("message") or res.text
        except ValueError:
            detail = res.text
        detail = " ".join(str(detail).replace(t.token, "***").split())[:200]
        hint = {401: " (the token is missing, wrong or expired)",
                403: " (the token may not write comments: GitHub needs `permissions: pull-requests: write`, "
                     "GitLab a token with the api scope)",
                404: " (no such project or merge request, or the token cannot see it)"}.get(res.status_code, "")
        raise ForgeError(f"review comment: {t.name} API {method} {url} answered HTTP {res.status_code}{hint}: {detail}")
    return res


def _comments_url(t: Target) -> str:
    if t.forge == "github":
        return f"{t.api}/repos/{t.project}/issues/{t.number}/comments"
    return f"{t.api}/projects/{quote(t.project, safe='')}/merge_requests/{t.number}/notes"


def find(s: requests.Session, t: Target) -> int | None:
    """The id of our comment (the first that holds the marker), following the pages."""
    url, page = _comments_url(t), 1
    while True:
        res = _call(s, t, "GET", url, params={"per_page": 100, "page": page})
        items = res.json()
        for c in items:
            if MARKER in (c.get("body") or ""):
                return int(c["id"])
        # GitHub pages by a Link header, GitLab by X-Next-Page; both end on a short page
        if len(items) < 100 or not (res.links.get("next") or res.headers.get("X-Next-Page")):
            return None
        page += 1


def upsert(t: Target, body: str) -> tuple[str, int]:
    """("created" | "updated", comment id)."""
    if MARKER not in body:
        body = f"{MARKER}\n{body}"
    if t.forge == "github" and len(body) > GITHUB_LIMIT:
        cut = "\n\n(cut to fit GitHub's comment limit: the whole report is in the job's artifact)\n"
        body = body[: GITHUB_LIMIT - len(cut)] + cut
    s = _session(t)
    found = find(s, t)
    if found is None:
        res = _call(s, t, "POST", _comments_url(t), json={"body": body})
        return "created", int(res.json()["id"])
    if t.forge == "github":
        _call(s, t, "PATCH", f"{t.api}/repos/{t.project}/issues/comments/{found}", json={"body": body})
    else:
        _call(s, t, "PUT", f"{_comments_url(t)}/{found}", json={"body": body})
    return "updated", found


def target(args: argparse.Namespace, env: dict[str, str]) -> Target:
    """Where to post, from the flags, else from the CI's own variables; ForgeError naming what is missing."""
    forge = args.forge or ("github" if env.get("GITHUB_ACTIONS") else "gitlab" if env.get("GITLAB_CI") else None)
    if forge is None:
        raise ForgeError("review comment: not in GitHub Actions or GitLab CI; pass --forge github|gitlab "
                         "with --api, --project and --number")
    if forge == "github":
        api, project, number = args.api or env.get("GITHUB_API_URL"), args.project or env.get("GITHUB_REPOSITORY"), args.number
        if number is None and env.get("GITHUB_EVENT_PATH"):
            event = json.loads(Path(env["GITHUB_EVENT_PATH"]).read_text())
            number = (event.get("pull_request") or {}).get("number")
        token_var = "GITHUB_TOKEN"
    else:
        api, project = args.api or env.get("CI_API_V4_URL"), args.project or env.get("CI_PROJECT_ID")
        number = args.number or (int(env["CI_MERGE_REQUEST_IID"]) if env.get("CI_MERGE_REQUEST_IID") else None)
        token_var = "GITLAB_TOKEN"
    missing = [n for n, v in (("--api", api), ("--project", project), ("--number (not a merge request?)", number)) if not v]
    if missing:
        raise ForgeError(f"review comment: {forge}: no {', '.join(missing)}; nothing posted")
    token = env.get(token_var, "")
    if not token:
        raise ForgeError(f"review comment: {token_var} is not set (a CI secret or masked variable); nothing posted")
    return Target(forge, str(api).rstrip("/"), str(project), int(number), token)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m src.tools.review.forge", description=__doc__.splitlines()[0])
    ap.add_argument("comment", type=Path, help="the review's comment.md")
    ap.add_argument("--forge", choices=["github", "gitlab"])
    ap.add_argument("--api", help="the API root: https://api.github.com, https://gitlab.example.com/api/v4")
    ap.add_argument("--project", help="OWNER/REPO (GitHub), the project id or path (GitLab)")
    ap.add_argument("--number", type=int, help="the pull request number, or the merge request iid")
    args = ap.parse_args(argv)
    try:
        t = target(args, dict(os.environ))
        action, cid = upsert(t, args.comment.read_text())
    except ForgeError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"review comment: {action} comment {cid} on {t.name} {t.project} #{t.number}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
