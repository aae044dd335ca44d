"""Grid copies under a real fault: the destination XRootD server SIGKILLed mid-copy (a push from
the DAQ, and a third-party copy between two XRootD sites). Nothing stands under the final name,
the datum says what happened (an ``error`` and its ``error_kind``), and once the server is back
later passes make the copy whole."""
import os

from cax.checksum import checksum
from cax.daemon import run_pass
from tests.faults.test_transfer_faults import KillWhen, datum
from tests.helpers import context, mongomock_db, run_doc, statuses
from tests.test_grid import grid_config

import pytest

NAME = "170101_0000"
MIB = 1 << 20
FILE = 24 * MIB


@pytest.mark.parametrize("hop", ["push", "third-party"])
def test_storage_killed_mid_copy_leaves_no_final_name_and_a_recorded_error(
        tmp_path, xrootd, xrootd_b, hop):
    cfg, site_a, site_b = grid_config(tmp_path, xrootd, xrootd_b)
    db = mongomock_db()
    src = os.path.join(str(tmp_path / "daq"), NAME)
    os.makedirs(src)
    for i in range(3):
        with open(os.path.join(src, f"f{i}.bin"), "wb") as f:
            f.write(os.urandom(FILE))
    db.insert_run(run_doc(1, NAME, src))
    run_pass(context(cfg, "daq", db))  # the daq verifies its own copy
    # the daq's next pass pushes to A and then (CopyThirdParty) has B receive it from A
    host, dest, server, site = (("daq", "grid-a", xrootd, site_a) if hop == "push"
                                else ("daq", "grid-b", xrootd_b, site_b))
    final = os.path.join(site.dirs["raw"], NAME)
    trigger = KillWhen(server, site.dirs["raw"], FILE // 2,
                       settle=lambda: None)  # the copy's next call sees the dead server
    run_pass(context(cfg, host, db, stop=trigger))
    assert trigger.killed_at is not None and trigger.killed_at < 3 * FILE, \
        "the copy ended before the kill"
    assert not os.path.lexists(final), "a copy cut short stands under its final name"
    d = datum(db, dest)
    assert d is not None and d["status"] in ("error", "retrying"), d
    assert d["error"] and "\n" not in d["error"] and d.get("error_kind"), d

    server.start()
    for _ in range(4):  # retry (removes what the kill left), copy, verify
        run_pass(context(cfg, host, db))
        assert not os.path.lexists(final) or checksum(final, "adler32") == checksum(src, "adler32")
    assert statuses(db, 1)[(dest, "raw")] == "transferred", datum(db, dest)
    assert datum(db, dest)["checksum"] == checksum(src, "adler32")
    assert sorted(os.listdir(site.dirs["raw"])) == [NAME]  # no partial copy left over
