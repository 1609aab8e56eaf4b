"""Throwaway PostgreSQL and Redis servers for the tests and benchmarks: real servers on real sockets,
listening on 127.0.0.1 only (a free port), their files in a temporary directory, removed when stopped.

PostgreSQL comes from Debian's ``postgresql`` package (``/usr/lib/postgresql/<version>/bin``) and Redis from
``redis-server``; ``make test`` installs both when missing. ``initdb`` and ``postgres`` refuse to run as
root: as root, the cluster is created and run as an unprivileged system user (``postgres``, which the
Debian package creates, else ``nobody``), owning the temporary directory.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen | None, what: str, log: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc is not None and proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start:\n{_tail(log)}") from None
            time.sleep(0.05)


def _tail(path: str, n: int = 3000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return "(no log)"


def postgres_bindir() -> str:
    """The newest Debian PostgreSQL's server binaries, else the ones on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    if initdb:
        return os.path.dirname(initdb)
    raise RuntimeError("PostgreSQL's initdb was not found: `make test` installs Debian's postgresql "
                       "(or: apt-get install postgresql)")


def _unprivileged_user() -> pwd.struct_passwd | None:
    """None when not root (run as ourselves); as root the ``postgres`` user if it exists, else ``nobody``."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root, and neither a 'postgres' nor a 'nobody' user exists to run PostgreSQL")


class PostgresServer:
    """``initdb`` + ``pg_ctl start`` under a temporary directory: 127.0.0.1 on a free port, its unix socket in
    that directory, ``fsync=off`` (throwaway data), trust authentication for the superuser ``postgres``."""

    def __init__(self) -> None:
        self.bindir = postgres_bindir()
        self.user = _unprivileged_user()
        self.dir = tempfile.mkdtemp(prefix="mailpipe-pg-")
        self.data = os.path.join(self.dir, "data")
        self.log = os.path.join(self.dir, "postgres.log")
        self.port = free_port()
        self.host = "127.0.0.1"
        self.username = "postgres"
        self.started = False

    def _run(self, *args: str) -> None:
        kw: dict = {}
        if self.user is not None:
            kw = dict(user=self.user.pw_uid, group=self.user.pw_gid, extra_groups=[])
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": self.dir}
        out = subprocess.run([os.path.join(self.bindir, args[0]), *args[1:]], capture_output=True, text=True,
                             env=env, cwd=self.dir, timeout=120, **kw)
        if out.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({out.returncode}):\n{out.stdout[-2000:]}{out.stderr[-2000:]}"
                               f"\n{_tail(self.log)}")

    def start(self) -> "PostgresServer":
        if self.user is not None:
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        self._run("initdb", "-D", self.data, "-U", self.username, "--auth=trust", "-E", "UTF8", "--locale=C",
                  "--no-sync")
        opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.dir} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300 "
                "-c shared_buffers=64MB")
        self._run("pg_ctl", "-D", self.data, "-l", self.log, "-o", opts, "-w", "-t", "60", "start")
        self.started = True
        return self

    def stop(self) -> None:
        if self.started:
            try:
                self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "-t", "30", "stop")
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
            self.started = False
        shutil.rmtree(self.dir, ignore_errors=True)

    def connect(self, dbname: str = "postgres"):
        import psycopg2

        conn = psycopg2.connect(host=self.host, port=self.port, user=self.username, dbname=dbname)
        conn.autocommit = True
        return conn

    def create_database(self, prefix: str = "t") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return name

    def drop_database(self, name: str) -> None:
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            conn.close()

    def storage_config(self, db_name: str) -> dict:
        """The ``storage:`` section of a dagster.yaml for database ``db_name`` (dagster-postgres)."""
        return {"postgres": {"postgres_db": {
            "hostname": self.host, "port": self.port, "username": self.username, "password": "",
            "db_name": db_name, "scheme": "postgresql+psycopg2"}}}

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class RedisServer:
    """``redis-server`` on 127.0.0.1 and a free port, no persistence (no RDB snapshots, no AOF)."""

    def __init__(self) -> None:
        self.binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.path.exists(self.binary):
            raise RuntimeError("redis-server was not found: `make test` installs Debian's redis-server "
                               "(or: apt-get install redis-server)")
        self.dir = tempfile.mkdtemp(prefix="mailpipe-redis-")
        self.port = free_port()
        self.log = os.path.join(self.dir, "redis.log")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> "RedisServer":
        self.proc = subprocess.Popen(
            [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", self.dir, "--daemonize", "no", "--protected-mode", "yes", "--logfile", self.log],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        _wait_port(self.port, self.proc, "redis-server", self.log)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class CeleryWorker:
    """A dagster-celery worker, started as its docs say: ``dagster-celery worker start -A dagster_celery.app
    -y celery.yaml`` (the yaml's ``execution: config:`` names the broker and result backend), with ``env``
    (DAGSTER_HOME: the worker runs each run in its pool processes, against that instance). It runs in its
    own process group (dagster-celery starts ``celery`` as its child), stopped as a whole; log in ``log``."""

    def __init__(self, redis_url: str, workdir: str, env: dict[str, str], concurrency: int = 2,
                 name: str = "mailpipe") -> None:
        import sys

        import yaml

        self.bin = os.path.dirname(sys.executable)
        self.cfg = os.path.join(workdir, "celery.yaml")
        self.log = os.path.join(workdir, "celery.log")
        with open(self.cfg, "w") as f:
            yaml.safe_dump({"execution": {"config": {"broker": f"{redis_url}/0", "backend": f"{redis_url}/1"}}}, f)
        self.env = {**env, "PATH": f"{self.bin}{os.pathsep}{env.get('PATH', '')}"}  # it runs `celery` from PATH
        self.args = [os.path.join(self.bin, "dagster-celery"), "worker", "start", "-A", "dagster_celery.app",
                     "-y", self.cfg, "-n", name, "--", f"--concurrency={concurrency}", "--without-gossip",
                     "--without-mingle", "--without-heartbeat"]
        self.proc: subprocess.Popen | None = None

    def read_log(self) -> str:
        return _tail(self.log, 10**9)

    def start(self, cwd: str | None = None, timeout: float = 120) -> "CeleryWorker":
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.args, env=self.env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while " ready." not in self.read_log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the Celery worker did not start:\n{_tail(self.log)}")
            time.sleep(0.2)
        return self

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM to the group (a warm shutdown), SIGKILL to whatever is left of it after ``timeout``."""
        import signal

        if self.proc is None:
            return
        pgid, self.proc = self.proc.pid, None
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)  # anyone left in the group?
            except ProcessLookupError:
                return
            time.sleep(0.2)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
