"""Real storage servers on loopback for the remote tests: an S3 API (moto's server) and OpenSSH's sshd.

Each is started in its own process by the test, on a free 127.0.0.1 port, and stopped after it.

- S3: moto's server with request authentication on (`INITIAL_NO_AUTH_ACTION_COUNT`): the first
  three requests create an IAM user, its policy and its access key; every request after that must be
  signed with that key, so wrong credentials are refused as a real S3 refuses them. The bucket is
  created with the new key.
- SSH: /usr/sbin/sshd with a generated host key, public-key login only, the generated user key as the
  only authorized key, internal SFTP. The client side (HOME/.ssh: id_ed25519, known_hosts) is in a
  throwaway HOME the tests point DVC at.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.http_server import wait_for

SSHD = Path("/usr/sbin/sshd")
START_S = 60  # moto imports a lot; a loaded 2-core machine needs the margin


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    key_id: str
    secret: str
    proc: subprocess.Popen
    log: Path


def start_s3(workdir: Path, bucket: str) -> S3Server:
    import boto3

    port = free_port()
    log = workdir / "moto.log"
    # three unauthenticated requests set up the user; from the fourth on, S3 checks signatures
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        if not wait_for(lambda: listening(port) or proc.poll() is not None, START_S, 0.1) or proc.poll() is not None:
            raise RuntimeError(f"moto server did not start:\n{log.read_text()[-2000:]}")
        boot = {"endpoint_url": endpoint, "region_name": "us-east-1"}
        iam = boto3.client("iam", **boot, aws_access_key_id="boot", aws_secret_access_key="boot")
        iam.create_user(UserName="dvc")
        iam.put_user_policy(UserName="dvc", PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="dvc")["AccessKey"]
        s3 = boto3.client("s3", **boot, aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
        s3.create_bucket(Bucket=bucket)
    except BaseException:
        stop(proc)
        raise
    return S3Server(endpoint, bucket, key["AccessKeyId"], key["SecretAccessKey"], proc, log)


@dataclass
class SSHServer:
    host: str
    port: int
    user: str
    home: Path  # the client's HOME: .ssh/id_ed25519 (the login key) and .ssh/known_hosts
    key: Path
    host_pub: str  # "ssh-ed25519 AAAA..." of the server
    proc: subprocess.Popen
    log: Path

    def known_hosts_line(self, pub: str | None = None) -> str:
        return f"[{self.host}]:{self.port} {pub or self.host_pub}\n"


def keygen(path: Path) -> str:
    """A new ed25519 key pair without passphrase; returns the public key as `type base64`."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test", "-f", str(path)], check=True)
    return " ".join(Path(f"{path}.pub").read_text().split()[:2])


def sshd_missing() -> str | None:
    """Why the SSH server cannot run here, or None."""
    if not SSHD.exists():
        return f"{SSHD} is not installed (`make setup` installs openssh-server with apt when run as root)"
    if shutil.which("ssh-keygen") is None:
        return "ssh-keygen is not installed (Debian's openssh-client, a dependency of openssh-server)"
    return None


def start_sshd(workdir: Path) -> SSHServer:
    import getpass

    srv, home = workdir / "sshd", workdir / "home"
    srv.mkdir(parents=True)
    (home / ".ssh").mkdir(parents=True)
    host_pub = keygen(srv / "host_ed25519")
    key = home / ".ssh" / "id_ed25519"
    keygen(key)
    (srv / "authorized_keys").write_text(Path(f"{key}.pub").read_text())
    port = free_port()
    (srv / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {srv / 'host_ed25519'}\nPidFile {srv / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {srv / 'authorized_keys'}\nStrictModes no\nPubkeyAuthentication yes\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nPermitRootLogin prohibit-password\n"
        "Subsystem sftp internal-sftp\n")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # Debian's sshd needs its privilege-separation directory
    log = srv / "sshd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(srv / "sshd_config")], stdout=out, stderr=subprocess.STDOUT)
    if not wait_for(lambda: listening(port) or proc.poll() is not None, START_S, 0.05) or proc.poll() is not None:
        stop(proc)
        raise RuntimeError(f"sshd did not start:\n{log.read_text()[-2000:]}")
    server = SSHServer("127.0.0.1", port, getpass.getuser(), home, key, host_pub, proc, log)
    (home / ".ssh" / "known_hosts").write_text(server.known_hosts_line())
    return server
