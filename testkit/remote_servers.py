"""Real storage servers on loopback for the remote tests: an S3 API (moto's server) and OpenSSH's sshd.

Each is started in its own process by the test and stopped after it. That process binds 127.0.0.1 port 0
itself and reports the port the kernel gave it (a file written once it listens): no port is picked first and
bound later, when another process may have taken it.

- S3: moto's server with request authentication on (`INITIAL_NO_AUTH_ACTION_COUNT`): the first
  three requests create an IAM user, its policy and its access key; every request after that must be
  signed with that key, so wrong credentials are refused as a real S3 refuses them. The bucket is
  created with the new key.
- SSH: /usr/sbin/sshd in inetd mode (`sshd -i`, one per connection, as OpenSSH's own tests run it) behind a
  small listener that binds port 0, with a generated host key, public-key login only, the generated user key as the
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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from testkit.http_server import wait_for

SSHD = Path("/usr/sbin/sshd")
START_S = 60  # moto imports a lot; a loaded 2-core machine needs the margin


# The S3 server: moto's own threaded server on port 0; the port it got goes to argv[1] once it listens.
MOTO_MAIN = """
import os, sys, threading
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(server.get_host_and_port()[1]))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
threading.Event().wait()
"""

# The SSH server: a listener on port 0 (reported in argv[1]) that hands each connection to `sshd -i`
# (argv[2:]), the connection as its stdin and stdout; sshd's log goes to this process's stderr.
SSHD_MAIN = """
import os, socket, subprocess, sys
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(16)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(listener.getsockname()[1]))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
children = []
while True:
    conn, _ = listener.accept()
    children = [c for c in children if c.poll() is None]
    children.append(subprocess.Popen(sys.argv[2:], stdin=conn, stdout=conn))
    conn.close()
"""


@contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port where nothing listens, held for the block: bound but not listening, so connections
    are refused and no other process can start listening there meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def serve(main: str, args: list[str], workdir: Path, name: str,
          env: dict[str, str] | None = None) -> tuple[subprocess.Popen, int, Path]:
    """Run `python -c main PORT_FILE *args`, which binds port 0 and writes the port to PORT_FILE once it
    listens; returns (process, port, log), or raises with the log's tail."""
    port_file, log = workdir / f"{name}.port", workdir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", main, str(port_file), *args], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    if not wait_for(lambda: port_file.exists() or proc.poll() is not None, START_S, 0.05) or proc.poll() is not None:
        stop(proc)
        raise RuntimeError(f"{name} did not start:\n{log.read_text()[-2000:]}")
    return proc, int(port_file.read_text()), log


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

    # three unauthenticated requests set up the user; from the fourth on, S3 checks signatures
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    proc, port, log = serve(MOTO_MAIN, [], workdir, "moto", env)
    endpoint = f"http://127.0.0.1:{port}"
    try:
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
        return f"{SSHD} is not installed (`make test` installs openssh-server with apt when run as root)"
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
    (srv / "sshd_config").write_text(
        f"HostKey {srv / 'host_ed25519'}\nAuthorizedKeysFile {srv / 'authorized_keys'}\nStrictModes no\nPubkeyAuthentication yes\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nPermitRootLogin prohibit-password\n"
        "Subsystem sftp internal-sftp\n")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # Debian's sshd needs its privilege-separation directory
    # sshd checks its config and keys before serving: a bad one is an error here, not a refused login later
    test = subprocess.run([str(SSHD), "-t", "-f", str(srv / "sshd_config")], capture_output=True, text=True)
    if test.returncode != 0:
        raise RuntimeError(f"sshd refuses its config: {test.stderr.strip()}")
    proc, port, log = serve(SSHD_MAIN, [str(SSHD), "-i", "-e", "-f", str(srv / "sshd_config")], srv, "sshd")
    server = SSHServer("127.0.0.1", port, getpass.getuser(), home, key, host_pub, proc, log)
    (home / ".ssh" / "known_hosts").write_text(server.known_hosts_line())
    return server
