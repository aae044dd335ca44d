"""Classic Runs DB records that made cax lose or condemn good data (issue 12).

- A Rucio record's adler32 (no ``checksum_type``) was taken for a run's reference: AddChecksum
  then flagged the DAQ's own sha512 as differing, and RetryBadChecksumTransfer, counting the
  Rucio record as "a good copy elsewhere", removed the DAQ's files: the run's only copy.
- A copy restored from tape by the classic cax carries the tape client's MD5 (no
  ``checksum_type``): CompareChecksums compared it with the sha512 reference as if it were one,
  and flagged the good copy ``error``.
- A record at a host a site trusts (``purge.count_unverified_at``) whose sha512 differs from the
  reference is a bad copy: it never counts.
"""
from __future__ import annotations

import json
import os

from cax.checksum import checksum
from cax.daemon import run_pass
from cax.runsdb import copies
from tests.helpers import context, make_raw, mongomock_db
from tests.test_classic_documents import (MD5, NAMES, classic_run, classic_sites, daq_record,
                                          datum, rucio_record, tsm_record)


def test_a_rucio_adler32_never_gets_the_daqs_only_copy_removed(tmp_path):
    cfg = classic_sites(tmp_path)
    db = mongomock_db()
    name = NAMES[0]
    loc = make_raw(str(tmp_path / "daq"), name)
    digest = checksum(loc)
    classic_run(db, 1, name, [daq_record(loc), rucio_record(name)])
    for _ in range(2):
        run_pass(context(cfg, "daq", db))
    assert os.path.isdir(loc) and checksum(loc) == digest
    daq = datum(db, 1, "daq")
    assert daq is not None and daq["status"] == "transferred" and daq["checksum"] == digest


def test_a_tape_restored_copy_is_never_flagged_for_its_md5(tmp_path):
    cfg = classic_sites(tmp_path)
    db = mongomock_db()
    name = NAMES[0]
    loc = make_raw(str(tmp_path / "daq"), name)
    restored = make_raw(str(tmp_path / "buffer" / "raw"), name)
    classic_run(db, 1, name, [daq_record(loc, checksum(loc)),
                              {"host": "buffer", "type": "raw", "status": "transferred",
                               "location": restored, "checksum": MD5}])
    # the DAQ's sha512 recorded as the reference, as cax records it once it verified the DAQ
    db.set_reference(db.run_by(number=1)["_id"], "raw", None, "sha512", checksum(loc), "daq")
    for _ in range(2):
        run_pass(context(cfg, "buffer", db))
    assert datum(db, 1, "buffer")["status"] == "transferred"
    assert os.path.isdir(restored)


def test_a_trusted_hosts_record_with_another_sha512_never_counts():
    ref = {"checksum": "a" * 128, "checksum_type": "sha512", "host": "daq"}
    good = dict(tsm_record("r"), checksum="a" * 128)
    bad = dict(tsm_record("r"), checksum="b" * 128)
    run = {"data": [bad]}
    assert copies.good_copies(run, "raw", None, ref, trusted=("tsm-server",)) == []
    assert copies.good_copies({"data": [tsm_record("r")]}, "raw", None, ref,
                              trusted=("tsm-server",)) == [tsm_record("r")]
    assert copies.good_copies({"data": [tsm_record("r")]}, "raw", None, ref) == []
    assert copies.good_copies({"data": [good]}, "raw", None, ref) == [good]


def test_the_scrub_never_flags_a_record_whose_checksum_it_cannot_compute(tmp_path):
    """The scrub re-hashed a tape-restored copy (MD5) and one with ``"n/a"`` as sha512 and
    flagged both ``corrupt``: good copies turned into errors that heal by deletion."""
    cfg = classic_sites(tmp_path)
    doc = json.loads((tmp_path / "cax.json").read_text())
    doc["sites"][1]["scrub"] = True
    (tmp_path / "cax.json").write_text(json.dumps(doc))
    db = mongomock_db()
    for number, (name, value) in enumerate(zip(NAMES, (MD5, "n/a")), 1):
        loc = make_raw(str(tmp_path / "daq"), name)
        restored = make_raw(str(tmp_path / "buffer" / "raw"), name)
        classic_run(db, number, name, [daq_record(loc, checksum(loc)),
                                       {"host": "buffer", "type": "raw", "status": "transferred",
                                        "location": restored, "checksum": value}])
    run_pass(context(cfg, "buffer", db))
    for number in (1, 2):
        assert datum(db, number, "buffer")["status"] == "transferred", number
