"""The daemon as users run it: real processes on the embedded Runs DB."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import pytest

from cax.checksum import checksum
from cax.config import load
from cax.runsdb import connect
from tests.helpers import make_raw, run_doc, three_sites
from tests.waiting import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cax(*args, **kw):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, "-m", "cax", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def transferred_at(db, host, location_root, name, number):
    loc = make_raw(location_root, name, nfiles=6, size=400_000)
    doc = run_doc(number, name, loc, host=host, status="verifying")
    db.insert_run(doc)
    return loc


def _open_fifo_writer(fifo, what):
    """Open ``fifo`` for writing once a reader has it open (ENXIO until then); blocking after."""
    import errno
    import fcntl

    def attempt():
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            return None

    fd = wait_for(attempt, timeout=60, what=what)
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return fd


def test_two_daemons_racing_make_one_datum_and_one_copy(tmp_path):
    """Both daemons hold the same candidate runs and claim concurrently.

    Daemon A reads its candidates and then blocks copying run 0 (its source is a FIFO); daemon B
    starts only then, so it reads run 1 unclaimed and blocks copying it. When both are released,
    A still holds run 1 as it read it (unclaimed) and must lose that claim, and both go on racing
    for the remaining runs.
    """
    from cax.checksum import checksum as digest
    cfg = three_sites(tmp_path)
    doc = json.loads(open(cfg).read())
    doc["sites"][2]["max_transfers"] = 1  # copies run in the claiming thread, one at a time
    open(cfg, "w").write(json.dumps(doc))
    cfg2 = str(tmp_path / "second.json")
    shutil.copy(cfg, cfg2)  # a second daemon for the same site (its own lock)
    db = connect(load(cfg))
    payload = b"fed through a fifo\n" * 50
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "stream.bin").write_bytes(payload)
    fifo_sum = digest(str(scratch))
    names = [f"16010{i}_0000" for i in range(8)]
    fifos = []
    for i, name in enumerate(names):
        if i < 2:
            loc = tmp_path / "buffer" / name
            loc.mkdir()
            os.mkfifo(loc / "stream.bin")
            fifos.append(loc / "stream.bin")
            loc, sum_ = str(loc), fifo_sum
        else:
            loc = make_raw(str(tmp_path / "buffer"), name, nfiles=3, size=50_000)
            sum_ = digest(loc)
        run = run_doc(i, name, loc, host="buffer", status="transferred")
        run["data"][0]["checksum"] = sum_
        if i < 2:  # what the FIFO will deliver: a copy must hold it all before it is named final
            run["data"][0].update(size=len(payload), files=1)
        db.insert_run(run)
    a = cax("--config", cfg, "--once", "--host", "archive", "--log", "DEBUG")
    b = None
    fds = []
    try:
        fds.append(_open_fifo_writer(fifos[0], "daemon A copying run 0"))
        b = cax("--config", cfg2, "--once", "--host", "archive", "--log", "DEBUG")
        fds.append(_open_fifo_writer(fifos[1], "daemon B copying run 1"))
        for fd in fds:
            os.write(fd, payload)
    finally:
        for fd in fds:
            os.close(fd)
    outs = [p.communicate(timeout=120) for p in (a, b)]
    assert [p.returncode for p in (a, b)] == [0, 0], outs
    for run in db.collection.find({}):
        archive = [d for d in run["data"] if d["host"] == "archive"]
        assert len(archive) == 1, run["data"]
        assert archive[0]["status"] == "transferred", archive
    assert sorted(os.listdir(tmp_path / "archive")) == names  # and no partial copy left
    looked = [int(re.search(r"runs looked at: .*CopyPull=(\d+)", err).group(1))
              for _out, err in outs]
    assert looked[0] == 8 and looked[1] > 0, looked
    assert "already claimed" in outs[0][1]  # A lost run 1 to B
    both = outs[0][1] + outs[1][1]
    assert both.count("copy start") == 8  # each run copied by exactly one of them
    assert re.search(r"run=160100_0000 task=CopyPull .* copy start", outs[0][1])
    assert re.search(r"run=160101_0000 task=CopyPull .* copy start", outs[1][1])


def _fifo_origin(tmp_path):
    """Three sites and a DAQ run whose one file is a FIFO: whatever reads it (a copy, a checksum)
    blocks until the test feeds it, so a signal provably lands mid-read: no timing guesses."""
    cfg = three_sites(tmp_path)
    db = connect(load(cfg))
    name = "160101_0000"
    src = tmp_path / "daq" / name
    src.mkdir()
    fifo = src / "stream.bin"
    os.mkfifo(fifo)
    return cfg, db, name, src, fifo


def test_sigterm_mid_copy_records_interrupted_and_leaves_no_partial(tmp_path):
    cfg, db, name, src, fifo = _fifo_origin(tmp_path)
    doc = run_doc(1, name, str(src), status="transferred")
    doc["data"][0]["checksum"] = "ab" * 64
    db.insert_run(doc)
    daemon = cax("--config", cfg, "--host", "daq", "--interval", "3600")
    with open(fifo, "wb") as writer:  # opens when the copy opens the file for reading
        writer.write(b"x" * (1 << 20))
        writer.flush()
        wait_for(lambda: any(d["host"] == "buffer" and d["status"] == "transferring"
                             for d in db.run_by(number=1)["data"]), what="copy in flight")
        daemon.send_signal(signal.SIGTERM)
        wait_for(lambda: "received SIGTERM" in _drain(daemon), what="signal handled")
        try:  # if the copy is still reading, it reads on, sees the stop flag, and stops
            writer.write(b"y" * (1 << 20))
        except BrokenPipeError:
            pass  # it already stopped (the signal woke its read)
    out, err = daemon.communicate(timeout=60)
    err = _stderr_seen[daemon.pid] + err
    assert daemon.returncode == 0, err
    buffer = next(d for d in db.run_by(number=1)["data"] if d["host"] == "buffer")
    assert buffer["status"] == "error" and buffer["error"] == "interrupted", buffer
    assert not os.path.exists(tmp_path / "buffer" / name)
    assert os.listdir(tmp_path / "buffer") == []  # no partial copy left behind either
    assert "stopped cleanly" in err


def test_sigterm_mid_checksum_leaves_origin_verifying_and_next_pass_verifies(tmp_path):
    """An origin copy cannot be re-copied: a checksum cut short must not leave it in error."""
    cfg, db, name, src, fifo = _fifo_origin(tmp_path)
    db.insert_run(run_doc(1, name, str(src), status="verifying"))
    daemon = cax("--config", cfg, "--host", "daq", "--interval", "3600")
    # opens when AddChecksum (the only task reading a verifying origin) opens the file
    writer = open(fifo, "wb", buffering=0)
    try:
        writer.write(b"x" * 1000)
        daemon.send_signal(signal.SIGTERM)
        wait_for(lambda: "received SIGTERM" in _drain(daemon), what="signal handled")
        writer.write(b"y" * 1000)  # the checksum reads on, sees the stop flag, and stops
    except BrokenPipeError:
        pass  # it already stopped
    finally:
        try:
            writer.close()
        except BrokenPipeError:
            pass
    out, err = daemon.communicate(timeout=60)
    err = _stderr_seen[daemon.pid] + err
    assert daemon.returncode == 0, err
    daq = db.run_by(number=1)["data"][0]
    assert daq["status"] == "verifying" and "error" not in daq, daq
    assert "checksum interrupted" in err
    fifo.unlink()
    (src / "stream.bin").write_bytes(b"x" * 1000 + b"y" * 1000)  # the data as they really are
    assert cax("--config", cfg, "--once", "--host", "daq").wait(60) == 0
    run = db.run_by(number=1)
    assert run["data"][0]["status"] == "transferred"
    assert run["references"][0]["checksum"] == run["data"][0]["checksum"] == checksum(str(src))


_stderr_seen: dict = {}


def _drain(proc):
    """Read what the daemon logged so far without blocking (stderr is a pipe)."""
    import fcntl
    fd = proc.stderr.fileno()
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
    try:
        chunk = proc.stderr.read() or ""
    except (BlockingIOError, TypeError):
        chunk = ""
    _stderr_seen[proc.pid] = _stderr_seen.get(proc.pid, "") + chunk
    return _stderr_seen[proc.pid]


def test_second_daemon_for_same_site_is_refused(tmp_path):
    cfg = three_sites(tmp_path)
    first = cax("--config", cfg, "--host", "buffer", "--interval", "3600")
    try:
        wait_for(lambda: "pass 1 end" in _drain(first), what="first daemon running")
        second = cax("--config", cfg, "--host", "buffer", "--once")
        out, err = second.communicate(timeout=60)
        assert second.returncode == 1
        assert "already running" in err and "'buffer'" in err and str(first.pid) in err
        other = cax("--config", cfg, "--host", "archive", "--once")  # another site is fine
        assert other.wait(60) == 0
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=60)
    assert first.returncode == 0


def test_runs_add_validates_and_rejects_duplicates(tmp_path):
    cfg = three_sites(tmp_path)
    runs = [
        {"number": 1, "name": "160101_0000", "detector": "tpc", "start": "2016-01-01T00:00:00Z",
         "data": [{"host": "daq", "type": "raw", "status": "verifying", "location": "/x",
                   "creation_time": "2016-01-01T00:10:00+01:00"}]},
        {"number": 1, "name": "160101_0001", "detector": "tpc", "start": "2016-01-01T01:00:00"},
        {"number": 3, "name": "../../etc", "detector": "tpc", "start": "2016-01-01T01:00:00"},
        {"number": "4", "name": "x", "detector": "tpc", "start": "2016-01-01T01:00:00"},
        {"number": 5, "name": "160101_0005", "detector": "tpc", "start": "yesterday"},
    ]
    p = tmp_path / "runs.json"
    p.write_text(json.dumps(runs))
    proc = cax("--config", cfg, "runs", "add", str(p))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "added 1 run(s), rejected 4" in out
    lines = err.strip().splitlines()
    assert len(lines) == 4
    assert "already exists" in lines[0]
    assert "unsafe run name" in lines[1]
    assert "'number' must be an integer" in lines[2]
    assert "'start'" in lines[3] and "ISO-8601" in lines[3]
    run = connect(load(cfg)).run_by(number=1)
    assert run["start"].isoformat() == "2016-01-01T00:00:00+00:00"
    assert run["data"][0]["creation_time"].isoformat() == "2015-12-31T23:10:00+00:00"


def test_status_json_and_checksum_command(tmp_path):
    from checksumdir import dirhash
    cfg = three_sites(tmp_path)
    loc = make_raw(str(tmp_path / "daq"), "160101_0000")
    db = connect(load(cfg))
    db.insert_run(run_doc(1, "160101_0000", loc))
    for _ in range(2):
        for host in ("daq", "buffer", "archive"):
            assert cax("--config", cfg, "--once", "--host", host).wait(60) == 0
    out, _ = cax("--config", cfg, "status", "--json").communicate(timeout=60)
    runs = json.loads(out)
    assert [r["name"] for r in runs] == ["160101_0000"]
    assert {d["host"]: d["status"] for d in runs[0]["data"]} == {
        "daq": "transferred", "buffer": "transferred", "archive": "transferred"}
    assert {d["checksum"] for d in runs[0]["data"]} == {dirhash(loc, "sha512")}
    out, _ = cax("checksum", str(tmp_path / "archive" / "160101_0000")).communicate(timeout=60)
    assert out.split()[0] == dirhash(loc, "sha512")
    table, _ = cax("--config", cfg, "status").communicate(timeout=60)
    assert "all equal (3)" in table


def test_once_exits_1_when_runs_db_unusable(tmp_path):
    cfg = three_sites(tmp_path, runs_db=str(tmp_path / "missing-dir" / "x.runsdb"))
    proc = cax("--config", cfg, "--once", "--host", "daq")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert err.strip().splitlines()[-1].startswith("cax: error: cannot use Runs DB")


def test_missing_password_variable_is_clear_and_secret_free(tmp_path, monkeypatch):
    cfg = three_sites(tmp_path, runs_db="mongodb://cax@127.0.0.1:1/run")
    env = {k: v for k, v in os.environ.items() if k != "MONGO_PASSWORD"}
    proc = subprocess.run([sys.executable, "-m", "cax", "--config", cfg, "--once", "--host",
                           "daq"], env=dict(env, PYTHONPATH=ROOT), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    assert "MONGO_PASSWORD is not set" in proc.stderr


def test_log_file_has_one_line_per_event_with_run_task_site(tmp_path):
    cfg = three_sites(tmp_path)
    db = connect(load(cfg))
    loc = make_raw(str(tmp_path / "daq"), "160101_0000")
    db.insert_run(run_doc(1, "160101_0000", loc))
    log = tmp_path / "cax.log"
    for _ in range(2):
        assert cax("--config", cfg, "--once", "--host", "daq", "--log-file", str(log)).wait(60) == 0
    lines = log.read_text().splitlines()
    copy = [ln for ln in lines if "copy start" in ln]
    assert len(copy) == 1
    assert "run=160101_0000" in copy[0] and "task=CopyPush" in copy[0] and "site=daq" in copy[0]
    assert "datum=raw@buffer" in copy[0]


def test_runs_add_rejects_each_bad_document_in_one_line_and_adds_the_rest(tmp_path):
    cfg = three_sites(tmp_path)
    ok = {"number": 10, "name": "160101_0010", "detector": "tpc", "start": "2016-01-01T00:00:00Z",
          "data": [{"host": "daq", "type": "raw", "status": "transferred",
                    "location": "/data/160101_0010"}]}

    def bad(**change):
        doc = json.loads(json.dumps(ok))
        doc["number"] = 11 + len(cases)
        doc["name"] = f"160101_00{11 + len(cases)}"
        for k, v in change.items():
            if k.startswith("data0_"):
                doc["data"][0][k[6:]] = v
            else:
                doc[k] = v
        return doc

    cases = []
    for change, needle in [
        ({"number": 2 ** 64}, "64-bit"),
        ({"$where": "1"}, "'$where'"),
        ({"data0_status": "happy"}, "data[0].status"),
        ({"data0_host": "mars"}, "data[0].host 'mars'"),
        ({"data0_type": "minitrees"}, "data[0].type"),
        ({"data0_location": "relative/dir"}, "data[0].location"),
        ({"data0_location": None}, "data[0].location"),
        ({"start": None}, "'start'"),
        ({"extra": {"$set": 1}}, "'extra.$set'"),
    ]:
        cases.append((bad(**change), needle))
    p = tmp_path / "runs.json"
    p.write_text(json.dumps([c[0] for c in cases] + [ok]))
    dry = cax("--config", cfg, "--dry-run", "runs", "add", str(p))
    out, err = dry.communicate(timeout=60)
    assert dry.returncode == 1, err
    assert "would add 1 run(s), rejected 9" in out and "added" not in out
    assert connect(load(cfg)).run_by(number=10) is None
    proc = cax("--config", cfg, "runs", "add", str(p))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "Traceback" not in err
    assert "added 1 run(s), rejected 9" in out
    lines = err.strip().splitlines()
    assert len(lines) == len(cases), lines
    for i, (line, (_doc, needle)) in enumerate(zip(lines, cases)):
        assert line.startswith(f"cax: error: {p}: run #{i + 1} "), line
        assert needle in line, (needle, line)
    assert connect(load(cfg)).run_by(number=10)["data"][0]["location"] == "/data/160101_0010"
    again = cax("--config", cfg, "--dry-run", "runs", "add", str(p))
    out, err = again.communicate(timeout=60)
    assert "would add 0 run(s), rejected 10" in out and "already exists" in err


def test_runs_add_refuses_duplicate_keys(tmp_path):
    cfg = three_sites(tmp_path)
    p = tmp_path / "runs.json"
    p.write_text('[{"number": 1, "name": "160101_0000", "detector": "tpc",\n'
                 ' "start": "2016-01-01T00:00:00", "number": 2}]')
    proc = cax("--config", cfg, "runs", "add", str(p))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err.strip() == f"cax: error: {p}: key 'number' appears twice in the object starting " \
                          f"at line 1"
    assert connect(load(cfg)).count({}) == 0


def test_runs_db_timeout_bounds_server_selection(tmp_path, wire_uri):
    """A lost server must fail an operation in seconds (``runs_db_timeout``), not pymongo's 30 s."""
    from cax.config import ConfigError, parse
    cfg = three_sites(tmp_path, runs_db=wire_uri)
    client = connect(load(cfg)).collection.database.client
    assert client.options.server_selection_timeout == 5.0
    assert client.options.pool_options.connect_timeout == 5.0
    client.close()
    cfg = three_sites(tmp_path, runs_db=wire_uri, runs_db_timeout=1.5)
    client = connect(load(cfg)).collection.database.client
    assert client.options.server_selection_timeout == 1.5
    client.close()
    for bad in (0, -1, "5", 1e9):
        doc = json.loads(open(cfg).read())
        doc["runs_db_timeout"] = bad
        with pytest.raises(ConfigError, match="runs_db_timeout"):
            parse(json.dumps(doc), cfg)
