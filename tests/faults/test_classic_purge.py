"""Classic purge meanings kept, and a refused location never costs a good datum (issue 12).

Real components: the embedded store (cax's default Runs DB), real files, the real tasks and one
real daemon pass. Each test here failed on the code before its fix (see the report of the branch
``classic-purge``):

- a refused location flipped the good datum to ``error`` (unsafe-location);
- ``purge.types: []`` purged raw data;
- CopyPull pulled raw data the site purged again in the same pass;
- ``pax_version_purge`` was an unknown key, warned about and ignored;
- the classic processed layout ``<dir_processed>/pax_<version>/<run>.root`` was refused by
  PurgeProcessed (and the datum flipped to ``error``), and never written.
"""
import json
import logging
import os
import re
from datetime import timedelta

import pytest

from cax import config as cfgmod
from cax.checksum import checksum
from cax.daemon import run_pass
from cax.runsdb import connect, now
from cax.tasks.checksum import AddChecksum
from cax.tasks.copy import CopyPull
from cax.tasks.process import output_path, settings
from cax.tasks.purge import BufferPurger, PurgeProcessed
from cax.tasks.scrub import VerifyCopies
from cax.tasks.size import AddSize
from tests.purge_helpers import add_run, copies, ctx, sites_config

NAME = "160301_1200"


def store(cfg):
    return connect(cfgmod.load(cfg))


def datum_at(db, host, number=1, dtype="raw"):
    run = db.collection.find_one({"number": number})
    return next((d for d in run["data"] if d["host"] == host and d["type"] == dtype), None)


def refusal_lines(caplog):
    """The log lines saying an action was refused (the test's own path may say 'refused')."""
    return [m for m in (r.getMessage() for r in caplog.records) if re.search(r" refused: ", m)]


# ---- 5. a refused location never turns a good datum into error ------------------------------
@pytest.mark.parametrize("dry_run", [False, True])
def test_refused_location_leaves_the_good_datum_as_it_was(tmp_path, caplog, dry_run):
    cfg = sites_config(tmp_path, purge={"buffer": {"min_copies": 1}})
    db = store(cfg)
    add_run(db, tmp_path, 1, {"daq": "transferred", "buffer": "transferred"})
    elsewhere = tmp_path / "buffer" / "old" / NAME   # not directly in the raw directory
    os.makedirs(elsewhere.parent)
    os.rename(tmp_path / "buffer" / NAME, elsewhere)
    db.collection.update_one({"number": 1}, {"$set": {"data.1.location": str(elsewhere)}})
    before = datum_at(db, "buffer")
    with caplog.at_level(logging.INFO, logger="cax"):
        BufferPurger(ctx(cfg, "buffer", db, dry_run=dry_run)).go()
    assert datum_at(db, "buffer") == before          # still transferred, no error written
    assert os.path.isdir(elsewhere)
    lines = refusal_lines(caplog)
    assert len(lines) == 1, lines
    assert f"run={NAME}" in lines[0] and "site=buffer" in lines[0] \
        and "datum=raw@buffer" in lines[0] and "refusing location" in lines[0], lines


def test_refused_processed_location_leaves_the_datum(tmp_path):
    cfg = sites_config(tmp_path, purge={"buffer": {"min_copies": 1, "versions": ["v1"]}})
    db = store(cfg)
    add_run(db, tmp_path, 1, {"buffer": "transferred", "archive": "transferred"},
            dtype="processed", version="v1")
    # names the whole version directory: deleting it would delete every run's v1 data
    db.collection.update_one({"number": 1}, {"$set": {
        "data.0.location": str(tmp_path / "buffer" / "v1")}})
    PurgeProcessed(ctx(cfg, "buffer", db)).go()
    d = datum_at(db, "buffer", dtype="processed")
    assert d["status"] == "transferred" and "error" not in d and "error_kind" not in d, d
    assert os.path.isdir(tmp_path / "buffer" / "v1" / NAME)


def test_scrub_refusing_a_location_leaves_the_datum(tmp_path, caplog):
    cfg = sites_config(tmp_path, extra={"buffer": {"scrub": True}})
    db = store(cfg)
    add_run(db, tmp_path, 1, {"daq": "transferred", "buffer": "transferred"})
    outside = tmp_path / "secret" / NAME
    os.makedirs(outside.parent)
    os.rename(tmp_path / "buffer" / NAME, outside)
    db.collection.update_one({"number": 1}, {"$set": {"data.1.location": str(outside)}})
    with caplog.at_level(logging.INFO, logger="cax"):
        VerifyCopies(ctx(cfg, "buffer", db)).go()
    d = datum_at(db, "buffer")
    assert d["status"] == "transferred" and "error_kind" not in d, d
    assert any("refused" in m and "refusing location" in m for m in refusal_lines(caplog))


# ---- 2. purge.types: [] purges nothing -------------------------------------------------------
def test_empty_purge_types_purges_nothing(tmp_path):
    cfg = sites_config(tmp_path, purge={"buffer": {"min_copies": 1, "types": []}})
    db = store(cfg)
    add_run(db, tmp_path, 1, {"daq": "transferred", "buffer": "transferred",
                              "archive": "transferred"})
    BufferPurger(ctx(cfg, "buffer", db)).go()
    assert copies(db, 1)["buffer"] == "transferred"
    assert os.path.isdir(tmp_path / "buffer" / NAME)


# ---- 3. CopyPull skips what this site would purge in the same pass ---------------------------
def pulling_archive(tmp_path, purge):
    cfg = sites_config(tmp_path, names=("daq", "buffer", "archive"), purge={"archive": purge},
                       extra={"archive": {"download_options": ["buffer"]}})
    return cfg, store(cfg)


def test_pull_skips_raw_data_this_site_would_purge_right_away(tmp_path, caplog):
    cfg, db = pulling_archive(tmp_path, {"min_copies": 2, "older_than_days": 1})
    add_run(db, tmp_path, 1, {"daq": "transferred", "buffer": "transferred"})  # 2 others: purged
    add_run(db, tmp_path, 2, {"buffer": "transferred"})                        # archive needed
    add_run(db, tmp_path, 3, {"daq": "transferred", "buffer": "transferred"},  # too young yet
            start=now() - timedelta(hours=1))
    with caplog.at_level(logging.DEBUG, logger="cax"):
        CopyPull(ctx(cfg, "archive", db)).go()
    assert "archive" not in copies(db, 1)
    assert copies(db, 2)["archive"] == "transferred"
    assert copies(db, 3)["archive"] == "transferred"
    assert not os.path.exists(tmp_path / "archive" / "160301_1200")
    assert any("160301_1200" in m and "would purge" in m for m in
               (r.getMessage() for r in caplog.records)), caplog.text
    # and a whole pass there leaves run 1 alone: nothing pulled, nothing to remove again
    run_pass(ctx(cfg, "archive", db))
    assert "archive" not in copies(db, 1)
    assert copies(db, 2)["archive"] == "transferred"


def test_pull_skips_a_version_this_site_purges(tmp_path):
    cfg, db = pulling_archive(tmp_path, {"min_copies": 1, "versions": ["v1"], "types": []})
    add_run(db, tmp_path, 1, {"buffer": "transferred", "daq": "transferred"},
            dtype="processed", version="v1")
    add_run(db, tmp_path, 2, {"buffer": "transferred", "daq": "transferred"},
            dtype="processed", version="v2")
    CopyPull(ctx(cfg, "archive", db)).go()
    assert "archive" not in copies(db, 1, "processed")
    assert copies(db, 2, "processed")["archive"] == "transferred"


# ---- 1. pax_version_purge is honoured, under the invariant -----------------------------------
def test_pax_version_purge_is_honoured_never_the_last_copy(tmp_path, caplog):
    cfg = sites_config(tmp_path, names=("daq", "buffer", "archive"),
                       extra={"buffer": {"pax_version_purge": "v1", "pax_versions": ["v2"]}})
    with caplog.at_level(logging.WARNING, logger="cax.config"):
        site = cfgmod.load(cfg).site("buffer")
    notes = [r.getMessage() for r in caplog.records if "pax_version_purge" in r.getMessage()]
    assert len(notes) == 1 and "unknown" not in notes[0] and '"versions": ["v1"]' in notes[0], \
        notes
    assert site.purge["versions"] == ["v1"] and site.purge["types"] == []
    db = store(cfg)
    add_run(db, tmp_path, 1, {"buffer": "transferred", "archive": "transferred"},
            dtype="processed", version="v1")
    add_run(db, tmp_path, 2, {"buffer": "transferred"}, dtype="processed", version="v1")  # last
    add_run(db, tmp_path, 3, {"buffer": "transferred", "archive": "transferred"},
            dtype="processed", version="v2")
    add_run(db, tmp_path, 4, {"daq": "transferred", "buffer": "transferred",
                              "archive": "transferred"})   # raw: the key asks nothing of it
    run_pass(ctx(cfg, "buffer", db))
    assert copies(db, 1, "processed") == {"archive": "transferred"}
    assert not os.path.exists(tmp_path / "buffer" / "v1" / "160301_1200")
    assert copies(db, 2, "processed") == {"buffer": "transferred"}
    assert os.path.isdir(tmp_path / "buffer" / "v1" / "160302_1200")
    assert copies(db, 3, "processed")["buffer"] == "transferred"
    assert copies(db, 4)["buffer"] == "transferred"


def test_pax_version_purge_with_classic_integer_purge(tmp_path):
    cfg = sites_config(tmp_path, extra={"buffer": {"purge": 3, "pax_version_purge": "v0.9"}})
    purge = cfgmod.load(cfg).site("buffer").purge
    assert purge["types"] == ["raw"] and purge["older_than_days"] == 3
    assert purge["versions"] == ["v0.9"] and purge["min_copies"] == 2


def test_pax_version_purge_of_a_current_version_is_not_retired(tmp_path, caplog):
    """Processing would make it again and the purge remove it again, every pass."""
    cfg = sites_config(tmp_path, extra={"buffer": {"pax_version_purge": "v2",
                                                   "pax_versions": ["v2"]}})
    with caplog.at_level(logging.WARNING, logger="cax.config"):
        assert cfgmod.load(cfg).site("buffer").purge is None
    assert "'v2' is also a current version here" in caplog.text


@pytest.mark.parametrize("value", [None, ""])
def test_empty_pax_version_purge_purges_nothing(tmp_path, value):
    cfg = sites_config(tmp_path, extra={"buffer": {"pax_version_purge": value}})
    assert cfgmod.load(cfg).site("buffer").purge is None


# ---- 4. the classic processed layout: <dir_processed>/pax_<version>/<run>.root --------------
def add_classic_processed(db, tmp_path, number, hosts, version="v6.8.0", classic_fields=True):
    """A processed run as the classic cax wrote it: one ROOT file per copy under
    ``pax_<version>``, no ``source``, no ``references``, no ``checksum_type``."""
    name = f"1603{number:02d}_1200"
    payload = os.urandom(300 + number)
    data = []
    for host in hosts:
        d = tmp_path / host / f"pax_{version}"
        os.makedirs(d, exist_ok=True)
        f = d / f"{name}.root"
        f.write_bytes(payload)
        data.append({"host": host, "type": "processed", "status": "transferred",
                     "location": str(f), "checksum": checksum(str(f)), "pax_version": version,
                     "pax_hash": "abc123", "creation_time": now() - timedelta(days=400),
                     "creation_place": host})
    db.collection.insert_one({"number": number, "name": name, "detector": "tpc",
                              "start": now() - timedelta(days=400), "data": data})
    return [tmp_path / h / f"pax_{version}" / f"{name}.root" for h in hosts]


def test_purge_processed_deletes_a_classic_layout_copy(tmp_path):
    cfg = sites_config(tmp_path, purge={"buffer": {"min_copies": 1, "versions": ["v6.8.0"],
                                                   "types": []}})
    db = store(cfg)
    here, there = add_classic_processed(db, tmp_path, 1, ["buffer", "archive"])
    AddSize(ctx(cfg, "buffer", db)).go()          # the size task reads the file
    assert isinstance(datum_at(db, "buffer", dtype="processed").get("size"), int)
    PurgeProcessed(ctx(cfg, "buffer", db)).go()
    assert copies(db, 1, "processed") == {"archive": "transferred"}
    assert not here.exists() and there.exists()


def test_checksum_of_a_classic_layout_copy(tmp_path):
    cfg = sites_config(tmp_path)
    db = store(cfg)
    (f,) = add_classic_processed(db, tmp_path, 1, ["buffer"])
    db.collection.update_one({"number": 1}, {"$set": {"data.0.checksum": None}})
    AddChecksum(ctx(cfg, "buffer", db)).go()
    d = datum_at(db, "buffer", dtype="processed")
    assert d["status"] == "transferred" and d["checksum"] == checksum(str(f)), d


def classic_layout_site(tmp_path, **processing):
    doc = json.loads((tmp_path / "cax.json").read_text())
    for s in doc["sites"]:
        if s["name"] == "buffer":
            s["processed_layout"] = "classic"
            if processing:
                s["processing"] = dict(processing, versions=["v6.8.0"],
                                       command=["true", "{input}", "{output}"])
    (tmp_path / "cax.json").write_text(json.dumps(doc))


def test_processing_writes_the_classic_layout_where_the_site_keeps_it(tmp_path):
    cfg = sites_config(tmp_path)
    classic_layout_site(tmp_path, backend="local")
    site = cfgmod.load(cfg).site("buffer")
    assert output_path(site, settings(site), NAME, "v6.8.0") == \
        str(tmp_path / "buffer" / "pax_v6.8.0" / f"{NAME}.root")
    other = cfgmod.load(cfg).site("archive")   # the default layout is unchanged
    assert output_path(other, settings(other), NAME, "v6.8.0") == \
        str(tmp_path / "archive" / "v6.8.0" / NAME)


def test_pull_into_a_classic_layout_site_lands_there(tmp_path):
    cfg = sites_config(tmp_path, names=("buffer", "archive"),
                       extra={"buffer": {"download_options": ["archive"]}})
    classic_layout_site(tmp_path)
    db = store(cfg)
    add_run(db, tmp_path, 1, {"archive": "transferred"}, dtype="processed", version="v1")
    CopyPull(ctx(cfg, "buffer", db)).go()
    d = datum_at(db, "buffer", dtype="processed")
    assert d["status"] == "transferred" and d["location"] == \
        str(tmp_path / "buffer" / "pax_v1" / NAME), d


def test_unknown_processed_layout_is_a_config_error_naming_the_key(tmp_path):
    cfg = sites_config(tmp_path, extra={"buffer": {"processed_layout": "flat"}})
    with pytest.raises(cfgmod.ConfigError, match="processed_layout"):
        cfgmod.load(cfg)


# ---- a pass over a Runs DB holding classic processed documents -------------------------------
def test_pass_over_classic_processed_documents(tmp_path):
    """buffer retires v6.8.0 (classic key) and keeps v6.10.0; classic documents throughout.
    Nothing is purged early (the current version, the last copy of the retired one, raw data)
    and no good datum becomes ``error``; the retired copy with another good copy goes."""
    cfg = sites_config(tmp_path, names=("daq", "buffer", "archive"),
                       extra={"buffer": {"pax_version_purge": "v6.8.0",
                                         "pax_versions": ["v6.10.0"]}})
    db = store(cfg)
    retired_here, retired_there = add_classic_processed(db, tmp_path, 1, ["buffer", "archive"])
    (last,) = add_classic_processed(db, tmp_path, 2, ["buffer"])
    current = add_classic_processed(db, tmp_path, 3, ["buffer", "archive"], version="v6.10.0")
    add_run(db, tmp_path, 4, {"daq": "transferred", "buffer": "transferred",
                              "archive": "transferred"})
    run_pass(ctx(cfg, "buffer", db))
    for run in db.collection.find({}):
        for d in run["data"]:
            assert d["status"] == "transferred" and "error_kind" not in d, (run["name"], d)
    assert copies(db, 1, "processed") == {"archive": "transferred"}
    assert not retired_here.exists() and retired_there.exists()
    assert last.exists() and copies(db, 2, "processed") == {"buffer": "transferred"}
    assert all(f.exists() for f in current)
    assert copies(db, 3, "processed") == {"buffer": "transferred", "archive": "transferred"}
    assert copies(db, 4)["buffer"] == "transferred"
