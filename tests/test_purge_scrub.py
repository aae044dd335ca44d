"""VerifyCopies (the scrub): budget, order, dry run, and the cost of an idle pass.

The scrub's fault tests (a flipped byte found within its budget, a file gone, a corrupt source
flagged after two failed verifications) are in tests/faults/test_purge_faults.py.
"""
import os
from datetime import timedelta

import mongomock

from cax.runsdb import RunsDB, now
from cax.tasks.scrub import VerifyCopies
from cax.transfer.base import local_tree
from tests.purge_helpers import add_run, ctx, sites_config

SIZE = 100 + 101 + 1  # add_run's copies: two data files and a hidden one


def fresh_db():
    return RunsDB(mongomock.MongoClient(tz_aware=True)["run"]["runs_new"])


def setup(tmp_path, scrub, runs=3, days_ago=(30, 20, 10)):
    cfg = sites_config(tmp_path, names=("daq", "buffer"), extra={"buffer": {"scrub": scrub}})
    db = fresh_db()
    for n in range(1, runs + 1):
        add_run(db, tmp_path, n, {"daq": "transferred", "buffer": "transferred"},
                ref_host="daq")
        run = db.collection.find_one({"number": n})
        size, files = local_tree(run["data"][1]["location"])
        db.collection.update_one({"number": n}, {"$set": {
            "data.1.size": size, "data.1.files": files,
            "data.1.checksum_time": now() - timedelta(days=days_ago[n - 1])}})
    return cfg, db


def checked_since(db, t0, runs=3):
    return [n for n in range(1, runs + 1)
            if db.collection.find_one({"number": n})["data"][1]["checksum_time"].replace(
                tzinfo=t0.tzinfo) >= t0]


def test_copy_larger_than_the_budget_is_read_alone_first_in_a_pass(tmp_path):
    cfg, db = setup(tmp_path, {"bytes_per_pass": SIZE // 2, "every_days": 1})
    t0 = now()
    VerifyCopies(ctx(cfg, "buffer", db)).go()
    assert checked_since(db, t0) == [1]
    VerifyCopies(ctx(cfg, "buffer", db)).go()
    assert checked_since(db, t0) == [1, 2]


def test_oldest_verified_first_and_never_verified_before_all(tmp_path):
    cfg, db = setup(tmp_path, {"bytes_per_pass": SIZE, "every_days": 1}, days_ago=(5, 50, 20))
    db.collection.update_one({"number": 3}, {"$unset": {"data.1.checksum_time": ""}})
    t0 = now()
    order = []
    for _ in range(3):
        VerifyCopies(ctx(cfg, "buffer", db)).go()
        order.append(next(n for n in checked_since(db, t0) if n not in order))
    assert order == [3, 2, 1]


def test_dry_run_reads_but_writes_nothing(tmp_path, caplog):
    cfg, db = setup(tmp_path, {"bytes_per_pass": 10 * SIZE, "every_days": 1})
    with open(os.path.join(db.collection.find_one({"number": 2})["data"][1]["location"],
                           "f0.bin"), "r+b") as f:
        f.write(b"\0\1\2")
    before = list(db.collection.find({}))
    dry = RunsDB(db.collection, dry_run=True)
    with caplog.at_level("INFO", logger="cax.task"):
        VerifyCopies(ctx(cfg, "buffer", dry, dry_run=True)).go()
    assert list(db.collection.find({})) == before
    assert "dry-run: would flag corrupt" in caplog.text


def test_idle_pass_is_one_query(tmp_path):
    cfg, db = setup(tmp_path, {"bytes_per_pass": 10 * SIZE, "every_days": 100})
    db.queries = 0
    VerifyCopies(ctx(cfg, "buffer", db)).go()
    assert db.queries == 1
    # and a due copy costs a fresh read and one update
    db.collection.update_one({"number": 1}, {"$set": {
        "data.1.checksum_time": now() - timedelta(days=101)}})
    db.queries = 0
    VerifyCopies(ctx(cfg, "buffer", db)).go()
    assert db.queries == 3


def test_failed_verifications_recorded_once_each_on_every_backend(collection):
    """The run-level list the source re-check counts: an event seen on several passes (the same
    datum, the same error_time) is recorded once; the scrub's query selects on every backend."""
    db = RunsDB(collection)
    t = now()
    collection.insert_one({"_id": 1, "number": 1, "name": "r", "data": [
        {"host": "b", "type": "raw", "status": "transferred", "checksum": "X",
         "checksum_time": t - timedelta(days=3)},
        {"host": "b", "type": "processed", "pax_version": "v1", "status": "transferred",
         "checksum": "Y", "checksum_time": t}]})
    e1 = {"host": "a", "type": "raw", "pax_version": None, "source": "b", "at": "1"}
    assert db.add_run_entry(1, "failed_verifications", e1)
    assert not db.add_run_entry(1, "failed_verifications", dict(e1))
    assert db.add_run_entry(1, "failed_verifications", dict(e1, at="2"))
    assert [e["at"] for e in collection.find_one({"_id": 1})["failed_verifications"]] == ["1", "2"]
    due = {"data": {"$elemMatch": {
        "host": "b", "status": "transferred", "checksum": {"$ne": None},
        "$or": [{"checksum_time": None}, {"checksum_time": {"$lt": t - timedelta(days=1)}}]}}}
    assert [r["_id"] for r in db.find_runs(due)] == [1]
    collection.update_one({"_id": 1}, {"$set": {"data.0.checksum_time": t}})
    assert list(db.find_runs(due)) == []
