"""The task pipeline end to end over local sites (mongomock Runs DB: fast unit level)."""
import os

from cax.checksum import checksum
from cax.daemon import run_pass
from tests.helpers import context, make_raw, mongomock_db, run_doc, statuses, three_sites


def passes(cfg, db, n=2, **kw):
    for _ in range(n):
        for host in ("daq", "buffer", "archive"):
            run_pass(context(cfg, host, db, **kw))


def test_runs_flow_daq_buffer_archive(tmp_path):
    cfg = three_sites(tmp_path)
    db = mongomock_db()
    for i, name in enumerate(["160315_1432", "160315_1532"]):
        loc = make_raw(str(tmp_path / "daq"), name)
        db.insert_run(run_doc(i + 1, name, loc))
    passes(cfg, db)
    for n, name in ((1, "160315_1432"), (2, "160315_1532")):
        assert statuses(db, n) == {("daq", "raw"): "transferred", ("buffer", "raw"): "transferred",
                                   ("archive", "raw"): "transferred"}
        run = db.collection.find_one({"number": n})
        sums = {d["checksum"] for d in run["data"]}
        assert sums == {checksum(str(tmp_path / "daq" / name))}
        assert run["references"][0]["host"] == "daq"
        assert os.path.isdir(tmp_path / "archive" / name)
        assert sorted(os.listdir(tmp_path / "buffer")) == ["160315_1432", "160315_1532"]


def test_classic_transferred_origin_without_checksum_is_checksummed_before_any_copy(tmp_path):
    """A classic DAQ record (transferred, no checksum): pushing it first would fail every copy."""
    cfg = three_sites(tmp_path)
    db = mongomock_db()
    loc = make_raw(str(tmp_path / "daq"), "160315_1432")
    db.insert_run(run_doc(1, "160315_1432", loc, status="transferred"))
    run_pass(context(cfg, "daq", db))
    run = db.collection.find_one({"number": 1})
    assert statuses(db, 1) == {("daq", "raw"): "transferred"}  # nothing pushed without a reference
    assert run["data"][0]["checksum"] == checksum(loc)
    assert run["references"][0]["checksum"] == checksum(loc)
    passes(cfg, db)
    assert statuses(db, 1) == {("daq", "raw"): "transferred", ("buffer", "raw"): "transferred",
                               ("archive", "raw"): "transferred"}
    run = db.collection.find_one({"number": 1})
    assert {d["checksum"] for d in run["data"]} == {checksum(loc)}


def test_embedded_store_finds_origins_without_checksum(tmp_path):
    from cax.config import load
    from cax.runsdb import connect
    cfg = three_sites(tmp_path)
    db = connect(load(cfg))
    loc = make_raw(str(tmp_path / "daq"), "160315_1432")
    db.insert_run(run_doc(1, "160315_1432", loc, status="transferred"))
    passes(cfg, db)
    assert statuses(db, 1) == {("daq", "raw"): "transferred", ("buffer", "raw"): "transferred",
                               ("archive", "raw"): "transferred"}
