"""The RunsDB operations the tasks rely on, on every backend; the mongodb:// path end to end."""
import json
import os
import subprocess
import sys
from datetime import datetime, timezone

import pytest

from cax.config import load
from cax.runsdb import RunsDB, connect, datum_key, now, redact_uri, reference
from tests.helpers import make_raw, run_doc, three_sites

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def db(collection):
    d = RunsDB(collection)
    d.ensure_indexes()
    d.ensure_indexes()  # idempotent
    return d


def new_run(db, number=1):
    db.insert_run(run_doc(number, f"r{number}", "/data/daq/r", status="transferred"))
    return db.run_by(number=number)


def test_claim_exactly_once_per_key(db):
    run = new_run(db)
    datum = {"host": "buffer", "type": "raw", "status": "transferring", "creation_time": now()}
    assert db.claim(run["_id"], datum)
    assert not db.claim(run["_id"], dict(datum))
    proc = {"host": "buffer", "type": "processed", "pax_version": "v6.8.0", "status": "processing"}
    assert db.claim(run["_id"], proc)
    assert not db.claim(run["_id"], dict(proc))
    assert db.claim(run["_id"], dict(proc, pax_version="v6.9.0"))
    assert len(db.run(run["_id"])["data"]) == 4


def test_update_only_from_expected_status(db):
    run = new_run(db)
    key = {"host": "buffer", "type": "raw"}
    db.claim(run["_id"], dict(key, status="transferring"))
    assert not db.set_status(run["_id"], key, "verifying", "transferred")
    assert db.set_status(run["_id"], key, "transferring", "verifying", size=5)
    assert db.set_status(run["_id"], key, ["verifying", "x"], "transferred", checksum="ab")
    d = next(d for d in db.run(run["_id"])["data"] if d["host"] == "buffer")
    assert (d["status"], d["size"], d["checksum"]) == ("transferred", 5, "ab")
    daq = next(d for d in db.run(run["_id"])["data"] if d["host"] == "daq")
    assert daq["status"] == "transferred" and "size" not in daq  # only the keyed datum changed


def test_set_error_is_one_line_with_kind_and_time(db):
    run = new_run(db)
    key = {"host": "daq", "type": "raw"}
    assert db.set_error(run["_id"], key, "transferred", "disk\nfull\t now", kind="failed")
    d = db.run(run["_id"])["data"][0]
    assert d["status"] == "error" and d["error"] == "disk full now" and d["error_kind"] == "failed"
    assert d["error_time"].tzinfo is not None


def test_pull_datum_guarded_by_status(db):
    run = new_run(db)
    key = {"host": "daq", "type": "raw"}
    assert not db.pull_datum(run["_id"], key, "deleting")
    assert db.pull_datum(run["_id"], key, "transferred")
    assert db.run(run["_id"])["data"] == []


def test_reference_first_verifier_wins(db):
    run = new_run(db)
    assert db.set_reference(run["_id"], "raw", None, "sha512", "aa", "daq")
    assert not db.set_reference(run["_id"], "raw", None, "sha512", "bb", "buffer")
    assert db.set_reference(run["_id"], "processed", "v1", "sha512", "cc", "proc")
    fresh = db.run(run["_id"])
    assert reference(fresh, "raw")["checksum"] == "aa"
    assert reference(fresh, "processed", "v1")["checksum"] == "cc"
    assert reference(fresh, "processed", "v2") is None


def test_compare_and_set_on_data_array(db):
    run = new_run(db)
    db.claim(run["_id"], {"host": "buffer", "type": "raw", "status": "error", "t": now()})
    read = db.run(run["_id"])
    assert db.update_datum_if_unchanged(read["_id"], read["data"], 1, {"status": "retrying"})
    assert not db.update_datum_if_unchanged(read["_id"], read["data"], 1, {"status": "again"})
    assert db.run(run["_id"])["data"][1]["status"] == "retrying"


def test_datetimes_are_utc_aware(db):
    run = new_run(db)
    assert run["start"] == datetime(2016, 3, 15, 1, tzinfo=timezone.utc)
    assert run["start"].tzinfo is not None


def test_candidate_query_sorted_and_projected(db):
    for n in (3, 1, 2):
        new_run(db, n)
    got = list(db.find_runs({"data": {"$elemMatch": {"host": "daq", "status": "transferred"}}},
                            {"number": 1, "data.host": 1}))
    assert [r["number"] for r in got] == [1, 2, 3]
    assert got[0]["data"] == [{"host": "daq"}] and "name" not in got[0]


def test_unique_number_and_name(db):
    from cax.runsdb import DuplicateKeyError
    new_run(db, 1)
    with pytest.raises(DuplicateKeyError):
        db.insert_run(run_doc(1, "other", "/x"))
    with pytest.raises(DuplicateKeyError):
        db.insert_run(run_doc(2, "r1", "/x"))


def test_dry_run_sends_no_write(db):
    run = new_run(db)
    db.dry_run = True
    before = db.queries
    assert not db.claim(run["_id"], {"host": "x", "type": "raw", "status": "transferring"})
    assert not db.pull_datum(run["_id"], datum_key(run["data"][0]))
    assert db.queries == before
    db.dry_run = False
    assert len(db.run(run["_id"])["data"]) == 1


def test_redact_uri_hides_password():
    assert redact_uri("mongodb://cax:s3cret@h:27017/run") == "mongodb://cax:***@h:27017/run"
    assert redact_uri("mongodb://h/run") == "mongodb://h/run"


def test_mongodb_uri_path_end_to_end_on_wire_server(tmp_path, wire_uri):
    """The same daemon and commands, with the Runs DB behind a real MongoDB wire protocol."""
    cfg = three_sites(tmp_path, runs_db=wire_uri, database="cax_e2e_" + os.urandom(4).hex())
    config = load(cfg)
    assert config.is_uri()
    loc = make_raw(str(tmp_path / "daq"), "160101_0000")
    runs = tmp_path / "runs.json"
    doc = run_doc(1, "160101_0000", loc)
    doc["start"] = doc["start"].isoformat()
    doc["data"][0]["creation_time"] = doc["data"][0]["creation_time"].isoformat()
    runs.write_text(json.dumps([doc]))
    env = dict(os.environ, PYTHONPATH=ROOT)

    def cax(*args):
        return subprocess.run([sys.executable, "-m", "cax", "--config", cfg, *args], env=env,
                              capture_output=True, text=True, timeout=120)

    assert cax("runs", "add", str(runs)).returncode == 0
    for _ in range(2):
        for host in ("daq", "buffer", "archive"):
            r = cax("--once", "--host", host)
            assert r.returncode == 0, r.stderr
    out = json.loads(cax("status", "--json").stdout)
    assert {d["host"]: d["status"] for d in out[0]["data"]} == {
        "daq": "transferred", "buffer": "transferred", "archive": "transferred"}
    db = connect(config)
    assert len({d["checksum"] for d in db.run_by(number=1)["data"]}) == 1
    names = {ix["name"] for ix in db.collection.list_indexes()}
    assert {"number_1_detector_1", "name_1_detector_1"} <= names  # run identity (detector, ...)


def test_wire_server_down_is_exit_1_and_back_up_works(tmp_path, wire_daemon):
    cfg = three_sites(tmp_path, runs_db=wire_daemon.uri)
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "cax", "--config", cfg, "--once", "--host", "daq"]
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=120).returncode == 0
    wire_daemon.kill()
    r = subprocess.run(cmd + ["--log", "ERROR"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and "cannot use Runs DB" in r.stderr
    wire_daemon.start()
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=120).returncode == 0


# ---- opening the embedded store: only an existing, valid one --------------------------------
def _config_at(tmp_path, store):
    """A config whose runs_db is ``store``, without creating it (three_sites would)."""
    cfg = three_sites(tmp_path, runs_db="mongodb://unused/run")
    doc = json.loads(open(cfg).read())
    doc["runs_db"] = str(store)
    open(cfg, "w").write(json.dumps(doc))
    return load(cfg)


def test_connect_refuses_missing_empty_and_foreign_files(tmp_path):
    import sqlite3

    from cax.runsdb import RunsDBError
    store = tmp_path / "cax.runsdb"
    config = _config_at(tmp_path, store)
    with pytest.raises(RunsDBError, match="does not exist; run 'cax db init'"):
        connect(config)
    assert not store.exists()
    store.write_bytes(b"")
    for content, why in ((b"", "empty"), (b"not sqlite at all\n" * 300, "not a cax Runs DB"),
                         (None, "without the cax tables")):
        if content is None:
            store.unlink()
            with sqlite3.connect(store) as c:
                c.execute("CREATE TABLE other (x)")
        else:
            store.write_bytes(content)
        before = store.read_bytes()
        for kw in ({}, {"create": True}, {"dry_run": True}, {"dry_run": True, "missing_ok": True}):
            with pytest.raises(RunsDBError, match=why) as e:
                connect(config, **kw)
            assert str(store) in str(e.value) and "cax db init" in str(e.value), kw
            assert store.read_bytes() == before, kw  # never "repaired" into an empty store
    store.unlink()
    store.mkdir()
    with pytest.raises(RunsDBError, match="not a file"):
        connect(config)


def test_store_is_created_only_on_request(tmp_path):
    from cax.runsdb import RunsDBError, StoreExists, init_embedded
    store = tmp_path / "cax.runsdb"
    config = _config_at(tmp_path, store)
    db = connect(config, dry_run=True, missing_ok=True)  # the daemon's dry run of a new config
    assert db.count({}) == 0 and not store.exists()
    db = connect(config, create=True)                    # cax runs add
    db.insert_run(run_doc(1, "r1", "/data/daq/r"))
    db.close()
    with pytest.raises(StoreExists):
        init_embedded(config)
    assert connect(config).count({}) == 1               # untouched
    other = tmp_path / "sub" / "x.runsdb"
    with pytest.raises(RunsDBError, match="directory .* does not exist"):
        init_embedded(path=str(other))
    (tmp_path / "sub").mkdir()
    assert init_embedded(path=str(other)) == str(other)
    db = connect(_config_at(tmp_path, other))
    assert db.count({}) == 0
    db.close()
    assert sorted(os.listdir(tmp_path / "sub")) == ["x.runsdb"]  # no temporary left behind


def test_db_init_command(tmp_path):
    from click.testing import CliRunner

    from cax.cli import cli
    store = tmp_path / "cax.runsdb"
    config = _config_at(tmp_path, store)
    r = CliRunner().invoke(cli, ["--config", config.path, "db", "init"])
    assert r.exit_code == 0 and f"created an empty Runs DB at {store}" in r.output, r.output
    r = CliRunner().invoke(cli, ["--config", config.path, "db", "init"])
    assert r.exit_code == 2 and "already exists" in r.stderr, r.output
    r = CliRunner().invoke(cli, ["db", "init", str(tmp_path / "elsewhere.runsdb")])
    assert r.exit_code == 0 and (tmp_path / "elsewhere.runsdb").is_file(), r.output
    (tmp_path / "m").mkdir()
    uri_cfg = three_sites(tmp_path / "m", runs_db="mongodb://db.example.org/run")
    r = CliRunner().invoke(cli, ["--config", uri_cfg, "db", "init"])
    assert r.exit_code == 2 and "MongoDB URI" in r.stderr, r.output
    r = CliRunner().invoke(cli, ["db", "--help"])
    assert "cax db init" in r.output and "stray" in r.output


def test_runs_add_creates_a_missing_store_but_not_over_an_empty_file(tmp_path):
    from click.testing import CliRunner

    from cax.cli import cli
    store = tmp_path / "cax.runsdb"
    config = _config_at(tmp_path, store)
    doc = run_doc(1, "160101_0000", str(tmp_path / "daq" / "160101_0000"))
    doc["start"] = doc["start"].isoformat()
    doc["data"][0]["creation_time"] = doc["data"][0]["creation_time"].isoformat()
    (tmp_path / "runs.json").write_text(json.dumps(doc))
    r = CliRunner().invoke(cli, ["--config", config.path, "--dry-run", "runs", "add",
                                 str(tmp_path / "runs.json")])
    assert r.exit_code == 0 and "would add 1 run(s)" in r.output and not store.exists(), r.output
    r = CliRunner().invoke(cli, ["--config", config.path, "runs", "add",
                                 str(tmp_path / "runs.json")])
    assert r.exit_code == 0 and "added 1 run(s)" in r.output, r.output
    assert f"created a new, empty Runs DB {store}" in r.stderr
    db = connect(config)
    assert db.count({}) == 1
    db.close()
    store.write_bytes(b"")  # : > cax.runsdb
    r = CliRunner().invoke(cli, ["--config", config.path, "runs", "add",
                                 str(tmp_path / "runs.json")])
    assert r.exit_code == 1 and "empty" in r.stderr and store.read_bytes() == b"", r.output
