"""Builders for the purge and admin tests: N local sites, runs with real copies at chosen sites."""
from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone

from cax import config as cfgmod
from cax.checksum import checksum
from cax.tasks.base import Context
from tests.helpers import init_store, make_raw

SITES = ("daq", "buffer", "archive", "tape", "cloud")


def sites_config(tmp_path, names=SITES, purge=None, runs_db=None, extra=None):
    """One local site per name, each with its own directory; ``purge`` maps name -> purge setting."""
    purge = purge or {}
    extra = extra or {}
    doc = {"runs_db": runs_db or str(tmp_path / "test.runsdb"), "sites": []}
    for n in names:
        d = str(tmp_path / n)
        os.makedirs(d, exist_ok=True)
        site = {"name": n, "directory": d, "data_type": ["raw", "processed"]}
        if n in purge:
            site["purge"] = purge[n]
        site.update(extra.get(n, {}))
        doc["sites"].append(site)
    path = tmp_path / "cax.json"
    path.write_text(json.dumps(doc))
    init_store(doc["runs_db"])
    return str(path)


def add_run(db, tmp_path, number, copies, name=None, start=None, dtype="raw", version=None,
            ref_host=None):
    """Insert a run with one real copy per entry of ``copies``: host -> status or (status, 'bad'|
    'nosum'). The reference checksum is the real one of the data (recorded at ``ref_host``)."""
    name = name or f"1603{number:02d}_1200"
    start = start or datetime(2016, 3, 15, tzinfo=timezone.utc) + timedelta(hours=number)
    data = []
    digest = None
    for host, spec in copies.items():
        status, quality = (spec, "good") if isinstance(spec, str) else spec
        root = str(tmp_path / host) if dtype == "raw" else str(tmp_path / host / version)
        loc = make_raw(root, name, nfiles=2, size=100) if digest is None else _clone(root, name, src)
        if digest is None:
            src = loc
            digest = checksum(loc)
        d = {"host": host, "type": dtype, "status": status, "location": loc,
             "checksum_type": "sha512",
             "checksum": {"good": digest, "bad": "0" * 128, "nosum": None}[quality]}
        if version is not None:
            d["pax_version"] = version
        data.append(d)
    refs = [{"type": dtype, "pax_version": version, "checksum": digest, "checksum_type": "sha512",
             "host": ref_host or next(iter(copies))}]
    db.collection.insert_one({"number": number, "name": name, "detector": "tpc", "start": start,
                              "data": data, "references": refs})
    return db.collection.find_one({"number": number})


def _clone(root, name, src):
    import shutil
    dst = os.path.join(root, name)
    os.makedirs(root, exist_ok=True)
    shutil.copytree(src, dst)
    return dst


def ctx(config_path, host, db, **kw):
    return Context(config=cfgmod.load(config_path), host=host, db=db, **kw)


def copies(db, number, dtype="raw"):
    run = db.collection.find_one({"number": number})
    return {d["host"]: d["status"] for d in run["data"] if d["type"] == dtype}
