"""Transitions that drifted apart while they were written by hand in each task (issue 11).

Real components: the embedded store (cax's default Runs DB), real files and the real tasks.
"""
import os

from cax import config as cfgmod
from cax.daemon import run_pass
from cax.runsdb import connect
from cax.tasks.retry import RetryBadChecksumTransfer
from cax.tasks.size import AddSize
from tests.purge_helpers import add_run, ctx, sites_config

NAME = "160301_1200"


def datum(db, host, number=1):
    run = db.collection.find_one({"number": number})
    return next((d for d in run["data"] if d["host"] == host), None)


def test_size_mismatch_has_a_kind_and_heals_like_other_bad_copies(tmp_path):
    """A copy whose size differs from the reference site's was written ``error`` with no
    ``error_kind``, so no healing task ever picked it up: it stayed bad for good."""
    cfg = sites_config(tmp_path, names=("daq", "buffer"),
                       extra={"daq": {"upload_options": ["buffer"]}})
    db = connect(cfgmod.load(cfg))
    add_run(db, tmp_path, 1, {"daq": "transferred", "buffer": "transferred"}, ref_host="daq")
    d = datum(db, "buffer")
    d["source"], d["creation_place"] = "daq", "daq"
    db.collection.update_one({"number": 1}, {"$set": {"data.1": d}})
    AddSize(ctx(cfg, "daq", db)).go()
    with open(os.path.join(d["location"], "f0.bin"), "ab") as f:
        f.write(b"padded")                      # the copy's bytes are no longer the source's
    AddSize(ctx(cfg, "buffer", db)).go()
    bad = datum(db, "buffer")
    assert bad["status"] == "error" and "differs from reference copy at daq" in bad["error"]
    assert bad.get("error_kind") == "size", bad
    RetryBadChecksumTransfer(ctx(cfg, "buffer", db)).go()
    assert datum(db, "buffer") is None, "the bad copy was not healed (removed for a new copy)"
    assert not os.path.exists(d["location"])
    assert datum(db, "daq")["status"] == "transferred"
    assert db.collection.find_one({"number": 1})["retries"] == 1
    run_pass(ctx(cfg, "daq", db))              # sent again from the good copy, verified
    again = datum(db, "buffer")
    assert again["status"] == "transferred", again
    assert again["checksum"] == datum(db, "daq")["checksum"]
