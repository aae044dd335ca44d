"""Processing on the site's batch system: ProcessBatchQueue, cax-process and massive-cax.

Jobs really run (private Slurm from tests/slurm.py, and the local backend) and record their results
through a real MongoDB wire server shared by every process (SecantusDB), as at a site.
"""
from __future__ import annotations

import functools
import json
import os
import shlex
import subprocess
import sys
import threading
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from click.testing import CliRunner

from cax import config as cfgmod
from cax.batch import ACTIVE_STATES, FINAL_STATES, RUNNING, get_backend
from cax.checksum import checksum
from cax.runsdb import connect
from cax.tasks.base import Context
from cax.processing import ProcessRun
from cax.tasks.process import ProcessBatchQueue, fill_command
from tests.conftest import missing_component
from tests.waiting import wait_for

pytest_plugins = ["tests.slurm"]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
VERSION = "v1.0.2"
COPY = [PY, "-c", "import shutil, sys; shutil.copytree(sys.argv[1], sys.argv[2]); print('copied', sys.argv[3])",
        "{input}", "{output}", "{name}"]
FAIL = [PY, "-c", "import sys; print('line one'); print('bad thing happened', sys.argv[1]); sys.exit(3)",
        "{name}"]
SLEEP = [PY, "-c", "import time; time.sleep(120)"]


#: the batch system is asked by squeue/scontrol: poll it gently
wait_until = functools.partial(wait_for, interval=0.1)


@pytest.fixture(scope="session")
def wire_uri():
    try:
        from secantus import SecantusDBServer
    except ImportError as e:
        missing_component(f"SecantusDB (MongoDB wire server) not importable: {e}")
    with SecantusDBServer(storage_path=":memory:") as server:
        yield server.uri


@pytest.fixture(autouse=True)
def _job_pythonpath(monkeypatch):
    # jobs start `python -m cax.processing` elsewhere: they must find this checkout's cax
    monkeypatch.setenv("PYTHONPATH", REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


class Site:
    """One processing site in tmp_path: config, Runs DB handle, backend, and job bookkeeping."""

    def __init__(self, tmp_path, uri, backend, cluster=None):
        self.tmp = tmp_path
        self.uri = uri
        self.backend_name = backend
        self.cluster = cluster
        self.host = "p" + uuid.uuid4().hex[:8]
        self.collection = "runs_" + uuid.uuid4().hex[:8]
        self.data = tmp_path / "data"
        self.data.mkdir()
        self.cfg = None
        self.db = None

    def configure(self, command, site_fields=None, **processing):
        proc = {"backend": self.backend_name, "versions": [VERSION], "command": command,
                "log_dir": str(self.tmp / "logs"), "max_retries": 0, **processing}
        if self.backend_name == "local":
            proc.setdefault("state_dir", str(self.tmp / "state"))
            proc.setdefault("max_jobs", 4)
        else:
            proc.setdefault("script_dir", str(self.tmp / "scripts"))
        doc = {"runs_db": self.uri, "collection": self.collection,
               "sites": [{"name": self.host, "directory": str(self.data),
                          "data_type": ["raw", "processed"], "processing": proc,
                          **(site_fields or {})}]}
        path = self.tmp / "cax.json"
        path.write_text(json.dumps(doc))
        self.cfg = str(path)
        self.db = connect(cfgmod.load(self.cfg))
        return self

    def backend(self):
        return ProcessBatchQueue(self.ctx()).backend()

    def ctx(self, db=None):
        return Context(config=cfgmod.load(self.cfg), host=self.host, db=db or self.db)

    def run_pass(self, db=None):
        return ProcessBatchQueue(self.ctx(db)).go()

    def add_run(self, number, name=None, location=None, **fields):
        name = name or f"160315_{number:04d}"
        if location is None:
            location = str(self.data / name)
            os.makedirs(os.path.join(location, "sub"))
            for i in range(3):
                with open(os.path.join(location, "sub" if i else "", f"f{i}.bin"), "wb") as f:
                    f.write(os.urandom(500 + i))
        t = datetime(2016, 3, 15, tzinfo=timezone.utc) + timedelta(hours=number)
        self.db.insert_run({"number": number, "name": name, "detector": "tpc", "start": t,
                            "data": [{"host": self.host, "type": "raw", "status": "transferred",
                                      "location": location, "checksum": "x" * 128,
                                      "checksum_type": "sha512"}], **fields})
        return location

    def run(self, number):
        return self.db.collection.find_one({"number": number})

    def datum(self, number):
        run = self.run(number)
        return next((d for d in run.get("data") or [] if d.get("type") == "processed"), None)

    def status(self, number):
        d = self.datum(number)
        return d and d.get("status")

    def jobs(self):
        """(job id, name, argv) of every job this site's backend got, finished ones included."""
        if self.backend_name == "local":
            root = self.tmp / "state" / "jobs"
            out = []
            for job_id in sorted(os.listdir(root)) if root.is_dir() else []:
                meta = json.loads((root / job_id / "meta.json").read_text())
                out.append((job_id, meta["name"], meta["argv"]))
            return out
        res = self.cluster.run("squeue", "-h", "-t", "all", "-o", "%i %j")
        return [(i, n, None) for i, n in (line.split(None, 1) for line in res.stdout.splitlines())
                if self.host in n]

    def diagnostics(self) -> str:
        """Job logs and Runs DB state, for failure messages."""
        out = []
        for path in sorted(self.tmp.glob("logs/*.log")) + sorted(self.tmp.glob("state/jobs/*/wrapper.log")):
            out.append(f"{path.name}: " + " | ".join(path.read_text(errors="replace").splitlines()[-6:]))
        for run in self.db.collection.find({}, {"number": 1, "data": 1}):
            out.append(f"run {run['number']}: " + ", ".join(
                f"{d['type']}={d['status']}/{d.get('job_id')}" for d in run.get("data") or []))
        if self.cluster:
            out.append(self.cluster.run("squeue", "-h", "-t", "all", "-o", "%i %j %T", check=False).stdout)
        return "\n".join(out)

    def cleanup(self):
        if self.cfg is None:
            return
        b = self.backend()
        for job_id, _name, _argv in self.jobs():
            if b.status(job_id) in ACTIVE_STATES:
                b.cancel(job_id)


@pytest.fixture(params=["local", pytest.param("slurm", marks=pytest.mark.slurm)])
def site(request, tmp_path, wire_uri):
    cluster = request.getfixturevalue("slurm") if request.param == "slurm" else None
    s = Site(tmp_path, wire_uri, request.param, cluster)
    yield s
    s.cleanup()


@pytest.fixture
def local_site(tmp_path, wire_uri):
    s = Site(tmp_path, wire_uri, "local")
    yield s
    s.cleanup()


# -- both backends ---------------------------------------------------------------------------------
def test_submitted_once_then_transferred_with_checksum(site):
    site.configure(COPY)
    raw = site.add_run(1)
    # two daemons at the same moment, each with its own connection and backend instance
    dbs = [connect(cfgmod.load(site.cfg)) for _ in range(2)]
    barrier = threading.Barrier(2)
    errors = []

    def daemon(db):
        try:
            barrier.wait()
            site.run_pass(db)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=daemon, args=(db,)) for db in dbs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    site.run_pass()  # a later pass: the datum exists, nothing new
    assert len(site.jobs()) == 1
    d = site.datum(1)
    assert d["job_id"] == site.jobs()[0][0] and d["job_backend"] == site.backend_name
    wait_until(lambda: site.status(1) in ("transferred", "error"), 60, "the job to record its result", diagnose=site.diagnostics)
    d = site.datum(1)
    assert d["status"] == "transferred", d.get("error")
    final = str(site.data / VERSION / "160315_0001")
    assert d["location"] == final and d["pax_version"] == VERSION
    assert d["checksum"] == checksum(final) == checksum(raw)
    assert site.run(1)["references"][0]["pax_version"] == VERSION
    assert not os.path.exists(site.data / VERSION / ".160315_0001.cax-partial")
    site.run_pass()
    assert len(site.jobs()) == 1


def test_failing_command_ends_error_with_exit_code_and_tail(site):
    site.configure(FAIL)
    site.add_run(2)
    site.run_pass()
    wait_until(lambda: site.status(2) in ("transferred", "error"), 60, "the job to record its result", diagnose=site.diagnostics)
    d = site.datum(2)
    assert d["status"] == "error"
    assert "exited with code 3" in d["error"] and "bad thing happened 160315_0002" in d["error"]
    assert "\n" not in d["error"] and d["error_time"]
    site.run_pass()  # max_retries 0: stays error, no second job
    assert site.status(2) == "error" and len(site.jobs()) == 1


def test_cancelled_job_found_dead_retried_within_max_retries(site):
    site.configure(SLEEP, site_fields={"retry_delay": 0}, max_retries=1)
    site.add_run(3)
    backend = site.backend()
    site.run_pass()
    first = site.datum(3)["job_id"]
    wait_until(lambda: "started" in site.datum(3), 60, "cax-process to start the command")
    backend.cancel(first)
    wait_until(lambda: backend.status(first) in FINAL_STATES, 30, "the cancelled job to end")
    assert site.status(3) == "processing"  # nobody recorded anything: the job died silently

    site.run_pass()  # found dead -> error -> retry 1 of 1 -> submitted again
    d = site.datum(3)
    assert d["status"] == "processing" and d["job_id"] != first
    retries = site.run(3)["processing_retries"]
    assert len(retries) == 1 and retries[0]["pax_version"] == VERSION
    assert retries[0]["job_id"] == first and "CANCELLED" in retries[0]["error"]

    second = d["job_id"]
    wait_until(lambda: backend.status(second) == RUNNING, 60, "the second job to run")
    backend.cancel(second)
    wait_until(lambda: backend.status(second) in FINAL_STATES, 30, "the second job to end")
    site.run_pass()
    site.run_pass()
    d = site.datum(3)
    assert d["status"] == "error" and d["job_id"] == second
    assert f"batch job {second} ended CANCELLED" in d["error"]
    assert len(site.run(3)["processing_retries"]) == 1
    assert len(site.jobs()) == 2


def backdate_error(site, number, seconds):
    site.db.collection.update_one(
        {"number": number, "data": {"$elemMatch": {"type": "processed", "status": "error"}}},
        {"$set": {"data.$.error_time": datetime.now(timezone.utc) - timedelta(seconds=seconds)}})


def test_failed_attempt_retried_only_after_retry_delay(local_site):
    s = local_site.configure(FAIL, site_fields={"retry_delay": 1000}, max_retries=2)
    s.add_run(71)
    s.run_pass()
    wait_until(lambda: s.status(71) == "error", 60, "the job to record its failure", diagnose=s.diagnostics)
    wait_until(lambda: not s.backend().queued("cax-proc-"), 30, "the job to end")
    s.run_pass()  # failed a moment ago: no retry yet
    assert s.status(71) == "error" and not s.run(71).get("processing_retries")
    assert len(s.jobs()) == 1
    backdate_error(s, 71, 1001)
    s.run_pass()
    assert len(s.run(71)["processing_retries"]) == 1 and len(s.jobs()) == 2
    wait_until(lambda: s.status(71) == "error", 60, "the second job to record its failure", diagnose=s.diagnostics)
    wait_until(lambda: not s.backend().queued("cax-proc-"), 30, "the second job to end")
    backdate_error(s, 71, 1001)  # the second retry waits twice as long
    s.run_pass()
    assert len(s.run(71)["processing_retries"]) == 1 and len(s.jobs()) == 2
    backdate_error(s, 71, 2001)
    s.run_pass()
    assert len(s.run(71)["processing_retries"]) == 2 and len(s.jobs()) == 3


@pytest.mark.slurm
def test_refused_submission_uses_no_retry_and_waits(tmp_path, wire_uri, slurm):
    """sbatch refuses a partition the cluster does not have: the processor never ran, so the
    attempt must not use up max_retries, and the next submission waits retry_delay."""
    s = Site(tmp_path, wire_uri, "slurm", slurm)
    try:
        s.configure(COPY, site_fields={"retry_delay": 600}, partition="nosuchpartition",
                    max_retries=0)
        s.add_run(72)
        s.run_pass()
        d = s.datum(72)
        assert d["status"] == "error" and d["error_kind"] == "submit", d
        assert "submit failed" in d["error"] and "partition" in d["error"].lower()
        assert s.jobs() == []
        s.run_pass()  # within retry_delay: nothing happens
        assert s.datum(72)["error_time"] == d["error_time"]
        backdate_error(s, 72, 601)
        s.run_pass()  # resubmitted although max_retries is 0, refused again, still not counted
        d2 = s.datum(72)
        assert d2["status"] == "error" and d2["error_kind"] == "submit"
        assert d2["error_time"] > d["error_time"]
        assert not s.run(72).get("processing_retries")

        # the partition fixed: the next submission after the delay runs and succeeds
        s.configure(COPY, site_fields={"retry_delay": 600}, max_retries=0)
        backdate_error(s, 72, 601)
        s.run_pass()
        wait_until(lambda: s.status(72) in ("transferred", "error"), 60, "the job", diagnose=s.diagnostics)
        assert s.status(72) == "transferred", s.datum(72).get("error")
    finally:
        s.cleanup()


def test_job_dying_in_env_setup_leaves_its_log_tail_in_the_datum(site):
    setup = str(site.tmp / "no-such-dir" / "setup.sh")
    site.configure(COPY, env_setup=["export X=/opt/x:$SURELY_UNSET_CAX_VARIABLE",
                                    "echo preparing the environment", f"source {setup}"])
    site.add_run(74)
    backend = site.backend()
    site.run_pass()
    job_id = site.datum(74)["job_id"]
    wait_until(lambda: backend.status(job_id) in FINAL_STATES, 60, "the job to end", diagnose=site.diagnostics)
    assert site.status(74) == "processing"  # cax-process never ran
    site.run_pass()
    d = site.datum(74)
    assert d["status"] == "error" and f"batch job {job_id} ended FAILED" in d["error"], d
    assert "log tail: preparing the environment |" in d["error"]
    assert f"{setup}: No such file or directory" in d["error"]
    assert "unbound variable" not in d["error"]


def test_max_queued_and_donotprocess(site):
    gate = site.tmp / "gate"
    site.configure([PY, "-c", "import os, shutil, sys, time\n"
                    "while not os.path.exists(sys.argv[1]): time.sleep(0.1)\n"
                    "shutil.copytree(sys.argv[2], sys.argv[3])", str(gate), "{input}", "{output}"],
                   max_queued=2)
    for n in (1, 2, 3):
        site.add_run(n)
    site.add_run(4, tags=[{"name": "donotprocess"}])
    site.add_run(5, trigger={"events_built": 0})
    site.add_run(6, trigger={"events_built": 10})
    site.run_pass()
    site.run_pass()
    assert [site.status(n) for n in range(1, 7)] == ["processing", "processing", None, None, None, None]
    assert len(site.jobs()) == 2
    gate.write_text("go")
    wait_until(lambda: site.status(1) == site.status(2) == "transferred", 60, "runs 1 and 2", diagnose=site.diagnostics)
    wait_until(lambda: not site.backend().queued("cax-proc-"), 30, "the queue to drain")
    site.run_pass()
    wait_until(lambda: site.status(3) == site.status(6) == "transferred", 60, "runs 3 and 6", diagnose=site.diagnostics)
    site.run_pass()
    assert site.status(4) is None and site.status(5) is None
    assert len(site.jobs()) == 4


def test_hostile_run_fields_cannot_change_the_command_line(site, tmp_path):
    site.configure([PY, "-c", "import json, os, sys; os.makedirs(sys.argv[-1]); "
                    "json.dump(sys.argv[1:], open(os.path.join(sys.argv[-1], 'argv.json'), 'w'))",
                    "{name}", "{input}", "in={input};{number}", "{version}", "{output}"])
    canaries = [tmp_path / f"pwned{i}" for i in range(4)]
    hostile_inputs = [str(site.data / f"x; touch {canaries[0]}"),
                      str(site.data / f"$(touch {canaries[1]})"),
                      str(site.data / f"`touch {canaries[2]}` {{output}}")]
    for i, loc in enumerate(hostile_inputs):
        os.makedirs(loc)
        site.add_run(10 + i, location=loc)
    site.add_run(20, name=f"x; touch {canaries[3]}", location=str(site.data / "ok20"))
    site.add_run(21, name=f"$(touch {canaries[3]})", location=str(site.data / "ok21"))
    site.run_pass()
    for i, loc in enumerate(hostile_inputs):
        n = 10 + i
        wait_until(lambda: site.status(n) in ("transferred", "error"), 60, f"run {n}")
        d = site.datum(n)
        assert d["status"] == "transferred", d.get("error")
        partial = str(site.data / VERSION / f".160315_{n:04d}.cax-partial")
        argv = json.loads((site.data / VERSION / f"160315_{n:04d}" / "argv.json").read_text())
        assert argv == [f"160315_{n:04d}", loc, f"in={loc};{n}", VERSION, partial]
    # hostile names are refused outright: no datum, no job
    assert site.datum(20) is None and site.datum(21) is None
    assert len(site.jobs()) == 3
    if site.backend_name == "local":
        for _id, _name, job_argv in site.jobs():
            assert job_argv[:5] == [PY, "-P", "-m", "cax.processing", "--config"]
            assert job_argv[5:9] == [site.cfg, "--host", site.host, "--run"]
            assert job_argv[9] in ("10", "11", "12")
            assert job_argv[10:] == ["--detector", "tpc", "--version", VERSION]
    else:  # the scripts sbatch got: only trusted values and the run number, each quoted
        lines = {p.read_text().splitlines()[-1] for p in (tmp_path / "scripts").glob("*.sh")}
        assert lines == {"exec " + shlex.join([PY, "-P", "-m", "cax.processing", "--config", site.cfg,
                                               "--host", site.host, "--run", str(n), "--detector", "tpc",
                                               "--version", VERSION]) for n in (10, 11, 12)}
    assert not any(c.exists() for c in canaries)


# -- cax-process by hand, template rules, config -------------------------------------------------
def test_cax_process_by_hand(local_site):
    gate = local_site.tmp / "gate"
    gate.write_text("open")
    s = local_site.configure(gated_copy(gate))
    raw = s.add_run(7)
    s.add_run(8)
    cmd = [PY, "-m", "cax.processing", "--config", s.cfg, "--host", s.host, "--version", VERSION]
    res = subprocess.run(cmd + ["--run", "7"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    d = s.datum(7)
    assert d["status"] == "transferred" and d["job_backend"] == "manual"
    assert d["checksum"] == checksum(raw)
    gate.unlink()  # run 8's job waits at the gate: its datum stays processing under its job id
    s.run_pass()  # run 7 is done; run 8 is submitted
    assert [name.endswith("_8_" + VERSION) for _i, name, _a in s.jobs()] == [True]
    job_id = s.datum(8)["job_id"]
    wait_until(lambda: "started" in s.datum(8), 60, "run 8's job to start its command", diagnose=s.diagnostics)
    # a second run by hand on a datum another job owns does nothing
    res = subprocess.run(cmd + ["--run", "8"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and f"being processed by job {job_id}" in res.stderr, res.stderr
    d = s.datum(8)
    assert d["status"] == "processing" and d["job_id"] == job_id and d["job_backend"] == "local"
    gate.write_text("open")
    wait_until(lambda: s.status(8) in ("transferred", "error"), 60, "run 8's job", diagnose=s.diagnostics)
    assert s.status(8) == "transferred", s.datum(8).get("error")


def test_cax_process_by_hand_failure(local_site):
    s = local_site.configure(FAIL)
    s.add_run(9)
    res = subprocess.run([PY, "-m", "cax.processing", "--config", s.cfg, "--host", s.host,
                          "--version", VERSION, "--run", "9"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 3
    assert s.status(9) == "error" and "exited with code 3" in s.datum(9)["error"]


def test_failed_processing_is_error_kind_processing(local_site):
    """docs/design.rst documented kind ``processing`` but a failed processing job was written
    ``failed`` like a failed transfer (issue 11): the kind now says the processor failed."""
    s = local_site.configure(FAIL)
    s.add_run(10)
    s.run_pass()
    wait_until(lambda: s.status(10) == "error", 60, "the job to record its failure", diagnose=s.diagnostics)
    assert s.datum(10)["error_kind"] == "processing", s.datum(10)


RANDOM_OUTPUT = [PY, "-c", "import os, sys; os.makedirs(sys.argv[1]); "
                 "open(os.path.join(sys.argv[1], 'out.bin'), 'wb').write(os.urandom(64))", "{output}"]


def two_processing_sites(tmp_path, uri, command):
    """Sites a and b in one Runs DB collection, each with its own raw copy and processing."""
    names = ["a" + uuid.uuid4().hex[:6], "b" + uuid.uuid4().hex[:6]]
    sites = [{"name": n, "directory": str(tmp_path / n), "data_type": ["raw", "processed"],
              "processing": {"versions": [VERSION], "command": command,
                             "log_dir": str(tmp_path / n / "logs")}} for n in names]
    path = tmp_path / "cax.json"
    path.write_text(json.dumps({"runs_db": uri, "collection": "runs_" + uuid.uuid4().hex[:8],
                                "sites": sites}))
    config = cfgmod.load(str(path))
    return config, connect(config), names


def test_second_site_output_of_the_same_version_is_its_own_origin(tmp_path, wire_uri):
    """Processors are not bit-reproducible: a second site's output of a version differs from the
    first site's, and must not be flagged against it; a copy still must equal the reference."""
    from cax.processing import process
    from cax.tasks.checksum import CompareChecksums, verify

    config, db, (a, b) = two_processing_sites(tmp_path, wire_uri, RANDOM_OUTPUT)
    data = []
    for host in (a, b):
        raw = tmp_path / host / "160315_0081"
        raw.mkdir(parents=True)
        (raw / "f.bin").write_bytes(b"raw")
        data.append({"host": host, "type": "raw", "status": "transferred", "location": str(raw),
                     "checksum": checksum(str(raw)), "checksum_type": "sha512"})
    db.insert_run({"number": 81, "name": "160315_0081", "detector": "tpc", "data": data})

    def datum(host):
        run = db.collection.find_one({"number": 81})
        return next(d for d in run["data"] if d["host"] == host and d["type"] == "processed")

    assert process(config, a, 81, VERSION, db=db) == 0
    assert process(config, b, 81, VERSION, db=db) == 0
    da, dbb = datum(a), datum(b)
    assert da["status"] == dbb["status"] == "transferred", (da.get("error"), dbb.get("error"))
    assert da["checksum"] != dbb["checksum"]  # really different outputs
    assert dbb["checksum"] == checksum(dbb["location"]) and dbb["reference_checked"] is True
    refs = db.collection.find_one({"number": 81})["references"]
    assert [(r["host"], r["checksum"]) for r in refs] == [(a, da["checksum"])]

    # CompareChecksums leaves b's own output alone, also when an older tool wrote it unflagged
    key_b = {"host": b, "type": "processed", "pax_version": VERSION}
    db.collection.update_one({"number": 81, "data": {"$elemMatch": key_b}},
                             {"$unset": {"data.$.reference_checked": ""}})
    CompareChecksums(Context(config=config, host=b, db=db)).go()
    assert datum(b)["status"] == "transferred" and datum(b)["reference_checked"] is True

    # a copy (it has a source) of this version that differs from the reference is still an error
    copy_dir = tmp_path / b / "copy"
    copy_dir.mkdir()
    (copy_dir / "out.bin").write_bytes(b"not what a wrote")
    key_copy = {"host": b, "type": "processed", "pax_version": "v-copy"}
    db.collection.update_one({"number": 81}, {"$push": {
        "references": {"type": "processed", "pax_version": "v-copy", "checksum": da["checksum"],
                       "checksum_type": "sha512", "host": a},
        "data": dict(key_copy, status="verifying", location=str(copy_dir), source=a)}})
    verify(ProcessRun(Context(config=config, host=b, db=db)), db.collection.find_one({"number": 81})["_id"],
           key_copy, lambda algo: checksum(str(copy_dir), algo))
    d = next(x for x in db.collection.find_one({"number": 81})["data"] if x.get("pax_version") == "v-copy")
    assert d["status"] == "error" and d["error_kind"] == "checksum" and "differs from reference" in d["error"]


def test_processed_at_one_site_pulled_by_another_with_equal_checksum(tmp_path, wire_uri):
    """The whole path of processed data: a batch job's cax-process at site a, then site b's
    daemon pulls that version and verifies it against a's reference checksum."""
    from cax.daemon import run_pass

    a, b = "a" + uuid.uuid4().hex[:6], "b" + uuid.uuid4().hex[:6]
    doc = {"runs_db": wire_uri, "collection": "runs_" + uuid.uuid4().hex[:8], "sites": [
        {"name": a, "directory": str(tmp_path / a), "data_type": ["raw", "processed"],
         "processing": {"backend": "local", "versions": [VERSION], "command": RANDOM_OUTPUT,
                        "log_dir": str(tmp_path / "logs"), "state_dir": str(tmp_path / "state")}},
        {"name": b, "directory": str(tmp_path / b), "data_type": ["processed"],
         "pax_versions": [VERSION], "download_options": [a]}]}
    (tmp_path / "cax.json").write_text(json.dumps(doc))
    config = cfgmod.load(str(tmp_path / "cax.json"))
    db = connect(config)
    raw = tmp_path / a / "160315_0085"
    raw.mkdir(parents=True)
    (raw / "f.bin").write_bytes(os.urandom(300))
    (tmp_path / b).mkdir()
    db.insert_run({"number": 85, "name": "160315_0085", "detector": "tpc",
                   "data": [{"host": a, "type": "raw", "status": "transferred", "location": str(raw),
                             "checksum": checksum(str(raw)), "checksum_type": "sha512"}]})

    def processed(host):
        run = db.collection.find_one({"number": 85})
        return next((d for d in run["data"] if d["host"] == host and d["type"] == "processed"), None)

    run_pass(Context(config=config, host=a, db=db))  # submits the processing job
    wait_until(lambda: (processed(a) or {}).get("status") in ("transferred", "error"), 60,
               "a's processing job")
    assert processed(a)["status"] == "transferred", processed(a).get("error")

    def b_has_it():
        run_pass(Context(config=config, host=b, db=db))
        return (processed(b) or {}).get("status") in ("transferred", "error")

    wait_until(b_has_it, 60, "b to pull the processed data", interval=0.2)
    da, dbb = processed(a), processed(b)
    assert dbb["status"] == "transferred", dbb.get("error")
    assert dbb["source"] == a and dbb["pax_version"] == VERSION
    assert dbb["location"] == str(tmp_path / b / VERSION / "160315_0085")
    assert dbb["checksum"] == da["checksum"] == checksum(dbb["location"]) == checksum(da["location"])
    refs = db.collection.find_one({"number": 85})["references"]
    assert [(r["host"], r["pax_version"], r["checksum"]) for r in refs] == \
        [(a, VERSION, da["checksum"])]
    assert processed(b).get("reference_checked") is True


def test_fill_command_keeps_arguments_whole():
    values = {"name": "a b; rm -rf ~", "number": 5, "input": "/d/$(x)", "output": "/o/{name}",
              "version": "v1", "ncpus": 2}
    assert fill_command(["p", "{name}", "-n{ncpus}", "{input}{output}"], values) == \
        ["p", "a b; rm -rf ~", "-n2", "/d/$(x)/o/{name}"]


@pytest.mark.parametrize("command, message", [
    (["p", "{nmae}"], "unknown placeholder"),
    (["p", "{name.__class__}"], "unknown placeholder"),
    (["p", "{input[0]}"], "unknown placeholder"),
    (["p", "{name!r}"], "conversions"),
    (["p", "{name"], "expected '}'"),
])
def test_bad_templates_refused_at_load(tmp_path, command, message):
    doc = {"sites": [{"name": "s", "directory": str(tmp_path),
                      "processing": {"versions": ["v1"], "command": command}}]}
    (tmp_path / "c.json").write_text(json.dumps(doc))
    with pytest.raises(cfgmod.ConfigError, match=message):
        cfgmod.load(str(tmp_path / "c.json"))


def test_processing_config_normalised_and_checked(tmp_path):
    def load(processing, **site):
        doc = {"sites": [{"name": "s", "directory": str(tmp_path), **site, "processing": processing}]}
        (tmp_path / "c.json").write_text(json.dumps(doc))
        return cfgmod.load(str(tmp_path / "c.json")).site("s").processing

    p = load({"pax_versions": ["v6.10.1"], "command": ["p"], "max_local_jobs": 3})
    assert p["versions"] == ["v6.10.1"] and p["max_jobs"] == 3 and p["backend"] == "local"
    assert p["output_dir"] == str(tmp_path)
    with pytest.raises(cfgmod.ConfigError, match="outside"):
        load({"versions": ["v1"], "command": ["p"], "output_dir": "/elsewhere"})
    with pytest.raises(cfgmod.ConfigError, match="unsafe processor version"):
        load({"versions": ["../v1"], "command": ["p"]})
    with pytest.raises(cfgmod.ConfigError, match="command"):
        load({"versions": ["v1"]})
    with pytest.raises(cfgmod.ConfigError, match="backend"):
        load({"versions": ["v1"], "command": ["p"], "backend": "condor"})


@pytest.mark.parametrize("key, value", [
    ("walltime", "forever"), ("walltime", 0), ("walltime", "1:xx"),
    ("partition", "gpu queue"), ("partition", "-p"), ("account", "a;b"), ("qos", ""),
    ("mem_per_cpu", "lots"), ("mem_per_cpu", 0), ("mem_per_cpu", "2 G"),
])
def test_bad_job_resources_refused_at_load(tmp_path, key, value):
    """Found only at submit time, a bad resource turned every run into an error datum."""
    from cax.cli import cli

    doc = {"sites": [{"name": "s", "directory": str(tmp_path),
                      "processing": {"versions": ["v1"], "command": ["p"], key: value}}]}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(cfgmod.ConfigError) as err:
        cfgmod.load(str(path))
    assert str(err.value).startswith(f"{path}: site 's': key 'processing.{key}': invalid {key}")
    assert "\n" not in str(err.value)
    res = CliRunner().invoke(cli, ["config", "check", "--config", str(path), "--host", "s"])
    assert res.exit_code == 2 and f"key 'processing.{key}'" in res.output


@pytest.mark.parametrize("key, value", [
    ("walltime", 30), ("walltime", "90"), ("walltime", "1:00:00"), ("walltime", "2-00"),
    ("walltime", "2-00:00:00"), ("mem_per_cpu", 2000), ("mem_per_cpu", "2G"),
    ("mem_per_cpu", "512m"), ("partition", "xenon1t,broadwl"), ("account", "pi-lgrandi"),
])
def test_good_job_resources_accepted(tmp_path, key, value):
    doc = {"sites": [{"name": "s", "directory": str(tmp_path),
                      "processing": {"versions": ["v1"], "command": ["p"], key: value}}]}
    (tmp_path / "c.json").write_text(json.dumps(doc))
    assert cfgmod.load(str(tmp_path / "c.json")).site("s").processing[key] == value


def test_config_check_shows_the_processing_section(tmp_path):
    from cax.cli import cli

    doc = {"sites": [{"name": "s", "directory": str(tmp_path / "s"),
                      "processing": {"backend": "slurm", "versions": ["v1", "v2"], "command": ["p"],
                                     "walltime": "2-00:00:00", "mem_per_cpu": "2G",
                                     "partition": "xenon1t", "max_queued": 5}},
                     {"name": "t", "directory": str(tmp_path / "t")}]}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(doc))
    res = CliRunner().invoke(cli, ["config", "check", "--config", str(path), "--host", "s"])
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if x.startswith("processing at s:"))
    for part in ("backend=slurm", "versions=v1,v2", "walltime=2-00:00:00", "mem_per_cpu=2G",
                 "partition=xenon1t", "max_queued=5", "max_retries=3", "command=p"):
        assert part in line.split(), line
    res = CliRunner().invoke(cli, ["config", "check", "--config", str(path), "--host", "t"])
    assert "processing at t: none (no processing section)" in res.output


# -- massive-cax -----------------------------------------------------------------------------------
def test_massive_dry_run_and_throttle(local_site):
    from cax.processing import massive

    s = local_site.configure(COPY)
    for n in (31, 32, 33):
        s.add_run(n)
    s.add_run(34, tags=[{"name": "calibration"}])
    runner = CliRunner()
    res = runner.invoke(massive, ["--config", s.cfg, "--host", s.host, "--start", "31",
                                  "--stop", "33", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert res.output.count("would submit") == 3 and "--once --run 32" in res.output
    assert s.jobs() == []
    res = runner.invoke(massive, ["--config", s.cfg, "--host", s.host, "--tag", "calibration",
                                  "--dry-run"])
    assert res.output.count("would submit") == 1 and "--run 34" in res.output

    # queue of at most one cax job, --no-wait: one submitted, the rest reported
    res = runner.invoke(massive, ["--config", s.cfg, "--host", s.host, "--run", "31", "--run", "32",
                                  "--max-queued", "1", "--no-wait"])
    assert res.exit_code == 1 and "1 run(s) not submitted" in res.output, res.output
    names = [name for _i, name, _a in s.jobs()]
    assert len(names) == 1 and names[0].startswith("cax-massive-")

    # waiting mode: every run gets its job (the bound is asserted by a queue watcher in
    # test_massive_on_slurm_keeps_the_documented_bound)
    res = runner.invoke(massive, ["--config", s.cfg, "--host", s.host, "--start", "32", "--stop", "33",
                                  "--max-queued", "1", "--interval", "0.2", "--timeout", "60"])
    assert res.exit_code == 0, res.output
    massive_jobs = [(i, a) for i, name, a in s.jobs() if name.startswith("cax-massive-")]
    assert len(massive_jobs) == 3
    backend = get_backend("local", state_dir=str(s.tmp / "state"))
    for job_id, argv in massive_jobs:
        assert argv[1:4] == ["-P", "-m", "cax"] and "--once" in argv
        wait_until(lambda: backend.status(job_id) in FINAL_STATES, 60, "the massive job")
        assert backend.exit_code(job_id) == 0


def gated_copy(gate):
    return [PY, "-c", "import os, shutil, sys, time\n"
            "while not os.path.exists(sys.argv[1]): time.sleep(0.1)\n"
            "shutil.copytree(sys.argv[2], sys.argv[3])", str(gate), "{input}", "{output}"]


class QueueWatcher(threading.Thread):
    """Snapshots of this site's queued cax jobs, so a bound is checked all along, not only at
    the moments a test happens to look."""

    def __init__(self, cluster, host):
        super().__init__(daemon=True)
        self.cluster, self.host = cluster, host
        self.stop = threading.Event()
        self.snapshots = []  # [[job name, ...], ...]

    def run(self):
        from cax.batch.slurm import QUEUED_STATES
        while not self.stop.is_set():
            res = self.cluster.run("squeue", "-h", "-t", QUEUED_STATES, "-o", "%j", check=False)
            if res.returncode == 0:
                self.snapshots.append([n for n in res.stdout.split()
                                       if n.startswith("cax-") and self.host in n])
            self.stop.wait(0.05)

    def runs(self, names):
        import re
        return {re.search(re.escape(self.host) + r"_(\d+)", n).group(1) for n in names}


@pytest.mark.slurm
def test_massive_on_slurm_keeps_the_documented_bound(tmp_path, wire_uri, slurm):
    """docs/processing.rst: with --max-queued L, at most L massive jobs and at most L runs have
    cax jobs queued; the cax- job count may reach L x (1 + versions) for a moment."""
    gate = tmp_path / "gate"
    s = Site(tmp_path, wire_uri, "slurm", slurm)
    watcher = QueueWatcher(slurm, s.host)
    out = tmp_path / "massive.out"
    proc = None
    try:
        s.configure(gated_copy(gate))
        for n in (91, 92, 93):
            s.add_run(n)
        watcher.start()
        with open(out, "w") as f:
            proc = subprocess.Popen([PY, "-m", "cax", "massive", "--config", s.cfg, "--host", s.host,
                                     "--start", "91", "--stop", "93", "--max-queued", "1",
                                     "--interval", "0.3", "--timeout", "240"],
                                    stdout=f, stderr=subprocess.STDOUT, cwd=str(tmp_path))
        # run 91's massive job submits its (gated) processing job and ends; the queue stays full
        wait_until(lambda: s.status(91) == "processing", 120, "run 91's processing job", diagnose=s.diagnostics)
        wait_until(lambda: watcher.snapshots and watcher.snapshots[-1]
                   and all(n.startswith("cax-proc-") for n in watcher.snapshots[-1]), 120,
                   "run 91's massive job to end, leaving its processing job queued", diagnose=s.diagnostics)
        looks = out.read_text().count("queue full")
        wait_until(lambda: out.read_text().count("queue full") >= looks + 2, 60,
                   "massive-cax to look at the full queue twice more", diagnose=s.diagnostics)
        assert s.status(92) is None and s.status(93) is None
        gate.write_text("go")
        assert proc.wait(timeout=240) == 0, out.read_text()
        for n in (92, 93):
            wait_until(lambda: s.status(n) in ("transferred", "error"), 120, f"run {n}", diagnose=s.diagnostics)
        wait_until(lambda: s.status(91) in ("transferred", "error"), 60, "run 91", diagnose=s.diagnostics)
        assert [s.status(n) for n in (91, 92, 93)] == ["transferred"] * 3, s.diagnostics()
    finally:
        watcher.stop.set()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        s.cleanup()
    watcher.join(10)
    text = out.read_text()
    assert text.count("submitted cax-massive-") == 3, text
    assert "queue full (1 cax job(s) queued, limit 1); 2 run(s) waiting" in text
    snaps = watcher.snapshots
    assert len(snaps) > 20
    seen_massive = [sum(n.startswith("cax-massive-") for n in snap) for snap in snaps]
    assert max(seen_massive) == 1  # the throttle bit: never two massive jobs
    assert max(len(watcher.runs(snap)) for snap in snaps) == 1  # never two runs in flight
    assert max(len(snap) for snap in snaps) <= 2  # L x (1 + one version)
    assert any(any(n.startswith("cax-proc-") for n in snap) for snap in snaps)


def test_massive_refuses_a_site_without_processing_and_a_zero_limit(tmp_path, wire_uri):
    from cax.processing import massive

    s = Site(tmp_path, wire_uri, "local").configure(COPY, max_queued=0)
    s.add_run(95)
    res = CliRunner().invoke(massive, ["--config", s.cfg, "--host", s.host, "--run", "95"])
    assert res.exit_code == 2 and "processing.max_queued is 0" in res.output, res.output
    assert "--max-queued N" in res.output
    res = CliRunner().invoke(massive, ["--config", s.cfg, "--host", s.host, "--run", "95",
                                       "--max-queued", "1", "--dry-run"])
    assert res.exit_code == 0 and "would submit" in res.output, res.output

    doc = json.loads((tmp_path / "cax.json").read_text())
    del doc["sites"][0]["processing"]
    (tmp_path / "cax.json").write_text(json.dumps(doc))
    for extra in ([], ["--dry-run"]):
        res = CliRunner().invoke(massive, ["--config", s.cfg, "--host", s.host, "--run", "95",
                                           "--max-queued", "1", *extra])
        assert res.exit_code == 2, res.output
        assert f"site {s.host} has no processing section (set processing.backend)" in res.output
        assert "would submit" not in res.output
    assert not (tmp_path / "state").exists()  # no local job was started


def test_stale_processing_datums_without_a_live_job_end_error(local_site):
    """A daemon that died between claim and submit, or a by-hand run that died, leaves a datum
    ``processing`` that no batch system will ever report on: the age of the claim / heartbeat
    decides."""
    s = local_site.configure(COPY, submit_grace=60)
    old = datetime.now(timezone.utc) - timedelta(hours=1)
    fresh = datetime.now(timezone.utc)
    for n, extra in ((41, {"creation_time": old}), (42, {"creation_time": fresh}),
                     (43, {"creation_time": old, "heartbeat": old, "job_backend": "manual",
                           "job_id": "manual:h:1"}),
                     (44, {"creation_time": old, "heartbeat": fresh, "job_backend": "manual",
                           "job_id": "manual:h:2"})):
        s.add_run(n)
        s.db.collection.update_one({"number": n}, {"$push": {"data": dict(
            {"host": s.host, "type": "processed", "pax_version": VERSION, "status": "processing",
             "location": str(s.data / VERSION / f"160315_{n:04d}")}, **extra)}})
    queries = s.db.queries
    s.run_pass()
    assert s.status(41) == "error" and "no batch job was recorded" in s.datum(41)["error"]
    assert s.status(42) == "processing"
    assert s.status(43) == "error" and "stopped updating its heartbeat" in s.datum(43)["error"]
    assert s.status(44) == "processing"
    assert s.jobs() == []  # max_retries 0: nothing resubmitted
    assert s.db.queries - queries < 10


def test_queued_job_of_a_datum_without_job_id_is_adopted(local_site):
    """The submitting daemon died between sbatch and recording the job id: the job is alive,
    so the datum is not dead; asking the queue by job name finds it."""
    gate = local_site.tmp / "gate"
    s = local_site.configure(gated_copy(gate), submit_grace=60)
    s.add_run(45)
    s.run_pass()
    job_id = s.datum(45)["job_id"]
    s.db.collection.update_one(
        {"number": 45, "data": {"$elemMatch": {"type": "processed"}}},
        {"$unset": {"data.$.job_id": ""},
         "$set": {"data.$.creation_time": datetime.now(timezone.utc) - timedelta(hours=1)}})
    assert "job_id" not in s.datum(45)
    s.run_pass()
    d = s.datum(45)
    assert d["status"] == "processing" and d["job_id"] == job_id, d
    assert len(s.jobs()) == 1
    gate.write_text("open")
    wait_until(lambda: s.status(45) in ("transferred", "error"), 60, "the adopted job", diagnose=s.diagnostics)
    assert s.status(45) == "transferred", s.datum(45).get("error")


def test_idle_pass_costs_one_query_and_no_batch_call(local_site, monkeypatch):
    s = local_site.configure(COPY)
    s.add_run(51, tags=[{"name": "donotprocess"}])
    calls = []
    monkeypatch.setattr(ProcessBatchQueue, "backend", lambda self: calls.append(1))
    before = s.db.queries
    assert s.run_pass() == 0
    assert s.db.queries - before == 1 and calls == []


def test_cax_massive_takes_the_root_options(local_site):
    """`cax --config C --host H --dry-run massive` behaves like `massive-cax --config C ... --dry-run`."""
    from cax.cli import cli
    from cax.processing import massive

    s = local_site.configure(COPY)
    s.add_run(61)
    added = "massive" not in cli.commands
    if added:
        cli.add_command(massive)
    try:
        res = CliRunner().invoke(cli, ["--config", s.cfg, "--host", s.host, "--dry-run", "massive"])
    finally:
        if added:
            cli.commands.pop("massive")
    assert res.exit_code == 0, res.output
    assert "would submit cax-massive-" in res.output and "--run 61" in res.output
    assert s.jobs() == []
