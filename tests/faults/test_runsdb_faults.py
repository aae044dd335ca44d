"""The Runs DB lost mid-pass, and a daemon killed mid-verify: copies are verified, never re-sent.

Real components only: the wire server is a separate SecantusDB process killed with SIGKILL, cax
runs as the real CLI in a subprocess, and each copy or checksum is held mid-way by a FIFO that the
test feeds, so every fault lands exactly where it is meant to (no timing guesses).
"""
import json
import os
import re
import signal
from datetime import timedelta

import pymongo
import pytest

from cax.checksum import checksum
from cax.config import load
from cax.runsdb import connect, now
from tests.helpers import run_doc, three_sites
from tests.test_daemon import _drain, _open_fifo_writer, _stderr_seen, cax
from tests.waiting import wait_for

NAME = "160101_0000"
PAYLOAD = b"run data fed through a fifo\n" * 4096  # ~112 KiB


def _reference(tmp_path):
    """sha512 of the run's data as they really are (the FIFO only streams them)."""
    scratch = tmp_path / "scratch"
    (scratch / NAME).mkdir(parents=True, exist_ok=True)
    (scratch / NAME / "stream.bin").write_bytes(PAYLOAD)
    return checksum(str(scratch / NAME))


def _lines(err, level):
    return [ln for ln in err.splitlines() if re.match(rf"\S+ {level}\s", ln)]


def _coll(uri):
    client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=20_000, tz_aware=True)
    return client, client["run"]["runs_new"]


def _buffer_datum(coll):
    return next(d for d in coll.find_one({"number": 1})["data"] if d["host"] == "buffer")


def _push_held_mid_copy(tmp_path, wire_daemon):
    """daq pushes a run to buffer; its one file is a FIFO, so the copy is held mid-way.

    Returns (config, the FIFO)."""
    cfg = three_sites(tmp_path, runs_db=wire_daemon.uri)
    src = tmp_path / "daq" / NAME
    src.mkdir()
    fifo = src / "stream.bin"
    os.mkfifo(fifo)
    doc = run_doc(1, NAME, str(src), status="transferred")
    # what AddSize recorded at the DAQ for the real file
    doc["data"][0].update(checksum=_reference(tmp_path), size=len(PAYLOAD), files=1)
    client, coll = _coll(wire_daemon.uri)
    coll.insert_one(doc)
    client.close()
    return cfg, fifo


def _lose_db_mid_copy(tmp_path, wire_daemon):
    fifo = tmp_path / "daq" / NAME / "stream.bin"
    fd = _open_fifo_writer(fifo, "the copy reading its source")
    os.write(fd, PAYLOAD[:len(PAYLOAD) // 2])
    client, coll = _coll(wire_daemon.uri)
    wait_for(lambda: _buffer_datum(coll).get("status") == "transferring", what="copy claimed")
    client.close()
    wire_daemon.kill()  # the Runs DB host dies while the copy is in flight
    os.write(fd, PAYLOAD[len(PAYLOAD) // 2:])  # the copy completes and lands
    os.close(fd)
    return fifo


def _real_file(fifo):
    """The FIFO becomes the regular file it stood for (the data as they really are)."""
    fifo.unlink()
    fifo.write_bytes(PAYLOAD)


def _check_one_db_error(err, wire_daemon):
    errors = _lines(err, "ERROR")
    assert len(errors) == 1, errors
    assert "Runs DB" in errors[0] and f"{wire_daemon.host}:{wire_daemon.port}" in errors[0], errors
    assert "Topology" not in err and "Traceback" not in err, err


def _check_kept(tmp_path, wire_daemon, landed_stat):
    client, coll = _coll(wire_daemon.uri)
    try:
        run = coll.find_one({"number": 1})
        buffer = _buffer_datum(coll)
        assert buffer["status"] == "transferred", buffer
        assert buffer["checksum"] == _reference(tmp_path)
        assert not run.get("retries"), run
    finally:
        client.close()
    st = os.stat(tmp_path / "buffer" / NAME / "stream.bin")
    assert (st.st_ino, st.st_mtime_ns) == landed_stat  # the landed copy itself, not a re-send
    assert sorted(os.listdir(tmp_path / "buffer")) == [NAME]  # and no partial copy


def test_wire_server_killed_mid_pass_stops_once_with_exit_1_and_keeps_the_copy(
        tmp_path, wire_daemon):
    cfg, fifo = _push_held_mid_copy(tmp_path, wire_daemon)
    proc = cax("--config", cfg, "--once", "--host", "daq")
    _lose_db_mid_copy(tmp_path, wire_daemon)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    _check_one_db_error(err, wire_daemon)
    landed = tmp_path / "buffer" / NAME / "stream.bin"
    assert landed.read_bytes() == PAYLOAD  # it landed while the Runs DB was gone
    st = os.stat(landed)
    _real_file(fifo)

    wire_daemon.start()
    again = cax("--config", cfg, "--once", "--host", "daq")
    out2, err2 = again.communicate(timeout=120)
    assert again.returncode == 0, err2
    assert "copy start" in err and "copy start" not in err2  # one copy in all
    _check_kept(tmp_path, wire_daemon, (st.st_ino, st.st_mtime_ns))


def test_daemon_waits_for_lost_runs_db_and_resumes(tmp_path, wire_daemon):
    cfg, fifo = _push_held_mid_copy(tmp_path, wire_daemon)
    daemon = cax("--config", cfg, "--host", "daq", "--interval", "3600")
    try:
        _lose_db_mid_copy(tmp_path, wire_daemon)
        wait_for(lambda: "Runs DB" in _drain(daemon) and _lines(_drain(daemon), "ERROR"),
                 timeout=60, what="the daemon noticing the lost Runs DB")
        landed = tmp_path / "buffer" / NAME / "stream.bin"
        wait_for(landed.exists, what="the copy landing")
        st = os.stat(landed)
        _real_file(fifo)
        assert daemon.poll() is None, _drain(daemon)  # it waits, it does not exit
        wire_daemon.start()
        wait_for(lambda: re.search(r"pass 2 end", _drain(daemon)), timeout=120,
                 what="a pass after the Runs DB came back")
        assert daemon.poll() is None
    finally:
        daemon.send_signal(signal.SIGTERM)
        out, err = daemon.communicate(timeout=60)
    err = _stderr_seen.get(daemon.pid, "") + err
    assert daemon.returncode == 0, err
    _check_one_db_error(err, wire_daemon)
    assert "Runs DB" in err and re.search(r"Runs DB .* back", err), err
    assert err.count("copy start") == 1
    _check_kept(tmp_path, wire_daemon, (st.st_ino, st.st_mtime_ns))


def test_daemon_waiting_for_lost_runs_db_stops_on_sigterm(tmp_path, wire_daemon):
    cfg = three_sites(tmp_path, runs_db=wire_daemon.uri)
    daemon = cax("--config", cfg, "--host", "daq", "--interval", "0.2")
    try:
        wait_for(lambda: "pass 1 end" in _drain(daemon), what="a first pass")
        wire_daemon.kill()  # between passes: the next pass finds it gone
        wait_for(lambda: _lines(_drain(daemon), "ERROR"), timeout=60, what="the loss noticed")
        daemon.send_signal(signal.SIGTERM)
        out, err = daemon.communicate(timeout=60)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.communicate(timeout=60)
    err = _stderr_seen.get(daemon.pid, "") + err
    assert daemon.returncode == 0, err
    _check_one_db_error(err, wire_daemon)
    assert "stopped cleanly" in err


# ---- a daemon killed mid-verify, back after stalled_after ---------------------------------------

STALLED_AFTER = 600


def _landed_copy_being_verified(tmp_path, direction):
    """A copy that landed whole and is ``verifying``: pulled by the archive from the buffer, or
    pushed by the DAQ to the buffer. Its one file is a FIFO, so its checksum is held mid-read."""
    cfg = three_sites(tmp_path)
    doc = json.loads(open(cfg).read())
    for s in doc["sites"]:
        s["stalled_after"] = STALLED_AFTER
    open(cfg, "w").write(json.dumps(doc))
    src_host, dst_host, owner = (("buffer", "archive", "archive") if direction == "pull"
                                 else ("daq", "buffer", "daq"))
    src = tmp_path / src_host / NAME
    src.mkdir()
    (src / "stream.bin").write_bytes(PAYLOAD)
    dst = tmp_path / dst_host / NAME
    dst.mkdir()
    os.mkfifo(dst / "stream.bin")
    doc = run_doc(1, NAME, str(src), host=src_host, status="transferred")
    doc["data"][0].update(checksum=checksum(str(src)), size=len(PAYLOAD), files=1)
    # the push's owner only resumes a verification nobody beats for stalled_after / 2
    beat = now() - timedelta(seconds=STALLED_AFTER * 0.75 if direction == "push" else 0)
    doc["data"].append({"host": dst_host, "type": "raw", "status": "verifying",
                        "location": str(dst), "checksum": None, "creation_time": beat,
                        "heartbeat": beat, "creation_place": owner, "source": src_host})
    db = connect(load(cfg))
    db.insert_run(doc)
    return cfg, db, owner, dst / "stream.bin"


@pytest.mark.parametrize("direction", ["pull", "push"])
def test_daemon_killed_mid_verify_and_back_after_stalled_after_reverifies(tmp_path, direction):
    cfg, db, owner, fifo = _landed_copy_being_verified(tmp_path, direction)
    daemon = cax("--config", cfg, "--host", owner, "--interval", "3600")
    try:
        fd = _open_fifo_writer(fifo, "the verification reading the copy")
        os.write(fd, PAYLOAD[:1000])
        daemon.send_signal(signal.SIGKILL)  # mid-checksum
        daemon.wait(60)
        os.close(fd)
    finally:
        if daemon.poll() is None:
            daemon.kill()
        daemon.communicate(timeout=60)
    dst_host = fifo.parent.parent.name
    d = next(d for d in db.run_by(number=1)["data"] if d["host"] == dst_host)
    assert d["status"] == "verifying", d
    # the copy is whole (as it was before the kill); the FIFO only held its checksum
    _real_file(fifo)
    st = os.stat(fifo)
    # the daemon is back after stalled_after: its last heartbeat is that old
    db.update_datum(db.run_by(number=1)["_id"], {"host": d["host"], "type": "raw"}, "verifying",
                    {"heartbeat": now() - timedelta(seconds=2 * STALLED_AFTER)})
    again = cax("--config", cfg, "--once", "--host", owner)
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    run = db.run_by(number=1)
    d = next((x for x in run["data"] if x["host"] == d["host"]), None)
    assert d is not None, f"the copy was removed to be sent again: {err}"
    assert d["status"] == "transferred", (d, err)
    assert d["checksum"] == run["data"][0]["checksum"]
    assert not run.get("retries") and "copy start" not in err, err
    assert (os.stat(fifo).st_ino, os.stat(fifo).st_mtime_ns) == (st.st_ino, st.st_mtime_ns)


# ---- the embedded store -----------------------------------------------------------------------

def test_embedded_store_locked_mid_pass_ends_the_pass_in_one_line(tmp_path, caplog):
    """The embedded store's "database is locked" (another process holding it past the busy
    timeout) is a lost Runs DB too: the pass stops at the first write, in one line."""
    import logging
    import sqlite3

    from cax.daemon import EXIT_RUNS_DB, run_loop, run_pass
    from cax.runsdb import RunsDB, RunsDBLost
    from cax.runsdb.embedded import EmbeddedClient
    from tests.helpers import context, make_raw

    cfg = three_sites(tmp_path)
    store = str(tmp_path / "test.runsdb")
    client = EmbeddedClient(store, timeout=0.2)
    db = RunsDB(client["run"]["runs_new"], description=store)
    db.ensure_indexes()
    loc = make_raw(str(tmp_path / "daq"), NAME)
    doc = run_doc(1, NAME, loc, status="transferred")
    doc["data"][0]["checksum"] = checksum(loc)
    db.insert_run(doc)
    other = sqlite3.connect(store, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # e.g. an admin's sqlite3 shell left in a transaction
    try:
        with pytest.raises(RunsDBLost) as lost:
            run_pass(context(cfg, "daq", db))
        assert str(lost.value).startswith(f"Runs DB {store} lost: OperationalError: ")
        assert "locked" in str(lost.value) and "\n" not in str(lost.value)
        caplog.clear()
        handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
        try:
            with caplog.at_level(logging.INFO):
                assert run_loop(context(cfg, "daq", db), once=True, interval=60) == EXIT_RUNS_DB
        finally:
            signal.signal(signal.SIGTERM, handlers[0])
            signal.signal(signal.SIGINT, handlers[1])
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "Runs DB" in errors[0].getMessage(), errors
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert not os.path.exists(tmp_path / "buffer" / NAME)  # nothing was claimed, nothing moved
    for _ in range(2):
        run_pass(context(cfg, "daq", db))
    buffer = next(d for d in db.run_by(number=1)["data"] if d["host"] == "buffer")
    assert buffer["status"] == "transferred", buffer
    client.close()
