"""Bad input never stops the other runs; dry runs change nothing; idle passes cost constant queries."""
import copy
import hashlib
import json
import logging
import os

import mongomock
import pytest

from cax.runsdb import RunsDB

from cax.daemon import run_pass
from tests.helpers import (CountingCollection, context, make_raw, mongomock_db, run_doc, statuses,
                           three_sites)


def tree_state(root):
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, root)] = (hashlib.sha1(open(p, "rb").read()).hexdigest()
                                              if os.path.isfile(p) else "dir")
    return out


def all_passes(cfg, db, n=2, **kw):
    for _ in range(n):
        for host in ("daq", "buffer", "archive"):
            run_pass(context(cfg, host, db, **kw))


@pytest.mark.parametrize("hostile", ["../../etc", "..", "-rf", ".hidden", "a/b", "x\0y", "ok\nname"])
def test_hostile_run_name_refused_others_move(tmp_path, caplog, hostile):
    cfg = three_sites(tmp_path)
    db = mongomock_db()
    good = make_raw(str(tmp_path / "daq"), "160101_0000")
    db.insert_run(run_doc(1, "160101_0000", good))
    # the hostile run claims a transferred copy at the daq pointing at real data
    bad = make_raw(str(tmp_path / "daq"), "victim")
    doc = run_doc(2, hostile, bad, status="transferred")
    doc["data"][0]["checksum"] = "0" * 128
    db.collection.insert_one(doc)
    with caplog.at_level(logging.ERROR):
        all_passes(cfg, db)
    assert statuses(db, 1) == {("daq", "raw"): "transferred", ("buffer", "raw"): "transferred",
                               ("archive", "raw"): "transferred"}
    assert statuses(db, 2) == {("daq", "raw"): "transferred"}
    assert any("refusing unsafe run name" in r.getMessage() for r in caplog.records)
    assert sorted(os.listdir(tmp_path / "buffer")) == ["160101_0000"]
    assert not os.path.exists(tmp_path / "etc")


def test_location_outside_data_directory_is_refused(tmp_path):
    cfg = three_sites(tmp_path)
    db = mongomock_db()
    outside = make_raw(str(tmp_path), "secret")
    db.insert_run(run_doc(1, "160101_0000", outside))
    all_passes(cfg, db)
    run = db.collection.find_one({"number": 1})
    assert statuses(db, 1) == {("daq", "raw"): "error"}
    assert "outside the data directories" in run["data"][0]["error"]


def test_dry_run_changes_nothing(tmp_path):
    cfg = three_sites(tmp_path)
    db = mongomock_db()
    for i in range(3):
        name = f"16010{i}_0000"
        db.insert_run(run_doc(i, name, make_raw(str(tmp_path / "daq"), name)))
    # one run already half way, so every task has something it would do
    all_passes(cfg, db, n=1, run_filter={"number": 0})
    before_db = copy.deepcopy(list(db.collection.find({}, sort=[("number", 1)])))
    before_disk = tree_state(str(tmp_path))
    db.dry_run = True
    all_passes(cfg, db, n=2, dry_run=True)
    db.dry_run = False
    assert list(db.collection.find({}, sort=[("number", 1)])) == before_db
    assert tree_state(str(tmp_path)) == before_disk


def test_dry_run_logs_what_it_would_do(tmp_path, caplog):
    cfg = three_sites(tmp_path)
    db = mongomock_db()
    doc = run_doc(1, "160101_0000", make_raw(str(tmp_path / "daq"), "160101_0000"),
                  status="transferred")
    doc["data"][0]["checksum"] = "ab" * 64  # verified: only data with a checksum are copied
    db.insert_run(doc)
    db.dry_run = True
    with caplog.at_level(logging.INFO):
        run_pass(context(cfg, "daq", db, dry_run=True))
    assert any("dry-run: would copy" in r.getMessage() and "buffer" in r.getMessage()
               for r in caplog.records)


def idle_pass_calls(tmp_path, nruns):
    cfg = three_sites(tmp_path)
    # mongomock checks unique indexes by scanning every document (quadratic inserts); counting
    # queries does not need them
    db = RunsDB(mongomock.MongoClient(tz_aware=True)["run"]["runs_new"])
    t = run_doc(0, "x", "/nowhere")["start"]
    docs = []
    for i in range(nruns):
        data = [{"host": h, "type": "raw", "status": "transferred", "checksum": "ab",
                 "checksum_type": "sha512", "location": str(tmp_path / h / f"r{i}"),
                 "source": None if h == "daq" else "daq", "size": 1, "files": 1,
                 "reference_checked": True}
                for h in ("daq", "buffer", "archive")]
        docs.append({"number": i, "name": f"r{i}", "detector": "tpc", "start": t, "data": data,
                     "references": [{"type": "raw", "pax_version": None, "checksum": "ab",
                                     "checksum_type": "sha512", "host": "daq"}]})
    db.collection.insert_many(docs)
    counting = CountingCollection(db.collection)
    db.collection = counting
    before = {d["number"]: d["data"] for d in counting._coll.find()}
    for host in ("daq", "buffer", "archive"):
        stats = run_pass(context(cfg, host, db))
        assert set(stats.values()) <= {0}, stats  # no task even reads a run
    assert {d["number"]: d["data"] for d in counting._coll.find()} == before  # really idle
    return counting.calls


def test_legacy_datums_are_compared_once_then_not_read_again(tmp_path):
    cfg = three_sites(tmp_path)
    db = mongomock_db()
    for i, checksum in enumerate(["ab", "ab", "cd"]):
        data = [{"host": h, "type": "raw", "status": "transferred", "checksum": checksum if
                 h == "archive" else "ab", "checksum_type": "sha512", "size": 1, "files": 1,
                 "location": str(tmp_path / h / f"r{i}"),
                 # no 'references': the origin (no 'source') is the reference; copies that lack
                 # 'source' too and disagree would leave it unknown (tests/test_purge.py)
                 **({} if h == "daq" else {"source": "daq"})}
                for h in ("daq", "buffer", "archive")]
        db.collection.insert_one({"number": i, "name": f"r{i}", "detector": "tpc",
                                  "start": run_doc(0, "x", "/")["start"], "data": data})
    first = run_pass(context(cfg, "archive", db))
    assert first["CompareChecksums"] == 3
    assert statuses(db, 2)[("archive", "raw")] == "error"  # the one that differs is flagged
    assert statuses(db, 0)[("archive", "raw")] == "transferred"
    second = run_pass(context(cfg, "archive", db))
    assert second["CompareChecksums"] == 0


def test_idle_pass_query_count_does_not_grow(tmp_path):
    from cax.config import DEFAULT_TASKS
    calls = [idle_pass_calls(tmp_path / str(n), n) for n in (100, 1000, 10000)]
    assert len(set(calls)) == 1, calls  # constant in the number of runs
    assert calls[0] <= 3 * len(DEFAULT_TASKS)  # at most one query per task and site


def test_cli_dry_run_leaves_embedded_store_and_disk_byte_identical(tmp_path):
    import subprocess
    import sys
    from cax.config import load
    from cax.runsdb import connect
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def cax(*args):
        return subprocess.run([sys.executable, "-m", "cax", *args], capture_output=True,
                              text=True, timeout=120, env=dict(os.environ, PYTHONPATH=root))

    cfg = three_sites(tmp_path)
    db = connect(load(cfg))
    for i in range(3):
        name = f"16010{i}_0000"
        db.insert_run(run_doc(i, name, make_raw(str(tmp_path / "daq"), name)))
    db.collection._client.close()  # the last connection closes: WAL folded into the file
    assert cax("--config", cfg, "--once", "--host", "daq", "--run", "0").returncode == 0
    before_disk = tree_state(str(tmp_path))
    assert "test.runsdb" in before_disk and "test.runsdb-wal" not in before_disk
    for host in ("daq", "buffer", "archive"):
        proc = cax("--config", cfg, "--once", "--dry-run", "--host", host)
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        assert "dry run: nothing will change" in proc.stderr
    assert tree_state(str(tmp_path)) == before_disk  # Runs DB file bytes and data alike

    missing = tmp_path / "nowhere.runsdb"
    doc = json.loads(open(cfg).read())
    doc["runs_db"] = str(missing)
    open(cfg, "w").write(json.dumps(doc))
    proc = cax("--config", cfg, "--once", "--dry-run", "--host", "daq")
    assert proc.returncode == 0, proc.stderr
    assert "does not exist; taken as empty, not created" in proc.stderr
    assert not missing.exists()
    assert tree_state(str(tmp_path)) == dict(before_disk, **{"cax.json": tree_state(
        str(tmp_path))["cax.json"]})


def test_readonly_embedded_store_refuses_writes(tmp_path):
    from cax.runsdb.embedded import open_collection
    path = tmp_path / "x.runsdb"
    open_collection(path).insert_one({"number": 1})
    ro = open_collection(path, readonly=True)
    assert ro.find_one({"number": 1})["number"] == 1
    with pytest.raises(Exception, match="readonly|read-only|query_only|attempt to write"):
        ro.insert_one({"number": 2})
    assert [d["number"] for d in open_collection(path).find({})] == [1]
    with pytest.raises(FileNotFoundError):
        open_collection(tmp_path / "missing.runsdb", readonly=True)
    assert not (tmp_path / "missing.runsdb").exists()


def test_logged_run_names_and_reasons_stay_on_one_line(tmp_path, caplog):
    """A run name from the Runs DB with a newline must not forge a second log line."""
    cfg = three_sites(tmp_path)
    db = mongomock_db()
    forged = "x\n2016-01-01T00:00:00 ERROR   cax.task: run=160101_0000 forged"
    doc = run_doc(1, forged, str(tmp_path / "daq" / "nowhere"), status="verifying")
    db.collection.insert_one(doc)
    with caplog.at_level(logging.INFO):
        run_pass(context(cfg, "daq", db))
    mine = [r.getMessage() for r in caplog.records if r.name == "cax.task"]
    assert mine, "the run was not logged at all"
    assert all("\n" not in m for m in mine), mine
    assert any(m.startswith("run=x\\n2016-01-01T00:00:00 ERROR") for m in mine), mine
