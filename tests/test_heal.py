"""Healing: stalled and corrupt copies are removed and copied again, within max_retries."""
import json
import os
import shutil
from datetime import timedelta

import pytest

from cax.daemon import run_pass
from cax.runsdb import now
from cax.transfer import partial_path
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


def truncate(tmp_path, host, nbytes=10):
    """Cut the end off one file of a copy, as a copy that died mid-file leaves it."""
    path = tmp_path / host / "160101_0000" / "f0.bin"
    path.write_bytes(path.read_bytes()[:-nbytes])


@pytest.mark.parametrize("status, clock", STALLS)
def test_stalled_incomplete_copy_is_retried_until_max_retries(tmp_path, status, clock):
    cfg = sites(tmp_path)
    db = mongomock_db()
    setup_run(tmp_path, db)
    settle(cfg, db, "daq")
    assert statuses(db, 1)[("buffer", "raw")] == "transferred"
    for attempt in (1, 2):
        truncate(tmp_path, "buffer")
        stall(db, "buffer", status, clock)
        settle(cfg, db, "daq")  # stalled -> removed -> copied again on the next pass
        d, run = datum(db, "buffer")
        assert run["retries"] == attempt
        assert d["status"] == "transferred"
        assert os.path.isdir(tmp_path / "buffer" / "160101_0000")
    truncate(tmp_path, "buffer")
    stall(db, "buffer", status, clock)
    settle(cfg, db, "daq")
    d, run = datum(db, "buffer")
    assert run["retries"] == 2  # max_retries reached: no further retry
    assert d["status"] == "error" and d["error_kind"] == "stalled"
    assert "no progress since" in d["error"]
    run_pass(context(cfg, "daq", db))
    assert datum(db, "buffer")[0]["status"] == "error"


@pytest.mark.parametrize("status, clock", STALLS)
def test_stalled_whole_copy_is_verified_and_kept_not_sent_again(tmp_path, status, clock):
    """Its daemon died while verifying it (or the Runs DB was gone when the copy ended): the
    copy under its final name holds the source's bytes and files, so it is verified where it is."""
    cfg = sites(tmp_path)
    db = mongomock_db()
    setup_run(tmp_path, db)
    settle(cfg, db, "daq")
    landed = tmp_path / "buffer" / "160101_0000" / "f0.bin"
    before = os.stat(landed)
    stall(db, "buffer", status, clock)
    run_pass(context(cfg, "daq", db))
    d, run = datum(db, "buffer")
    assert d["status"] == "transferred" and not run.get("retries"), d
    assert d["checksum"] == datum(db, "daq")[0]["checksum"]
    after = os.stat(landed)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_stalled_whole_but_corrupt_copy_is_flagged_not_trusted(tmp_path):
    cfg = sites(tmp_path)
    db = mongomock_db()
    setup_run(tmp_path, db)
    settle(cfg, db, "daq")
    corrupt(tmp_path, "buffer")  # same bytes and files, different content
    stall(db, "buffer", "verifying")
    run_pass(context(cfg, "daq", db))
    d, _run = datum(db, "buffer")
    assert d["status"] == "error" and d["error_kind"] == "checksum", d


def test_transferring_copy_that_landed_is_verified_on_the_next_pass(tmp_path):
    """The Runs DB was lost as the copy ended, so its datum still says ``transferring``
    although the copy is whole under its final name: the next pass verifies it."""
    cfg = sites(tmp_path)
    db = mongomock_db()
    setup_run(tmp_path, db)
    settle(cfg, db, "daq")
    stall(db, "buffer", "transferring", age=timedelta(seconds=1))  # not stalled
    run_pass(context(cfg, "daq", db))
    d, run = datum(db, "buffer")
    assert d["status"] == "transferred" and not run.get("retries"), d
    # while the final name is missing (a copy in flight elsewhere), nothing happens to it
    shutil.rmtree(tmp_path / "buffer" / "160101_0000")
    stall(db, "buffer", "transferring", age=timedelta(seconds=1))
    run_pass(context(cfg, "daq", db))
    assert datum(db, "buffer")[0]["status"] == "transferring"


@pytest.mark.parametrize("status, clock", STALLS)
def test_live_slow_copy_is_not_stalled(tmp_path, status, clock):
    cfg = sites(tmp_path, stalled_after=3600)
    db = mongomock_db()
    setup_run(tmp_path, db)
    settle(cfg, db, "daq")
    if status == "transferring":  # a copy in flight writes under its partial name
        final = tmp_path / "buffer" / "160101_0000"
        os.rename(final, partial_path(str(final)))
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


def test_copy_landed_but_not_verified_is_removed_and_copied_again(tmp_path, monkeypatch):
    """The files under the final name were written by this datum's claim: the retry may remove them."""
    from cax.tasks import copy as copy_task
    cfg = sites(tmp_path, retry_delay=3600)
    db = mongomock_db()
    setup_run(tmp_path, db)
    run_pass(context(cfg, "daq", db, run_filter={"number": 1}))  # daq copy verified, not pushed
    real = copy_task.checksum
    calls = []

    def flaky(path, algorithm="sha512", **kw):
        calls.append(path)
        if len(calls) == 1:
            raise OSError("I/O error while reading")
        return real(path, algorithm, **kw)

    monkeypatch.setattr(copy_task, "checksum", flaky)
    run_pass(context(cfg, "daq", db))
    d, _run = datum(db, "buffer")
    assert d["status"] == "error" and d["error_kind"] == "unverified", d
    assert os.path.isdir(tmp_path / "buffer" / "160101_0000")  # it did land
    cfg = sites(tmp_path, retry_delay=0)
    settle(cfg, db, "daq")
    d, run = datum(db, "buffer")
    assert d["status"] == "transferred", d
    assert run["retries"] == 1


def test_push_verification_cut_short_by_stop_stays_verifying(tmp_path, monkeypatch):
    from cax.tasks import copy as copy_task
    cfg = sites(tmp_path)
    db = mongomock_db()
    setup_run(tmp_path, db)
    run_pass(context(cfg, "daq", db, run_filter={"number": 1}))
    ctx = context(cfg, "daq", db)

    def stopped(path, algorithm="sha512", **kw):
        ctx.stop.set()  # SIGTERM arrives while the copy is being checksummed
        raise InterruptedError("checksum cancelled")

    monkeypatch.setattr(copy_task, "checksum", stopped)
    run_pass(ctx)
    d, _run = datum(db, "buffer")
    assert d["status"] == "verifying" and "error" not in d, d
    monkeypatch.undo()
    run_pass(context(cfg, "buffer", db))  # the destination's AddChecksum finishes the job
    assert datum(db, "buffer")[0]["status"] == "transferred"


def test_legacy_failed_verification_record_is_healed_not_stuck(tmp_path):
    """Older cax recorded a cancelled checksum of a landed copy as 'failed': the retry must
    remove the landed copy, or every new claim meets 'already exists and is not ours'."""
    cfg = sites(tmp_path, retry_delay=0)
    db = mongomock_db()
    setup_run(tmp_path, db)
    settle(cfg, db, "daq")
    assert statuses(db, 1)[("buffer", "raw")] == "transferred"
    db.collection.update_one({"number": 1, "data.host": "buffer"}, {"$set": {
        "data.$.status": "error", "data.$.error_kind": "failed", "data.$.error_time": now(),
        "data.$.error": "checksum failed: InterruptedError: checksum cancelled"}})
    settle(cfg, db, "daq")
    d, run = datum(db, "buffer")
    assert d["status"] == "transferred", d
    assert run["retries"] == 1


def test_long_verification_keeps_its_heartbeat_fresh(tmp_path, monkeypatch):
    """A checksum taking longer than stalled_after must not look like a dead copy."""
    from cax.checksum import BUFSIZE
    from cax.tasks import checksum as checksum_task
    monkeypatch.setattr(checksum_task, "HEARTBEAT_SECONDS", 0.0)
    cfg = sites(tmp_path)
    db = mongomock_db()
    loc = make_raw(str(tmp_path / "daq"), "160101_0000", nfiles=2, size=3 * BUFSIZE)
    doc = run_doc(1, "160101_0000", loc)
    old = now() - timedelta(hours=2)
    doc["data"][0]["heartbeat"] = old
    db.insert_run(doc)
    beats = []
    real = db.apply

    def spy(change):
        if change.transition == "heartbeat":
            expected = change.filter["data"]["$elemMatch"]["status"]
            beats.append((expected, db.collection.find_one({"number": 1})["data"][0]["status"]))
        return real(change)

    monkeypatch.setattr(db, "apply", spy)
    run_pass(context(cfg, "daq", db, run_filter={"number": 1}))
    d, _run = datum(db, "daq")
    assert d["status"] == "transferred"
    assert beats and all(b == ("verifying", "verifying") for b in beats), beats
    assert d["heartbeat"] > old


def test_second_origin_of_processed_data_is_copied_and_verified_against_itself(tmp_path):
    """Two sites produced the same processor version (outputs differ: processing is not
    bit-reproducible). A third site pulling from the second must get the second's bytes and
    verify them against the second's checksum, not be blocked or flagged by the run's reference,
    which came from the first."""
    from cax.checksum import checksum

    doc = {"runs_db": str(tmp_path / "x.runsdb"), "sites": [
        {"name": "a", "directory": str(tmp_path / "a"), "data_type": ["processed"]},
        {"name": "b", "directory": str(tmp_path / "b"), "data_type": ["processed"]},
        {"name": "c", "directory": str(tmp_path / "c"), "data_type": ["processed"],
         "pax_versions": ["v1"], "download_options": ["b"]}]}
    (tmp_path / "cax.json").write_text(json.dumps(doc))
    files = {}
    for host, content in (("a", b"output of a"), ("b", b"output of b, different")):
        d = tmp_path / host / "v1"
        d.mkdir(parents=True)
        (d / "160101_0000.root").write_bytes(content)
        files[host] = str(d / "160101_0000.root")
    (tmp_path / "c").mkdir()
    db = mongomock_db()
    t = now()
    db.insert_run({"number": 1, "name": "160101_0000", "detector": "tpc", "start": t, "data": [
        {"host": h, "type": "processed", "pax_version": "v1", "status": "transferred",
         "location": files[h], "checksum": checksum(files[h]), "checksum_type": "sha512",
         "size": os.path.getsize(files[h]), "files": 1, "creation_time": t,
         "reference_checked": True} for h in ("a", "b")],
        "references": [{"type": "processed", "pax_version": "v1", "host": "a",
                        "checksum": checksum(files["a"]), "checksum_type": "sha512"}]})
    settle(str(tmp_path / "cax.json"), db, "c")
    run = db.collection.find_one({"number": 1})
    got = next(d for d in run["data"] if d["host"] == "c")
    assert got["status"] == "transferred", got.get("error")
    assert got["source"] == "b"
    assert got["checksum"] == checksum(files["b"]) == checksum(got["location"])
    assert run["references"][0]["host"] == "a"  # the run's reference is untouched


def test_retry_removes_leftovers_of_a_killed_pull(tmp_path):
    """The retry of an interrupted pull clears its partial copy and an rsync holder directory,
    so nothing of the dead copy is left even when no new copy follows."""
    from cax.tasks.retry import RetryStalledTransfer
    from cax.transfer.policy import leftovers as local_leftovers
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


def test_retry_never_removes_another_runs_data(tmp_path):
    """A stalled copy whose datum names another run's directory (a corrupted or hand-edited
    location) is not healed by deleting that directory: the retry refuses and says why."""
    cfg = sites(tmp_path)
    db = mongomock_db()
    setup_run(tmp_path, db)
    other = make_raw(str(tmp_path / "daq"), "160101_0100")
    db.insert_run(run_doc(2, "160101_0100", other))
    settle(cfg, db, "daq")
    assert statuses(db, 2)[("buffer", "raw")] == "transferred"
    victim = tmp_path / "buffer" / "160101_0100"
    before = sorted(p.name for p in victim.rglob("*"))
    db.collection.update_one({"number": 1, "data.host": "buffer"},
                             {"$set": {"data.$.location": str(victim)}})
    stall(db, "buffer")
    settle(cfg, db, "daq", n=1)
    d, _ = datum(db, "buffer")
    assert d["status"] == "error" and d["error_kind"] == "retry-failed", d
    assert "not run 160101_0000's raw data" in d["error"]
    assert sorted(p.name for p in victim.rglob("*")) == before


def test_stalled_copy_whose_source_is_gone_is_verified_not_deleted(tmp_path):
    """The DAQ purged its copy meanwhile: the stalled copy may be the only one left. Nothing can
    measure it against the source any more, so its checksum against the reference decides."""
    cfg = sites(tmp_path)
    db = mongomock_db()
    loc = setup_run(tmp_path, db)
    settle(cfg, db, "daq")
    run = db.collection.find_one({"number": 1})
    assert run["references"]  # the DAQ's checksum outlives its copy
    db.collection.update_one({"number": 1}, {"$pull": {"data": {"host": "daq"}}})
    shutil.rmtree(loc)
    stall(db, "buffer", "verifying")
    run_pass(context(cfg, "daq", db))
    d, run = datum(db, "buffer")
    assert d["status"] == "transferred" and not run.get("retries"), d
    assert os.path.isdir(tmp_path / "buffer" / "160101_0000")
