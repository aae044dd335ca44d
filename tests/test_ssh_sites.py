"""Copies between sites over a real OpenSSH sshd, through the daemon's tasks, for each method."""
import json
import os
import threading
from datetime import timedelta

import pytest
from checksumdir import dirhash

from cax.daemon import run_pass
from cax.runsdb import now
from tests.helpers import context, mongomock_db, run_doc, statuses

pytest_plugins = ["tests.sshd"]

METHODS = ["scp", "sftp", "rsync"]
NAME = "160315_1432"


def config(tmp_path, sshd, method, known_hosts=None, **buffer_extra):
    """daq (local) pushes to buffer (over SSH); archive (local) pulls from buffer (over SSH)."""
    ssh = {"hostname": sshd.host, "port": sshd.port, "username": sshd.user,
           "key_file": sshd.key_file, "known_hosts": known_hosts or sshd.known_hosts,
           "method": method}
    doc = {"runs_db": str(tmp_path / "x.runsdb"), "sites": [
        {"name": "daq", "directory": str(tmp_path / "daq"), "upload_options": ["buffer"],
         "data_type": ["raw"], "max_retries": 2, "retry_delay": 0},
        {"name": "buffer", "directory": str(tmp_path / "buffer"), "data_type": ["raw"], **ssh,
         **buffer_extra},
        {"name": "archive", "directory": str(tmp_path / "archive"),
         "download_options": ["buffer"], "data_type": ["raw"], "max_retries": 2,
         "retry_delay": 0}]}
    for s in doc["sites"]:
        os.makedirs(s["directory"], exist_ok=True)
    (tmp_path / "cax.json").write_text(json.dumps(doc))
    return str(tmp_path / "cax.json")


def raw_tree(root):
    d = os.path.join(root, NAME)
    os.makedirs(os.path.join(d, "a", "b"))
    files = {"a/b/deep.bin": os.urandom(300_000), ".hidden": b"h", "empty.bin": b"",
             "données_µ.bin": os.urandom(1000), "a/x.zip": os.urandom(70_000)}
    for rel, data in files.items():
        with open(os.path.join(d, rel), "wb") as f:
            f.write(data)
    return d


def bytes_below(directory):
    total = 0
    for r, _ds, fs in os.walk(directory):
        for f in fs:
            try:
                total += os.path.getsize(os.path.join(r, f))
            except OSError:  # renamed meanwhile
                pass
    return total


def passes(cfg, db, hosts=("daq", "archive"), n=2):
    for _ in range(n):
        for host in hosts:
            run_pass(context(cfg, host, db))


def buffer_datum(db, host="buffer"):
    return next(d for d in db.collection.find_one({"number": 1})["data"] if d["host"] == host)


@pytest.fixture
def setup(tmp_path, live_sshd):
    db = mongomock_db()
    src = raw_tree(str(tmp_path / "daq"))
    db.insert_run(run_doc(1, NAME, src))
    return db, src


@pytest.mark.parametrize("method", METHODS)
def test_push_and_pull_over_ssh_end_transferred_with_equal_checksums(tmp_path, live_sshd, setup,
                                                                     method):
    db, src = setup
    cfg = config(tmp_path, live_sshd, method)
    passes(cfg, db)
    assert statuses(db, 1) == {("daq", "raw"): "transferred", ("buffer", "raw"): "transferred",
                               ("archive", "raw"): "transferred"}
    want = dirhash(src, "sha512")
    assert {d["checksum"] for d in db.collection.find_one({"number": 1})["data"]} == {want}
    for site in ("buffer", "archive"):
        assert dirhash(str(tmp_path / site / NAME), "sha512") == want
        assert os.path.getsize(tmp_path / site / NAME / "empty.bin") == 0
        assert os.path.exists(tmp_path / site / NAME / "données_µ.bin")
    # the push was verified where the data are (remote checksum), not by the buffer's own daemon
    assert buffer_datum(db)["creation_place"] == "daq"


def cut_short(path):
    """What a copy that died mid-file leaves (seen under final names before the copy policy
    checked completeness): the stalled check must find it incomplete and send it again."""
    path.write_bytes(path.read_bytes()[:-100])


def four_runs(tmp_path, db):
    for i in range(1, 5):
        d = os.path.join(str(tmp_path / "daq"), f"16031{i}_1432")
        os.makedirs(d)
        for j in range(3):
            with open(os.path.join(d, f"f{j}.bin"), "wb") as f:
                f.write(os.urandom(20_000 + i))
        db.insert_run(run_doc(i, f"16031{i}_1432", d))


def set_site(cfg, name, **fields):
    with open(cfg) as f:
        doc = json.load(f)
    next(s for s in doc["sites"] if s["name"] == name).update(fields)
    with open(cfg, "w") as f:
        json.dump(doc, f)


@pytest.mark.parametrize("method", METHODS)
def test_one_ssh_login_per_remote_site_per_pass(tmp_path, live_sshd, method):
    """Parallel copies, their verification and the healing of several runs share one login."""
    db = mongomock_db()
    four_runs(tmp_path, db)
    cfg = config(tmp_path, live_sshd, method)
    set_site(cfg, "daq", max_transfers=2)
    set_site(cfg, "archive", max_transfers=2)
    run_pass(context(cfg, "daq", db))  # the daq verifies its own copies

    def logins(host):
        mark = live_sshd.log_mark()
        run_pass(context(cfg, host, db))
        return live_sshd.logins_since(mark)

    def all_at(host, status):
        return all(statuses(db, i).get((host, "raw")) == status for i in range(1, 5))

    assert logins("daq") == 1  # four pushes, two at a time, each verified remotely
    assert all_at("buffer", "transferred")
    assert logins("archive") == 1  # four pulls, two at a time
    assert all_at("archive", "transferred")
    for i in range(1, 5):
        cut_short(tmp_path / "buffer" / f"16031{i}_1432" / "f0.bin")
        db.collection.update_one({"number": i, "data.host": "buffer"}, {"$set": {
            "data.$.status": "transferring", "data.$.heartbeat": now() - timedelta(hours=2)}})
    assert logins("daq") == 1  # four stalled incomplete copies checked and removed at the buffer
    assert not any(statuses(db, i).get(("buffer", "raw")) for i in range(1, 5))
    assert os.listdir(tmp_path / "buffer") == []


@pytest.mark.parametrize("method", METHODS)
def test_unreachable_site_is_tried_and_logged_once_per_pass(tmp_path, live_sshd, method, caplog):
    """Four runs to push, the buffer's host key unknown: one attempt, one error line."""
    db = mongomock_db()
    four_runs(tmp_path, db)
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    cfg = config(tmp_path, live_sshd, method, known_hosts=str(empty))
    run_pass(context(cfg, "daq", db))  # the daq verifies its own copies
    caplog.clear()
    mark = live_sshd.log_mark()
    run_pass(context(cfg, "daq", db))
    assert live_sshd.count_since(mark, "Connection from") == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "host key" in errors[0].lower(), errors
    assert all(statuses(db, i) == {("daq", "raw"): "transferred"} for i in range(1, 5))
    mark = live_sshd.log_mark()
    run_pass(context(cfg, "daq", db))  # a new pass tries again
    assert live_sshd.count_since(mark, "Connection from") == 1


def test_rsync_copies_start_one_remote_session_each_plus_verification(tmp_path, live_sshd,
                                                                      setup):
    """Remote sessions cost the site's login shell start-up: a pull is its rsync alone (it
    verifies here), a push its rsync and the remote checksum; nothing is made on the remote site
    for a pull's local destination. Sizes for the progress bar come from the Runs DB when the
    source's daemon recorded them; only a pull without one asks the remote site."""
    db, _src = setup
    cfg = config(tmp_path, live_sshd, "rsync")
    run_pass(context(cfg, "daq", db))  # the daq verifies its own copy
    mark = live_sshd.log_mark()
    run_pass(context(cfg, "daq", db))
    assert live_sshd.sessions_since(mark) == 2
    assert buffer_datum(db).get("size") is None
    run_pass(context(cfg, "buffer", db))  # the buffer's daemon records the size of its copy
    assert buffer_datum(db)["size"] > 0
    mark = live_sshd.log_mark()
    run_pass(context(cfg, "archive", db))
    assert live_sshd.sessions_since(mark) == 1
    assert statuses(db, 1) == {("daq", "raw"): "transferred", ("buffer", "raw"): "transferred",
                               ("archive", "raw"): "transferred"}


def test_site_down_is_logged_once_per_pass(tmp_path, live_sshd, caplog):
    db = mongomock_db()
    four_runs(tmp_path, db)
    cfg = config(tmp_path, live_sshd, "rsync")
    run_pass(context(cfg, "daq", db))
    live_sshd.kill()
    caplog.clear()
    run_pass(context(cfg, "daq", db))
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "cannot reach buffer" in errors[0], errors
    assert all(statuses(db, i) == {("daq", "raw"): "transferred"} for i in range(1, 5))


@pytest.mark.parametrize("method", METHODS)
def test_unknown_host_key_is_refused(tmp_path, live_sshd, setup, method, caplog):
    db, _ = setup
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    cfg = config(tmp_path, live_sshd, method, known_hosts=str(empty))
    passes(cfg, db, hosts=("daq",))
    assert statuses(db, 1) == {("daq", "raw"): "transferred"}  # nothing claimed
    assert os.listdir(tmp_path / "buffer") == []
    assert any("host key" in r.getMessage().lower() for r in caplog.records)


@pytest.mark.parametrize("method", METHODS)
def test_sshd_killed_mid_copy_leaves_error_then_heals(tmp_path, live_sshd, setup, method):
    db, src = setup
    with open(os.path.join(src, "big.bin"), "wb") as f:
        f.write(os.urandom(64 << 20))
    cfg = config(tmp_path, live_sshd, method)
    run_pass(context(cfg, "daq", db))  # the daq verifies its own copy

    class KillMidCopy(threading.Event):
        """Kills sshd once 4 MiB are on the buffer's disk: the methods poll ``stop`` as their
        cancel check while bytes move (rsync's own progress comes only once a second, too late
        to tell a copy in flight from one already landed)."""

        def is_set(self):
            if live_sshd.running and bytes_below(tmp_path / "buffer") >= (4 << 20):
                live_sshd.kill()
            return super().is_set()

    run_pass(context(cfg, "daq", db, stop=KillMidCopy()))
    assert not live_sshd.running, "the copy ended before the kill"
    d = buffer_datum(db)
    # error, or already retrying (waiting for the site) with the reason kept
    assert d["status"] in ("error", "retrying") and "buffer (127.0.0.1" in d["error"], d
    assert not os.path.exists(tmp_path / "buffer" / NAME)  # nothing under the final name
    live_sshd.start()
    passes(cfg, db, hosts=("daq",), n=2)
    d = buffer_datum(db)
    assert d["status"] == "transferred"
    assert dirhash(str(tmp_path / "buffer" / NAME), "sha512") == dirhash(src, "sha512")
    assert not [n for n in os.listdir(tmp_path / "buffer") if n != NAME]  # no partial left


@pytest.mark.parametrize("method", METHODS)
def test_stalled_push_is_retried_up_to_max_retries(tmp_path, live_sshd, setup, method):
    db, _ = setup
    cfg = config(tmp_path, live_sshd, method)
    passes(cfg, db, hosts=("daq",))
    for attempt in (1, 2, 3):
        cut_short(tmp_path / "buffer" / NAME / "a" / "x.zip")
        db.collection.update_one({"number": 1, "data.host": "buffer"}, {"$set": {
            "data.$.status": "transferring", "data.$.heartbeat": now() - timedelta(hours=2)}})
        passes(cfg, db, hosts=("daq",))
        run = db.collection.find_one({"number": 1})
        assert run["retries"] == min(attempt, 2)
    d = buffer_datum(db)
    assert d["status"] == "error" and d["error_kind"] == "stalled"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("status", ["transferring", "verifying"])
def test_stalled_whole_push_is_verified_in_place_over_ssh(tmp_path, live_sshd, setup, method,
                                                          status):
    """The pusher was down for longer than stalled_after (its copy had landed, or its remote
    checksum was cut short): the copy is measured and checksummed at the far side, and kept."""
    db, src = setup
    cfg = config(tmp_path, live_sshd, method)
    passes(cfg, db, hosts=("daq",))
    assert buffer_datum(db)["status"] == "transferred"
    db.collection.update_one({"number": 1, "data.host": "buffer"},
                             {"$set": {"data.$.status": status,
                                       "data.$.heartbeat": now() - timedelta(hours=2)},
                              "$unset": {"data.$.checksum": "", "data.$.reference_checked": ""}})
    landed = os.stat(tmp_path / "buffer" / NAME / "a" / "x.zip")
    mark = live_sshd.log_mark()
    passes(cfg, db, hosts=("daq",), n=1)
    assert live_sshd.logins_since(mark) == 1  # the check rides on the pass's one connection
    d = buffer_datum(db)
    assert not db.collection.find_one({"number": 1}).get("retries")
    assert d["status"] == "transferred", d.get("error")
    assert d["checksum"] == dirhash(src, "sha512")
    after = os.stat(tmp_path / "buffer" / NAME / "a" / "x.zip")
    assert (after.st_ino, after.st_mtime_ns) == (landed.st_ino, landed.st_mtime_ns)


def test_stalled_push_to_a_site_that_is_down_waits_then_is_verified(tmp_path, live_sshd, setup):
    """Whether a stalled copy is whole cannot be seen while its site is down: nothing is decided
    (nor removed) until the site is back, and then the whole copy is verified and kept."""
    db, src = setup
    cfg = config(tmp_path, live_sshd, "sftp")
    passes(cfg, db, hosts=("daq",))
    db.collection.update_one({"number": 1, "data.host": "buffer"},
                             {"$set": {"data.$.status": "verifying",
                                       "data.$.heartbeat": now() - timedelta(hours=2)},
                              "$unset": {"data.$.checksum": "", "data.$.reference_checked": ""}})
    landed = os.stat(tmp_path / "buffer" / NAME / "a" / "x.zip")
    live_sshd.kill()
    passes(cfg, db, hosts=("daq",), n=1)
    assert buffer_datum(db)["status"] == "verifying"
    live_sshd.start()
    passes(cfg, db, hosts=("daq",), n=1)
    d = buffer_datum(db)
    assert d["status"] == "transferred" and d["checksum"] == dirhash(src, "sha512"), d
    assert not db.collection.find_one({"number": 1}).get("retries")
    after = os.stat(tmp_path / "buffer" / NAME / "a" / "x.zip")
    assert (after.st_ino, after.st_mtime_ns) == (landed.st_ino, landed.st_mtime_ns)


@pytest.mark.parametrize("method", METHODS)
def test_corrupt_pulled_copy_refetched_only_when_good_copy_exists(tmp_path, live_sshd, setup,
                                                                  method):
    db, src = setup
    cfg = config(tmp_path, live_sshd, method)
    passes(cfg, db)
    target = tmp_path / "archive" / NAME / "a" / "x.zip"
    target.write_bytes(b"corrupt" + target.read_bytes()[7:])
    db.collection.update_one({"number": 1, "data.host": "archive"},
                             {"$set": {"data.$.checksum": dirhash(str(tmp_path / "archive" / NAME),
                                                                  "sha512")},
                              "$unset": {"data.$.reference_checked": ""}})
    passes(cfg, db, hosts=("archive",))
    assert buffer_datum(db, "archive")["status"] == "transferred"
    assert dirhash(str(tmp_path / "archive" / NAME), "sha512") == dirhash(src, "sha512")
    # now make the archive's the only copy, corrupt it again: flagged, left in place
    run = db.collection.find_one({"number": 1})
    db.collection.update_one({"_id": run["_id"]}, {"$pull": {"data": {"host": {"$ne": "archive"}}}})
    target.write_bytes(b"corrupt" + target.read_bytes()[7:])
    bad = dirhash(str(tmp_path / "archive" / NAME), "sha512")
    db.collection.update_one({"number": 1, "data.host": "archive"},
                             {"$set": {"data.$.checksum": bad},
                              "$unset": {"data.$.reference_checked": ""}})
    passes(cfg, db, hosts=("archive",))
    d = buffer_datum(db, "archive")
    assert d["status"] == "error" and d["error_kind"] == "checksum"
    assert dirhash(str(tmp_path / "archive" / NAME), "sha512") == bad  # not deleted


def test_remote_verification_keeps_its_heartbeat_fresh(tmp_path, live_sshd, setup, monkeypatch):
    """A push verified by a checksum on the far side reports no progress until it ends; the
    datum's heartbeat must still move, or a long verification looks like a dead copy."""
    from cax.tasks import checksum as checksum_task
    from cax.transfer.ssh import SshMethod

    db, _src = setup
    cfg = config(tmp_path, live_sshd, "sftp")
    monkeypatch.setattr(checksum_task, "HEARTBEAT_SECONDS", 0.05)
    beats = []
    real_checksum = SshMethod.checksum

    def slow_checksum(self, path, algorithm="sha512"):
        # hold the verification until the heartbeat thread has written twice (bounded wait)
        deadline = now() + timedelta(seconds=20)
        while len(beats) < 2 and now() < deadline:
            d = buffer_datum(db)
            if d.get("heartbeat") and (not beats or d["heartbeat"] != beats[-1]):
                beats.append(d["heartbeat"])
            threading.Event().wait(0.01)
        return real_checksum(self, path, algorithm)

    monkeypatch.setattr(SshMethod, "checksum", slow_checksum)
    passes(cfg, db, hosts=("daq",), n=2)  # the first pass checksums the origin, the second pushes
    d = buffer_datum(db)
    assert d["status"] == "transferred", d.get("error")
    assert len(beats) >= 2 and beats[0] < beats[1]


@pytest.mark.parametrize("method", METHODS)
def test_pushed_copy_left_verifying_is_verified_by_the_pusher(tmp_path, live_sshd, setup, method):
    """The daemon stopped during a pushed copy's remote checksum; the destination runs no cax.
    The pusher's next pass must verify the copy where it is, not leave it for the stalled check
    (which would delete it and send it all again)."""
    db, src = setup
    cfg = config(tmp_path, live_sshd, method)
    passes(cfg, db, hosts=("daq",))
    assert buffer_datum(db)["status"] == "transferred"
    # silent for 40 minutes: past half of stalled_after (1 h), before the stalled check
    db.collection.update_one({"number": 1, "data.host": "buffer"},
                             {"$set": {"data.$.status": "verifying",
                                       "data.$.heartbeat": now() - timedelta(minutes=40)},
                              "$unset": {"data.$.checksum": "", "data.$.reference_checked": ""}})
    landed = os.stat(tmp_path / "buffer" / NAME).st_ino
    passes(cfg, db, hosts=("daq",), n=1)
    d = buffer_datum(db)
    assert not db.collection.find_one({"number": 1}).get("retries")
    assert d["status"] == "transferred", d.get("error")
    assert d["checksum"] == dirhash(src, "sha512")
    assert os.stat(tmp_path / "buffer" / NAME).st_ino == landed  # verified in place, not re-sent
