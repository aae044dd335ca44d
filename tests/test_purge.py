"""BufferPurger and PurgeProcessed: the invariant, the protocol, crashes, paths, dry runs."""
import logging
import os
import subprocess
import sys
import tempfile

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
    cfg = sites_config(tmp_path, purge={"buffer": 1})
    db = fresh_db()
    add_run(db, tmp_path, 1, {"daq": "transferred", "buffer": "transferred",
                              "archive": "transferred"})
    db.collection.update_one({"number": 1}, {"$unset": {"references": ""}})
    # legacy fallback: the origin datum has no 'source', so it is the reference: make every copy a
    # copy (source set), so no reference exists at all
    _set_all_source(db)
    purge(cfg, "buffer", db)
    assert copies(db, 1)["buffer"] == "transferred"


def _set_all_source(db):
    run = db.collection.find_one({"number": 1})
    for i in range(len(run["data"])):
        db.collection.update_one({"number": 1}, {"$set": {f"data.{i}.source": "elsewhere"}})


def test_checksum_type_compared_like_with_like(tmp_path):
    cfg = sites_config(tmp_path, purge={"buffer": 1})
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


def test_min_free_fraction_purges_oldest_first_while_needed(tmp_path, monkeypatch):
    cfg = sites_config(tmp_path, purge={"buffer": {"min_copies": 1, "min_free_fraction": 0.5}})
    db = fresh_db()
    for n in (3, 1, 2):
        add_run(db, tmp_path, n, {"daq": "transferred", "buffer": "transferred"})
    free = iter([0.1, 0.2, 0.9, 0.9])  # two deletions bring the disk above the threshold
    monkeypatch.setattr(BufferPurger, "free_fraction", lambda self, dtype: next(free))
    purge(cfg, "buffer", db)
    assert [("buffer" in copies(db, n)) for n in (1, 2, 3)] == [False, False, True]


def test_dry_run_reports_and_deletes_nothing(tmp_path, caplog):
    cfg = sites_config(tmp_path, purge={"buffer": 2})
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
