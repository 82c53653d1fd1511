"""Real services for the tests, each on a free port of 127.0.0.1, bounded in time, stopped after.

- an S3 API server: moto's server mode (what s3fs's own test suite runs against);
- PostgreSQL 15 (Debian's package): ``initdb`` into a temporary folder, ``postgres`` on a free
  port, run as the ``postgres`` user when the tests run as root (PostgreSQL refuses root).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen | None, timeout: float = 20) -> None:
    """SIGTERM the process group, then SIGKILL what is left after ``timeout``."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


# ----------------------------------------------------------------------------- S3


@dataclass
class S3Server:
    endpoint: str
    proc: subprocess.Popen
    key: str = "domaintune-test-key"
    secret: str = "domaintune-test-secret-0123456789"

    def bucket(self, prefix: str = "dt") -> str:
        """A new, empty bucket; its name."""
        import s3fs

        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        fs = s3fs.S3FileSystem(
            key=self.key, secret=self.secret, endpoint_url=self.endpoint, skip_instance_cache=True
        )
        fs.mkdir(name)
        return name

    def env(self) -> dict[str, str]:
        """The variables a host's process needs to use the store (credentials by reference)."""
        return {
            "DT_S3_KEY": self.key,
            "DT_S3_SECRET": self.secret,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def storage_options(self) -> dict[str, str]:
        """What a config says: the endpoint, and the credentials as ``${env:NAME}``."""
        return {
            "endpoint_url": self.endpoint,
            "key": "${env:DT_S3_KEY}",
            "secret": "${env:DT_S3_SECRET}",
        }

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(
            key=self.key,
            secret=self.secret,
            endpoint_url=self.endpoint,
            skip_instance_cache=True,
            use_listings_cache=False,
        )


@contextlib.contextmanager
def http_service(
    name: str,
    cmd: list[str],
    ready_url: str,
    log_path: Path,
    env: dict[str, str] | None = None,
    timeout: float = 60,
    cwd: Path | None = None,
) -> Iterator[subprocess.Popen]:
    """Start ``cmd`` (a server on a loopback port), wait until ``ready_url`` answers (within
    ``timeout`` seconds; its log in the error otherwise), and stop it afterwards."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out = open(log_path, "w")  # noqa: SIM115
    proc = subprocess.Popen(
        cmd,
        stdout=out,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        start_new_session=True,
    )
    try:
        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(ready_url, timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(
                        f"{name} did not start: {log_path.read_text()[-2000:]}"
                    ) from None
                time.sleep(0.3)
        yield proc
    finally:
        stop(proc)
        out.close()


@contextlib.contextmanager
def s3_server(log_dir: Path, env: dict[str, str] | None = None) -> Iterator[S3Server]:
    """moto's S3 API server on a free loopback port (``env``: e.g. INITIAL_NO_AUTH_ACTION_COUNT
    to make it check credentials)."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with http_service(
        "moto server", cmd, f"{endpoint}/moto-api/", log_dir / f"moto-{port}.log", env
    ) as proc:
        yield S3Server(endpoint=endpoint, proc=proc)


# ----------------------------------------------------------------------------- PostgreSQL


def postgres_bin() -> Path | None:
    for v in ("15", "16", "17"):
        d = Path(f"/usr/lib/postgresql/{v}/bin")
        if (d / "initdb").is_file():
            return d
    found = shutil.which("initdb")
    return Path(found).parent if found else None


@dataclass
class Postgres:
    port: int
    user: str
    password: str
    database: str
    proc: subprocess.Popen
    psql: list[str]
    command: list[str] = field(default_factory=list)
    log: Path | None = None

    def restart(self, down: float = 0.0) -> None:
        """Stop the server (a fast shutdown: open connections are cut), stay down ``down``
        seconds, start it again on the same data and port: a failover as clients see it."""
        stop(self.proc, timeout=30)
        time.sleep(down)
        self.proc = subprocess.Popen(
            self.command, stdout=open(self.log, "a"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        _wait_ready(self.port, self.proc, self.log)

    @property
    def url(self) -> str:
        """Prefect's connection URL (asyncpg driver) of the default database."""
        return self.url_of(self.database)

    def url_of(self, database: str) -> str:
        return f"postgresql+asyncpg://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new database owned by the Prefect user; its URL."""
        subprocess.run(
            [*self.psql, "-c", f"CREATE DATABASE {name} OWNER {self.user}"],
            check=True, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        return self.url_of(name)


@contextlib.contextmanager
def postgres_server(data: Path) -> Iterator[Postgres]:
    """A PostgreSQL server of its own: ``initdb`` in ``data``, on a free port of 127.0.0.1,
    with a password-protected user and database for Prefect."""
    bindir = postgres_bin()
    if bindir is None:
        raise RuntimeError(
            "PostgreSQL is not installed (make install installs Debian's postgresql)"
        )
    run_as: list[str] = []
    owner = None
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        owner = pwd.getpwnam("postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    data.mkdir(parents=True, exist_ok=True)
    if owner is not None:
        for p in (data, *data.parents):
            if p == Path("/") or p == Path("/tmp"):
                break
            with contextlib.suppress(OSError):
                os.chmod(p, os.stat(p).st_mode | 0o011)  # let postgres traverse
        os.chown(data, owner.pw_uid, owner.pw_gid)
    pgdata = data / "pgdata"
    socket_dir = data / "sock"
    socket_dir.mkdir(exist_ok=True)
    if owner is not None:
        os.chown(socket_dir, owner.pw_uid, owner.pw_gid)
    subprocess.run(
        [*run_as, str(bindir / "initdb"), "-D", str(pgdata), "-U", "postgres", "-A", "trust",
         "--no-sync", "-E", "UTF8"],
        check=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    port = free_port()
    log = data / "postgres.log"
    command = [
        *run_as, str(bindir / "postgres"), "-D", str(pgdata), "-p", str(port),
        "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={socket_dir}",
        "-c", "fsync=off", "-c", "max_connections=200",
    ]  # fmt: skip
    proc = subprocess.Popen(
        command, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    pg = None
    try:
        _wait_ready(port, proc, log)
        password = uuid.uuid4().hex
        psql = [*run_as, str(bindir / "psql"), "-h", str(socket_dir), "-p", str(port),
                "-U", "postgres", "-v", "ON_ERROR_STOP=1", "-q"]  # fmt: skip
        subprocess.run(
            [*psql, "-c", f"CREATE USER prefect PASSWORD '{password}'",
             "-c", "CREATE DATABASE prefect OWNER prefect"],
            check=True, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        # from now on TCP connections need the password
        hba = pgdata / "pg_hba.conf"
        hba.write_text("local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
        subprocess.run([*psql, "-c", "SELECT pg_reload_conf()"], check=True, capture_output=True)
        pg = Postgres(
            port=port, user="prefect", password=password, database="prefect", proc=proc,
            psql=psql, command=command, log=log,
        )  # fmt: skip
        yield pg
    finally:
        stop(pg.proc if pg is not None else proc)


def _wait_ready(port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + 60
    while True:
        ready = subprocess.run(
            [str(postgres_bin() / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
            capture_output=True,
        )
        if ready.returncode == 0:
            return
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"postgres did not start: {log.read_text()[-2000:]}")
        time.sleep(0.3)


# ----------------------------------------------------------------------------- Prefect API


def prefect_api(api: str, path: str, body: dict | None = None, method: str = "POST") -> object:
    """Call the Prefect API. A 503 is Prefect's "retry": the server rolled back on a
    retryable database error; its own client retries it too."""
    import json
    import urllib.error

    for attempt in range(6):
        req = urllib.request.Request(
            f"{api}/{path}",
            data=None if method == "GET" else json.dumps(body or {}).encode(),
            headers={"Content-Type": "application/json"},
            method=method,
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                raw = r.read()
                return json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            if exc.code != 503 or attempt == 5:
                raise
            time.sleep(2**attempt)
    raise AssertionError("unreachable")


def process_tree(pid: int) -> list:
    """The process and all its descendants (psutil.Process objects)."""
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return []
    return [root, *root.children(recursive=True)]


def kill_tree(pid: int) -> list[int]:
    """SIGKILL a process and every descendant at once, as when its host dies."""
    import psutil

    procs = process_tree(pid)
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=30)
    return [p.pid for p in procs]


@contextlib.contextmanager
def s3_server_checking_credentials(log_dir: Path) -> Iterator[S3Server]:
    """An S3 API server that refuses every request not signed with the one access key it
    made (moto's IAM checks switched on after the three calls that create that key). The
    yielded server's ``key`` / ``secret`` are that key."""
    import json

    import boto3

    with s3_server(log_dir, env={"INITIAL_NO_AUTH_ACTION_COUNT": "3"}) as server:
        iam = boto3.client(
            "iam",
            endpoint_url=server.endpoint,
            region_name="us-east-1",
            aws_access_key_id="bootstrap",
            aws_secret_access_key="bootstrap",
        )
        iam.create_user(UserName="domaintune")
        iam.put_user_policy(
            UserName="domaintune",
            PolicyName="store",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
                }
            ),
        )
        key = iam.create_access_key(UserName="domaintune")["AccessKey"]
        server.key, server.secret = key["AccessKeyId"], key["SecretAccessKey"]
        yield server


# ----------------------------------------------------------------------------- SSH hosts


@dataclass
class SSHHosts:
    """Hosts reached over real SSH: one ``sshd`` listening on several loopback addresses,
    each address a host. ``ssh_config`` is what ``training.ssh_config`` names: the port,
    the client key, the known host key (checked strictly), batch mode."""

    hosts: list[str]
    port: int
    ssh_config: Path
    client_key: Path
    proc: subprocess.Popen
    folder: Path

    def hostfile(self, path: Path, slots: int = 1, hosts: list[str] | None = None) -> Path:
        path.write_text("".join(f"{h} slots={slots}\n" for h in hosts or self.hosts))
        return path

    def ssh(self, host: str, command: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ssh", "-F", str(self.ssh_config), host, command],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def config(
        self, name: str, ports: dict[str, int] | None = None, key: Path | None = None
    ) -> Path:
        """Another SSH config for these hosts: a host on another port, another client key."""
        path = self.folder / name
        path.write_text(
            _client_config(
                {h: (ports or {}).get(h, self.port) for h in self.hosts},
                key or self.client_key,
                self.folder / "known_hosts",
            )
        )
        return path


def _client_config(ports: dict[str, int], key: Path, known_hosts: Path) -> str:
    user = pwd.getpwuid(os.geteuid()).pw_name
    return "".join(f"Host {h}\n    Port {p}\n" for h, p in ports.items()) + (
        "Host *\n"
        f"    User {user}\n    IdentityFile {key}\n    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile {known_hosts}\n    StrictHostKeyChecking yes\n"
        "    BatchMode yes\n    ConnectTimeout 10\n    LogLevel ERROR\n"
    )


def make_ssh_key(path: Path) -> Path:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "domaintune-test", "-f", str(path)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return path


def ssh_tools_missing() -> str | None:
    """Why the SSH hosts cannot run here (None: they can)."""
    for tool in ("/usr/sbin/sshd", "ssh", "ssh-keygen", "pdsh"):
        if not shutil.which(tool):
            return f"{tool} is not installed (make install installs openssh-server and pdsh)"
    if os.geteuid() != 0:
        return "sshd for the two-host tests needs root (its privilege separation)"
    return None


@contextlib.contextmanager
def ssh_hosts(
    folder: Path, hosts: tuple[str, ...] = ("127.0.0.1", "127.0.0.2")
) -> Iterator[SSHHosts]:
    """``sshd`` on a free port of each loopback address in ``hosts``, with a host key and a
    client key generated for it; the SSH config the test's client uses names both."""
    missing = ssh_tools_missing()
    if missing:
        raise RuntimeError(missing)
    if not all(h.startswith("127.") for h in hosts):
        raise ValueError("the test hosts are loopback addresses only")
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    host_key, client_key = folder / "host_ed25519", folder / "client_ed25519"
    for key in (host_key, client_key):
        make_ssh_key(key)
    (folder / "authorized_keys").write_text(client_key.with_suffix(".pub").read_text())
    pub = host_key.with_suffix(".pub").read_text().split()
    port = free_port()
    (folder / "known_hosts").write_text("".join(f"[{h}]:{port} {pub[0]} {pub[1]}\n" for h in hosts))
    listen = "".join(f"ListenAddress {h}:{port}\n" for h in hosts)
    (folder / "sshd_config").write_text(
        f"{listen}HostKey {host_key}\nPidFile {folder / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {folder / 'authorized_keys'}\n"
        "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nX11Forwarding no\n"
        "AllowTcpForwarding no\nPermitUserEnvironment no\nMaxStartups 64\nMaxSessions 64\n"
        "LogLevel VERBOSE\n"
    )
    config = folder / "ssh_config"
    config.write_text(
        _client_config(dict.fromkeys(hosts, port), client_key, folder / "known_hosts")
    )
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation folder
    log = folder / "sshd.log"
    proc = subprocess.Popen(
        ["/usr/sbin/sshd", "-D", "-e", "-f", str(folder / "sshd_config")],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    found = SSHHosts(list(hosts), port, config, client_key, proc, folder)
    try:
        deadline = time.time() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"sshd did not start: {log.read_text()[-2000:]}")
            if all(found.ssh(h, "true", timeout=15).returncode == 0 for h in hosts):
                break
            if time.time() > deadline:
                raise RuntimeError(f"sshd does not answer: {log.read_text()[-2000:]}")
            time.sleep(0.3)
        yield found
    finally:
        stop(proc)
