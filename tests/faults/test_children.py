"""Finding 7: what cax leaves behind in its children and after it dies.

The real CLI (``.venv/bin/cax --once``) pulls a run over the private sshd (rsync, so one OpenSSH
ControlMaster) from a Runs DB that requires a password. The run's one file is a FIFO: rsync copies
it as a FIFO, and the verification that follows blocks opening it, so cax is provably mid-pass with
its master up when the test acts -- no timing guess. Then:

- SIGKILL cax: its master must end (and sshd lose its connection) without anyone's help;
- a run killed with its whole process tree leaves its control directory; the next cax start
  removes it and leaves the live directory of another running cax alone;
- cax holds the password variable (it needs it), its children (ssh master, rsync) do not;
- a processing job (local backend and real Slurm) still records its result in the
  password-protected Runs DB, yet neither the job nor the processor sees the password variable.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from datetime import datetime, timezone

import pytest

from cax import config as cfgmod
from cax.runsdb import connect
from cax.tasks.process import ProcessBatchQueue
from cax.tasks.base import Context
from tests.conftest import missing_component
from tests.slurm import pid_alive
from tests.waiting import wait_for

pytest_plugins = ["tests.sshd"]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CAX = os.path.join(os.path.dirname(sys.executable), "cax")
SECRET_VAR = "CAX_TEST_DB_SECRET"  # the config's password_env
NAME = "160315_1432"


# ---------------------------------------------------------------------- a Runs DB with a password
@pytest.fixture(scope="module")
def auth_db(tmp_path_factory):
    """A SecantusDB that refuses unauthenticated clients: ``(URI naming user cax, password)``."""
    try:
        import pymongo
        from secantus import SecantusDBServer
    except ImportError as e:
        missing_component(f"SecantusDB (MongoDB wire server) not importable: {e}")
    storage = str(tmp_path_factory.mktemp("authdb"))
    password = "pw-" + uuid.uuid4().hex
    with SecantusDBServer(storage_path=storage) as server:  # provision the user first
        client = pymongo.MongoClient(server.uri, serverSelectionTimeoutMS=10_000)
        client.admin.command("createUser", "cax", pwd=password, roles=["root"])
        client.close()
    with SecantusDBServer(storage_path=storage, require_auth=True) as server:
        yield server.uri.replace("mongodb://", "mongodb://cax@", 1), password


# ---------------------------------------------------------------------- /proc
def environ(pid: int) -> dict:
    with open(f"/proc/{pid}/environ", "rb") as f:
        items = [e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e]
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in items}


def _children(pid: int) -> list:
    from tests.sshd import _children as below  # a plugin module: imported once pytest loaded it
    return below(pid)


def cmdline(pid: int) -> list:
    from tests.sshd import cmdline as argv_of
    return argv_of(pid)


def masters(pid: int) -> list:
    from tests.sshd import masters as below
    return below(pid)


def sshd_connections(sshd) -> int:
    """Processes sshd runs for live connections (each connection has its own)."""
    return len(_children(sshd.proc.pid))


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and everything below it at once (as an OOM kill of the group would): all
    are stopped first, so none sees another die and acts on it."""
    victims = [pid] + _children(pid)
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for p in victims:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass


# ---------------------------------------------------------------------- a cax held mid-pass
@contextlib.contextmanager
def password_in_env(password):
    """The test process itself opens the Runs DB as cax would: with the password variable set."""
    old = os.environ.get(SECRET_VAR)
    os.environ[SECRET_VAR] = password
    try:
        yield
    finally:
        if old is None:
            del os.environ[SECRET_VAR]
        else:
            os.environ[SECRET_VAR] = old


class HeldPull:
    """A config (archive pulls from buffer over sshd with rsync) and a cax process held in its
    verification by a FIFO, with its ControlMaster up."""

    def __init__(self, tmp_path, sshd, auth_db, tmpdir, tag="a"):
        self.uri, self.password = auth_db
        self.root = tmp_path / tag
        remote = self.root / "remote"
        (self.root / "archive").mkdir(parents=True)
        src = remote / NAME
        src.mkdir(parents=True)
        (src / "small.bin").write_bytes(b"x" * 1000)
        os.mkfifo(src / "stream.bin")
        self.collection = "runs_" + uuid.uuid4().hex[:8]
        doc = {"runs_db": self.uri, "password_env": SECRET_VAR, "collection": self.collection,
               "sites": [
                   {"name": "buffer", "directory": str(remote), "data_type": ["raw"],
                    "hostname": sshd.host, "port": sshd.port, "username": sshd.user,
                    "key_file": sshd.key_file, "known_hosts": sshd.known_hosts,
                    "method": "rsync"},
                   {"name": "archive", "directory": str(self.root / "archive"),
                    "download_options": ["buffer"], "data_type": ["raw"], "max_transfers": 2}]}
        self.cfg = str(self.root / "cax.json")
        with open(self.cfg, "w") as f:
            json.dump(doc, f)
        self.env = dict(os.environ, TMPDIR=tmpdir, PYTHONPATH=ROOT,
                        MONGO_PASSWORD=self.password, **{SECRET_VAR: self.password})
        t = datetime(2016, 3, 15, tzinfo=timezone.utc)
        with password_in_env(self.password):
            self.db = connect(cfgmod.load(self.cfg))
        self.db.insert_run({"number": 1, "name": NAME, "detector": "tpc", "start": t,
                            "data": [{"host": "buffer", "type": "raw", "status": "transferred",
                                      "location": str(src), "checksum": "ab" * 64,
                                      "checksum_type": "sha512", "size": 1000,
                                      "creation_time": t, "creation_place": "buffer"}]})
        self.proc = None

    def start(self, **env):
        self.proc = subprocess.Popen([CAX, "--config", self.cfg, "--host", "archive", "--once",
                                      "--log", "DEBUG"], env=dict(self.env, **env),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(self.root / "cax.err", "ab"))
        return self

    def archive_status(self):
        run = self.db.collection.find_one({"number": 1}) or {}
        return next((d.get("status") for d in run.get("data") or [] if d["host"] == "archive"),
                    None)

    def wait_held(self):
        """The pull is done and cax verifies (blocked on the FIFO) with its master up."""
        def held():
            if self.proc.poll() is not None:
                raise AssertionError(f"cax ended early ({self.proc.returncode}): "
                                     f"{(self.root / 'cax.err').read_text()[-2000:]}")
            m = masters(self.proc.pid)
            return m if m and self.archive_status() == "verifying" else None
        found = wait_for(held, 60, "cax verifying with its ControlMaster up")
        assert len(found) == 1, found
        return found[0]

    def stop(self):
        """End what this test started: cax and whatever is left below it (by pid)."""
        if self.proc is not None:
            if self.proc.poll() is None:
                kill_tree(self.proc.pid)
            self.proc.wait(timeout=30)


@pytest.fixture
def short_tmp():
    """A private, short TMPDIR for the cax processes (control sockets have a path length limit;
    other cax processes on this machine keep theirs in /tmp)."""
    d = tempfile.mkdtemp(prefix="cxt")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def leftover_masters(tmpdir):
    """Masters whose control socket lives under ``tmpdir`` (found by their command line)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            argv = cmdline(int(entry))
            if argv and os.path.basename(argv[0]) == "ssh" and "ControlMaster=yes" in argv and \
                    any(a.startswith(f"ControlPath={tmpdir}/") for a in argv):
                out.append(int(entry))
    return out


@pytest.fixture
def reap(short_tmp):
    """Kill (by pid) any master a failing test leaves under its private TMPDIR."""
    held = []
    yield held
    for h in held:
        h.stop()
    for pid in leftover_masters(short_tmp):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------------- the tests
def test_sigkilled_cax_takes_its_ssh_master_and_sshd_connection_along(tmp_path, live_sshd,
                                                                       auth_db, short_tmp, reap):
    baseline = sshd_connections(live_sshd)
    held = HeldPull(tmp_path, live_sshd, auth_db, short_tmp).start()
    reap.append(held)
    master, control = held.wait_held()
    assert sshd_connections(live_sshd) > baseline
    held.proc.kill()
    held.proc.wait(timeout=30)
    wait_for(lambda: not pid_alive(master), 30,
             f"ControlMaster {master} to end after cax's SIGKILL")
    wait_for(lambda: sshd_connections(live_sshd) <= baseline, 30,
             "sshd to lose the master's connection")
    wait_for(lambda: not os.path.exists(os.path.dirname(control)), 30,
             "the control directory to be removed")


def test_next_start_removes_a_dead_runs_control_dir_and_keeps_a_live_one(tmp_path, live_sshd,
                                                                           auth_db, short_tmp,
                                                                           reap):
    live = HeldPull(tmp_path, live_sshd, auth_db, short_tmp, "live").start()
    reap.append(live)
    live_master, live_control = live.wait_held()
    dead = HeldPull(tmp_path, live_sshd, auth_db, short_tmp, "dead").start()
    reap.append(dead)
    dead_master, dead_control = dead.wait_held()
    kill_tree(dead.proc.pid)  # cax and every helper below it at once: nobody left to clean
    dead.proc.wait(timeout=30)
    wait_for(lambda: not pid_alive(dead_master), 30, "the killed master to be gone")
    assert os.path.isdir(os.path.dirname(dead_control))  # the leftover the next start must clean

    # the next start: a pass with nothing to do at a local-only site
    quiet = tmp_path / "quiet"
    (quiet / "data").mkdir(parents=True)
    cfg = quiet / "cax.json"
    cfg.write_text(json.dumps({"runs_db": live.uri, "password_env": SECRET_VAR,
                               "collection": "runs_" + uuid.uuid4().hex[:8],
                               "sites": [{"name": "q", "directory": str(quiet / "data")}]}))
    r = subprocess.run([CAX, "--config", str(cfg), "--host", "q", "--once"], env=live.env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(os.path.dirname(dead_control)), os.listdir(short_tmp)
    assert os.path.isdir(os.path.dirname(live_control)) and os.path.exists(live_control)
    assert pid_alive(live_master) and live.proc.poll() is None


def test_children_of_cax_do_not_inherit_the_password(tmp_path, live_sshd, auth_db, short_tmp,
                                                     reap):
    # a probe first in cax's PATH records what rsync is given, then runs the real rsync
    probe = tmp_path / "probe"
    probe.mkdir()
    real = shutil.which("rsync")
    (probe / "rsync").write_text(f'#!/bin/sh\ncat /proc/$$/environ > "{probe}/env.$$"\n'
                                 f'exec {real} "$@"\n')
    (probe / "rsync").chmod(0o755)
    held = HeldPull(tmp_path, live_sshd, auth_db, short_tmp)
    reap.append(held)
    held.start(PATH=f"{probe}{os.pathsep}{os.environ['PATH']}")
    master, _control = held.wait_held()
    parent = environ(held.proc.pid)
    assert parent[SECRET_VAR] == held.password and parent["MONGO_PASSWORD"] == held.password
    seen = {"ssh master": environ(master)}
    for f in probe.glob("env.*"):
        items = [e.split("=", 1) for e in f.read_text().split("\0") if "=" in e]
        seen[f"rsync ({f.name})"] = dict(items)
    assert any(k.startswith("rsync") for k in seen), "rsync never ran through the probe"
    for who, env in seen.items():
        assert SECRET_VAR not in env and "MONGO_PASSWORD" not in env, f"{who} got the password"
        assert held.password not in "\0".join(env.values()), f"{who} got the password"


# a processor that reports its own environment and its parent's (cax-process), then copies
DUMP_AND_COPY = [sys.executable, "-c",
                 "import json, os, shutil, sys\n"
                 "own = dict(os.environ)\n"
                 "parent = open('/proc/%d/environ' % os.getppid(), 'rb').read().decode()\n"
                 "json.dump(dict(own=own, parent=parent), open(sys.argv[3], 'w'))\n"
                 "shutil.copytree(sys.argv[1], sys.argv[2])",
                 "{input}", "{output}", "ENVFILE"]


@pytest.mark.parametrize("backend", ["local", pytest.param("slurm", marks=pytest.mark.slurm)])
def test_processing_jobs_reach_the_runs_db_without_the_password_in_their_environment(
        request, tmp_path, auth_db, monkeypatch, backend):
    if backend == "slurm":
        request.getfixturevalue("slurm")  # SLURM_CONF in os.environ points at the private one
    uri, password = auth_db
    monkeypatch.setenv(SECRET_VAR, password)
    monkeypatch.setenv("MONGO_PASSWORD", password)
    # jobs start `python -m cax.processing` elsewhere: they must find this checkout's cax
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    envfile = tmp_path / "job-env.json"
    command = [a if a != "ENVFILE" else str(envfile) for a in DUMP_AND_COPY]
    host = "p" + uuid.uuid4().hex[:8]
    data = tmp_path / "data"
    raw = data / NAME
    raw.mkdir(parents=True)
    (raw / "f.bin").write_bytes(os.urandom(1000))
    proc = {"backend": backend, "versions": ["v1"], "command": command,
            "log_dir": str(tmp_path / "logs"), "max_retries": 0}
    proc.update({"state_dir": str(tmp_path / "state")} if backend == "local"
                else {"script_dir": str(tmp_path / "scripts")})
    doc = {"runs_db": uri, "password_env": SECRET_VAR, "collection": "runs_" + uuid.uuid4().hex[:8],
           "sites": [{"name": host, "directory": str(data), "data_type": ["raw", "processed"],
                      "processing": proc}]}
    cfg = tmp_path / "cax.json"
    cfg.write_text(json.dumps(doc))
    config = cfgmod.load(str(cfg))
    db = connect(config)
    t = datetime(2016, 3, 15, tzinfo=timezone.utc)
    db.insert_run({"number": 1, "name": NAME, "detector": "tpc", "start": t,
                   "data": [{"host": host, "type": "raw", "status": "transferred",
                             "location": str(raw), "checksum": "x" * 128,
                             "checksum_type": "sha512"}]})
    ProcessBatchQueue(Context(config=config, host=host, db=db)).go()

    def processed():
        run = db.collection.find_one({"number": 1})
        d = next((d for d in run["data"] if d["type"] == "processed"), None)
        return d if d and d["status"] in ("transferred", "error") else None

    def logs():
        return " | ".join(p.read_text(errors="replace")[-800:]
                          for p in sorted(tmp_path.glob("logs/*.log")) +
                          sorted(tmp_path.glob("state/jobs/*/wrapper.log")))

    d = wait_for(processed, 120, "the job to record its result")
    # the job reached the password-protected Runs DB: it had the credential
    assert d["status"] == "transferred", (d.get("error"), logs())
    dumped = json.loads(envfile.read_text())
    assert SECRET_VAR not in dumped["own"] and "MONGO_PASSWORD" not in dumped["own"]
    assert password not in json.dumps(dumped["own"])
    assert password not in dumped["parent"], "cax-process was started with the password"
    # whatever carried the credential to the job is gone once the job is done
    left = [os.path.join(r, f) for top in (tmp_path / "logs", tmp_path / "scripts")
            for r, _d, fs in os.walk(top) for f in fs
            if password in open(os.path.join(r, f), errors="replace").read()]
    assert not left, left


def test_master_started_by_a_worker_thread_lives_until_closed_then_leaves_nothing(live_sshd,
                                                                                    tmp_path,
                                                                                    short_tmp,
                                                                                    monkeypatch):
    """Copy workers start masters: the master must not die with the thread (as the parent-death
    signal would have it) but with cax, and a normal close leaves no control directory."""
    import threading

    from cax.transfer.ssh import OpenSSHMaster
    monkeypatch.setattr(tempfile, "tempdir", short_tmp)
    master = OpenSSHMaster(live_sshd.site(root=str(tmp_path / "remote")))
    worker = threading.Thread(target=master.connect)
    worker.start()
    worker.join()
    try:
        (pid, control), = masters(os.getpid())
        assert master.run("echo still-here")[1] == b"still-here\n"
        assert pid_alive(pid)
    finally:
        master.close()
    wait_for(lambda: not pid_alive(pid), 30, "the master to end on close")
    assert not os.path.exists(os.path.dirname(control)), os.listdir(short_tmp)


def test_job_credential_is_private_read_once_and_refused_when_readable_by_others(tmp_path,
                                                                                 monkeypatch):
    from types import SimpleNamespace

    from cax import job_credential
    monkeypatch.setenv(SECRET_VAR, "pw")
    embedded = SimpleNamespace(password_env=SECRET_VAR, runs_db=str(tmp_path / "x.runsdb"))
    assert job_credential.for_job(embedded, str(tmp_path / "logs"), "j") == {}  # needs none
    config = SimpleNamespace(password_env=SECRET_VAR, runs_db="mongodb://cax@db.example:27017/")
    env = job_credential.for_job(config, str(tmp_path / "logs"), "j")
    path = env[job_credential.ENV]
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.stat(os.path.dirname(path)).st_mode & 0o777 == 0o700
    monkeypatch.delenv(SECRET_VAR)
    monkeypatch.setenv(job_credential.ENV, path)
    job_credential.adopt(SECRET_VAR)
    assert os.environ[SECRET_VAR] == "pw" and not os.path.exists(path)
    assert job_credential.ENV not in os.environ  # not passed on to the job's own children
    monkeypatch.setenv(job_credential.ENV, path)  # a second start (a requeued job)
    with pytest.raises(job_credential.CredentialError, match="is gone"):
        job_credential.adopt(SECRET_VAR)
    env = job_credential.for_job(config, str(tmp_path / "logs"), "k")
    os.chmod(env[job_credential.ENV], 0o644)
    monkeypatch.setenv(job_credential.ENV, env[job_credential.ENV])
    with pytest.raises(job_credential.CredentialError, match="not private"):
        job_credential.adopt("OTHER_SECRET")
    assert "OTHER_SECRET" not in os.environ
