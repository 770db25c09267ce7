"""remotes: probe a DVC remote the way `dvc push` reaches it, and say in one line what is wrong.

DVC's own messages for a broken remote rarely say which remote or what to fix ("unexpected error -
Forbidden: An error occurred (403) when calling the HeadObject operation" for a wrong S3 secret), and
its SSH driver checks no host key at all: sshfs connects with `known_hosts=None`, so `dvc push` to a
server whose key changed goes through silently. This module reads the remote exactly as DVC resolves
it (.dvc/config, .dvc/config.local, the environment) and probes it:

- s3: the endpoint answers, the credentials are accepted, the bucket exists (one ListObjectsV2).
- ssh: the server's host key is in ~/.ssh/known_hosts and matches, the credentials are accepted,
  and the path is there (or can be made by the first push).
- any other kind: said to be unprobed, never passed as checked.

Command: python -m src.tools.remotes check [REMOTE ...]    (default: the repository's default remote)
Output:  one line per remote: `remote NAME (URL[, endpoint E]): ok ...` on stdout, or
         `remote NAME (URL[, endpoint E]): CAUSE` on stderr and exit 1. Secrets are never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KNOWN_HOSTS = Path("~", ".ssh", "known_hosts")
TIMEOUT_S = 15


class RemoteProblem(Exception):
    """A remote that cannot be used; the message is the cause, for one line."""


@dataclass(frozen=True)
class Remote:
    name: str
    url: str
    scheme: str
    path: str  # the driver's path: bucket/prefix for s3, the directory for ssh
    fs_args: dict[str, Any]  # what DVC hands its driver (credentials included; never printed)

    def label(self) -> str:
        endpoint = (self.fs_args.get("client_kwargs") or {}).get("endpoint_url")
        return f"remote {self.name} ({redact(self.url)}" + (f", endpoint {redact(endpoint)})" if endpoint else ")")


def redact(url: str) -> str:
    """A URL without the password a `scheme://user:password@host` form would carry."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


def resolve(name: str | None, root: str | None = None) -> Remote:
    """The remote `name` (or the default one) as DVC's own config and driver see it."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        repo = Repo(root)
    except DvcException as exc:
        raise RemoteProblem(f"not in a DVC repository ({exc})") from None
    with repo:
        name = name or repo.config["core"].get("remote")
        if not name:
            raise RemoteProblem("no default remote: name one (`dvc remote list`)")
        conf = repo.config["remote"].get(name)
        if conf is None:
            raise RemoteProblem(f"no remote named {name} (`dvc remote list`)")
        try:
            remote = repo.cloud.get_remote(name)
        except DvcException as exc:  # e.g. the driver is not installed
            raise RemoteProblem(f"remote {name} ({redact(conf['url'])}): {exc}") from None
        return Remote(name=name, url=conf["url"], scheme=remote.fs.protocol if isinstance(remote.fs.protocol, str)
                      else remote.fs.protocol[0], path=remote.path, fs_args=dict(remote.fs.fs_args))


# --- s3 -----------------------------------------------------------------------------------------------

S3_CODES = {
    "NoSuchBucket": "bucket {bucket} does not exist",
    "InvalidAccessKeyId": "credentials refused: the server knows no such access key id",
    "SignatureDoesNotMatch": "credentials refused: the secret access key does not match the access key id",
    "AccessDenied": "access denied: the credentials may not list bucket {bucket}",
    "AllAccessDisabled": "access denied: all access to bucket {bucket} is disabled",
}


def probe_s3(r: Remote) -> str:
    """One ListObjectsV2 with DVC's endpoint, region and credentials; returns what was found."""
    import botocore.config
    import botocore.exceptions as bx
    import botocore.session

    bucket, _, prefix = r.path.partition("/")
    ck = r.fs_args.get("client_kwargs") or {}
    session = botocore.session.Session(profile=r.fs_args.get("profile"))
    client = session.create_client(
        "s3", endpoint_url=ck.get("endpoint_url"), region_name=ck.get("region_name"), verify=ck.get("verify"),
        aws_access_key_id=r.fs_args.get("key"), aws_secret_access_key=r.fs_args.get("secret"),
        aws_session_token=r.fs_args.get("token"),
        config=botocore.config.Config(connect_timeout=TIMEOUT_S, read_timeout=TIMEOUT_S, retries={"max_attempts": 1}))
    try:
        found = client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1).get("KeyCount", 0)
    except (bx.EndpointConnectionError, bx.ConnectTimeoutError) as exc:
        raise RemoteProblem(f"cannot connect to the endpoint ({exc})") from None
    except bx.NoCredentialsError:
        raise RemoteProblem("no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                            f"`dvc remote modify --local {r.name} access_key_id ...` and secret_access_key") from None
    except bx.ClientError as exc:
        err = exc.response.get("Error", {})
        code = err.get("Code", "?")
        cause = S3_CODES.get(code, "S3 error {code}: {message}")
        raise RemoteProblem(cause.format(bucket=bucket, code=code, message=err.get("Message", ""))) from None
    except bx.BotoCoreError as exc:
        raise RemoteProblem(f"S3 client error: {exc}") from None
    return f"bucket {bucket} reachable, credentials accepted, {'data under' if found else 'nothing yet under'} {prefix or '/'}"


# --- ssh ----------------------------------------------------------------------------------------------

def _fingerprints(keys: list[Any]) -> str:
    return ", ".join(k.get_fingerprint() for k in keys)


async def _probe_ssh(r: Remote) -> str:
    import asyncssh

    a = r.fs_args
    host, port, user = a["host"], int(a.get("port") or 22), a.get("username")
    where = f"{host}:{port}"
    opts: dict[str, Any] = {"port": port, "connect_timeout": TIMEOUT_S, "login_timeout": TIMEOUT_S}
    if user:
        opts["username"] = user
    for key in ("client_keys", "password", "passphrase", "preferred_auth"):
        if a.get(key) is not None:
            opts[key] = a[key]
    for keyfile in a.get("client_keys") or []:
        if not Path(keyfile).is_file():
            raise RemoteProblem(f"keyfile {keyfile} does not exist")
    try:
        # known_hosts left at asyncssh's default: ~/.ssh/known_hosts (or the ssh config's
        # UserKnownHostsFile); a host missing from it is refused, as OpenSSH's strict checking does.
        async with asyncssh.connect(host, **opts) as conn:
            async with conn.start_sftp_client() as sftp:
                there = await sftp.isdir(r.path)
        return (f"host key matches {KNOWN_HOSTS}, login accepted, "
                + (f"{r.path} exists" if there else f"{r.path} not there yet (the first push makes it)"))
    except asyncssh.HostKeyNotVerifiable:
        raise RemoteProblem(await _host_key_cause(host, port)) from None
    except asyncssh.PermissionDenied:
        keys = ", ".join(map(str, a.get("client_keys") or [])) or "~/.ssh/id_* and the agent"
        raise RemoteProblem(f"login refused for user {user or '(local user)'} on {where} (keys tried: {keys})") from None
    except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError) as exc:
        raise RemoteProblem(f"keyfile cannot be used: {exc}") from None
    except asyncssh.Error as exc:
        raise RemoteProblem(f"ssh error from {where}: {exc.reason}") from None
    except ConnectionRefusedError:
        raise RemoteProblem(f"cannot connect to {where}: connection refused (no SSH server listens there)") from None
    except socket.gaierror as exc:
        raise RemoteProblem(f"cannot connect to {where}: unknown host ({exc.strerror})") from None
    except (TimeoutError, OSError) as exc:
        raise RemoteProblem(f"cannot connect to {where}: {getattr(exc, 'strerror', None) or 'timed out'}") from None


async def _host_key_cause(host: str, port: int) -> str:
    """Tell a changed key (someone else answers, or the server was rebuilt) from a host never recorded."""
    import asyncssh

    where = f"{host}:{port}"
    try:
        key = await asyncio.wait_for(asyncssh.get_server_host_key(host, port), TIMEOUT_S)
    except (TimeoutError, OSError, asyncssh.Error):
        key = None
    presented = key.get_fingerprint() if key is not None else "?"
    path = KNOWN_HOSTS.expanduser()
    recorded: list[Any] = []
    if path.is_file():
        recorded = list(asyncssh.read_known_hosts(str(path)).match(host, "", port)[0])
    if recorded:
        return (f"host key mismatch: {where} presents {presented}, but {KNOWN_HOSTS} records {_fingerprints(recorded)} "
                "(another machine answers, or the server's key changed: confirm with its admin before editing known_hosts)")
    return (f"host key of {where} ({presented}) is not in {KNOWN_HOSTS}: after checking the fingerprint with the "
            f"server's admin, add it: ssh-keyscan -p {port} {host} >> {KNOWN_HOSTS}")


def probe_ssh(r: Remote) -> str:
    return asyncio.run(_probe_ssh(r))


PROBES = {"s3": probe_s3, "ssh": probe_ssh}


def check(name: str | None, root: str | None = None) -> tuple[bool, str]:
    """(ok, the one line) for one remote."""
    try:
        r = resolve(name, root)
    except RemoteProblem as exc:
        return False, f"remotes: {exc}"
    probe = PROBES.get(r.scheme)
    if probe is None:
        return True, f"{r.label()}: not probed (only s3 and ssh remotes are)"
    try:
        return True, f"{r.label()}: ok, {probe(r)}"
    except RemoteProblem as exc:
        return False, f"{r.label()}: {exc}"


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m src.tools.remotes", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="probe remotes; one line each, exit 1 if any is broken")
    c.add_argument("remotes", nargs="*", help="remote names (default: the default remote)")
    args = ap.parse_args()
    failed = 0
    for name in args.remotes or [None]:
        ok, line = check(name)
        print(line, file=sys.stdout if ok else sys.stderr)
        failed += not ok
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
