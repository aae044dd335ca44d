"""AddSize and SetPermission."""
import os
import stat

import mongomock
import pytest

from cax.runsdb import RunsDB
from cax.tasks.permission import SetPermission, dir_mode
from cax.tasks.size import AddSize, measure
from tests.helpers import make_raw
from tests.purge_helpers import add_run, ctx, sites_config


def fresh_db():
    return RunsDB(mongomock.MongoClient(tz_aware=True)["run"]["runs_new"])


def datum(db, number, host):
    return next(d for d in db.collection.find_one({"number": number})["data"] if d["host"] == host)


def test_add_size_records_and_flags_mismatch(tmp_path):
    cfg = sites_config(tmp_path)
    db = fresh_db()
    add_run(db, tmp_path, 1, {"daq": "transferred", "buffer": "transferred"})
    AddSize(ctx(cfg, "daq", db)).go()
    d = datum(db, 1, "daq")
    assert (d["size"], d["files"]) == measure(d["location"]) and d["files"] == 3
    AddSize(ctx(cfg, "buffer", db)).go()
    assert datum(db, 1, "buffer")["status"] == "transferred"
    assert datum(db, 1, "buffer")["size"] == d["size"]
    # a truncated copy at archive
    add_run(db, tmp_path, 2, {"daq": "transferred", "archive": "transferred"})
    AddSize(ctx(cfg, "daq", db)).go()
    with open(os.path.join(datum(db, 2, "archive")["location"], "f0.bin"), "ab") as f:
        f.write(b"extra")
    AddSize(ctx(cfg, "archive", db)).go()
    bad = datum(db, 2, "archive")
    assert bad["status"] == "error" and "differs from reference copy at daq" in bad["error"]
    assert bad["size"] == datum(db, 2, "daq")["size"] + 5


def test_add_size_compares_with_the_reference_site_only(tmp_path):
    """A bad copy measured before the reference copy must not make the reference copy the odd one."""
    cfg = sites_config(tmp_path)
    db = fresh_db()
    add_run(db, tmp_path, 2, {"daq": "transferred", "archive": "transferred"}, ref_host="daq")
    with open(os.path.join(datum(db, 2, "archive")["location"], "f0.bin"), "ab") as f:
        f.write(b"extra")
    AddSize(ctx(cfg, "archive", db)).go()      # the reference copy has no size yet: wait
    assert "size" not in datum(db, 2, "archive")
    AddSize(ctx(cfg, "daq", db)).go()
    AddSize(ctx(cfg, "archive", db)).go()
    assert datum(db, 2, "daq")["status"] == "transferred"
    assert datum(db, 2, "archive")["status"] == "error"


def test_add_size_missing_data_is_error(tmp_path):
    import shutil
    cfg = sites_config(tmp_path)
    db = fresh_db()
    add_run(db, tmp_path, 1, {"daq": "transferred"})
    shutil.rmtree(datum(db, 1, "daq")["location"])
    AddSize(ctx(cfg, "daq", db)).go()
    assert datum(db, 1, "daq")["status"] == "error"
    assert "data missing" in datum(db, 1, "daq")["error"]


def test_set_permission_mode_and_group(tmp_path):
    import grp
    group = grp.getgrgid(os.getgid()).gr_name
    cfg = sites_config(tmp_path, extra={"daq": {"mode": "0640", "group": group}})
    db = fresh_db()
    add_run(db, tmp_path, 1, {"daq": "transferred"})
    SetPermission(ctx(cfg, "daq", db)).go()
    d = datum(db, 1, "daq")
    assert d["permissions_set"] is True
    for dirpath, dirs, files in os.walk(d["location"]):
        assert stat.S_IMODE(os.stat(dirpath).st_mode) == 0o750 == dir_mode(0o640)
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_gid == os.getgid()


def test_set_permission_failure_recorded_on_datum(tmp_path):
    cfg = sites_config(tmp_path, extra={"daq": {"group": "no-such-group-cax"}})
    db = fresh_db()
    add_run(db, tmp_path, 1, {"daq": "transferred"})
    SetPermission(ctx(cfg, "daq", db)).go()
    d = datum(db, 1, "daq")
    assert d["status"] == "transferred" and "unknown group" in d["permissions_error"]
    assert "permissions_set" not in d


def test_local_method_tree_counts_regular_files_only(tmp_path):
    from cax.transfer.base import SourceNotFound
    from cax.transfer.local import LocalMethod
    d = make_raw(str(tmp_path), "run1", nfiles=3, size=1000)
    os.symlink("/etc/passwd", os.path.join(d, "link"))
    m = LocalMethod(None)
    assert m.tree(d) == (1000 + 1001 + 1002 + 1, 4)
    assert m.tree(os.path.join(d, "f0.bin")) == (1000, 1)
    with pytest.raises(SourceNotFound):
        m.tree(str(tmp_path / "nope"))


def test_local_tree_counts_like_the_remote_helper(tmp_path):
    """A FIFO (or socket) is no regular file on either side: the counts compare like with like."""
    import subprocess

    from cax.transfer import remote_hash
    from cax.transfer.base import local_tree
    d = make_raw(str(tmp_path), "run1", nfiles=2, size=10)
    os.mkfifo(os.path.join(d, "stream"))
    os.symlink("f0.bin", os.path.join(d, "link"))
    out = subprocess.run(remote_hash.argv("tree", d), capture_output=True, text=True, check=True)
    assert local_tree(d) == tuple(int(x) for x in out.stdout.split()) == (10 + 11 + 1, 3)
