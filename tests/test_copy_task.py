"""The copy tasks' own behaviour, with local sites and instrumented transfer methods: parallel
copies within max_transfers, heartbeats of slow copies, progress bars and log lines."""
import logging
import os
import re
import threading
from datetime import timedelta

import pytest

from cax import progress
from cax.daemon import run_pass
from cax.runsdb import now
from cax.tasks import checksum as checksum_task
from cax.tasks import copy as copymod
from cax.transfer import METHODS
from cax.transfer.local import LocalMethod
from tests.helpers import context, make_raw, mongomock_db, run_doc, statuses
from tests.test_heal import sites

WAIT = 10.0  # seconds any condition below may take before the test fails


def runs(tmp_path, db, n):
    sizes = {}
    for i in range(1, n + 1):
        name = f"16010{i}_0000"
        loc = make_raw(str(tmp_path / "daq"), name, size=5000 * i)
        db.insert_run(run_doc(i, name, loc))
        sizes[name] = sum(os.path.getsize(os.path.join(r, f))
                          for r, _d, fs in os.walk(loc) for f in fs)
    return sizes


def buffer_datum(db, name):
    run = db.collection.find_one({"name": name})
    return next(d for d in run["data"] if d["host"] == "buffer")


class Probe:
    """What the instrumented methods below see; set up by each test."""

    db = None
    barrier = None
    slot_wait = None
    lock = threading.Lock()
    active = 0
    most = 0
    claimed_in_flight: list = []
    claimed_at_start: list = []
    heartbeats: list = []


class GatedLocal(LocalMethod):
    """Holds each push until ``max_transfers`` of them are in flight and the main thread waits
    for a slot, then records how many copies the Runs DB has claimed."""

    def send(self, local, partial, remote, expect):
        name = os.path.basename(remote)
        Probe.claimed_at_start.append(buffer_datum(Probe.db, name)["status"])
        with Probe.lock:
            Probe.active += 1
            Probe.most = max(Probe.most, Probe.active)
        try:
            Probe.barrier.wait(WAIT)  # two copies really run at once
            assert Probe.slot_wait.wait(WAIT), "the main thread never waited for a slot"
            Probe.claimed_in_flight.append(Probe.db.collection.count_documents(
                {"data": {"$elemMatch": {"host": "buffer", "status": "transferring"}}}))
            Probe.barrier.wait(WAIT)  # neither goes on before both counted
        finally:
            with Probe.lock:
                Probe.active -= 1
        super().send(local, partial, remote, expect)


class WatchedSemaphore(threading.Semaphore):
    """Tells when someone blocks for it (the copy task's main thread waiting for a slot)."""

    def acquire(self, blocking=True, timeout=None):
        if not blocking or timeout is not None:  # ThreadPoolExecutor's idle check, not ours
            return super().acquire(blocking, timeout)
        if super().acquire(blocking=False):
            return True
        Probe.slot_wait.set()
        return super().acquire()


def test_at_most_max_transfers_copies_claimed_and_running(tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "local", "tests.test_copy_task:GatedLocal")
    monkeypatch.setattr(copymod.threading, "Semaphore", WatchedSemaphore)
    Probe.db = db = mongomock_db()
    Probe.barrier, Probe.slot_wait = threading.Barrier(2), threading.Event()
    Probe.active = Probe.most = 0
    Probe.claimed_in_flight, Probe.claimed_at_start = [], []
    cfg = sites(tmp_path, max_transfers=2)
    runs(tmp_path, db, 4)
    run_pass(context(cfg, "daq", db))  # the daq verifies its own copies
    run_pass(context(cfg, "daq", db))
    assert Probe.most == 2
    assert Probe.claimed_at_start == ["transferring"] * 4  # each copy claimed before it starts
    # never a third copy claimed while two run: it would wait, claimed, for a free slot
    assert Probe.claimed_in_flight == [2, 2, 2, 2]
    assert all(statuses(db, i)[("buffer", "raw")] == "transferred" for i in range(1, 5))


class SlowLocal(LocalMethod):
    """A copy that makes progress while its heartbeat in the Runs DB is an hour old."""

    def send(self, local, partial, remote, expect):
        name = os.path.basename(remote)
        old = now() - timedelta(hours=1)
        Probe.db.collection.update_one({"name": name, "data.host": "buffer"},
                                       {"$set": {"data.$.heartbeat": old}})
        self.progress(1)
        Probe.heartbeats.append(buffer_datum(Probe.db, name)["heartbeat"] - old)
        super().send(local, partial, remote, expect)


@pytest.mark.parametrize("heartbeat_seconds, refreshed", [(0.0, True), (3600.0, False)])
def test_progress_refreshes_the_heartbeat_of_a_slow_copy(tmp_path, monkeypatch,
                                                         heartbeat_seconds, refreshed):
    monkeypatch.setitem(METHODS, "local", "tests.test_copy_task:SlowLocal")
    monkeypatch.setattr(checksum_task, "HEARTBEAT_SECONDS", heartbeat_seconds)
    Probe.db = db = mongomock_db()
    Probe.heartbeats = []
    cfg = sites(tmp_path, max_transfers=1)
    runs(tmp_path, db, 1)
    run_pass(context(cfg, "daq", db))
    run_pass(context(cfg, "daq", db))
    assert len(Probe.heartbeats) == 1
    # refreshed: now, an hour after the old value; else throttled (one write per period)
    assert (Probe.heartbeats[0] > timedelta(minutes=59)) is refreshed
    assert statuses(db, 1)[("buffer", "raw")] == "transferred"


class FakeBar:
    made: list = []

    def __init__(self, desc, total):
        self.desc, self.total, self.done, self.closed = desc, total, 0, False
        FakeBar.made.append(self)

    def update(self, n):
        self.done += n

    def close(self):
        self.closed = True


def copy_lines(caplog, task):
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.INFO and f"task={task} " in r.getMessage()]


@pytest.mark.parametrize("recorded", [True, False])
def test_on_a_terminal_bars_know_the_size_of_raw_directories_and_pulls(tmp_path, monkeypatch,
                                                                       caplog, recorded):
    """Without a total a bar shows neither percentage nor ETA. The size recorded in the Runs DB
    is used when there is one; else the push measures its local tree and the pull asks the
    source site."""
    monkeypatch.setattr(progress, "wanted", lambda: True)
    monkeypatch.setattr(progress, "Bar", FakeBar)
    FakeBar.made = []
    caplog.set_level(logging.INFO)
    cfg = sites(tmp_path, max_transfers=1)
    db = mongomock_db()
    (name, size), = runs(tmp_path, db, 1).items()
    run_pass(context(cfg, "daq", db))  # verified, size recorded
    if not recorded:
        db.collection.update_one({"number": 1, "data.host": "daq"},
                                 {"$unset": {"data.$.size": ""}})
    run_pass(context(cfg, "daq", db))  # push
    if recorded:
        run_pass(context(cfg, "buffer", db))  # the buffer records the size of its copy
    assert (buffer_datum(db, name).get("size") is not None) is recorded
    run_pass(context(cfg, "archive", db))  # pull
    assert statuses(db, 1)[("archive", "raw")] == "transferred"
    assert [(b.total, b.done, b.closed) for b in FakeBar.made] == [(size, size, True)] * 2
    for task in ("CopyPush", "CopyPull"):
        assert any("copy start" in line and f", {size} bytes" in line
                   for line in copy_lines(caplog, task)), copy_lines(caplog, task)


def test_under_cron_a_copy_is_two_log_lines_with_size_seconds_and_rate(tmp_path, monkeypatch,
                                                                      caplog):
    monkeypatch.setattr(progress, "wanted", lambda: False)
    monkeypatch.setattr(progress, "Bar", FakeBar)
    FakeBar.made = []
    cfg = sites(tmp_path, max_transfers=1)
    db = mongomock_db()
    (name, size), = runs(tmp_path, db, 1).items()
    run_pass(context(cfg, "daq", db))
    caplog.set_level(logging.INFO)
    caplog.clear()
    run_pass(context(cfg, "daq", db))
    lines = copy_lines(caplog, "CopyPush")
    # the verification that follows logs its own line (cax.tasks.checksum)
    start, done = [line for line in lines if "verified" not in line]  # exactly two
    assert re.search(rf"datum=raw@buffer copy start daq -> buffer via local, {size} bytes in "
                     rf"4 files$",  # three and a hidden one
                     start), start
    assert re.search(rf"datum=raw@buffer copy done {size} bytes in \d+\.\d s "
                     rf"\(\d+\.\d MB/s\)$", done), done
    assert FakeBar.made == []
