"""Runs DB backend fixtures (load with ``pytest_plugins = ['tests.backends']``).

``collection`` is parametrized over every backend cax can talk to, so one contract test checks them
all: ``mongomock`` (in memory), ``embedded`` (cax's own SQLite store, a file in tmp_path), ``wire``
(a SecantusDB MongoDB wire-protocol server, in-process, reached through pymongo) and ``mongodb`` (a
real server from ``CAX_TEST_MONGO_URI``; plain skip without it, even under CI, since none exists here).

``wire_uri`` is the URI of the shared in-process SecantusDB server; ``wire_daemon`` runs SecantusDB
as a separate process that tests may kill -9 and restart on the same storage directory.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import missing_component
from tests.waiting import free_port, wait_for_port

BACKENDS = ["mongomock", "embedded", "wire", "mongodb"]


def _unique_db_name() -> str:
    return f"cax_test_{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def _wire_server():
    """One in-process SecantusDB for the whole session (tests use distinct database names)."""
    try:
        from secantus import SecantusDBServer
    except ImportError as e:
        missing_component(f"SecantusDB (PyPI SecantusDB) not importable: {e}")
    try:
        with SecantusDBServer(storage_path=":memory:") as server:
            yield server
    except OSError as e:
        missing_component(f"SecantusDB server could not start: {e}")


@pytest.fixture(scope="session")
def wire_uri(_wire_server) -> str:
    """``mongodb://`` URI of the session's SecantusDB server."""
    return _wire_server.uri


def _pymongo_collection(uri: str, request):
    import pymongo

    client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=10_000, tz_aware=True)
    name = _unique_db_name()
    request.addfinalizer(client.close)
    request.addfinalizer(lambda: client.drop_database(name))
    return client[name]["runs_new"]


@pytest.fixture(params=BACKENDS)
def collection(request, tmp_path):
    """A fresh, empty, pymongo-compatible ``runs_new`` collection on each backend.

    ``request.param`` names the backend, so a test can branch on it (e.g. cross-process tests only
    make sense for backends other processes can reach).
    """
    backend = request.param
    if backend == "mongomock":
        import mongomock

        return mongomock.MongoClient(tz_aware=True)[_unique_db_name()]["runs_new"]
    if backend == "embedded":
        from cax.runsdb.embedded import EmbeddedClient

        client = EmbeddedClient(tmp_path / "runsdb.sqlite")
        request.addfinalizer(client.close)
        return client["run"]["runs_new"]
    if backend == "wire":
        return _pymongo_collection(request.getfixturevalue("wire_uri"), request)
    if backend == "mongodb":
        uri = os.environ.get("CAX_TEST_MONGO_URI")
        if not uri:
            # Deliberately a plain skip even under CI: no real MongoDB exists on this machine kind.
            pytest.skip("CAX_TEST_MONGO_URI not set (no real MongoDB to test against)")
        return _pymongo_collection(uri, request)
    raise AssertionError(backend)


def backend_of(request) -> str:
    """The backend name of the ``collection`` fixture in this test."""
    return request.node.callspec.params["collection"]


class WireDaemon:
    """SecantusDB as a separate process on a fixed port and storage dir, so it can be killed and
    restarted with the data kept (``--sync-on-commit``: acknowledged writes survive ``kill -9``)."""

    def __init__(self, storage: Path, port: int | None = None, start_timeout: float = 30.0):
        exe = shutil.which("secantusd-py") or str(Path(sys.executable).with_name("secantusd-py"))
        if not os.path.exists(exe):
            raise FileNotFoundError("secantusd-py")
        self.exe, self.storage = exe, Path(storage)
        self.storage.mkdir(parents=True, exist_ok=True)
        # An empty config file disables the launcher's auto-discovery of ./secantusd.toml etc.
        self.config = self.storage.parent / f"{self.storage.name}.secantusd.toml"
        self.config.write_text("")
        self.host, self.port = "127.0.0.1", port or free_port()
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.log = self.storage.parent / f"{self.storage.name}.log"

    @property
    def uri(self) -> str:
        return f"mongodb://{self.host}:{self.port}/?directConnection=true"

    def start(self):
        if self.proc is not None and self.proc.poll() is None:
            return
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [self.exe, "--config", str(self.config), "--host", self.host, "--port",
                 str(self.port), "--storage-path", str(self.storage), "--sync-on-commit",
                 "--log-level", "WARNING"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_port(self.host, self.port, self.start_timeout, self.proc)
        except Exception:
            self.kill()
            raise

    def kill(self):
        """``kill -9``: no clean shutdown, as after a crash or power cut of the DB host."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def wire_daemon(tmp_path):
    """A started SecantusDB daemon process with ``.uri``, ``.kill()``, ``.start()``, ``.stop()``."""
    try:
        daemon = WireDaemon(tmp_path / "secantus-data")
    except FileNotFoundError:
        missing_component("secantusd-py (PyPI SecantusDB) not installed")
    try:
        daemon.start()
    except (RuntimeError, TimeoutError, OSError) as e:
        missing_component(f"secantusd-py did not start: {e}")
    yield daemon
    daemon.kill()
