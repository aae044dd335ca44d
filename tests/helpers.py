"""Builders shared by the tests: configs with three local sites, run documents with real files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import mongomock

from cax import config as cfgmod
from cax.runsdb import RunsDB
from cax.tasks.base import Context


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cax(*args, env=None, timeout=180) -> subprocess.CompletedProcess:
    """cax as cron runs it: a whole process of this checkout, stdout and stderr pipes (not a
    terminal), text captured."""
    return subprocess.run([sys.executable, "-m", "cax", *args], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT, **(env or {})), timeout=timeout)


def init_store(runs_db: str) -> None:
    """Create the embedded store the way an admin does (``cax db init``), where there is none and
    its directory exists: cax never creates one by merely opening it. URIs are left alone."""
    if not runs_db.startswith("mongodb") and not os.path.lexists(runs_db) \
            and os.path.isdir(os.path.dirname(runs_db) or "."):
        from cax.runsdb import init_embedded
        init_embedded(path=runs_db)


def three_sites(tmp_path, runs_db=None, **extra_top):
    """daq -> buffer (push) -> archive (pull), all local; returns the config path (its embedded
    store made as by ``cax db init``)."""
    doc = {
        "runs_db": runs_db or str(tmp_path / "test.runsdb"),
        "sites": [
            {"name": "daq", "directory": str(tmp_path / "daq"), "upload_options": ["buffer"],
             "data_type": ["raw"]},
            {"name": "buffer", "directory": str(tmp_path / "buffer"), "data_type": ["raw"]},
            {"name": "archive", "directory": str(tmp_path / "archive"),
             "download_options": ["buffer"], "data_type": ["raw"]},
        ],
        **extra_top,
    }
    for s in doc["sites"]:
        os.makedirs(s["directory"], exist_ok=True)
    path = tmp_path / "cax.json"
    path.write_text(json.dumps(doc))
    init_store(doc["runs_db"])
    return str(path)


def make_raw(root, name, nfiles=3, size=1000):
    d = os.path.join(root, name)
    os.makedirs(os.path.join(d, "sub"), exist_ok=True)
    for i in range(nfiles):
        with open(os.path.join(d, "sub" if i % 2 else "", f"f{i}.bin"), "wb") as f:
            f.write(os.urandom(size + i))
    with open(os.path.join(d, ".hidden"), "wb") as f:
        f.write(b"h")
    return d


def run_doc(number, name, location, host="daq", status="verifying"):
    t = datetime(2016, 3, 15, tzinfo=timezone.utc) + timedelta(hours=number)
    return {"number": number, "name": name, "detector": "tpc", "start": t,
            "data": [{"host": host, "type": "raw", "status": status, "location": location,
                      "creation_time": t, "creation_place": host}]}


def mongomock_db():
    coll = mongomock.MongoClient(tz_aware=True)["run"]["runs_new"]
    db = RunsDB(coll)
    db.ensure_indexes()
    return db


def context(config_path, host, db, **kw):
    return Context(config=cfgmod.load(config_path), host=host, db=db, **kw)


def statuses(db, number):
    run = db.collection.find_one({"number": number})
    return {(d["host"], d["type"]): d["status"] for d in run["data"]}


class CountingCollection:
    """Counts every call that reaches the database, whatever the RunsDB layer believes (the
    query-count tests and ``benchmarks/loop.py`` wrap the collection in it)."""

    def __init__(self, coll):
        self._coll = coll
        self.calls = 0

    def __getattr__(self, name):
        attr = getattr(self._coll, name)
        if callable(attr):
            def counted(*a, **kw):
                self.calls += 1
                return attr(*a, **kw)
            return counted
        return attr
