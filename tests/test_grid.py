"""Grid storage end to end against two real XRootD servers (tests/xrootd.py): a local DAQ site
pushes raw data to XRootD site A (verified by the storage's own adler32), site B receives it
from A by a third-party copy, and a local site pulls it back from B; every copy ``transferred``
with the reference checksum. And the classic 2018 ``gfal-copy`` sites load as reachable."""
import json
import logging
import os

import pytest

from cax import config as cfgmod
from cax.checksum import checksum, directory_digest
from cax.daemon import run_pass
from tests.helpers import context, init_store, make_raw, mongomock_db, run_doc, statuses

CLASSIC_2018 = os.path.join(os.path.dirname(__file__), "data", "classic", "cax_2018.json")


def grid_config(tmp_path, a, b, tpc_b=True, checksum_type="adler32"):
    """daq (local) -> A (push), A -> B (third party, B's download_options), B -> back (pull)."""
    site_a, site_b = a.site(name="grid-a"), b.site(name="grid-b")
    doc = {"runs_db": str(tmp_path / "test.runsdb"), "sites": [
        {"name": "daq", "directory": str(tmp_path / "daq"), "upload_options": ["grid-a"],
         "data_type": ["raw"], "checksum_type": checksum_type, "max_retries": 2,
         "retry_delay": 0},
        {"name": "grid-a", "method": "gfal", "hostname": a.url, "dir_raw": site_a.dirs["raw"],
         "data_type": ["raw"]},
        {"name": "grid-b", "method": "gfal-copy", "hostname": b.url, "dir_raw": site_b.dirs["raw"],
         "data_type": ["raw"], "download_options": ["grid-a"]},
        {"name": "back", "directory": str(tmp_path / "back"), "download_options": ["grid-b"],
         "data_type": ["raw"], "max_retries": 2, "retry_delay": 0},
    ]}
    for s in (doc["sites"][0], doc["sites"][3]):
        os.makedirs(s["directory"], exist_ok=True)
    path = tmp_path / "cax.json"
    path.write_text(json.dumps(doc))
    init_store(doc["runs_db"])
    return str(path), site_a, site_b


def passes(cfg, db, hosts=("daq", "back"), n=3):
    for _ in range(n):
        for host in hosts:
            run_pass(context(cfg, host, db))


def test_daq_to_grid_a_third_party_to_grid_b_and_back(tmp_path, xrootd, xrootd_b, caplog):
    caplog.set_level(logging.INFO)
    cfg, site_a, site_b = grid_config(tmp_path, xrootd, xrootd_b)
    assert cfgmod.load(cfg).site("grid-b").method == "gfal"
    db = mongomock_db()
    name = "170101_0000"
    loc = make_raw(str(tmp_path / "daq"), name, nfiles=4, size=300_000)
    db.insert_run(run_doc(1, name, loc))
    passes(cfg, db)
    assert statuses(db, 1) == {(h, "raw"): "transferred" for h in ("daq", "grid-a", "grid-b",
                                                                    "back")}
    run = db.collection.find_one({"number": 1})
    want = checksum(loc, "adler32")
    assert run["references"][0]["checksum_type"] == "adler32"
    for d in run["data"]:
        assert (d["checksum"], d["checksum_type"]) == (want, "adler32"), d["host"]
    # the grid copies were verified by the storage's own per-file adler32, combined as cax does
    from cax.transfer.gfal import GfalMethod
    for site in (site_a, site_b):
        with GfalMethod(site) as m:
            per_file = m.file_checksums(os.path.join(site.dirs["raw"], name))
        assert len(per_file) == 5 and directory_digest("adler32", per_file.values()) == want
    assert checksum(str(tmp_path / "back" / name), "adler32") == want
    said = [r.getMessage() for r in caplog.records if "copy done" in r.getMessage()]
    assert any("third-party" in m and "grid-b" in m for m in said), said
    assert not any("streamed" in m for m in said), said


def test_a_refused_third_party_copy_is_streamed_and_says_so(tmp_path, xrootd, caplog):
    """Server B without ``ofs.tpc`` cannot pull from A: the copy goes through this host."""
    from tests.xrootd import XrootdServer
    plain = XrootdServer(name="notpc", tpc=False).start()
    try:
        caplog.set_level(logging.INFO)
        cfg, _a, site_b = grid_config(tmp_path, xrootd, plain)
        db = mongomock_db()
        loc = make_raw(str(tmp_path / "daq"), "170101_0100")
        db.insert_run(run_doc(1, "170101_0100", loc))
        passes(cfg, db)
        assert statuses(db, 1)[("grid-b", "raw")] == "transferred"
        said = [r.getMessage() for r in caplog.records if "copy done" in r.getMessage()
                and "grid-b" in r.getMessage()]
        assert len(said) == 1 and "streamed (third-party copy refused" in said[0], said
        assert os.path.isdir(os.path.join(site_b.dirs["raw"], "170101_0100"))
    finally:
        plain.stop()


def test_sha512_reference_is_kept_and_grid_copies_are_read_back(tmp_path, xrootd, xrootd_b):
    """A DAQ on the default sha512: the reference stays sha512 and the grid copies are held to
    it (like with like), read back through gfal2 since the storage computes only adler32."""
    cfg, _a, _b = grid_config(tmp_path, xrootd, xrootd_b, checksum_type="sha512")
    db = mongomock_db()
    loc = make_raw(str(tmp_path / "daq"), "170101_0200")
    db.insert_run(run_doc(1, "170101_0200", loc))
    passes(cfg, db)
    run = db.collection.find_one({"number": 1})
    assert run["references"][0]["checksum_type"] == "sha512"
    assert {(d["host"], d["status"], d["checksum"], d["checksum_type"]) for d in run["data"]} == \
        {(h, "transferred", checksum(loc), "sha512") for h in ("daq", "grid-a", "grid-b", "back")}


def test_classic_2018_gfal_copy_sites_load_as_reachable():
    config = cfgmod.load(CLASSIC_2018)
    grid = [s for s in config.sites.values() if s.raw.get("method") == "gfal-copy"]
    assert {s.name for s in grid} == {"lfc", "osg-connect-srm", "midway-srm", "cnaf-srm",
                                      "nikhef-srm", "wipp-srm"}
    for s in grid:
        assert s.method == "gfal" and s.unreachable is None, s.name
        assert config.reach_problem(s.name) is None, s.name
    from cax.transfer.gfal import GfalMethod
    m = GfalMethod(config.site("cnaf-srm"))
    assert m.url("/xenon/xenon1t/170101_0000") == \
        "srm://storm-fe-archive.cr.cnaf.infn.it:8444/srm/managerv2?SFN=/xenon/xenon1t/170101_0000"


def test_srm_site_without_the_plugin_is_unreachable_this_pass_with_the_package_named():
    """SRM cannot be tested here (no SRM server, no gfal2-plugin-srm): connecting says so."""
    from cax.transfer import ServiceUnavailable
    from cax.transfer.gfal import GfalMethod
    site = cfgmod.load(CLASSIC_2018).site("midway-srm")
    m = GfalMethod(site)
    try:
        have = None
        m.session.start()
        have = [p.split("-")[0] for p in m.session.hello["plugins"]]
    finally:
        m.close()
    if "srm" in have:
        pytest.skip("gfal2-plugin-srm is installed here: nothing to say about its absence")
    with pytest.raises(ServiceUnavailable, match="no srm plugin.*gfal2-plugin-srm"):
        with GfalMethod(site):
            pass
