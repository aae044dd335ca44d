"""Runs DB documents shaped as the classic cax wrote them (issue 12, "Classic Runs DB documents").

The shapes are taken from the classic cax's code (public repository XENON1T/cax): the DAQ's raw
record without a checksum, Rucio records (host ``rucio-catalogue``, adler32 or ``"n/a"`` checksums,
statuses ``RSEreupload`` and ``failed``, a Rucio DID as location), tape records (host
``tsm-server``, an MD5 folder checksum), processed records (``pax_version``, ``pax_hash``,
``creation_place`` copied from the processing site), copies in flight without ``source``, and
errors without ``error_kind``. None of them carries ``checksum_type``.
"""
import copy
import json
import logging
import os
from datetime import timedelta

import pytest
from click.testing import CliRunner

from cax import config as cfgmod
from cax.checksum import checksum
from cax.cli import cli
from cax.daemon import run_pass
from cax.runsdb import RunsDB, now
from cax.runsdb import copies
from tests.helpers import context, init_store, make_raw, mongomock_db

ADLER32 = "0a1b2c3d"                      # Rucio's checksum (8 hex digits)
MD5 = "9e107d9d372bb6826bd81d3542a419d6"  # the tape client's folder checksum (32 hex digits)
NAMES = ["160315_1432", "160315_1532", "160315_1632", "160315_1732", "160315_1832"]


# ---- the setting ---------------------------------------------------------------------------
def classic_sites(tmp_path, buffer_purge=None, daq_extra=None, runs_db=None):
    """daq pushes to buffer, archive pulls from buffer (raw and processed); tsm-server and
    rucio-catalogue as the classic configs have them (not reachable from this cax)."""
    doc = {"runs_db": runs_db or str(tmp_path / "test.runsdb"), "sites": [
        {"name": "daq", "directory": str(tmp_path / "daq"), "upload_options": ["buffer"],
         "data_type": ["raw"], **(daq_extra or {})},
        {"name": "buffer", "dir_raw": str(tmp_path / "buffer" / "raw"),
         "dir_processed": str(tmp_path / "buffer" / "processed"),
         "data_type": ["raw", "processed"]},
        {"name": "archive", "dir_raw": str(tmp_path / "archive" / "raw"),
         "dir_processed": str(tmp_path / "archive" / "processed"),
         "download_options": ["buffer"], "data_type": ["raw", "processed"]},
        {"name": "tsm-server", "hostname": None, "method": "tsm", "dir_raw": "/tsm/raw"},
        {"name": "rucio-catalogue", "hostname": "", "method": "rucio"},
    ]}
    if buffer_purge is not None:
        doc["sites"][1]["purge"] = buffer_purge
    for d in ("daq", "buffer/raw", "buffer/processed", "archive/raw", "archive/processed"):
        os.makedirs(tmp_path / d, exist_ok=True)
    path = tmp_path / "cax.json"
    path.write_text(json.dumps(doc))
    init_store(doc["runs_db"])
    return str(path)


HOSTS = ("daq", "buffer", "archive")


def passes(cfg, db, n=3):
    for _ in range(n):
        for host in HOSTS:
            run_pass(context(cfg, host, db))


def ago(**kw):
    return now() - timedelta(**kw)


# ---- the classic shapes --------------------------------------------------------------------
def daq_record(loc, checksum_value=None):
    """The event builder's record: transferred, with no checksum (classic AddChecksum added one
    only to 'verifying' data) or the classic sha512 without checksum_type."""
    return {"host": "daq", "type": "raw", "status": "transferred", "location": loc,
            "checksum": checksum_value, "creation_time": ago(days=10)}


def rucio_record(name, status="transferred", checksum_value=ADLER32):
    loc = "n/a" if checksum_value == "n/a" else f"x1t_SR000_{name}_tpc:raw"
    return {"host": "rucio-catalogue", "type": "raw", "status": status, "location": loc,
            "checksum": checksum_value, "rse": ["UC_OSG_USERDISK"] if loc != "n/a" else [],
            "rule_info": "no_rule", "creation_time": ago(days=9)}


def tsm_record(name):
    return {"host": "tsm-server", "type": "raw", "status": "transferred",
            "location": f"/tsm/raw/{name}", "checksum": MD5, "creation_time": ago(days=9)}


def classic_run(db, number, name, data):
    db.insert_run({"number": number, "name": name, "detector": "tpc", "start": ago(days=10),
                   "data": data})
    return db.collection.find_one({"number": number})


def partial_copy(tmp_path, host, name, src):
    """What a copy that died half-way leaves: one file of the source, cut short."""
    dst = tmp_path / host / "raw" / name
    dst.mkdir(parents=True)
    with open(os.path.join(src, "f0.bin"), "rb") as f:
        (dst / "f0.bin").write_bytes(f.read()[:50])
    return str(dst)


def datum(db, number, host, dtype="raw"):
    run = db.collection.find_one({"number": number})
    return next((d for d in run["data"] if d["host"] == host and d["type"] == dtype), None)


def hosts_with(db, number, status="transferred", dtype="raw"):
    run = db.collection.find_one({"number": number})
    return {d["host"] for d in run["data"] if d["type"] == dtype and d["status"] == status}


# ---- reference selection (unit) ------------------------------------------------------------
SHA = "a" * 128


def test_reference_ignores_checksums_of_another_type_and_placeholders():
    run = {"data": [daq_record("/d/r", SHA), rucio_record("r"), tsm_record("r"),
                    rucio_record("r", "RSEreupload", "n/a"),
                    dict(rucio_record("r"), host="lfc", checksum="")]}
    ref = copies.reference(run, "raw")
    assert ref is not None and ref["checksum"] == SHA and ref["host"] == "daq"
    assert ref["checksum_type"] == "sha512"


def test_a_lone_foreign_checksum_is_no_reference():
    """Only a Rucio adler32 beside a DAQ record without checksum: the adler32 must not become
    the reference (the DAQ's own sha512 would then 'differ' and a good copy be flagged)."""
    for record in (rucio_record("r"), tsm_record("r")):
        run = {"data": [daq_record("/d/r"), record]}
        assert copies.reference(run, "raw") is None, record


def test_reference_prefers_the_configured_reference_sites_verified_sha512():
    """Two copies without 'source' disagree: unknown, unless the config names whose checksum
    is the reference (as the classic cax's master checksums did)."""
    other = "b" * 128
    run = {"data": [daq_record("/d/r", SHA),
                    {"host": "buffer", "type": "raw", "status": "transferred",
                     "location": "/b/r", "checksum": other}]}
    assert copies.reference(run, "raw") is None
    assert copies.reference(run, "raw", prefer=("buffer",))["checksum"] == other
    assert copies.reference(run, "raw", prefer=("daq", "buffer"))["checksum"] == SHA
    # only a verified sha512 there counts: not an error, not another type
    run["data"][1]["status"] = "error"
    assert copies.reference(run, "raw", prefer=("buffer",)) is None
    run["data"][1].update(status="transferred", checksum=ADLER32)
    assert copies.reference(run, "raw", prefer=("buffer",))["checksum"] == SHA


def test_the_reference_site_is_a_site_key_and_checked(tmp_path):
    cfg = classic_sites(tmp_path, daq_extra={"reference": True})
    config = cfgmod.load(cfg)
    assert config.reference_sites == ("daq",)
    assert config.site("daq").reference and not config.site("buffer").reference
    doc = json.loads((tmp_path / "cax.json").read_text())
    doc["sites"][0]["reference"] = "yes"
    (tmp_path / "cax.json").write_text(json.dumps(doc))
    with pytest.raises(cfgmod.ConfigError, match="'daq'.*'reference'"):
        cfgmod.load(cfg)


def test_configured_reference_site_decides_a_classic_disagreement(tmp_path):
    """The classic cax compared every copy with the DAQ's ("master") checksum. With the DAQ
    named as reference site, a classic copy that disagrees is healed instead of blocking."""
    cfg = classic_sites(tmp_path, daq_extra={"reference": True})
    db = mongomock_db()
    name = NAMES[0]
    loc = make_raw(str(tmp_path / "daq"), name)
    bad = make_raw(str(tmp_path / "buffer" / "raw"), name)  # other bytes
    classic_run(db, 1, name, [daq_record(loc, checksum(loc)),
                              {"host": "buffer", "type": "raw", "status": "transferred",
                               "location": bad, "checksum": checksum(bad),
                               "creation_time": ago(days=9)}])
    passes(cfg, db)
    assert hosts_with(db, 1) == {"daq", "buffer", "archive"}
    assert {datum(db, 1, h)["checksum"] for h in HOSTS} == {checksum(loc)}


# ---- a reference that cannot be known is said, once per run per pass -----------------------
def test_unknown_reference_is_said_once_per_run_per_pass_at_info(tmp_path, caplog):
    cfg = classic_sites(tmp_path)
    db = mongomock_db()
    name = NAMES[0]
    loc = make_raw(str(tmp_path / "daq"), name)
    other = make_raw(str(tmp_path / "buffer" / "raw"), name)
    classic_run(db, 1, name, [daq_record(loc, checksum(loc)),
                              {"host": "buffer", "type": "raw", "status": "transferred",
                               "location": other, "checksum": checksum(other),
                               "creation_time": ago(days=9)},
                              rucio_record(name)])
    caplog.set_level(logging.INFO, "cax")
    for _ in range(2):
        run_pass(context(cfg, "archive", db))
    said = [r for r in caplog.records if "reference" in r.getMessage()
            and f"run={name}" in r.getMessage() and "unknown" in r.getMessage()]
    assert len(said) == 2, [r.getMessage() for r in caplog.records]  # one per pass
    assert all(r.levelno == logging.INFO for r in said)
    msg = said[0].getMessage()
    assert "raw@daq" in msg and "raw@buffer" in msg and "raw@rucio-catalogue" in msg, msg
    # nothing copied from an unknown reference
    assert hosts_with(db, 1) == {"daq", "buffer", "rucio-catalogue"}


# ---- classic copies in flight and errors heal by their age ---------------------------------
def test_classic_transferring_copy_without_source_is_healed_by_its_age(tmp_path):
    cfg = classic_sites(tmp_path)
    db = mongomock_db()
    name = NAMES[0]
    loc = make_raw(str(tmp_path / "daq"), name)
    stale = partial_copy(tmp_path, "buffer", name, loc)
    classic_run(db, 1, name, [daq_record(loc, checksum(loc)),
                              {"host": "buffer", "type": "raw", "status": "transferring",
                               "location": stale, "checksum": None,
                               "creation_time": ago(days=3)}])
    passes(cfg, db)
    assert hosts_with(db, 1) == {"daq", "buffer", "archive"}
    assert datum(db, 1, "buffer")["checksum"] == checksum(loc)
    assert db.collection.find_one({"number": 1}).get("retries") == 1


def test_a_young_classic_transferring_copy_is_left_to_finish(tmp_path):
    """The classic cax gave a copy a day; a classic daemon may still be sending it."""
    cfg = classic_sites(tmp_path)
    db = mongomock_db()
    name = NAMES[0]
    loc = make_raw(str(tmp_path / "daq"), name)
    stale = partial_copy(tmp_path, "buffer", name, loc)
    classic_run(db, 1, name, [daq_record(loc, checksum(loc)),
                              {"host": "buffer", "type": "raw", "status": "transferring",
                               "location": stale, "checksum": None,
                               "creation_time": ago(hours=3)}])
    passes(cfg, db, n=1)
    assert datum(db, 1, "buffer")["status"] == "transferring"
    assert os.path.exists(os.path.join(stale, "f0.bin"))


def test_a_classic_transferring_datum_that_may_be_the_only_data_is_never_removed(tmp_path):
    """No good copy elsewhere: it may be the origin still being written. Kept, whatever age."""
    cfg = classic_sites(tmp_path)
    db = mongomock_db()
    name = NAMES[0]
    loc = make_raw(str(tmp_path / "buffer" / "raw"), name)
    classic_run(db, 1, name, [{"host": "buffer", "type": "raw", "status": "transferring",
                               "location": loc, "checksum": None,
                               "creation_time": ago(days=3)}])
    passes(cfg, db, n=1)
    assert datum(db, 1, "buffer")["status"] == "transferring"
    assert os.path.isdir(loc)


@pytest.mark.parametrize("where", ["daq", "reference"])
def test_a_classic_error_at_a_site_no_copy_comes_to_or_the_reference_site_is_kept(tmp_path,
                                                                                   where):
    """An origin in ``error`` (the DAQ, where nothing would copy it back) and the reference
    site's record (the classic cax never retried its master site's errors) stay, files too,
    though a good copy exists elsewhere."""
    cfg = classic_sites(tmp_path, daq_extra={"reference": True} if where == "reference" else {})
    db = mongomock_db()
    name = NAMES[0]
    if where == "daq":
        loc = make_raw(str(tmp_path / "daq"), name)
        good = make_raw(str(tmp_path / "buffer" / "raw"), name)
        data = [dict(daq_record(loc), status="error"),
                {"host": "buffer", "type": "raw", "status": "transferred", "location": good,
                 "checksum": checksum(good), "creation_time": ago(days=9)}]
        kept, host = loc, "daq"
    else:
        doc = json.loads((tmp_path / "cax.json").read_text())
        doc["sites"][0]["reference"] = False
        doc["sites"][1]["reference"] = True  # buffer is the reference site
        (tmp_path / "cax.json").write_text(json.dumps(doc))
        loc = make_raw(str(tmp_path / "daq"), name)
        stale = partial_copy(tmp_path, "buffer", name, loc)
        data = [daq_record(loc, checksum(loc)),
                {"host": "buffer", "type": "raw", "status": "error", "location": stale,
                 "checksum": None, "creation_time": ago(days=2)}]
        kept, host = stale, "buffer"
    classic_run(db, 1, name, data)
    passes(cfg, db, n=2)
    assert datum(db, 1, host)["status"] == "error"
    assert os.path.isdir(kept)


def test_classic_error_without_error_kind_is_healed(tmp_path):
    cfg = classic_sites(tmp_path)
    db = mongomock_db()
    name = NAMES[0]
    loc = make_raw(str(tmp_path / "daq"), name)
    stale = partial_copy(tmp_path, "buffer", name, loc)
    classic_run(db, 1, name, [daq_record(loc, checksum(loc)),
                              {"host": "buffer", "type": "raw", "status": "error",
                               "location": stale, "checksum": None,
                               "creation_time": ago(days=2)}])
    passes(cfg, db)
    assert hosts_with(db, 1) == {"daq", "buffer", "archive"}
    assert datum(db, 1, "buffer")["checksum"] == checksum(loc)


def test_classic_error_with_placeholder_location_is_healed_without_touching_files(tmp_path):
    """The classic tape download wrote 'n/a' as location of a failed copy: nothing to remove."""
    cfg = classic_sites(tmp_path)
    db = mongomock_db()
    name = NAMES[0]
    loc = make_raw(str(tmp_path / "daq"), name)
    classic_run(db, 1, name, [daq_record(loc, checksum(loc)),
                              {"host": "buffer", "type": "raw", "status": "error",
                               "location": "n/a", "checksum": "n/a",
                               "creation_time": ago(days=2)}])
    passes(cfg, db)
    assert hosts_with(db, 1) == {"daq", "buffer", "archive"}


# ---- Rucio/TSM records: never block, counted only where the config opts in ------------------
def test_a_run_whose_only_other_datum_is_a_rucio_record_is_copied(tmp_path):
    cfg = classic_sites(tmp_path)
    db = mongomock_db()
    name = NAMES[0]
    loc = make_raw(str(tmp_path / "daq"), name)
    classic_run(db, 1, name, [daq_record(loc), rucio_record(name)])
    passes(cfg, db)
    assert hosts_with(db, 1) == {"daq", "buffer", "archive", "rucio-catalogue"}
    assert datum(db, 1, "daq")["checksum"] == checksum(loc)


def test_unverifiable_copies_count_toward_min_copies_only_where_opted_in(tmp_path):
    name = NAMES[0]

    def setting(tmp, purge):
        cfg = classic_sites(tmp, buffer_purge=purge)
        db = mongomock_db()
        loc = make_raw(str(tmp / "daq"), name)
        classic_run(db, 1, name, [daq_record(loc, checksum(loc)), tsm_record(name),
                                  rucio_record(name)])
        passes(cfg, db, n=2)
        return db

    # daq and archive are the two other verified copies; tape makes the third only if opted in
    db = setting(tmp_path / "a", {"min_copies": 3})
    assert hosts_with(db, 1) == {"daq", "buffer", "archive", "tsm-server", "rucio-catalogue"}
    db = setting(tmp_path / "b", {"min_copies": 3, "count_unverified_at": ["tsm-server"]})
    assert hosts_with(db, 1) == {"daq", "archive", "tsm-server", "rucio-catalogue"}
    assert not os.path.exists(tmp_path / "b" / "buffer" / "raw" / name)


def test_count_unverified_at_is_checked(tmp_path):
    cfg = classic_sites(tmp_path, buffer_purge={"count_unverified_at": "tsm-server"})
    with pytest.raises(cfgmod.ConfigError, match="purge.count_unverified_at"):
        cfgmod.load(cfg)


# ---- cax runs add takes what the classic code wrote ----------------------------------------
def test_runs_add_accepts_classic_statuses_and_hosts(tmp_path):
    doc = {"runs_db": str(tmp_path / "test.runsdb"), "sites": [
        {"name": "daq", "directory": str(tmp_path / "daq")}]}
    os.makedirs(tmp_path / "daq")
    (tmp_path / "cax.json").write_text(json.dumps(doc))
    init_store(doc["runs_db"])
    name = NAMES[0]
    run = {"number": 1, "name": name, "detector": "tpc", "start": "2016-03-15T14:32:00+00:00",
           "data": [{"host": "daq", "type": "raw", "status": "transferred",
                     "location": str(tmp_path / "daq" / name), "checksum": None},
                    {"host": "rucio-catalogue", "type": "raw", "status": "RSEreupload",
                     "location": "n/a", "checksum": "n/a", "rse": [], "rule_info": "no_rule"},
                    {"host": "tsm-server", "type": "raw", "status": "failed",
                     "location": f"/tsm/raw/{name}", "checksum": MD5},
                    {"host": "rucio-catalogue", "type": "processed", "pax_version": "v6.8.0",
                     "status": "transferred", "location": f"x1t_SR000_{name}_tpc:v6.8.0",
                     "checksum": ADLER32}]}
    src = tmp_path / "runs.json"
    src.write_text(json.dumps([run]))
    result = CliRunner().invoke(cli, ["--config", str(tmp_path / "cax.json"), "runs", "add",
                                      str(src)])
    assert result.exit_code == 0, result.output
    from cax.runsdb import connect
    stored = connect(cfgmod.load(str(tmp_path / "cax.json"))).run_by(number=1)
    assert [d["status"] for d in stored["data"]] == ["transferred", "RSEreupload", "failed",
                                                    "transferred"]
    # still refused: a datum cax acts on with no usable location, and statuses nobody wrote
    for bad, needle in (({"host": "daq", "status": "transferred", "location": "n/a"}, "location"),
                        ({"host": "daq", "status": "lost"}, "status"),
                        ({"host": "nowhere", "status": "transferred"}, "host")):
        broken = copy.deepcopy(run)
        broken["data"][0].update(bad)
        src.write_text(json.dumps(broken))
        result = CliRunner().invoke(cli, ["--config", str(tmp_path / "cax.json"), "runs", "add",
                                          str(src)])
        assert result.exit_code != 0 and needle in result.output + (result.stderr or ""), \
            (bad, result.output)


# ---- the must-show: a pass over every classic shape ----------------------------------------
@pytest.fixture(params=["embedded", "wire"])
def store(request, tmp_path):
    """A Runs DB on the embedded store and on the wire server (SecantusDB through pymongo)."""
    if request.param == "embedded":
        from cax.runsdb.embedded import EmbeddedClient
        client = EmbeddedClient(tmp_path / "classic.sqlite")
        request.addfinalizer(client.close)
        coll = client["run"]["runs_new"]
    else:
        import pymongo
        client = pymongo.MongoClient(request.getfixturevalue("wire_uri"), tz_aware=True,
                                     serverSelectionTimeoutMS=10_000)
        request.addfinalizer(client.close)
        dbname = f"cax_classic_{os.getpid()}_{id(request)}"
        request.addfinalizer(lambda: client.drop_database(dbname))
        coll = client[dbname]["runs_new"]
    db = RunsDB(coll)
    db.ensure_indexes()
    return db


def test_a_pass_over_every_classic_document_shape(tmp_path, store):
    """Every copy the config asks for is made, no good datum becomes ``error``, nothing is
    purged early (buffer purges with three other copies: the unverifiable records are not
    counted there), and the records cax cannot verify are left exactly as they were."""
    db = store
    cfg = classic_sites(tmp_path, buffer_purge={"min_copies": 3})
    locs = {n: make_raw(str(tmp_path / "daq"), n) for n in NAMES}
    sums = {n: checksum(loc) for n, loc in locs.items()}
    a, b, c, d, e = NAMES
    processed = tmp_path / "buffer" / "processed" / "pax_v6.8.0"
    processed.mkdir(parents=True)
    root = processed / f"{e}.root"
    root.write_bytes(os.urandom(500))
    classic_run(db, 1, a, [daq_record(locs[a]), rucio_record(a)])
    classic_run(db, 2, b, [daq_record(locs[b], sums[b]), tsm_record(b),
                           rucio_record(b, "RSEreupload", "n/a"), rucio_record(b, "failed")
                           | {"host": "lfc"}])
    classic_run(db, 3, c, [daq_record(locs[c], sums[c]),
                           {"host": "buffer", "type": "raw", "status": "transferring",
                            "location": partial_copy(tmp_path, "buffer", c, locs[c]),
                            "checksum": None, "creation_time": ago(days=3)}])
    classic_run(db, 4, d, [daq_record(locs[d], sums[d]),
                           {"host": "buffer", "type": "raw", "status": "error",
                            "location": partial_copy(tmp_path, "buffer", d, locs[d]),
                            "checksum": None, "creation_time": ago(days=2)}, tsm_record(d)])
    classic_run(db, 5, e, [daq_record(locs[e], sums[e]),
                           {"host": "buffer", "type": "processed", "pax_version": "v6.8.0",
                            "pax_hash": "4f5a1b2", "creation_place": "buffer",
                            "status": "transferred", "location": str(root),
                            "checksum": checksum(str(root)), "creation_time": ago(days=8)},
                           rucio_record(e) | {"type": "processed", "pax_version": "v6.8.0"}])
    unverifiable = {n: [copy.deepcopy(x) for x in db.run_by(number=n)["data"]
                        if x["host"] not in HOSTS] for n in range(1, 6)}
    passes(cfg, db)
    for number, name in enumerate(NAMES, 1):
        run = db.run_by(number=number)
        assert not [x for x in run["data"] if x["status"] == "error"], run["data"]
        raw = {x["host"]: x for x in run["data"] if x["type"] == "raw" and x["host"] in HOSTS}
        assert set(raw) == set(HOSTS), (name, run["data"])
        assert {x["status"] for x in raw.values()} == {"transferred"}, (name, run["data"])
        assert {x["checksum"] for x in raw.values()} == {sums[name]}, name
        assert os.path.isdir(tmp_path / "buffer" / "raw" / name), name  # not purged early
        assert [x for x in run["data"] if x["host"] not in HOSTS] == unverifiable[number]
    pulled = datum(db, 5, "archive", "processed")
    assert pulled is not None and pulled["status"] == "transferred"
    assert pulled["checksum"] == checksum(str(root))
    assert datum(db, 5, "buffer", "processed")["status"] == "transferred"
