"""BufferPurger and PurgeProcessed: the invariant, the protocol, crashes, paths, dry runs."""
import json
import logging
import os
import shutil
import subprocess
import sys

import mongomock
import pymongo
import pytest

from cax import deletion
from cax.runsdb import RunsDB
from cax.tasks.purge import BufferPurger, PurgeProcessed
from tests.purge_helpers import add_run, copies, ctx, sites_config


def fresh_db():
    return RunsDB(mongomock.MongoClient(tz_aware=True)["run"]["runs_new"])


def purge(cfg, host, db, **kw):
    BufferPurger(ctx(cfg, host, db, **kw)).go()


def test_buffer_copy_goes_when_enough_verified_copies(tmp_path):
    cfg = sites_config(tmp_path, purge={"buffer": {"min_copies": 2}})
    db = fresh_db()
    add_run(db, tmp_path, 1, {"daq": "transferred", "buffer": "transferred",
                              "archive": "transferred"})
    purge(cfg, "buffer", db)
    assert copies(db, 1) == {"daq": "transferred", "archive": "transferred"}
    assert not os.path.exists(tmp_path / "buffer" / "160301_1200")
    assert os.path.isdir(tmp_path / "daq" / "160301_1200")


@pytest.mark.parametrize("others", [
    {"daq": "transferred"},                                   # only one other copy
    {"daq": "transferred", "archive": ("transferred", "bad")},  # second copy has a bad checksum
    {"daq": "transferred", "archive": ("transferred", "nosum")},
    {"daq": "transferred", "archive": "verifying"},
    {"daq": "transferred", "archive": "deleting"},
    {"daq": "transferred", "archive": "error"},
])
def test_not_enough_good_copies_keeps_data(tmp_path, others):
    cfg = sites_config(tmp_path, purge={"buffer": {"min_copies": 2}})
    db = fresh_db()
    add_run(db, tmp_path, 1, dict(others, buffer="transferred"), ref_host="daq")
    purge(cfg, "buffer", db)
    assert copies(db, 1)["buffer"] == "transferred"
    assert os.path.isdir(tmp_path / "buffer" / "160301_1200")


def test_unknown_reference_never_deletes(tmp_path):
    cfg = sites_config(tmp_path, purge={"buffer": {"min_copies": 1}})
    db = fresh_db()
    add_run(db, tmp_path, 1, {"daq": "transferred", "buffer": "transferred",
                              "archive": "transferred"})
    db.collection.update_one({"number": 1}, {"$unset": {"references": ""}})
    # legacy fallback: the origin datum has no 'source', so it is the reference: make every copy a
    # copy (source set), so no reference exists at all
    _set_all_source(db)
    purge(cfg, "buffer", db)
    assert copies(db, 1)["buffer"] == "transferred"


def test_legacy_reference_needs_agreeing_origins(tmp_path, caplog):
    """Older cax wrote neither ``references`` nor ``source``: a bad copy listed first looked like
    the origin, became the reference, and the only true copy was purged."""
    cfg = sites_config(tmp_path, purge={"daq": {"min_copies": 1}})
    db = fresh_db()
    add_run(db, tmp_path, 1, {"buffer": ("transferred", "bad"), "daq": "transferred",
                              "archive": ("transferred", "bad")})
    db.collection.update_one({"number": 1}, {"$unset": {"references": ""}})
    with caplog.at_level(logging.WARNING, logger="cax.task"):
        purge(cfg, "daq", db)
    assert copies(db, 1)["daq"] == "transferred"
    assert os.path.isdir(tmp_path / "daq" / "160301_1200")
    assert "reference checksum unknown" in caplog.text and "disagree" in caplog.text
    # when every source-less copy agrees, the legacy fallback still works
    db.collection.update_one({"number": 1}, {"$set": {"data.0.source": "daq",
                                                      "data.2.source": "daq"}})
    add_run(db, tmp_path, 2, {"daq": "transferred", "buffer": "transferred"})
    db.collection.update_one({"number": 2}, {"$unset": {"references": ""}})
    purge(cfg, "daq", db)
    assert copies(db, 1)["daq"] == "transferred"     # the others are bad copies
    assert copies(db, 2) == {"buffer": "transferred"}


def test_one_copy_under_two_site_names_is_not_another_copy(tmp_path):
    """buffer2 names the very files of buffer (same machine, same path): deleting buffer's copy
    would delete it too, so it is no other good copy."""
    cfg = sites_config(tmp_path, names=("daq", "buffer", "buffer2"), purge={"buffer": {"min_copies": 1}})
    db = fresh_db()
    add_run(db, tmp_path, 1, {"daq": ("transferred", "bad"), "buffer": "transferred"},
            ref_host="buffer")
    run = db.collection.find_one({"number": 1})
    db.collection.update_one({"number": 1}, {"$push": {"data": dict(run["data"][1], host="buffer2")}})
    purge(cfg, "buffer", db)
    assert copies(db, 1)["buffer"] == "transferred"
    assert os.path.isdir(tmp_path / "buffer" / "160301_1200")
    # the same path under a site name of another machine is another copy
    doc = json.loads(open(cfg).read())
    doc["sites"][2].update(method="rsync", hostname="elsewhere.example.org")
    open(cfg, "w").write(json.dumps(doc))
    site = ctx(cfg, "buffer", db).config
    outcome = deletion.delete_copy(db, site.site("buffer"), run["_id"],
                                   {"host": "buffer", "type": "raw"}, min_copies=1,
                                   sites=site.sites)
    # counted, and so checked where it lives: that host cannot be reached, so the purge waits
    # (tests/faults/test_purge_faults.py deletes after checking a copy on another host over SSH)
    assert outcome.action == "unsafe" and "cannot reach buffer2" in outcome.reason, outcome
    assert copies(db, 1)["buffer"] == "transferred"


def _set_all_source(db):
    run = db.collection.find_one({"number": 1})
    for i in range(len(run["data"])):
        db.collection.update_one({"number": 1}, {"$set": {f"data.{i}.source": "elsewhere"}})


def test_checksum_type_compared_like_with_like(tmp_path):
    cfg = sites_config(tmp_path, purge={"buffer": {"min_copies": 1}})
    db = fresh_db()
    add_run(db, tmp_path, 1, {"daq": "transferred", "buffer": "transferred"})
    db.collection.update_one({"number": 1}, {"$set": {"data.0.checksum_type": "xxh3"}})
    purge(cfg, "buffer", db)
    assert copies(db, 1)["buffer"] == "transferred"


def test_classic_numeric_purge_and_older_than(tmp_path):
    from datetime import datetime, timezone
    cfg = sites_config(tmp_path, purge={"buffer": {"min_copies": 1, "older_than_days": 30}})
    db = fresh_db()
    add_run(db, tmp_path, 1, {"daq": "transferred", "buffer": "transferred"})
    add_run(db, tmp_path, 2, {"daq": "transferred", "buffer": "transferred"},
            start=datetime.now(timezone.utc))
    purge(cfg, "buffer", db)
    assert "buffer" not in copies(db, 1)
    assert copies(db, 2)["buffer"] == "transferred"


def test_classic_integer_purge_is_an_age_in_days_with_three_copies(tmp_path, caplog):
    """Issue 12: the classic ``purge: 2`` (the 2018 config's lena) meant "raw data older than 2
    days, while three verified copies exist"; read as ``min_copies: 2`` it deleted a run an hour
    after it started."""
    from datetime import datetime, timedelta, timezone
    cfg = sites_config(tmp_path, purge={"buffer": 2})
    db = fresh_db()
    hour_old = datetime.now(timezone.utc) - timedelta(hours=1)
    add_run(db, tmp_path, 1, {"daq": "transferred", "buffer": "transferred",
                              "archive": "transferred"}, start=hour_old)
    add_run(db, tmp_path, 2, {"daq": "transferred", "buffer": "transferred",
                              "archive": "transferred"})
    add_run(db, tmp_path, 3, {"daq": "transferred", "buffer": "transferred"})
    purge(cfg, "buffer", db)
    assert "classic 2 means raw data older than 2 days" in caplog.text
    assert copies(db, 1)["buffer"] == "transferred", "an hour-old run was purged"
    assert "buffer" not in copies(db, 2)
    assert copies(db, 3)["buffer"] == "transferred", "purged with only two copies in all"


def test_min_free_fraction_purges_oldest_first_while_needed(tmp_path, monkeypatch):
    cfg = sites_config(tmp_path, purge={"buffer": {"min_copies": 1, "min_free_fraction": 0.5}})
    db = fresh_db()
    for n in (3, 1, 2):
        add_run(db, tmp_path, n, {"daq": "transferred", "buffer": "transferred"})
    free = iter([0.1, 0.2, 0.9, 0.9])  # two deletions bring the disk above the threshold
    monkeypatch.setattr(BufferPurger, "free_fraction", lambda self, dtype: next(free))
    purge(cfg, "buffer", db)
    assert [("buffer" in copies(db, n)) for n in (1, 2, 3)] == [False, False, True]


def test_min_free_fraction_dry_run_counts_what_it_would_free(tmp_path, monkeypatch, caplog):
    from collections import namedtuple
    from cax import purge_rule as purge_mod  # the purge rule reads the disk (shared with CopyPull)
    cfg = sites_config(tmp_path, purge={"buffer": {"min_copies": 1, "min_free_fraction": 0.5}})
    db = fresh_db()
    for n in (1, 2, 3):
        add_run(db, tmp_path, n, {"daq": "transferred", "buffer": "transferred"})
        db.collection.update_one({"number": n}, {"$set": {"data.1.size": 60}})
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(purge_mod.shutil, "disk_usage", lambda p: usage(1000, 600, 400))
    with caplog.at_level(logging.INFO, logger="cax"):
        purge(cfg, "buffer", db, dry_run=True)
    # 400 free of 1000: two copies of 60 bytes bring it to 52%, the third is not needed
    would = [ln for ln in caplog.text.splitlines() if "dry-run: would delete" in ln]
    assert len(would) == 2 and not any("160303_1200" in ln for ln in would), caplog.text


def test_dry_run_reports_and_deletes_nothing(tmp_path, caplog):
    cfg = sites_config(tmp_path, purge={"buffer": {"min_copies": 2}})
    db = fresh_db()
    add_run(db, tmp_path, 1, {"daq": "transferred", "buffer": "transferred",
                              "archive": "transferred"})
    before = db.collection.find_one({"number": 1})
    db.dry_run = True
    with caplog.at_level(logging.INFO):
        purge(cfg, "buffer", db, dry_run=True)
    db.dry_run = False
    assert db.collection.find_one({"number": 1}) == before
    assert os.path.isdir(tmp_path / "buffer" / "160301_1200")
    msgs = [r.getMessage() for r in caplog.records]
    assert any("dry-run: would delete" in m and "160301_1200" in m and "daq, archive" in m
               for m in msgs), msgs


# ---- the marking update: verified on every backend ---------------------------------------------
def _backends():
    out = ["mongomock", "embedded", "wire"]
    return out


@pytest.fixture(scope="module")
def wire_server():
    try:
        from secantus import SecantusDBServer
    except ImportError:
        from tests.conftest import missing_component
        missing_component("SecantusDB (MongoDB wire server) is not installed")
    with SecantusDBServer(storage_path=":memory:") as s:
        yield s


def backend_collection(kind, request, tmp_path):
    if kind == "mongomock":
        return mongomock.MongoClient(tz_aware=True)["run"]["runs_new"]
    if kind == "embedded":
        try:
            from cax.runsdb.embedded import open_collection
        except ImportError:
            from tests.conftest import missing_component
            missing_component("cax.runsdb.embedded is not in this build")
        return open_collection(str(tmp_path / "e.runsdb"), database="run", collection="runs_new")
    server = request.getfixturevalue("wire_server")
    coll = pymongo.MongoClient(server.uri, tz_aware=True)["run"][f"t{abs(hash(str(tmp_path)))}"]
    coll.delete_many({})
    return coll


@pytest.mark.parametrize("kind", _backends())
def test_marking_update_semantics(kind, request, tmp_path):
    """mark_deleting touches exactly the own element, only while the named copies are good."""
    db = RunsDB(backend_collection(kind, request, tmp_path))
    db.collection.insert_one({"_id": 7, "number": 7, "name": "x", "data": [
        {"host": "a", "type": "raw", "status": "transferred", "checksum": "X"},  # no checksum_type
        {"host": "b", "type": "processed", "pax_version": "v1", "status": "transferred"},
        {"host": "b", "type": "raw", "status": "transferred", "checksum": "X",
         "checksum_type": "sha512"},
        {"host": "c", "type": "raw", "status": "transferred", "checksum": "X",
         "checksum_type": "sha512"},
    ]})
    ref = {"checksum": "X", "checksum_type": "sha512"}
    a, c = {"host": "a", "type": "raw"}, {"host": "c", "type": "raw"}
    b = {"host": "b", "type": "raw"}
    # wrong index for the key: refused, nothing written
    assert not db.mark_deleting(7, 1, b, "transferred", [deletion.good_spec(a, ref)])
    # b names a and c: applies to element 2 only
    assert db.mark_deleting(7, 2, b, "transferred",
                            [deletion.good_spec(a, ref), deletion.good_spec(c, ref)])
    doc = db.collection.find_one({"_id": 7})
    assert [d["status"] for d in doc["data"]] == ["transferred", "transferred", "deleting",
                                                  "transferred"]
    # c names a and b at the same time: b is no longer good, so c's mark must fail
    assert not db.mark_deleting(7, 3, c, "transferred",
                                [deletion.good_spec(a, ref), deletion.good_spec(b, ref)])
    # a bad checksum or another algorithm is not a good copy
    assert not db.mark_deleting(7, 3, c, "transferred",
                                [deletion.good_spec(a, {"checksum": "Y", "checksum_type": "sha512"})])
    assert not db.mark_deleting(7, 3, c, "transferred",
                                [deletion.good_spec(a, {"checksum": "X", "checksum_type": "xxh3"})])
    assert db.collection.find_one({"_id": 7}) == doc
    # processed: the version is part of the key
    assert not db.mark_deleting(7, 1, {"host": "b", "type": "processed", "pax_version": "v2"},
                                "transferred")
    assert db.mark_deleting(7, 1, {"host": "b", "type": "processed", "pax_version": "v1"},
                            "transferred")
    assert [d["status"] for d in db.collection.find_one({"_id": 7})["data"]] == [
        "transferred", "deleting", "deleting", "transferred"]


# ---- crashes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("stop_after", ["decided", "marked", "removed"])
def test_interrupted_purge_is_finished_by_next_pass(tmp_path, stop_after):
    """Simulated crash: the protocol generator is abandoned after a step."""
    cfg = sites_config(tmp_path, purge={"buffer": {"min_copies": 2}})
    db = fresh_db()
    run = add_run(db, tmp_path, 1, {"daq": "transferred", "buffer": "transferred",
                                    "archive": "transferred"})
    config = ctx(cfg, "buffer", db).config
    steps = deletion.delete_steps(db, config.site("buffer"), run["_id"],
                                  {"host": "buffer", "type": "raw"}, min_copies=2,
                                  sites=config.sites)
    for step in steps:
        if step == stop_after:
            break
    steps.close()
    expect = {"decided": "transferred", "marked": "deleting", "removed": "deleting"}[stop_after]
    assert copies(db, 1)["buffer"] == expect
    assert os.path.isdir(tmp_path / "buffer" / "160301_1200") == (stop_after != "removed")
    purge(cfg, "buffer", db)
    assert copies(db, 1) == {"daq": "transferred", "archive": "transferred"}
    assert not os.path.exists(tmp_path / "buffer" / "160301_1200")


CRASH_SCRIPT = r"""
import sys
from cax import config as cfgmod
from cax.runsdb import connect
from cax.tasks.base import Context
from cax.tasks.purge import BufferPurger
cfg = cfgmod.load(sys.argv[1])
BufferPurger(Context(config=cfg, host="buffer", db=connect(cfg))).go()
"""


@pytest.mark.parametrize("crash_at", ["marked", "removed"])
def test_killed_purge_is_finished_by_next_pass(tmp_path, wire_server, crash_at):
    """A real crash: the purging process is SIGKILLed right after the step."""
    uri = wire_server.uri
    dbname = f"crash{crash_at}{abs(hash(str(tmp_path)))}"
    cfg = sites_config(tmp_path, purge={"buffer": {"min_copies": 2}}, runs_db=uri)
    import json
    doc = json.loads(open(cfg).read())
    doc["database"] = dbname
    open(cfg, "w").write(json.dumps(doc))
    from cax.config import load
    from cax.runsdb import connect
    db = connect(load(cfg))
    add_run(db, tmp_path, 1, {"daq": "transferred", "buffer": "transferred",
                              "archive": "transferred"})
    env = dict(os.environ, PYTHONPATH=os.getcwd(), **{deletion.CRASH_ENV: crash_at})
    p = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, cfg], env=env, timeout=120,
                       capture_output=True, text=True)
    assert p.returncode == -9, p.stderr
    assert copies(db, 1)["buffer"] == "deleting"
    assert os.path.isdir(tmp_path / "buffer" / "160301_1200") == (crash_at == "marked")
    BufferPurger(ctx(cfg, "buffer", db)).go()
    assert copies(db, 1) == {"daq": "transferred", "archive": "transferred"}
    assert not os.path.exists(tmp_path / "buffer" / "160301_1200")


# ---- paths -----------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["outside", "symlink-out", "symlink-itself"])
def test_location_outside_or_through_symlink_never_deleted(tmp_path, how, caplog):
    cfg = sites_config(tmp_path, purge={"buffer": {"min_copies": 1}})
    db = fresh_db()
    add_run(db, tmp_path, 1, {"daq": "transferred", "buffer": "transferred"})
    secret = tmp_path / "secret"
    os.makedirs(secret / "160301_1200")
    (secret / "160301_1200" / "keep").write_text("x")
    if how == "outside":
        loc = str(secret / "160301_1200")
    elif how == "symlink-out":
        os.symlink(secret, tmp_path / "buffer" / "link")
        loc = str(tmp_path / "buffer" / "link" / "160301_1200")
    else:
        os.symlink(tmp_path / "daq" / "160301_1200", tmp_path / "buffer" / "alias")
        loc = str(tmp_path / "buffer" / "alias")
    db.collection.update_one({"number": 1, "data.host": "buffer"},
                             {"$set": {"data.1.location": loc}})
    before = db.collection.find_one({"number": 1})["data"][1]
    with caplog.at_level(logging.ERROR, logger="cax.task"):
        purge(cfg, "buffer", db)
    run = db.collection.find_one({"number": 1})
    datum = run["data"][1]
    # refused and said; the datum stays as it was (issue 12: never a good datum turned error)
    assert datum == before and datum["status"] == "transferred"
    assert "refused: not deleted: refusing location" in caplog.text
    assert (secret / "160301_1200" / "keep").exists()
    assert os.path.isdir(tmp_path / "daq" / "160301_1200")


@pytest.mark.parametrize("how", ["other-run", "dotdot", "symlinked-part", "shared-path"])
def test_location_not_this_runs_copy_never_deleted(tmp_path, how, caplog):
    """Only the only copy of run 2 is at risk; run 1's buffer datum points at it in some way."""
    cfg = sites_config(tmp_path, purge={"buffer": {"min_copies": 1}})
    db = fresh_db()
    add_run(db, tmp_path, 1, {"daq": "transferred", "buffer": "transferred"})
    add_run(db, tmp_path, 2, {"buffer": "transferred"})   # the only copy of run 2
    run2 = tmp_path / "buffer" / "160302_1200"
    loc = {"other-run": str(run2),
           "dotdot": str(tmp_path / "buffer" / "160301_1200" / ".." / "160302_1200"),
           "symlinked-part": str(tmp_path / "buffer" / "sub" / "160301_1200"),
           "shared-path": str(tmp_path / "buffer" / "160301_1200")}[how]
    if how == "symlinked-part":
        os.symlink(run2, tmp_path / "buffer" / "sub")
        os.makedirs(run2 / "160301_1200")
    if how == "shared-path":
        # run 1's directory holds run 2's only data (moved there by hand) and run 2's datum says so
        import shutil
        shutil.rmtree(tmp_path / "buffer" / "160301_1200")
        os.rename(run2, tmp_path / "buffer" / "160301_1200")
        run2 = tmp_path / "buffer" / "160301_1200"
        db.collection.update_one({"number": 2}, {"$set": {"data.0.location": str(run2)}})
    db.collection.update_one({"number": 1}, {"$set": {"data.1.location": loc}})
    before = sorted(os.listdir(run2))
    purge(cfg, "buffer", db, dry_run=True)   # a dry run reports the refusal, changes nothing
    assert copies(db, 1)["buffer"] == "transferred" and sorted(os.listdir(run2)) == before
    kept = db.collection.find_one({"number": 1})["data"][1]
    with caplog.at_level(logging.ERROR, logger="cax.task"):
        purge(cfg, "buffer", db)
    datum = db.collection.find_one({"number": 1})["data"][1]
    assert datum == kept and datum["status"] == "transferred", datum
    assert "error_kind" not in datum
    assert "refused: not deleted: refusing location" in caplog.text
    assert sorted(os.listdir(run2)) == before


def retired_v1_site(tmp_path, third_version):
    """buffer retires v1 (keeps v2): run 1 (v1) is also at archive, run 2 (v1) only at buffer,
    run 3 (``third_version``) at both."""
    cfg = sites_config(tmp_path, purge={"buffer": {"min_copies": 1, "versions": ["v1"]}},
                       extra={"buffer": {"pax_versions": ["v2"]}})
    db = fresh_db()
    add_run(db, tmp_path, 1, {"buffer": "transferred", "archive": "transferred"},
            dtype="processed", version="v1")
    add_run(db, tmp_path, 2, {"buffer": "transferred"}, dtype="processed", version="v1")
    add_run(db, tmp_path, 3, {"buffer": "transferred", "archive": "transferred"},
            dtype="processed", version=third_version)
    return cfg, db


def test_processed_location_must_be_in_its_version_directory(tmp_path, caplog):
    cfg, db = retired_v1_site(tmp_path, "v1")
    # run 1 names the whole version directory; run 3 names its copy under the wrong version
    os.makedirs(tmp_path / "buffer" / "v2")
    os.rename(tmp_path / "buffer" / "v1" / "160303_1200", tmp_path / "buffer" / "v2" / "160303_1200")
    db.collection.update_one({"number": 1}, {"$set": {"data.0.location": str(tmp_path / "buffer" / "v1")}})
    db.collection.update_one({"number": 3}, {"$set": {
        "data.0.location": str(tmp_path / "buffer" / "v2" / "160303_1200")}})
    with caplog.at_level(logging.WARNING, logger="cax.task"):
        PurgeProcessed(ctx(cfg, "buffer", db)).go()
    assert os.path.isdir(tmp_path / "buffer" / "v1" / "160302_1200")
    assert os.path.isdir(tmp_path / "buffer" / "v2" / "160303_1200")
    for n in (1, 3):
        d = db.collection.find_one({"number": n})["data"][0]
        assert d["status"] == "transferred" and "error" not in d, d
        assert f"run=1603{n:02d}_1200" in caplog.text
    assert caplog.text.count("refused: not deleted: refusing location") == 2, caplog.text


def test_processed_file_named_after_the_run_is_deleted(tmp_path):
    cfg = sites_config(tmp_path, purge={"buffer": {"min_copies": 1, "versions": ["v1"]}})
    db = fresh_db()
    add_run(db, tmp_path, 1, {"buffer": "transferred", "archive": "transferred"},
            dtype="processed", version="v1")
    f = tmp_path / "buffer" / "v1" / "160301_1200.root"
    f.write_text("x")
    db.collection.update_one({"number": 1}, {"$set": {"data.0.location": str(f)}})
    PurgeProcessed(ctx(cfg, "buffer", db)).go()
    assert not f.exists() and copies(db, 1, "processed") == {"archive": "transferred"}


def test_deleting_datum_with_unsafe_location_is_reported_not_deleted(tmp_path):
    cfg = sites_config(tmp_path, purge={"buffer": {"min_copies": 1}})
    db = fresh_db()
    add_run(db, tmp_path, 1, {"daq": "transferred", "buffer": "transferred"})
    db.collection.update_one({"number": 1}, {"$set": {"data.1.status": "deleting",
                                                      "data.1.location": str(tmp_path / "daq")}})
    purge(cfg, "buffer", db)
    datum = db.collection.find_one({"number": 1})["data"][1]
    assert datum["status"] == "error" and "outside the data directories" in datum["error"]
    assert os.path.isdir(tmp_path / "daq" / "160301_1200")


def test_deleting_copy_finished_at_site_without_purge_settings(tmp_path):
    """A crashed ``cax rm`` at a site that never purges left a copy ``deleting``."""
    cfg = sites_config(tmp_path)   # no site purges
    db = fresh_db()
    add_run(db, tmp_path, 1, {"daq": "transferred", "buffer": "transferred"})
    db.collection.update_one({"number": 1}, {"$set": {"data.1.status": "deleting"}})
    purge(cfg, "buffer", db, dry_run=True)
    assert copies(db, 1)["buffer"] == "deleting"
    assert os.path.isdir(tmp_path / "buffer" / "160301_1200")
    purge(cfg, "buffer", db)
    assert copies(db, 1) == {"daq": "transferred"}
    assert not os.path.exists(tmp_path / "buffer" / "160301_1200")


def test_one_bad_run_does_not_stop_others(tmp_path, caplog):
    cfg = sites_config(tmp_path, purge={"buffer": {"min_copies": 1}})
    db = fresh_db()
    add_run(db, tmp_path, 1, {"daq": "transferred", "buffer": "transferred"})
    add_run(db, tmp_path, 2, {"daq": "transferred", "buffer": "transferred"})
    db.collection.update_one({"number": 1}, {"$set": {"data.1.location": None}})
    with caplog.at_level(logging.ERROR, logger="cax.task"):
        purge(cfg, "buffer", db)
    # the deletion is refused and said; the datum stays as it was (issue 12)
    assert copies(db, 1)["buffer"] == "transferred"
    assert "run=160301_1200" in caplog.text and "refused: not deleted" in caplog.text
    assert "buffer" not in copies(db, 2)


# ---- PurgeProcessed --------------------------------------------------------------------------
def test_purge_processed_retired_version(tmp_path, caplog):
    cfg, db = retired_v1_site(tmp_path, "v2")
    with caplog.at_level(logging.WARNING):
        PurgeProcessed(ctx(cfg, "buffer", db)).go()
    assert copies(db, 1, "processed") == {"archive": "transferred"}
    assert copies(db, 2, "processed") == {"buffer": "transferred"}  # the only copy stays
    assert copies(db, 3, "processed") == {"buffer": "transferred", "archive": "transferred"}
    assert any("kept: 0 other verified copies" in r.getMessage() and "run=160302_1200" in
               r.getMessage() for r in caplog.records)


def test_purge_processed_old_versions(tmp_path):
    cfg = sites_config(tmp_path, purge={"buffer": {"min_copies": 1, "old_versions": True}},
                       extra={"buffer": {"pax_versions": ["v2"]}})
    db = fresh_db()
    add_run(db, tmp_path, 1, {"buffer": "transferred", "archive": "transferred"},
            dtype="processed", version="v1")
    add_run(db, tmp_path, 2, {"buffer": "transferred", "archive": "transferred"},
            dtype="processed", version="v2")
    PurgeProcessed(ctx(cfg, "buffer", db)).go()
    assert copies(db, 1, "processed") == {"archive": "transferred"}
    assert copies(db, 2, "processed") == {"buffer": "transferred", "archive": "transferred"}


# ---- two real processes purging the same runs at the same moment -------------------------------
def _race_child(cfg_path, host, run_ids, barrier, results):
    """Decide, wait until the other process has decided too, then both try to mark and delete."""
    from cax import config as cfgmod
    from cax.runsdb import connect
    cfg = cfgmod.load(cfg_path)
    db = connect(cfg)
    site = cfg.site(host)
    out = {}
    for rid in run_ids:
        steps = deletion.delete_steps(db, site, rid, {"host": host, "type": "raw"}, min_copies=2,
                                      sites=cfg.sites)
        waited = False
        try:
            while True:
                step = next(steps)
                if step == "decided" and not waited:
                    waited = True
                    barrier.wait(timeout=60)
        except StopIteration as stop:
            out[str(rid)] = stop.value.action
        if not waited:
            barrier.wait(timeout=60)  # keep the two processes in step
    results.put((host, out))


@pytest.mark.parametrize("kind", ["embedded", "wire"])
def test_two_processes_purge_same_runs_at_once(tmp_path, request, kind):
    import multiprocessing
    import json
    if kind == "wire":
        runs_db = request.getfixturevalue("wire_server").uri
    else:
        try:
            import cax.runsdb.embedded  # noqa: F401
        except ImportError:
            from tests.conftest import missing_component
            missing_component("cax.runsdb.embedded is not in this build")
        runs_db = str(tmp_path / "shared.runsdb")
    cfg = sites_config(tmp_path, purge={"buffer": 2, "archive": {"min_copies": 2}}, runs_db=runs_db)
    doc = json.loads(open(cfg).read())
    doc["database"] = f"race{abs(hash(str(tmp_path)))}"
    open(cfg, "w").write(json.dumps(doc))
    from cax.config import load
    from cax.runsdb import connect
    db = connect(load(cfg))
    ids = [add_run(db, tmp_path, n, {"daq": "transferred", "buffer": "transferred",
                                     "archive": "transferred"})["_id"] for n in range(1, 9)]
    mp = multiprocessing.get_context("spawn")
    barrier, results = mp.Barrier(2), mp.Queue()
    procs = [mp.Process(target=_race_child, args=(cfg, h, ids, barrier, results))
             for h in ("buffer", "archive")]
    for p in procs:
        p.start()
    outs = dict(results.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for n, rid in enumerate(ids, 1):
        state = copies(db, n)
        good = [h for h, s in state.items() if s == "transferred"]
        assert len(good) >= 2, state
        assert "deleting" not in state.values()
        # both decided it was safe; exactly one of them could mark it
        actions = sorted(outs[h][str(rid)] for h in ("buffer", "archive"))
        assert actions == ["deleted", "unsafe"], actions
        for h in good:
            assert os.path.isdir(tmp_path / h / f"1603{n:02d}_1200")


def test_pipeline_buffer_purged_once_archive_verified(tmp_path):
    """daq -> buffer -> archive with the daemon's task order: the buffer copy goes, not before."""
    import json
    from cax.daemon import run_pass
    from tests.helpers import context, make_raw, run_doc, three_sites
    cfg = three_sites(tmp_path)
    doc = json.loads(open(cfg).read())
    doc["sites"][1]["purge"] = {"min_copies": 2}
    open(cfg, "w").write(json.dumps(doc))
    db = fresh_db()
    db.insert_run(run_doc(1, "160315_1432", make_raw(str(tmp_path / "daq"), "160315_1432")))
    for host in ("daq", "daq", "buffer"):  # the daq verifies, then pushes on its next pass
        run_pass(context(cfg, host, db))
    assert copies(db, 1) == {"daq": "transferred", "buffer": "transferred"}  # only one other copy
    run_pass(context(cfg, "archive", db))
    run_pass(context(cfg, "buffer", db))
    assert copies(db, 1) == {"daq": "transferred", "archive": "transferred"}
    assert os.listdir(tmp_path / "buffer") == []


# ---- verify before delete (cax/deletion.py CopyChecker) -----------------------------------------
def _flip(location):
    with open(os.path.join(location, "f0.bin"), "r+b") as f:
        b = f.read(1)
        f.seek(0)
        f.write(bytes([b[0] ^ 0xFF]))


def _verified(db, number, days_ago, source=None):
    """Sizes recorded (as AddSize does) and the last verification ``days_ago``."""
    from datetime import timedelta

    from cax.runsdb import now
    from cax.transfer.base import local_tree
    run = db.collection.find_one({"number": number})
    for i, d in enumerate(run["data"]):
        size, files = local_tree(d["location"])
        fields = {"size": size, "files": files,
                  "checksum_time": now() - timedelta(days=days_ago)}
        if source and d["host"] != source:
            fields["source"] = source
        db.collection.update_one({"number": number}, {"$set": {
            f"data.{i}.{k}": v for k, v in fields.items()}})


@pytest.mark.parametrize("reverify_days, days_ago, rehashed", [
    (None, 1, False),    # a copy's copy, verified yesterday: size and file count checked only
    (None, 31, True),    # verified over 30 days ago (the default for non-origins): re-hashed
    (0, 0, True),        # reverify_days 0: every counted copy re-hashed
    (7, 3, False),
    (7, 8, True),
])
def test_reverify_days_decides_which_counted_copies_are_rehashed(tmp_path, reverify_days,
                                                                 days_ago, rehashed):
    cfg = sites_config(tmp_path, purge={"buffer": {"min_copies": 1,
                                                   "reverify_days": reverify_days}})
    db = fresh_db()
    add_run(db, tmp_path, 1, {"daq": "transferred", "buffer": "transferred"}, ref_host="daq")
    _verified(db, 1, days_ago, source="daq")   # buffer's copy is a copy of the DAQ's
    _flip(str(tmp_path / "daq" / "160301_1200"))  # same size: only a re-hash sees it
    purge(cfg, "buffer", db)
    if rehashed:
        assert copies(db, 1) == {"daq": "error", "buffer": "transferred"}
        run = db.collection.find_one({"number": 1})
        assert run["data"][0]["error_kind"] == "corrupt"
    else:
        assert copies(db, 1) == {"daq": "transferred"}


def test_origin_deletion_rehashes_even_fresh_copies_by_default(tmp_path):
    cfg = sites_config(tmp_path, purge={"daq": {"min_copies": 1}})
    db = fresh_db()
    add_run(db, tmp_path, 1, {"daq": "transferred", "buffer": "transferred"}, ref_host="daq")
    _verified(db, 1, 0, source="daq")
    _flip(str(tmp_path / "buffer" / "160301_1200"))
    purge(cfg, "daq", db)
    assert copies(db, 1) == {"daq": "transferred", "buffer": "error"}
    # with reverify_days set, the admin chose otherwise (for the origin too)
    cfg = sites_config(tmp_path, purge={"daq": {"min_copies": 1, "reverify_days": 5}})
    add_run(db, tmp_path, 2, {"daq": "transferred", "buffer": "transferred"}, ref_host="daq")
    _verified(db, 2, 1, source="daq")
    _flip(str(tmp_path / "buffer" / "160302_1200"))
    purge(cfg, "daq", db)
    assert copies(db, 2) == {"buffer": "transferred"}


def test_counted_copy_of_a_site_not_in_the_config_is_not_counted(tmp_path):
    cfg = sites_config(tmp_path, names=("daq", "buffer"), purge={"buffer": {"min_copies": 1}})
    db = fresh_db()
    add_run(db, tmp_path, 1, {"daq": "transferred", "buffer": "transferred"}, ref_host="daq")
    db.collection.update_one({"number": 1}, {"$set": {"data.0.host": "gone"}})
    purge(cfg, "buffer", db)
    assert copies(db, 1) == {"gone": "transferred", "buffer": "transferred"}


def test_a_failed_check_flags_once_and_the_purge_waits(tmp_path, caplog):
    """The other good copies are not tried in its place this pass: the purge waits, and says
    why on the next pass too (the flagged copy is no longer counted)."""
    cfg = sites_config(tmp_path, purge={"daq": {"min_copies": 1}})
    db = fresh_db()
    add_run(db, tmp_path, 1, {"daq": "transferred", "buffer": "transferred",
                              "archive": "transferred"}, ref_host="daq")
    shutil.rmtree(tmp_path / "archive" / "160301_1200")
    with caplog.at_level(logging.WARNING, logger="cax.task"):
        purge(cfg, "daq", db)
    assert copies(db, 1) == {"daq": "transferred", "buffer": "transferred",
                             "archive": "error"}
    assert "archive lost" in caplog.text and "waiting for it to heal" in caplog.text
    purge(cfg, "daq", db)        # next pass: buffer checked and sound, the origin goes
    assert copies(db, 1) == {"buffer": "transferred", "archive": "error"}


def test_purge_and_scrub_settings_in_the_config(tmp_path):
    from cax import config as cfgmod
    doc = {"sites": [{"name": "a", "directory": str(tmp_path / "a"), "purge": True, "scrub": True},
                     {"name": "b", "directory": str(tmp_path / "b"),
                      "scrub": {"bytes_per_pass": 1000, "every_days": 2}},
                     {"name": "c", "directory": str(tmp_path / "c"),
                      "scrub": {"every_days": 2, "enabled": False}}]}
    cfg = cfgmod.parse(json.dumps(doc), str(tmp_path / "c.json"))
    a, b, c = (cfg.sites[n] for n in "abc")
    assert a.purge["reverify_days"] is None
    assert a.scrub == {"bytes_per_pass": 10 * 2 ** 30, "every_days": 30.0}
    assert b.scrub == {"bytes_per_pass": 1000, "every_days": 2}
    assert c.scrub is None
    assert "VerifyCopies" in cfg.tasks_for("a")
    order = list(cfgmod.DEFAULT_TASKS)
    assert order.index("SetPermission") < order.index("VerifyCopies") \
        < order.index("ProcessBatchQueue")
    for bad, key in (({"scrub": {"bytes_per_pass": 0}}, "scrub"),
                     ({"scrub": {"every": 1}}, "scrub"),
                     ({"purge": {"reverify_days": -1}}, "purge")):
        d = {"sites": [dict({"name": "a", "directory": str(tmp_path)}, **bad)]}
        with pytest.raises(cfgmod.ConfigError) as e:
            cfgmod.parse(json.dumps(d), "c.json")
        assert key in str(e.value)


def test_purge_processed_checks_the_copies_it_counts(tmp_path):
    cfg = sites_config(tmp_path, purge={"buffer": {"min_copies": 1, "versions": ["v1"]}})
    db = fresh_db()
    add_run(db, tmp_path, 1, {"buffer": "transferred", "archive": "transferred"},
            dtype="processed", version="v1")
    _flip(str(tmp_path / "archive" / "v1" / "160301_1200"))
    PurgeProcessed(ctx(cfg, "buffer", db)).go()
    assert copies(db, 1, "processed") == {"buffer": "transferred", "archive": "error"}
    run = db.collection.find_one({"number": 1})
    assert run["data"][1]["error_kind"] == "corrupt"
