"""An emptied, mistyped or fresh embedded store must never make a site's data look like strays.

Seen by hand on the code before the fix: after ``: > cax.runsdb`` ``cax status`` printed "(no runs)"
with exit 0 and ``cax stray --delete`` deleted every run at the site; a mistyped ``runs_db`` path
silently created a fresh store with the same effect. Every test here drives the real command line
(``python -m cax`` in a subprocess, as cron and admins run it) on a real store file and real data
directories, and ends by checking that no copy was deleted that should not have been.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

from tests.helpers import make_raw, three_sites

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cax(tmp_path, *args):
    env = dict(os.environ, PYTHONPATH=ROOT, XDG_STATE_HOME=str(tmp_path / "state"))
    return subprocess.run([sys.executable, "-m", "cax", *args], env=env, capture_output=True,
                          text=True, timeout=120)


def site(tmp_path, nruns, registered=None, grace=0.0, runs_db=None):
    """``nruns`` real copies at the buffer, the first ``registered`` of them (default: all) known
    to the Runs DB through ``cax runs add``; returns (config path, copy locations)."""
    cfg = three_sites(tmp_path, runs_db=runs_db)
    doc = json.loads(open(cfg).read())
    doc["sites"][1]["stray_grace_days"] = grace  # age alone never protects a copy here
    open(cfg, "w").write(json.dumps(doc))
    locs, docs = [], []
    for i in range(nruns):
        name = f"1601{i:02d}_0000"
        locs.append(make_raw(str(tmp_path / "buffer"), name, nfiles=1, size=10))
        docs.append({"number": i, "name": name, "detector": "tpc",
                     "start": f"2016-01-{i + 1:02d}T00:00:00+00:00",
                     "data": [{"host": "buffer", "type": "raw", "status": "transferred",
                               "location": locs[-1]}]})
    registered = nruns if registered is None else registered
    if registered:
        (tmp_path / "runs.json").write_text(json.dumps(docs[:registered]))
        r = cax(tmp_path, "--config", cfg, "runs", "add", str(tmp_path / "runs.json"))
        assert r.returncode == 0, r.stderr
    return cfg, locs


def one_error_line(r, *needles):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith("cax: error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_emptied_store_is_an_error_and_stray_deletes_nothing(tmp_path):
    """Before the fix: status printed "(no runs)" with exit 0, stray --delete removed all 4 copies."""
    cfg, locs = site(tmp_path, 4)
    store = str(tmp_path / "test.runsdb")
    assert "160100_0000" in cax(tmp_path, "--config", cfg, "status").stdout
    open(store, "w").close()  # : > test.runsdb
    r = cax(tmp_path, "--config", cfg, "status")
    assert r.returncode == 1 and "(no runs)" not in r.stdout, (r.returncode, r.stdout)
    one_error_line(r, store, "empty", "cax db init")
    r = cax(tmp_path, "--config", cfg, "stray", "--host", "buffer", "--delete")
    assert r.returncode == 1, (r.stdout, r.stderr)
    one_error_line(r, store)
    assert all(os.path.isdir(p) for p in locs)
    r = cax(tmp_path, "--config", cfg, "--once", "--host", "buffer")
    assert r.returncode == 1 and store in r.stderr
    assert os.path.getsize(store) == 0  # left as found: the admin decides


def test_mistyped_runs_db_path_is_an_error_and_creates_nothing(tmp_path):
    """Before the fix: a typo in runs_db created a fresh store and stray --delete removed all."""
    cfg, locs = site(tmp_path, 3)
    typo = str(tmp_path / "tset.runsdb")
    doc = json.loads(open(cfg).read())
    doc["runs_db"] = typo
    open(cfg, "w").write(json.dumps(doc))
    for args in (["status"], ["stray", "--host", "buffer", "--delete"],
                 ["--once", "--host", "buffer"], ["stray", "--host", "buffer", "--delete",
                                                  "--dry-run"]):
        r = cax(tmp_path, "--config", cfg, *args)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        one_error_line(r, typo, "does not exist", "cax db init")
        assert not os.path.exists(typo), args
        assert all(os.path.isdir(p) for p in locs), args
    # the explicit way to a new store
    r = cax(tmp_path, "--config", cfg, "db", "init")
    assert r.returncode == 0 and typo in r.stdout, r.stderr
    assert cax(tmp_path, "--config", cfg, "status").returncode == 0
    r = cax(tmp_path, "--config", cfg, "db", "init")
    assert r.returncode == 2, r.stdout
    one_error_line(r, typo, "already exists")


def test_stray_delete_refuses_when_most_entries_would_be_strays(tmp_path):
    """A fresh or restored-from-old-backup store knows 2 of the 10 copies at the buffer.

    Before the fix: stray --delete removed the 8 copies the store did not know."""
    cfg, locs = site(tmp_path, 10, registered=2)
    r = cax(tmp_path, "--config", cfg, "stray", "--host", "buffer", "--delete")
    assert r.returncode == 2, (r.stdout, r.stderr)
    one_error_line(r, "8 of the 10 entries", "--force")
    assert all(os.path.isdir(p) for p in locs)
    assert not glob.glob(str(tmp_path / "state" / "cax" / "strays-*"))  # no clock started either


def test_stray_delete_refuses_when_the_site_has_no_datum(tmp_path):
    """The Runs DB is fine but knows nothing of this site (e.g. a wrong collection or database):
    before the fix every entry of the buffer was deleted."""
    cfg, locs = site(tmp_path, 3, registered=0)
    loc = make_raw(str(tmp_path / "daq"), "160200_0000", nfiles=1, size=10)
    (tmp_path / "daq.json").write_text(json.dumps({
        "number": 100, "name": "160200_0000", "detector": "tpc", "start": "2016-02-01T00:00:00Z",
        "data": [{"host": "daq", "type": "raw", "status": "transferred", "location": loc}]}))
    assert cax(tmp_path, "--config", cfg, "runs", "add", str(tmp_path / "daq.json")).returncode == 0
    r = cax(tmp_path, "--config", cfg, "stray", "--host", "buffer", "--delete")
    assert r.returncode == 2, (r.stdout, r.stderr)
    one_error_line(r, "no datum of site buffer", "--force")
    assert all(os.path.isdir(p) for p in locs)


def test_stray_grace_is_recorded_across_runs_and_deletions_are_capped(tmp_path):
    """Before the fix: the first stray --delete removed every stray at once, however new the sighting.

    After: a run only records when it first saw each stray; a later run deletes those first seen
    at least stray_grace_days earlier (0 here), at most --max-delete of them."""
    cfg, locs = site(tmp_path, 7)
    strays = [make_raw(str(tmp_path / "buffer"), f"leftover_{i}", nfiles=1, size=10)
              for i in range(3)]
    r = cax(tmp_path, "--config", cfg, "stray", "--host", "buffer", "--delete",
            "--max-delete", "2")
    assert r.returncode == 0, r.stderr
    assert all(os.path.isdir(p) for p in strays + locs), r.stdout
    assert r.stdout.count("first seen now") == 3, r.stdout
    state = glob.glob(str(tmp_path / "state" / "cax" / "strays-buffer-*.json"))
    assert len(state) == 1 and set(json.load(open(state[0]))["first_seen"]) == set(strays)
    r = cax(tmp_path, "--config", cfg, "stray", "--host", "buffer", "--delete",
            "--max-delete", "2")
    assert r.returncode == 0, r.stderr
    gone = [p for p in strays if not os.path.exists(p)]
    assert len(gone) == 2 and r.stdout.count(": deleted") == 2, r.stdout
    assert "--max-delete 2 reached" in r.stdout
    assert all(os.path.isdir(p) for p in locs)
    r = cax(tmp_path, "--config", cfg, "stray", "--host", "buffer", "--delete")
    assert r.returncode == 0 and not any(os.path.exists(p) for p in strays), r.stdout
    assert all(os.path.isdir(p) for p in locs)
    assert json.load(open(state[0]))["first_seen"] == {}
