"""Healing: stalled and corrupt copies are removed and copied again, within max_retries."""
import json
import os
import shutil
from datetime import timedelta

import pytest

from cax.daemon import run_pass
from cax.runsdb import now
from tests.helpers import context, make_raw, mongomock_db, run_doc, statuses


def sites(tmp_path, **daq_extra):
    doc = {"runs_db": str(tmp_path / "x.runsdb"), "sites": [
        {"name": "daq", "directory": str(tmp_path / "daq"), "upload_options": ["buffer"],
         "data_type": ["raw"], "max_retries": 2, **daq_extra},
        {"name": "buffer", "directory": str(tmp_path / "buffer"), "data_type": ["raw"]},
        {"name": "archive", "directory": str(tmp_path / "archive"),
         "download_options": ["buffer"], "data_type": ["raw"]}]}
    for s in doc["sites"]:
        os.makedirs(s["directory"], exist_ok=True)
    (tmp_path / "cax.json").write_text(json.dumps(doc))
    return str(tmp_path / "cax.json")


def setup_run(tmp_path, db):
    loc = make_raw(str(tmp_path / "daq"), "160101_0000")
    db.insert_run(run_doc(1, "160101_0000", loc))
    return loc


def datum(db, host):
    run = db.collection.find_one({"number": 1})
    return next(d for d in run["data"] if d["host"] == host), run


def settle(cfg, db, host, n=2):
    for _ in range(n):
        run_pass(context(cfg, host, db))


def stall(db, host, status="transferring", clock="heartbeat", age=timedelta(hours=2)):
    """Pretend a copy is still ``status`` with its last sign of life ``age`` ago, kept in
    ``heartbeat`` or, as a copy claimed by an older cax has it, only in ``creation_time``."""
    t = now() - age
    update = {"$set": {"data.$.status": status, f"data.$.{clock}": t}}
    if clock == "creation_time":
        update["$unset"] = {"data.$.heartbeat": ""}
    db.collection.update_one({"number": 1, "data.host": host}, update)


STALLS = [("transferring", "heartbeat"), ("verifying", "heartbeat"),
          ("transferring", "creation_time"), ("verifying", "creation_time")]


@pytest.mark.parametrize("status, clock", STALLS)
def test_stalled_copy_is_retried_until_max_retries(tmp_path, status, clock):
    cfg = sites(tmp_path)
    db = mongomock_db()
    setup_run(tmp_path, db)
    settle(cfg, db, "daq")
    assert statuses(db, 1)[("buffer", "raw")] == "transferred"
    for attempt in (1, 2):
        stall(db, "buffer", status, clock)
        settle(cfg, db, "daq")  # stalled -> removed -> copied again on the next pass
        d, run = datum(db, "buffer")
        assert run["retries"] == attempt
        assert d["status"] == "transferred"
        assert os.path.isdir(tmp_path / "buffer" / "160101_0000")
    stall(db, "buffer", status, clock)
    settle(cfg, db, "daq")
    d, run = datum(db, "buffer")
    assert run["retries"] == 2  # max_retries reached: no further retry
    assert d["status"] == "error" and d["error_kind"] == "stalled"
    assert "no progress since" in d["error"]
    run_pass(context(cfg, "daq", db))
    assert datum(db, "buffer")[0]["status"] == "error"


@pytest.mark.parametrize("status, clock", STALLS)
def test_live_slow_copy_is_not_stalled(tmp_path, status, clock):
    cfg = sites(tmp_path, stalled_after=3600)
    db = mongomock_db()
    setup_run(tmp_path, db)
    settle(cfg, db, "daq")
    stall(db, "buffer", status, clock, age=timedelta(minutes=5))
    run_pass(context(cfg, "daq", db, run_filter={"number": 1}))
    d, run = datum(db, "buffer")
    assert d["status"] == status and not run.get("retries")


def corrupt(tmp_path, host):
    path = tmp_path / host / "160101_0000" / "f0.bin"
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_copy_refetched_when_good_copy_exists(tmp_path):
    cfg = sites(tmp_path)
    db = mongomock_db()
    setup_run(tmp_path, db)
    for host in ("daq", "archive"):
        settle(cfg, db, host)
    assert statuses(db, 1)[("archive", "raw")] == "transferred"
    corrupt(tmp_path, "archive")
    # the archive re-verifies (as after a bit flip found by a scrub): checksum now differs
    db.collection.update_one({"number": 1, "data.host": "archive"},
                             {"$set": {"data.$.checksum": "f" * 128},
                              "$unset": {"data.$.reference_checked": ""}})
    run_pass(context(cfg, "archive", db))  # Compare flags, RetryBad removes, CopyPull re-fetches
    settle(cfg, db, "archive", 1)
    d, run = datum(db, "archive")
    assert d["status"] == "transferred"
    assert d["checksum"] == datum(db, "daq")[0]["checksum"]
    assert run["retries"] == 1


def test_corrupt_only_copy_is_left_alone_and_flagged(tmp_path):
    cfg = sites(tmp_path)
    db = mongomock_db()
    loc = setup_run(tmp_path, db)
    run_pass(context(cfg, "daq", db, run_filter={"number": 0}))  # nothing
    db.collection.update_one({"number": 1}, {"$set": {"data.0.status": "transferred",
                                                      "data.0.checksum": "a" * 128,
                                                      "references": [{"type": "raw",
                                                                      "pax_version": None,
                                                                      "checksum": "b" * 128,
                                                                      "checksum_type": "sha512",
                                                                      "host": "daq"}]}})
    for _ in range(2):
        run_pass(context(cfg, "daq", db))
    d, _run = datum(db, "daq")
    assert d["status"] == "error" and d["error_kind"] == "checksum"
    assert os.path.isdir(loc) and len(os.listdir(loc)) == 4  # nothing deleted
    assert statuses(db, 1) == {("daq", "raw"): "error"}


def test_failed_copy_is_retried_after_backoff(tmp_path):
    cfg = sites(tmp_path, retry_delay=3600)
    db = mongomock_db()
    setup_run(tmp_path, db)
    run_pass(context(cfg, "daq", db, run_filter={"number": 1}))  # daq copy verified, not pushed
    assert statuses(db, 1) == {("daq", "raw"): "transferred"}
    blocker = tmp_path / "buffer" / "160101_0000"
    blocker.write_text("in the way")  # not cax's: the copy must refuse to overwrite it
    settle(cfg, db, "daq")
    d, run = datum(db, "buffer")
    assert d["status"] == "error" and "refusing to overwrite" in d["error"]
    assert not run.get("retries")  # within retry_delay: left as is
    cfg = sites(tmp_path, retry_delay=0)
    run_pass(context(cfg, "daq", db))
    assert blocker.read_text() == "in the way"  # a failed copy never owned the final name
    assert ("buffer", "raw") not in statuses(db, 1)
    blocker.unlink()
    settle(cfg, db, "daq")
    d, run = datum(db, "buffer")
    assert d["status"] == "transferred" and run["retries"] == 1


def test_retry_removes_leftovers_of_a_killed_pull(tmp_path):
    """The retry of an interrupted pull clears its partial copy and an rsync holder directory,
    so nothing of the dead copy is left even when no new copy follows."""
    from cax.tasks.retry import RetryStalledTransfer
    from cax.transfer import local_leftovers
    cfg = sites(tmp_path)
    db = mongomock_db()
    setup_run(tmp_path, db)
    for host in ("daq", "archive"):
        settle(cfg, db, host)
    d, _run = datum(db, "archive")
    assert d["status"] == "transferred"
    final = d["location"]
    shutil.rmtree(final)  # an interrupted copy never reached its final name
    leftovers = local_leftovers(final)
    for left in leftovers:
        os.makedirs(os.path.join(left, "sub"))
    db.collection.update_one({"number": 1, "data.host": "archive"}, {"$set": {
        "data.$.status": "error", "data.$.error_kind": "interrupted",
        "data.$.error_time": now() - timedelta(days=1)}})
    RetryStalledTransfer(context(cfg, "archive", db)).go()
    assert not any(os.path.exists(left) for left in leftovers)
    assert ("archive", "raw") not in statuses(db, 1)
