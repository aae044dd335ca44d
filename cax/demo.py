"""The README demo: three local sites, a few runs with real raw files, data flowing through.

It runs the real command line (``cax --once --host X`` for each site in turn) and prints each command
as it goes, so what the admin watches is exactly what cron would run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone

from cax import children, python_m

SITES = ("daq", "buffer", "archive")

#: the demo's "processor": summarises a raw run into one small JSON file, as a stand-in for pax
#: (no braces: command arguments are format templates)
PROCESSOR = (
    "import json, os, sys; raw, out, version = sys.argv[1:4]; "
    "files = [os.path.join(d, f) for d, _, fs in os.walk(raw) for f in fs]; "
    "json.dump(dict(version=version, files=len(files), "
    "bytes=sum(os.path.getsize(f) for f in files)), open(out, 'w'))"
)


def write_config(root: str) -> str:
    config = {
        "runs_db": "cax.runsdb",
        "interval": 10,
        "sites": [
            {"name": "daq", "method": "local", "directory": "daq",
             "upload_options": ["buffer"], "download_options": None, "data_type": ["raw"]},
            {"name": "buffer", "method": "local", "directory": "buffer",
             "upload_options": None, "download_options": None, "data_type": ["raw"]},
            {"name": "archive", "method": "local", "dir_raw": "archive/raw",
             "dir_processed": "archive/processed", "upload_options": None,
             "download_options": ["buffer"], "data_type": ["raw", "processed"],
             "processing": {
                 "backend": "local", "versions": ["v1.0"], "max_queued": 4,
                 "command": [sys.executable, "-P", "-c", PROCESSOR, "{input}", "{output}",
                             "{version}"],
                 "state_dir": "batch", "log_dir": "logs"}},
        ],
    }
    path = os.path.join(root, "cax.json")
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
    return path


def make_runs(root: str, nruns: int) -> str:
    """Raw data for ``nruns`` runs at the DAQ, and their run documents."""
    start = datetime(2016, 3, 15, 14, 32, tzinfo=timezone.utc)
    docs = []
    for i in range(nruns):
        t = start + timedelta(hours=i)
        name = t.strftime("%y%m%d_%H%M")
        raw = os.path.join(root, "daq", name)
        os.makedirs(os.path.join(raw, "events"), exist_ok=True)
        for j in range(4):
            with open(os.path.join(raw, "events", f"xenon100_{j:06d}.zip"), "wb") as f:
                f.write(os.urandom(256 * 1024))
        with open(os.path.join(raw, ".pax_settings"), "w") as f:
            f.write(f"run {name}\n")
        docs.append({"number": 1000 + i, "name": name, "detector": "tpc",
                     "start": t.isoformat(), "end": (t + timedelta(minutes=50)).isoformat(),
                     "trigger": {"events_built": 1000 * (i + 1)},
                     "data": [{"host": "daq", "type": "raw", "status": "verifying",
                               "location": os.path.abspath(raw),
                               "creation_time": t.isoformat(), "creation_place": "daq"}]})
    path = os.path.join(root, "runs.json")
    with open(path, "w") as f:
        json.dump(docs, f, indent=1)
    return path


def cax(*args) -> int:
    shown = " ".join(["cax", *args])
    print(f"$ {shown}", flush=True)
    return subprocess.call([*python_m("cax"), *args], env=children.environment())


def main(directory: str, nruns: int = 3) -> int:
    root = os.path.abspath(directory)
    if os.path.exists(os.path.join(root, "cax.json")):
        print(f"cax demo: {root} already holds a demo; remove it first", file=sys.stderr)
        return 2
    os.makedirs(root, exist_ok=True)
    config = write_config(root)
    runs = make_runs(root, nruns)
    print(f"demo: three sites under {root}: daq -> buffer (push) -> archive (pull)")
    if cax("--config", config, "runs", "add", runs) != 0:
        return 1
    for n in range(1, 9):
        print(f"\ndemo: pass {n}: each site's daemon runs once, as cron would run it")
        for site in SITES:
            if cax("--config", config, "--once", "--host", site) != 0:
                return 1
        done = complete(config)  # before the table, so the table is never behind the verdict
        print()
        cax("--config", config, "status")
        if done:
            print("\ndemo: every run is transferred at all three sites with equal checksums, "
                  "and processed (v1.0) at the archive")
            print(f"demo: try  .venv/bin/cax --config {config} status --json")
            return 0
    print("demo: FAILED: not every run reached all sites", file=sys.stderr)
    return 1


def complete(config: str) -> bool:
    out = subprocess.run([*python_m("cax"), "--config", config, "status", "--json"],
                         check=True, capture_output=True, text=True,
                         env=children.environment()).stdout
    for run in json.loads(out):
        sums = {d["host"]: (d["status"], d["checksum"]) for d in run["data"] if d["type"] == "raw"}
        if set(sums) != set(SITES) or any(s != "transferred" for s, _ in sums.values()) \
                or len({c for _, c in sums.values()}) != 1:
            return False
        processed = [d for d in run["data"] if d["type"] == "processed"]
        if [(d["host"], d["status"]) for d in processed] != [("archive", "transferred")]:
            return False
    return True
