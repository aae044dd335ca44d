"""Daemon heartbeats in the Runs DB and the exit status of --once for cron (issue 13)."""
import os
import signal
import subprocess
import sys
from datetime import timedelta

from cax import heartbeat
from cax.checksum import checksum
from cax.config import load
from cax.runsdb import connect, now
from tests.helpers import init_store, make_raw, run_cax, run_doc, three_sites
from tests.test_ssh_sites import config as ssh_config
from tests.waiting import wait_for

pytest_plugins = ["tests.sshd"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


cax = run_cax


def checked_run(db, root, number=1, name="170101_0000"):
    loc = make_raw(root, name)
    doc = run_doc(number, name, loc, status="transferred")
    doc["data"][0]["checksum"] = checksum(loc)
    db.insert_run(doc)
    return loc


def beats(db):
    return {d["_id"]: d for d in db.heartbeats()}


def test_stopped_sshd_is_named_in_the_heartbeat_in_status_and_once_exits_3(tmp_path, live_sshd):
    cfg = ssh_config(tmp_path, live_sshd, "rsync")
    init_store(load(cfg).runs_db)
    db = connect(load(cfg))
    checked_run(db, tmp_path / "daq")
    me = f"daq@{heartbeat.machine()}"
    live_sshd.stop()
    try:
        r = cax("--config", cfg, "--host", "daq", "--once")
        assert r.returncode == 3, r.stderr
        assert "pass incomplete: cannot reach buffer" in r.stderr
        doc = beats(db)[me]
        assert set(doc["unreachable"]) == {"buffer"}
        since = doc["unreachable"]["buffer"]["since"]
        assert doc["unreachable"]["buffer"]["reason"]
        status = cax("--config", cfg, "status")
        assert status.returncode == 0
        assert f"site buffer: UNREACHABLE from {me} since" in status.stdout, status.stdout
        r = cax("--config", cfg, "--host", "daq", "--once")
        assert r.returncode == 3
        assert beats(db)[me]["unreachable"]["buffer"]["since"] == since  # since the first
    finally:
        live_sshd.start()
    codes = [cax("--config", cfg, "--host", h, "--once").returncode
             for h in ("daq", "daq", "daq", "daq")]
    assert codes[-1] == 0, codes
    doc = beats(db)[me]
    assert doc["unreachable"] == {} and doc["pass"] == 6 and doc["state"] == "idle"
    assert "UNREACHABLE" not in cax("--config", cfg, "status").stdout


def test_a_failed_copy_makes_once_exit_3_and_an_idle_pass_0(tmp_path):
    cfg = three_sites(tmp_path)
    db = connect(load(cfg))
    loc = checked_run(db, tmp_path / "daq")
    os.rename(loc, loc + ".gone")  # the source vanished after it was checksummed
    r = cax("--config", cfg, "--host", "daq", "--once")
    assert r.returncode == 3, r.stderr
    doc = beats(db)[f"daq@{heartbeat.machine()}"]
    assert sum(doc["failures"].values()) >= 1 and "170101_0000" in doc["last_error"]["text"]
    assert cax("--config", cfg, "--host", "archive", "--once").returncode == 0
    help_text = cax("--help").stdout
    assert "3  --once: a failure was recorded" in help_text


def test_silent_daemon_is_flagged_and_a_stopped_one_is_not(tmp_path):
    cfg = three_sites(tmp_path)
    db = connect(load(cfg))
    old = now() - timedelta(seconds=400)
    db.beat({"_id": "buffer@far", "site": "buffer", "interval": 60, "state": "idle",
             "pass": 9, "pass_start": old, "pass_end": old, "version": "x", "pid": 1})
    db.beat({"_id": "archive@far", "site": "archive", "interval": 60, "state": "stopped",
             "pass": 3, "pass_start": old, "pass_end": old, "version": "x", "pid": 2})
    out = cax("--config", cfg, "status").stdout
    line = next(l for l in out.splitlines() if l.startswith("daemon buffer@far"))
    assert "SILENT: silent for" in line and "3 x its 60 s interval" in line
    line = next(l for l in out.splitlines() if l.startswith("daemon archive@far"))
    assert "SILENT" not in line and "stopped" in line
    assert heartbeat.silent({"interval": 60, "pass_end": now()}) is None


def test_daemon_writes_a_heartbeat_every_pass_and_stopped_on_sigterm(tmp_path):
    cfg = three_sites(tmp_path, interval=0.2)
    db = connect(load(cfg))
    daemon = subprocess.Popen([sys.executable, "-m", "cax", "--config", cfg, "--host", "buffer"],
                              env=dict(os.environ, PYTHONPATH=ROOT), stderr=subprocess.DEVNULL)
    me = f"buffer@{heartbeat.machine()}"
    try:
        wait_for(lambda: (beats(db).get(me) or {}).get("pass", 0) >= 3, timeout=60,
                 what="three passes in the heartbeat")
        doc = beats(db)[me]
        assert doc["pid"] == daemon.pid and doc["once"] is False and doc["interval"] == 0.2
        assert doc["pass_end"] >= doc["pass_start"] or doc["state"] == "in pass"
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0
        assert beats(db)[me]["state"] == "stopped"
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


def test_dry_run_writes_no_heartbeat(tmp_path):
    cfg = three_sites(tmp_path)
    db = connect(load(cfg))
    assert cax("--config", cfg, "--host", "daq", "--once", "--dry-run").returncode == 0
    assert beats(db) == {}


def test_operations_page_explains_every_error_kind():
    from cax.runsdb.lifecycle import ErrorKind
    text = open(os.path.join(ROOT, "docs", "operations.rst"), encoding="utf-8").read()
    missing = [k.value for k in ErrorKind if f"``{k.value}``\n" not in text]
    assert missing == []
