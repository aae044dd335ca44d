"""Copies deleted or corrupted behind cax's back before a purge (issue 10, finding 1).

Real components: the embedded store (cax's default Runs DB), real files, the real tasks and
``cax rm``; the remote copies of (c) live behind the private OpenSSH sshd (tests/sshd.py) and are
checked through scp, sftp and rsync sites.
"""
import os
import shutil
from datetime import timedelta

import pytest
from click.testing import CliRunner

from cax import admin, config as cfgmod
from cax.daemon import run_pass
from cax.runsdb import connect, now
from cax.tasks.purge import BufferPurger
from cax.tasks.size import AddSize
from tests.purge_helpers import add_run, ctx, sites_config
from tests.sshd import live_sshd, sshd  # noqa: F401

NAME = "160301_1200"


def store(cfg):
    """The embedded store the config names (cax's default Runs DB), as the daemon opens it."""
    return connect(cfgmod.load(cfg))


def datum(db, host, number=1):
    run = db.collection.find_one({"number": number})
    return next((d for d in run["data"] if d["host"] == host), None)


def verified(db, cfg, hosts, number=1, days_ago=0.0):
    """What cax's own tasks leave on verified copies: size and files recorded (AddSize, reference
    copy first), and the time of the last checksum verification."""
    for host in hosts:
        AddSize(ctx(cfg, host, db)).go()
    run = db.collection.find_one({"number": number})
    for i in range(len(run["data"])):
        db.collection.update_one({"number": number}, {"$set": {
            f"data.{i}.checksum_time": now() - timedelta(days=days_ago)}})
    for d in db.collection.find_one({"number": number})["data"]:
        assert isinstance(d.get("size"), int) and d.get("files") == 3, d


def flip_byte(location, offset=10):
    """One byte changed in place: same size, same file count, another checksum."""
    path = os.path.join(location, "f0.bin")
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def purge(cfg, host, db):
    BufferPurger(ctx(cfg, host, db)).go()


# ---- (a) a copy deleted by hand -----------------------------------------------------------
def test_copy_deleted_by_hand_is_not_counted(tmp_path):
    cfg = sites_config(tmp_path, names=("daq", "buffer"), purge={"daq": {"min_copies": 1}})
    db = store(cfg)
    add_run(db, tmp_path, 1, {"daq": "transferred", "buffer": "transferred"}, ref_host="daq")
    verified(db, cfg, ["daq", "buffer"])
    shutil.rmtree(tmp_path / "buffer" / NAME)          # behind cax's back
    purge(cfg, "daq", db)
    assert datum(db, "daq")["status"] == "transferred"
    assert os.path.isdir(tmp_path / "daq" / NAME), "the last real copy was deleted"
    lost = datum(db, "buffer")
    assert lost["status"] == "error" and lost["error_kind"] == "lost", lost
    assert "missing" in lost["error"] and str(tmp_path / "buffer" / NAME) in lost["error"]


def test_lost_copy_heals_then_the_purge_goes_ahead(tmp_path):
    """The flag is not the end: the copy's site heals it (removed, datum pulled), the DAQ sends it
    again, and only once the new copy is checked does the DAQ's copy go."""
    cfg = sites_config(tmp_path, names=("daq", "buffer"), purge={"daq": {"min_copies": 1}},
                       extra={"daq": {"upload_options": ["buffer"]}})
    db = store(cfg)
    add_run(db, tmp_path, 1, {"daq": "transferred", "buffer": "transferred"}, ref_host="daq")
    verified(db, cfg, ["daq", "buffer"])
    original = sorted(os.listdir(tmp_path / "daq" / NAME))
    shutil.rmtree(tmp_path / "buffer" / NAME)
    run_pass(ctx(cfg, "daq", db))
    assert datum(db, "buffer")["error_kind"] == "lost" and datum(db, "daq") is not None
    run_pass(ctx(cfg, "buffer", db))               # RetryBadChecksumTransfer: removed for retry
    assert datum(db, "buffer") is None and datum(db, "daq")["status"] == "transferred"
    run_pass(ctx(cfg, "daq", db))                  # sent again, verified, checked, purged
    assert datum(db, "buffer")["status"] == "transferred"
    assert datum(db, "daq") is None
    assert sorted(os.listdir(tmp_path / "buffer" / NAME)) == original


def test_truncated_copy_is_lost(tmp_path):
    """A file cut short (or one missing from the tree) is found by the cheap size check."""
    cfg = sites_config(tmp_path, names=("daq", "buffer"), purge={"daq": {"min_copies": 1}})
    db = store(cfg)
    add_run(db, tmp_path, 1, {"daq": "transferred", "buffer": "transferred"}, ref_host="daq")
    verified(db, cfg, ["daq", "buffer"])
    os.unlink(tmp_path / "buffer" / NAME / "sub" / "f1.bin")
    purge(cfg, "daq", db)
    assert os.path.isdir(tmp_path / "daq" / NAME)
    lost = datum(db, "buffer")
    assert lost["error_kind"] == "lost" and "2 files" in lost["error"], lost


# ---- (b) one flipped byte in a verified copy ---------------------------------------------
def test_flipped_byte_in_verified_copy_blocks_origin_purge(tmp_path):
    cfg = sites_config(tmp_path, names=("daq", "buffer", "archive"),
                       purge={"daq": {"min_copies": 2}})
    db = store(cfg)
    add_run(db, tmp_path, 1, {"daq": "transferred", "buffer": "transferred",
                              "archive": "transferred"}, ref_host="daq")
    verified(db, cfg, ["daq", "buffer", "archive"])   # verified just now: still re-hashed
    flip_byte(str(tmp_path / "buffer" / NAME))
    purge(cfg, "daq", db)
    assert datum(db, "daq")["status"] == "transferred"
    assert os.path.isdir(tmp_path / "daq" / NAME), "deleted with one real copy left"
    bad = datum(db, "buffer")
    assert bad["status"] == "error" and bad["error_kind"] == "corrupt", bad
    assert "differs from reference" in bad["error"]
    assert datum(db, "archive")["status"] == "transferred"
    # the good copy's verification time was refreshed by its re-hash
    assert now() - datum(db, "archive")["checksum_time"].replace(
        tzinfo=now().tzinfo) < timedelta(minutes=5)


def test_dry_run_checks_but_writes_nothing(tmp_path, caplog):
    cfg = sites_config(tmp_path, names=("daq", "buffer", "archive"),
                       purge={"daq": {"min_copies": 2}})
    db = store(cfg)
    add_run(db, tmp_path, 1, {"daq": "transferred", "buffer": "transferred",
                              "archive": "transferred"}, ref_host="daq")
    verified(db, cfg, ["daq", "buffer", "archive"])
    flip_byte(str(tmp_path / "buffer" / NAME))
    before = db.collection.find_one({"number": 1})
    dry = connect(cfgmod.load(cfg), dry_run=True)
    with caplog.at_level("INFO", logger="cax.task"):
        BufferPurger(ctx(cfg, "daq", dry, dry_run=True)).go()
    assert db.collection.find_one({"number": 1}) == before
    assert "would flag" in caplog.text and "corrupt" in caplog.text


# ---- (c) the same with a remote copy reached over SSH ------------------------------------
@pytest.mark.sshd
@pytest.mark.parametrize("method", ["rsync", "sftp", "scp"])
def test_flipped_byte_in_remote_copy_found_over_ssh(tmp_path, live_sshd, method):
    s = live_sshd
    remote = {"method": method, "hostname": s.host, "port": s.port, "username": s.user,
              "key_file": s.key_file, "known_hosts": s.known_hosts}
    cfg = sites_config(tmp_path, names=("daq", "buffer", "archive"),
                       purge={"daq": {"min_copies": 2}},
                       extra={"archive": remote, "daq": {"upload_options": ["archive"]}})
    db = store(cfg)
    add_run(db, tmp_path, 1, {"daq": "transferred", "buffer": "transferred",
                              "archive": "transferred"}, ref_host="daq")
    verified(db, cfg, ["daq", "buffer", "archive"])
    db.collection.update_one({"number": 1, "data.host": "archive"}, {"$set": {
        "data.$.source": "daq", "data.$.creation_place": "daq"}})  # pushed; archive runs no cax
    flip_byte(str(tmp_path / "archive" / NAME))
    mark = s.log_mark()
    purge(cfg, "daq", db)
    assert os.path.isdir(tmp_path / "daq" / NAME), "deleted with one real copy left"
    assert datum(db, "daq")["status"] == "transferred"
    bad = datum(db, "archive")
    assert bad["status"] == "error" and bad["error_kind"] == "corrupt", bad
    assert datum(db, "buffer")["status"] == "transferred"
    # checked where it lives, over one connection of the pass
    assert s.logins_since(mark) == 1
    # healed from the DAQ, which pushed it: removed over SSH, pushed again, checked, then purged
    run_pass(ctx(cfg, "daq", db))
    assert datum(db, "archive") is None and not os.path.exists(tmp_path / "archive" / NAME)
    assert datum(db, "daq")["status"] == "transferred"
    run_pass(ctx(cfg, "daq", db))
    assert datum(db, "archive")["status"] == "transferred", datum(db, "archive")
    assert datum(db, "daq") is None and not os.path.exists(tmp_path / "daq" / NAME)


# ---- (d) cax rm refuses in the same situation ---------------------------------------------
def test_rm_refuses_when_a_counted_copy_is_corrupt(tmp_path):
    cfg = sites_config(tmp_path, names=("daq", "buffer", "archive"))
    db = store(cfg)
    add_run(db, tmp_path, 1, {"daq": "transferred", "buffer": "transferred",
                              "archive": "transferred"}, ref_host="daq")
    verified(db, cfg, ["daq", "buffer", "archive"])
    flip_byte(str(tmp_path / "buffer" / NAME))
    loc = str(tmp_path / "daq" / NAME)
    args = ["--config", cfg, "--host", "daq", "--run", "1", "--location", loc,
            "--min-copies", "2"]
    before = db.collection.find_one({"number": 1})
    r = CliRunner().invoke(admin.rm, args + ["--dry-run"], catch_exceptions=False)
    assert r.exit_code == 1 and "corrupt" in r.output, r.output
    assert db.collection.find_one({"number": 1}) == before   # a dry run writes nothing
    r = CliRunner().invoke(admin.rm, args, catch_exceptions=False)
    assert r.exit_code == 1 and "refusing to delete" in r.output and "corrupt" in r.output, \
        r.output
    assert os.path.isdir(loc) and datum(db, "daq")["status"] == "transferred"
    assert datum(db, "buffer")["error_kind"] == "corrupt"


# ---- (e) the scrub ------------------------------------------------------------------------
def test_scrub_finds_flipped_byte_within_its_budget(tmp_path):
    from cax.tasks.scrub import VerifyCopies

    size = 100 + 101 + 1   # add_run's copies: two data files and a hidden one
    cfg = sites_config(tmp_path, names=("daq", "buffer"),
                       extra={"buffer": {"scrub": {"bytes_per_pass": 2 * size + size // 2,
                                                   "every_days": 1}}})
    db = store(cfg)
    for n in range(1, 6):
        add_run(db, tmp_path, n, {"daq": "transferred", "buffer": "transferred"},
                ref_host="daq")
        verified(db, cfg, ["daq", "buffer"], number=n, days_ago=10 - n)  # run 1 oldest
    # run 6 was verified an hour ago: not due (every_days 1)
    add_run(db, tmp_path, 6, {"daq": "transferred", "buffer": "transferred"}, ref_host="daq")
    verified(db, cfg, ["daq", "buffer"], number=6, days_ago=1 / 24)
    flip_byte(str(tmp_path / "buffer" / "160303_1200"))       # run 3
    os.unlink(tmp_path / "buffer" / "160304_1200" / "f0.bin")   # run 4: a file gone
    t0 = now()

    def fresh():
        return {n for n in range(1, 7)
                if datum(db, "buffer", n)["checksum_time"].replace(tzinfo=t0.tzinfo) >= t0}

    def state(n):
        d = datum(db, "buffer", n)
        return d["status"], d.get("error_kind")

    VerifyCopies(ctx(cfg, "buffer", db)).go()
    assert fresh() == {1, 2}                        # the two oldest, and no more: the budget
    assert state(3) == ("transferred", None)
    VerifyCopies(ctx(cfg, "buffer", db)).go()      # 3 and 5 hashed; 4 found short unread
    assert state(3) == ("error", "corrupt") and state(4) == ("error", "lost")
    assert "differs" in datum(db, "buffer", 3)["error"]
    assert "2 files" in datum(db, "buffer", 4)["error"]
    assert fresh() == {1, 2, 5}
    VerifyCopies(ctx(cfg, "buffer", db)).go()
    assert fresh() == {1, 2, 5}                     # nothing else due; run 6 left alone
    assert all(state(n) == ("transferred", None) for n in (1, 2, 5, 6))
    assert datum(db, "daq", 3)["status"] == "transferred"


def test_scrub_is_off_by_default(tmp_path):
    from cax.tasks.scrub import VerifyCopies

    cfg = sites_config(tmp_path, names=("daq", "buffer"))
    db = store(cfg)
    add_run(db, tmp_path, 1, {"daq": "transferred", "buffer": "transferred"}, ref_host="daq")
    flip_byte(str(tmp_path / "buffer" / NAME))
    task = VerifyCopies(ctx(cfg, "buffer", db))
    assert task.query() is None
    task.go()
    assert datum(db, "buffer")["status"] == "transferred"


# ---- (f) a corrupt source ----------------------------------------------------------------
def test_corrupt_source_is_flagged_after_two_failed_verifications(tmp_path):
    cfg = sites_config(tmp_path, names=("daq", "buffer", "archive"),
                       extra={"archive": {"download_options": ["buffer"],
                                          "data_type": ["raw"]}})
    db = store(cfg)
    add_run(db, tmp_path, 1, {"daq": "transferred", "buffer": "transferred"}, ref_host="daq")
    verified(db, cfg, ["daq", "buffer"])
    run = db.collection.find_one({"number": 1})
    db.collection.update_one({"_id": run["_id"], "data.host": "buffer"}, {"$set": {
        "data.$.source": "daq", "data.$.creation_place": "daq"}})
    flip_byte(str(tmp_path / "buffer" / NAME))        # after its verification
    pulls = []
    for _ in range(6):
        run_pass(ctx(cfg, "archive", db))
        a = datum(db, "archive")
        if a is not None and a.get("error_kind") == "checksum" \
                and a.get("error_time") not in pulls:
            pulls.append(a.get("error_time"))
    src = datum(db, "buffer")
    assert src["status"] == "error" and src["error_kind"] == "corrupt", src
    assert len(pulls) == 2, f"the corrupt source was pulled {len(pulls)} times"
    # never used as a source again: archive holds no copy from it
    assert datum(db, "archive") is None
    assert datum(db, "daq")["status"] == "transferred"
