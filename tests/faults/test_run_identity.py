"""Run identity is (detector, number) and (detector, name) (issue 12, item 4).

The classic Runs DB holds TPC and muon-veto runs that share numbers. cax made unique indexes on
``number`` and ``name`` alone: on such a Runs DB every cax command stopped at connect (E11000,
exit 1), and ``runs add`` refused the muon-veto run. A number given without a detector must never
pick one of two runs silently.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from cax.config import load
from cax.runsdb import AmbiguousRun, DuplicateKeyError, RunsDB, connect
from tests.helpers import make_raw, three_sites

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def doc(number, name, detector="tpc", location=None, host="daq", status="transferred"):
    t = datetime(2017, 1, 1, 12, tzinfo=timezone.utc) + timedelta(minutes=number)
    d = {"number": number, "name": name, "start": t,
         "data": [] if location is None else [
             {"host": host, "type": "raw", "status": status, "location": location,
              "creation_time": t, "creation_place": host}]}
    if detector is not None:
        d["detector"] = detector
    return d


def cax(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "cax", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


# ---- on every store --------------------------------------------------------------------------
def test_two_detectors_share_a_number_and_a_name_one_detector_never(collection):
    db = RunsDB(collection)
    db.ensure_indexes()
    db.insert_run(doc(1000, "170101_1200", "tpc"))
    db.insert_run(doc(1000, "170101_1200", "muon_veto"))  # was E11000 on the index on number
    with pytest.raises(DuplicateKeyError):
        db.insert_run(doc(1000, "170101_1300", "tpc"))
    with pytest.raises(DuplicateKeyError):
        db.insert_run(doc(1001, "170101_1200", "muon_veto"))
    assert collection.count_documents({}) == 2


def test_duplicates_already_in_the_runs_db_are_reported_not_fatal(collection, caplog):
    """Before: ensure_indexes raised E11000, so every cax command exited 1 on this Runs DB."""
    for d in (doc(5, "a"), doc(5, "b"), doc(5, "c", "muon_veto"), doc(6, "d", None)):
        collection.insert_one(d)
    db = RunsDB(collection, description="the-db")
    with caplog.at_level(logging.WARNING, logger="cax.runsdb"):
        db.ensure_indexes()
    lines = [r.getMessage() for r in caplog.records if "not created" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "the-db" in lines[0] and "(detector, number)" in lines[0]
    assert "tpc number 5 (a, b)" in lines[0] and "muon_veto" not in lines[0]
    names = set(collection.index_information())
    assert "name_1_detector_1" in names and "number_1_detector_1" not in names
    assert "data.location_1" in names  # the other indexes are still made


def test_unique_index_on_number_alone_of_an_earlier_cax_is_retired(collection, caplog):
    collection.create_index("number", unique=True)
    collection.insert_one(doc(7, "170101_1207"))
    db = RunsDB(collection, description="old-db")
    with caplog.at_level(logging.WARNING, logger="cax.runsdb"):
        db.ensure_indexes()
    said = " | ".join(r.getMessage() for r in caplog.records)
    if hasattr(collection, "drop_index"):
        assert "dropped the unique index number_1" in said, said
        db.insert_run(doc(7, "170101_1207", "muon_veto"))
        assert "number_1" not in collection.index_information()
    else:  # the embedded store has no drop_index (yet): it says so instead of failing later
        assert "the unique index number_1 on number alone stays" in said, said


def test_lookups_follow_the_detector_and_refuse_an_ambiguous_number(collection):
    db = RunsDB(collection)
    db.ensure_indexes()
    db.insert_run(doc(1000, "170101_1200", "tpc"))
    db.insert_run(doc(1000, "170101_1200_MV", "muon_veto"))
    collection.insert_one(doc(999, "161231_0000", detector=None))  # an old document: a TPC run
    with pytest.raises(AmbiguousRun) as e:
        db.run_by(number=1000)
    assert str(e.value) == ("run number 1000 is in several detectors (muon_veto, tpc); choose "
                            "one with --detector")
    assert db.run_by(number=1000, detector="muon_veto")["name"] == "170101_1200_MV"
    assert db.run_by(number=1000, detector="tpc")["name"] == "170101_1200"
    assert db.run_by(name="170101_1200_MV")["detector"] == "muon_veto"
    assert db.run_by(number=999, detector="tpc")["name"] == "161231_0000"
    assert db.run_by(number=999, detector="muon_veto") is None
    assert db.detectors_of(number=1000) == ["muon_veto", "tpc"]
    assert db.identity_taken(doc(999, "x", None)).startswith("a run of detector 'tpc' with this "
                                                             "number already exists")
    assert db.identity_taken(doc(999, "x", "muon_veto")) is None


# ---- the command line, on the embedded store ---------------------------------------------------
def two_detectors(tmp_path, runs_db=None):
    """A TPC and a muon-veto run with the same number, both with raw data at daq."""
    extra = {"collection": "runs_" + uuid.uuid4().hex[:12]} if runs_db else {}
    cfg = three_sites(tmp_path, runs_db, **extra)
    runs = []
    for name, detector in (("170101_1200", "tpc"), ("170101_1200_MV", "muon_veto")):
        loc = make_raw(str(tmp_path / "daq"), name)
        d = doc(1000, name, detector, loc, status="verifying")
        d["start"] = d["start"].isoformat()
        d["data"][0]["creation_time"] = d["data"][0]["creation_time"].isoformat()
        runs.append(d)
    p = tmp_path / "runs.json"
    p.write_text(json.dumps(runs))
    return cfg, p


@pytest.mark.parametrize("store", ["embedded", "wire"])
def test_two_detector_runs_db_runs_a_pass_at_each_site(tmp_path, store, request):
    uri = request.getfixturevalue("wire_uri") if store == "wire" else None
    cfg, runs = two_detectors(tmp_path, uri)
    r = cax("--config", cfg, "runs", "add", str(runs))
    assert r.returncode == 0 and "added 2 run(s), rejected 0" in r.stdout, r.stderr
    for _ in range(2):
        for host in ("daq", "buffer", "archive"):
            r = cax("--config", cfg, "--once", "--host", host)
            assert r.returncode == 0, r.stderr
    db = connect(load(cfg))
    for detector, name in (("tpc", "170101_1200"), ("muon_veto", "170101_1200_MV")):
        run = db.run_by(number=1000, detector=detector)
        assert run["name"] == name
        assert {d["host"]: d["status"] for d in run["data"]} == {
            "daq": "transferred", "buffer": "transferred", "archive": "transferred"}
        assert os.path.isdir(tmp_path / "archive" / name)
    table = cax("--config", cfg, "status").stdout.split("\n\n")[0].splitlines()  # no daemons
    assert table[0].split()[:3] == ["number", "name", "detector"]
    assert sorted(ln.split()[2] for ln in table[1:]) == ["muon_veto", "tpc"]
    # the same number again in one detector, or as an old document (no detector: tpc), is refused
    again = tmp_path / "again.json"
    again.write_text(json.dumps([{"number": 1000, "name": "170101_1300",
                                  "start": "2017-01-01T13:00:00Z"}]))
    r = cax("--config", cfg, "runs", "add", str(again))
    assert r.returncode == 1 and "rejected 1" in r.stdout
    assert "a run of detector 'tpc' with this number already exists" in r.stderr, r.stderr
    # a name another detector has is allowed, with one warning: data paths use the name alone
    again.write_text(json.dumps([{"number": 1001, "name": "170101_1200_MV", "detector": "tpc",
                                  "start": "2017-01-01T13:00:00Z"}]))
    r = cax("--config", cfg, "runs", "add", str(again))
    assert r.returncode == 0 and "added 1 run(s)" in r.stdout, r.stderr
    warned = r.stderr.strip().splitlines()
    assert len(warned) == 1 and "detector 'muon_veto' has a run with this name too" in warned[0]


def test_run_option_names_the_detectors_when_a_number_is_ambiguous(tmp_path):
    cfg, runs = two_detectors(tmp_path)
    assert cax("--config", cfg, "runs", "add", str(runs)).returncode == 0
    r = cax("--config", cfg, "--once", "--host", "daq", "--run", "1000")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "cax: error: run number 1000 is in several detectors (muon_veto, tpc); choose one with "
        "--detector")
    for _ in range(2):  # checksum, then push
        r = cax("--config", cfg, "--once", "--host", "daq", "--run", "1000", "--detector",
                "muon_veto")
        assert r.returncode == 0, r.stderr
    db = connect(load(cfg))
    mv = db.run_by(number=1000, detector="muon_veto")
    tpc = db.run_by(number=1000, detector="tpc")
    assert {d["host"] for d in mv["data"]} == {"daq", "buffer"}
    assert {d["host"] for d in tpc["data"]} == {"daq"}  # not acted on
    # a name is one detector's here: no --detector needed
    for _ in range(2):
        r = cax("--config", cfg, "--once", "--host", "daq", "--name", "170101_1200")
        assert r.returncode == 0, r.stderr
    assert {d["host"] for d in db.run_by(number=1000, detector="tpc")["data"]} == {"daq", "buffer"}
    # cax rm looks runs up the same way
    loc = str(tmp_path / "buffer" / "170101_1200")
    r = cax("--config", cfg, "rm", "--host", "buffer", "--run", "1000", "--location", loc,
            "--dry-run")
    assert r.returncode == 2 and "several detectors (muon_veto, tpc)" in r.stderr, r.stderr
    r = cax("--config", cfg, "rm", "--host", "buffer", "--run", "1000", "--detector", "tpc",
            "--location", loc, "--dry-run")
    # the TPC run found: its copy here is judged under the deletion invariant
    assert r.returncode == 1 and "refusing to delete" in r.stderr, r.stderr
    assert "1 other verified copy (daq)" in r.stderr


def test_a_runs_db_already_holding_duplicates_still_runs(tmp_path):
    """Before: E11000 at connect, exit 1 for every command."""
    from cax.runsdb.embedded import open_collection
    cfg = three_sites(tmp_path)
    coll = open_collection(str(tmp_path / "test.runsdb"), database="run", collection="runs_new")
    for d in (doc(5, "170101_0005"), doc(5, "170101_0105")):
        coll.insert_one(d)
    coll.database.client.close()
    r = cax("--config", cfg, "status")
    assert r.returncode == 0, r.stderr
    assert "unique index on (detector, number) not created" in r.stderr
    assert "tpc number 5 (170101_0005, 170101_0105)" in r.stderr
    r = cax("--config", cfg, "--once", "--host", "daq", "--run", "5")
    assert r.returncode == 0, r.stderr
