"""Change-stream wake-up: a new run is acted on in seconds, not at the next hourly poll."""
import os
import signal

from cax.config import load
from cax.runsdb import connect
from cax.wakeup import interesting
from tests.helpers import make_raw, run_doc, three_sites
from tests.test_daemon import _drain, cax
from tests.waiting import wait_for


def test_new_run_wakes_a_daemon_polling_hourly(tmp_path, wire_uri):
    cfg = three_sites(tmp_path, runs_db=wire_uri, database="cax_wake_" + os.urandom(4).hex(),
                      wake_on_change=True)
    db = connect(load(cfg))
    daemon = cax("--config", cfg, "--host", "daq", "--interval", "3600")
    try:
        wait_for(lambda: "pass 1 end" in _drain(daemon), what="first (idle) pass")
        loc = make_raw(str(tmp_path / "daq"), "160101_0000")
        db.insert_run(run_doc(1, "160101_0000", loc))
        wait_for(lambda: db.run_by(number=1)["data"][0]["status"] == "transferred", timeout=30,
                 what="the new run verified by the woken daemon")
        assert "woken by a Runs DB change" in _drain(daemon)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.communicate(timeout=60)
    assert daemon.returncode == 0


def test_heartbeats_do_not_wake():
    assert interesting({"operationType": "insert"})
    assert interesting({"operationType": "update",
                        "updateDescription": {"updatedFields": {"data.2.status": "error"}}})
    assert interesting({"operationType": "update",
                        "updateDescription": {"updatedFields": {"data.3": {"host": "x"}}}})
    assert not interesting({"operationType": "update",
                            "updateDescription": {"updatedFields": {"data.2.heartbeat": 1}}})
    assert not interesting({"operationType": "delete"})


def test_embedded_store_falls_back_to_polling(tmp_path):
    from cax.wakeup import Waker
    db = connect(load(three_sites(tmp_path)))
    assert not Waker(db.collection, enabled=True).enabled
