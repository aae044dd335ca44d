"""Cost of daemon passes over large Runs DBs: queries and seconds, against the naive per-run pattern.

Usage::

    PYTHONPATH=. python benchmarks/loop.py [--quick] [--sizes 1000,10000,100000]
                                           [--backend embedded,wire[,mongodb]] [--naive-budget S]

For each backend and size it builds an *idle* Runs DB (every run has its raw data ``transferred`` at
daq, buffer and archive with the reference checksum, as in ``tests/test_safety.py::idle_pass_calls``)
with one bulk ``insert_many`` (indexes created afterwards by ``cax.runsdb.connect``), then measures:

(a) idle: one ``run_pass`` at each of the three sites (every task cax has), real mode;
(b) 1 %: the same with 1 % of the runs lacking their archive copy (so CopyPull at archive has work),
    in dry-run (``Context(dry_run=True)``, ``RunsDB(dry_run=True)``: every read, no write);
(c) naive: what the original cax did: per site, per task, one ``find`` of all run ids and then one
    ``find_one`` by ``_id`` per run. It is timed for real until ``--naive-budget`` seconds are used
    and the remainder is extrapolated at the measured rate (marked ``~`` in the table).

Queries are counted where they reach the store: a wrapper counts every call on the collection object
(``find``, ``find_one``, ``update_one``, ...). For pymongo backends a ``CommandListener`` also counts
wire round trips (``find`` + ``getMore`` + writes) and sums their client-side durations ("DB s").

Backends: ``embedded`` (cax's SQLite + mongomock store, in this process), ``wire`` (SecantusDB's
``secantusd-py`` as a separate process on loopback: a stand-in for MongoDB, not MongoDB),
``mongodb`` (a real server from ``CAX_TEST_MONGO_URI``, when set).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone

from tests.waiting import WaitTimeout, free_port, wait_for_port

HOSTS = ("daq", "buffer", "archive")


# -- documents and config ---------------------------------------------------------------------------

def make_docs(n: int, root: str) -> list:
    """``n`` idle runs of realistic shape (about 1 KB of BSON each)."""
    t0 = datetime(2016, 3, 15, tzinfo=timezone.utc)
    docs = []
    for i in range(n):
        start = t0 + timedelta(minutes=30 * i)
        name = start.strftime("%y%m%d_%H%M")
        ck = f"{i:0128x}"
        data = [{"host": h, "type": "raw", "status": "transferred", "checksum": ck,
                 "checksum_type": "sha512", "location": os.path.join(root, h, "raw", name),
                 "size": 10_000_000_000 + i, "files": 100, "creation_time": start + timedelta(hours=1),
                 "creation_place": h, "source": None if h == "daq" else "daq",
                 "reference_checked": True}
                for h in HOSTS]
        docs.append({"_id": i + 1, "number": i, "name": name, "detector": "tpc", "start": start,
                     "end": start + timedelta(minutes=30), "tags": [],
                     "trigger": {"events_built": 100_000 + i, "status": "processed"},
                     "reader": {"ini": {"name": "background_stable", "run_mode": "ZLE"}},
                     "source": {"type": "none"}, "data": data,
                     "references": [{"type": "raw", "pax_version": None, "checksum": ck,
                                     "checksum_type": "sha512", "host": "daq",
                                     "time": start + timedelta(hours=1)}]})
    return docs


def write_config(root: str, runs_db: str, database: str = "run") -> str:
    doc = {"runs_db": runs_db, "database": database, "lock_dir": root, "sites": [
        {"name": "daq", "directory": os.path.join(root, "daq"), "upload_options": ["buffer"],
         "data_type": ["raw"]},
        {"name": "buffer", "directory": os.path.join(root, "buffer"), "data_type": ["raw"]},
        {"name": "archive", "directory": os.path.join(root, "archive"),
         "download_options": ["buffer"], "data_type": ["raw"]},
    ]}
    for s in doc["sites"]:
        os.makedirs(os.path.join(s["directory"], "raw"), exist_ok=True)
    path = os.path.join(root, "cax.json")
    with open(path, "w") as f:
        json.dump(doc, f)
    return path


# -- counting ---------------------------------------------------------------------------------------

class WireCounter:
    """pymongo CommandListener: round trips and their summed client-side durations."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.commands = 0
        self.by_name: dict = {}
        self.micros = 0

    def started(self, event):
        if event.command_name in ("hello", "isMaster", "ismaster", "endSessions", "ping"):
            return
        self.commands += 1
        self.by_name[event.command_name] = self.by_name.get(event.command_name, 0) + 1

    def succeeded(self, event):
        if event.command_name not in ("hello", "isMaster", "ismaster", "endSessions", "ping"):
            self.micros += event.duration_micros

    def failed(self, event):
        self.succeeded(event)


_COUNTER = None


def wire_counter() -> WireCounter:
    """One global listener, registered before any MongoClient is made."""
    global _COUNTER
    if _COUNTER is None:
        from pymongo import monitoring

        class _L(monitoring.CommandListener):
            def started(self, e):
                _COUNTER.started(e)

            def succeeded(self, e):
                _COUNTER.succeeded(e)

            def failed(self, e):
                _COUNTER.failed(e)

        _COUNTER = WireCounter()
        monitoring.register(_L())
    return _COUNTER


# -- the wire server --------------------------------------------------------------------------------

class WireServer:
    """``secantusd-py`` in its own process (so its CPU is not charged to the measured client)."""

    def __init__(self, storage: str):
        exe = shutil.which("secantusd-py") or os.path.join(os.path.dirname(sys.executable),
                                                             "secantusd-py")
        if not os.path.exists(exe):
            raise FileNotFoundError("secantusd-py (PyPI SecantusDB) is not installed")
        os.makedirs(storage, exist_ok=True)
        conf = storage.rstrip("/") + ".secantusd.toml"
        with open(conf, "w"):
            pass  # an empty config disables the launcher's auto-discovery
        self.port = free_port()
        self.log = open(storage.rstrip("/") + ".log", "ab")
        self.proc = subprocess.Popen(
            [exe, "--config", conf, "--host", "127.0.0.1", "--port", str(self.port),
             "--storage-path", storage, "--log-level", "WARNING"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_port("127.0.0.1", self.port, 30, self.proc)
        except WaitTimeout:
            self.stop()
            raise TimeoutError("secantusd-py did not listen within 30 s") from None

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# -- building a Runs DB -----------------------------------------------------------------------------

def build(backend: str, n: int, root: str, uri: str | None = None):
    """Fill a fresh Runs DB with ``n`` idle runs; returns (config path, RunsDB, build seconds)."""
    from cax import config as cfgmod
    from cax.runsdb import connect

    docs = make_docs(n, root)
    t = time.perf_counter()
    if backend == "embedded":
        from cax.runsdb.embedded import open_collection

        path = os.path.join(root, "runs.sqlite")
        # before the indexes exist: mongomock checks a unique index by scanning every document
        coll = open_collection(path)
        coll.insert_many(docs)
        coll._client.close()
        cfg = write_config(root, path)
    else:
        import pymongo

        database = f"cax_bench_{os.getpid()}_{n}"
        client = pymongo.MongoClient(uri, tz_aware=True)
        client.drop_database(database)
        coll = client[database]["runs_new"]
        for i in range(0, n, 10_000):
            coll.insert_many(docs[i:i + 10_000], ordered=False)
        client.close()
        cfg = write_config(root, uri, database)
    del docs
    config = cfgmod.load(cfg)
    db = connect(config)  # creates the indexes (and, embedded, loads the cache)
    return config, db, time.perf_counter() - t


def drop(backend: str, config, db):
    if backend == "embedded":
        db.collection._client.close()
    else:
        db.collection.database.client.drop_database(config.database)
        db.collection.database.client.close()


# -- measurements -----------------------------------------------------------------------------------

def measure_pass(config, db, *, dry_run: bool) -> dict:
    from cax.daemon import run_pass
    from cax.runsdb import RunsDB
    from cax.tasks.base import Context
    from tests.helpers import CountingCollection  # the query-count tests' counter

    raw = db.collection
    counting = CountingCollection(raw)
    rdb = RunsDB(counting, dry_run=dry_run)
    wc = _COUNTER
    if wc:
        wc.reset()
    looked = {}
    t = time.perf_counter()
    for host in HOSTS:
        stats = run_pass(Context(config=config, host=host, db=rdb, dry_run=dry_run))
        for k, v in stats.items():
            looked[f"{host}:{k}"] = v
    seconds = time.perf_counter() - t
    bad = {k: v for k, v in looked.items() if v < 0}
    if bad:
        raise RuntimeError(f"tasks failed: {bad}")
    return {"calls": counting.calls, "runsdb_queries": rdb.queries, "seconds": seconds,
            "looked": looked, "wire": (wc.commands if wc else None),
            "wire_by": (dict(wc.by_name) if wc else None),
            "db_seconds": (wc.micros / 1e6 if wc else None)}


def measure_naive(config, db, budget: float) -> dict:
    """Original cax: per site and task, list run ids, then one find_one by _id per run."""
    from cax.daemon import build_tasks
    from cax.tasks.base import Context

    coll = db.collection
    plan = []  # (host, task) pairs, as the daemon would run them
    for host in HOSTS:
        for cls in build_tasks(Context(config=config, host=host, db=db)):
            plan.append((host, cls.__name__))
    proj = {"name": 1, "number": 1, "data": 1, "references": 1}
    done = 0
    total = 0
    t = time.perf_counter()
    extrapolated = False
    ids = None
    list_s = finds_s = 0.0  # the listing and the per-run find_one are extrapolated separately
    finds = 0
    for _host, _task in plan:
        t0 = time.perf_counter()
        ids = [d["_id"] for d in coll.find({}, {"_id": 1}).sort([("number", 1)])]
        list_s = time.perf_counter() - t0
        done += 1
        total += 1 + len(ids)
        t0 = time.perf_counter()
        for _id in ids:
            coll.find_one({"_id": _id}, proj)
            done += 1
            finds += 1
            if time.perf_counter() - t > budget:
                extrapolated = True
                break
        finds_s += time.perf_counter() - t0
        if extrapolated:
            break
    elapsed = time.perf_counter() - t
    if extrapolated:
        total = len(plan) * (1 + len(ids))
        seconds = len(plan) * (list_s + len(ids) * finds_s / max(finds, 1))
    else:
        seconds = elapsed
    return {"queries": total, "seconds": seconds, "measured_queries": done,
            "extrapolated": extrapolated, "tasks_sites": len(plan)}


def one(backend: str, n: int, budget: float, uri: str | None, verbose: bool) -> dict:
    root = tempfile.mkdtemp(prefix=f"cax-loop-{backend}-{n}-")
    try:
        config, db, build_s = build(backend, n, root, uri)
        raw = db.collection
        # no warm-up pass: connect() already loaded the embedded cache and opened the connection
        before = raw.count_documents({"data": {"$size": 3}})
        idle = measure_pass(config, db, dry_run=False)
        # a daemon's later passes: same process, nothing changed. The embedded store builds a
        # query's view the second time it sees it, so the third pass shows the steady state.
        measure_pass(config, db, dry_run=False)
        idle["again_s"] = measure_pass(config, db, dry_run=False)["seconds"]
        assert raw.count_documents({"data": {"$size": 3}}) == before == n, "idle pass wrote"
        # 1 %: every 100th run lacks its archive copy (one update_many, not measured)
        lacking = {"number": {"$in": list(range(0, n, 100))}}
        raw.update_many(lacking, {"$pull": {"data": {"host": "archive"}}})
        work = measure_pass(config, db, dry_run=True)
        want = len(range(0, n, 100))
        got = work["looked"].get("archive:CopyPull")
        assert got == want, f"CopyPull at archive looked at {got} runs, expected {want}"
        naive = measure_naive(config, db, budget)
        row = {"backend": backend, "n": n, "build_s": build_s, "idle": idle, "work": work,
               "naive": naive}
        if verbose:
            print(json.dumps(row, default=str), file=sys.stderr)
        drop(backend, config, db)
        return row
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- output -----------------------------------------------------------------------------------------

def fmt_table(rows: list) -> str:
    head = ["backend", "N", "queries idle", "round trips idle", "s idle", "s idle 3rd", "DB s idle",
            "queries 1%", "round trips 1%", "s 1%", "naive queries", "naive s", "ratio"]
    lines = []
    for r in rows:
        i, w, nv = r["idle"], r["work"], r["naive"]
        lines.append([
            r["backend"], f"{r['n']:,}", str(i["calls"]),
            "-" if i["wire"] is None else str(i["wire"]), f"{i['seconds']:.2f}",
            f"{i['again_s']:.2f}",
            "-" if i["db_seconds"] is None else f"{i['db_seconds']:.2f}",
            str(w["calls"]), "-" if w["wire"] is None else str(w["wire"]),
            f"{w['seconds']:.2f}", ("~" if nv["extrapolated"] else "") + f"{nv['queries']:,}",
            ("~" if nv["extrapolated"] else "") + f"{nv['seconds']:.1f}",
            f"{nv['seconds'] / max(i['seconds'], 1e-9):.0f}x"])
    widths = [max(len(h), *(len(l[k]) for l in lines)) for k, h in enumerate(head)]
    sep = "  ".join("=" * w for w in widths)
    out = [sep, "  ".join(h.ljust(w) for h, w in zip(head, widths)), sep]
    out += ["  ".join(c.ljust(w) for c, w in zip(l, widths)) for l in lines]
    out.append(sep)
    return "\n".join(out)


def runs_looked_at(rows: list) -> str:
    """Which tasks read how many runs in the idle pass (the candidates each query returned)."""
    out = []
    for r in rows:
        busy = {k: v for k, v in r["idle"]["looked"].items() if v}
        out.append(f"{r['backend']} N={r['n']:,}: idle pass runs returned per site:task: "
                   + (", ".join(f"{k}={v:,}" for k, v in busy.items()) or "none")
                   + (f"; wire commands {r['idle']['wire_by']}" if r['idle']['wire_by'] else ""))
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="sizes 1000,5000; naive budget 3 s")
    ap.add_argument("--sizes", help="comma-separated run counts (default 1000,10000,100000)")
    ap.add_argument("--backend", default=None,
                    help="comma-separated: embedded,wire[,mongodb] (mongodb when "
                         "CAX_TEST_MONGO_URI is set)")
    ap.add_argument("--naive-budget", type=float, default=None,
                    help="seconds of real naive queries per backend and size before "
                         "extrapolating (default 60, quick 5)")
    ap.add_argument("-v", "--verbose", action="store_true", help="raw results as JSON on stderr")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in (args.sizes or ("1000,5000" if args.quick
                                             else "1000,10000,100000")).split(",")]
    backends = (args.backend or "embedded,wire" + (",mongodb" if os.environ.get(
        "CAX_TEST_MONGO_URI") else "")).split(",")
    budget = args.naive_budget if args.naive_budget is not None else (3.0 if args.quick else 60.0)
    # SIGTERM unwinds like Ctrl-C, so the wire server and temporary directories are cleaned up
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    import logging

    logging.basicConfig(level=logging.WARNING)
    rows = []
    server = None
    try:
        for backend in backends:
            uri = None
            if backend == "wire":
                wire_counter()
                server = WireServer(tempfile.mkdtemp(prefix="cax-loop-secantus-") + "/data")
                uri = server.uri
            elif backend == "mongodb":
                wire_counter()
                uri = os.environ.get("CAX_TEST_MONGO_URI")
                if not uri:
                    print("mongodb: CAX_TEST_MONGO_URI not set; skipped", file=sys.stderr)
                    continue
            for n in sizes:
                t = time.perf_counter()
                rows.append(one(backend, n, budget, uri, args.verbose))
                print(f"{backend} N={n:,}: built in {rows[-1]['build_s']:.1f} s, "
                      f"all measurements in {time.perf_counter() - t:.1f} s", file=sys.stderr,
                      flush=True)
            if server is not None:
                server.stop()
                shutil.rmtree(os.path.dirname(server.log.name), ignore_errors=True)
                server = None
    finally:
        if server is not None:
            server.stop()
    print(f"Machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} "
          f"(shared machine: timings are noisy). '~' = extrapolated from a timed sample.")
    print(fmt_table(rows))
    print(runs_looked_at(rows))
    return rows


if __name__ == "__main__":
    main()
