"""Compare candidate embedded Runs DB stores: which required operations work, and how fast.

Usage: ``PYTHONPATH=. python benchmarks/store_candidates.py [--quick]``. Prints one table of
pass/fail per operation (with what went wrong) and one of speeds. Runs in well under a minute.

Candidates: cax's own ``embedded`` store (SQLite + mongomock), ``montydb`` (SQLite storage),
``mongita`` (disk), and for reference ``mongomock`` (in memory only) and ``wire`` (SecantusDB server
in-process through pymongo; GPL, test-only, never a runtime choice).
"""
from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import sys
import tempfile
import time
import traceback

from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError

UTC = datetime.timezone.utc


# -- openers (top level, so spawned processes can use them) ---------------------------------------

def open_embedded(path):
    from cax.runsdb.embedded import open_collection

    return open_collection(os.path.join(path, "runs.sqlite"))


def open_montydb(path):
    from montydb import MontyClient, set_storage

    if not os.path.exists(os.path.join(path, "monty.storage.cfg")):
        set_storage(path, storage="sqlite")
    return MontyClient(path)["run"]["runs_new"]


def open_mongita(path):
    from mongita import MongitaClientDisk

    return MongitaClientDisk(path)["run"]["runs_new"]


_MOCK = {}


def open_mongomock(path):
    import mongomock

    return _MOCK.setdefault(path, mongomock.MongoClient(tz_aware=True))["run"]["runs_new"]


_WIRE = {}


def open_wire(path):
    import pymongo

    if "server" not in _WIRE:
        from secantus import SecantusDBServer

        _WIRE["server"] = SecantusDBServer(storage_path=":memory:")
        _WIRE["server"].__enter__()
    uri = _WIRE["server"].uri
    db = "bench_" + os.path.basename(path).replace(".", "_")
    return pymongo.MongoClient(uri, tz_aware=True)[db]["runs_new"]


CANDIDATES = {
    "embedded": open_embedded,
    "montydb": open_montydb,
    "mongita": open_mongita,
    "mongomock": open_mongomock,
    "wire": open_wire,
}
PERSISTENT = {"embedded", "montydb", "mongita"}  # on disk, reachable from other processes

A = {"host": "a", "type": "raw", "status": "transferred"}
B = {"host": "b", "type": "raw", "status": "transferring"}
P = {"host": "b", "type": "processed", "pax_version": "v6", "status": "transferring"}


def _doc(n, *data, **kw):
    return {"number": n, "name": f"r{n}", "data": [dict(d) for d in data], **kw}


class Fail(Exception):
    pass


def expect(cond, what):
    if not cond:
        raise Fail(what)


# -- checks: each gets a fresh collection and raises on failure -----------------------------------

def c_insert_find(c, path, opener):
    _id = c.insert_one(_doc(1, A)).inserted_id
    got = c.find_one({"_id": _id})
    expect(got is not None and got["data"] == [A], f"find_one gave {got!r}")
    r = c.insert_many([_doc(i) for i in range(2, 5)])
    expect(len(r.inserted_ids) == 3 and c.count_documents({}) == 4, "insert_many/count_documents")


def c_unique(c, path, opener):
    c.create_index("number", unique=True)
    c.insert_one(_doc(1))
    try:
        c.insert_one(_doc(1))
    except DuplicateKeyError:
        pass
    else:
        raise Fail("duplicate accepted, no DuplicateKeyError")


def c_compound_unique(c, path, opener):
    c.create_index([("detector", 1), ("number", 1)], unique=True)
    c.insert_one({"detector": "tpc", "number": 1})
    c.insert_one({"detector": "mv", "number": 1})
    try:
        c.insert_one({"detector": "tpc", "number": 1})
    except DuplicateKeyError:
        pass
    else:
        raise Fail("duplicate accepted, no DuplicateKeyError")


def c_positional(c, path, opener):
    _id = c.insert_one(_doc(1, A, B, P)).inserted_id
    r = c.update_one({"_id": _id, "data": {"$elemMatch": {"host": "b", "type": "raw"}}},
                     {"$set": {"data.$.status": "verifying"}})
    got = c.find_one({"_id": _id})["data"]
    expect(r.modified_count == 1 and got == [A, dict(B, status="verifying"), P],
           f"modified {r.modified_count}, data {[d.get('status') for d in got]}")


def c_claim(c, path, opener):
    _id = c.insert_one(_doc(1, A)).inserted_id
    f = {"_id": _id, "data": {"$not": {"$elemMatch": {"host": "b", "type": "raw"}}}}
    r1 = c.update_one(f, {"$push": {"data": B}}).modified_count
    r2 = c.update_one(f, {"$push": {"data": B}}).modified_count
    expect((r1, r2) == (1, 0), f"claims modified {r1}, {r2}")
    expect(len(c.find_one({"_id": _id})["data"]) == 2, "wrong datum count")


def c_pull(c, path, opener):
    _id = c.insert_one(_doc(1, A, B)).inserted_id
    c.update_one({"_id": _id}, {"$pull": {"data": {"host": "b", "type": "raw"}}})
    expect(c.find_one({"_id": _id})["data"] == [A], "not pulled")


def c_inc_unset(c, path, opener):
    _id = c.insert_one(_doc(1, cnt=1, tmp=1)).inserted_id
    c.update_one({"_id": _id}, {"$inc": {"cnt": 2}, "$unset": {"tmp": ""}})
    d = c.find_one({"_id": _id})
    expect(d["cnt"] == 3 and "tmp" not in d, f"got {d}")


def c_update_many_upsert(c, path, opener):
    c.insert_many([_doc(i, det="tpc") for i in range(3)])
    r = c.update_many({"det": "tpc"}, {"$set": {"f": 1}})
    expect((r.matched_count, r.modified_count) == (3, 3), "update_many counts")
    r = c.update_one({"number": 9}, {"$set": {"f": 2}}, upsert=True)
    expect(r.upserted_id is not None and c.count_documents({}) == 4, "upsert")


def c_fou_positional(c, path, opener):
    _id = c.insert_one(_doc(1, A, B, P)).inserted_id
    d = c.find_one_and_update({"_id": _id, "data": {"$elemMatch": {"host": "b", "type": "raw"}}},
                              {"$set": {"data.$.status": "verifying"}},
                              return_document=ReturnDocument.AFTER)
    expect(d is not None and d["data"] == [A, dict(B, status="verifying"), P],
           "wrong element updated" if d else "returned None")


def c_sort_limit_projection(c, path, opener):
    c.insert_many([_doc(i, A, B) for i in (3, 1, 2)])
    got = [d["number"] for d in c.find({}, {"number": 1}).sort("number", -1).limit(2)]
    expect(got == [3, 2], f"sort/limit gave {got}")
    d = c.find_one({"number": 1}, {"data.host": 1, "_id": 0})
    expect(d == {"data": [{"host": "a"}, {"host": "b"}]}, f"sub-field projection gave {d}")


def c_distinct(c, path, opener):
    c.insert_many([_doc(1, A, B), _doc(2, A)])
    got = sorted(c.distinct("data.host"))
    expect(got == ["a", "b"], f"distinct gave {got}")


def c_datetime(c, path, opener):
    t = datetime.datetime(2016, 3, 15, 14, 32, 5, 123000, tzinfo=UTC)
    c.insert_one(_doc(1, start=t))
    got = c.find_one({"number": 1})["start"]
    expect(got.tzinfo is not None, f"naive datetime back: {got!r}")
    expect(got == t, f"{got!r} != {t!r}")


def c_reopen(c, path, opener):
    if opener not in (open_embedded, open_montydb, open_mongita):
        raise Fail("n/a: in memory only")
    _id = c.insert_one(_doc(1, A)).inserted_id
    c.update_one({"_id": _id}, {"$set": {"x": 1}})
    d = opener(path).find_one({"_id": _id})
    expect(d is not None and d.get("x") == 1, f"after reopen: {d}")


def _race_worker(opener_name, path, rounds, barrier, queue):
    try:
        c = CANDIDATES[opener_name](path)
        wins = 0
        for r in range(rounds):
            barrier.wait(timeout=60)
            key = {"host": f"s{r}", "type": "raw"}
            res = c.update_one({"_id": "run", "data": {"$not": {"$elemMatch": key}}},
                               {"$push": {"data": key}})
            wins += res.modified_count
        queue.put(("ok", wins))
    except Exception as e:  # report, so the parent can show what went wrong
        barrier.abort()
        queue.put(("error", f"{type(e).__name__}: {str(e)[:80]}"))


def c_cross_process(c, path, opener, nproc=4, rounds=20):
    name = {v: k for k, v in CANDIDATES.items()}[opener]
    if name not in PERSISTENT:
        raise Fail("n/a: in memory only")
    c.insert_one({"_id": "run", "data": []})
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(nproc), ctx.Queue()
    procs = [ctx.Process(target=_race_worker, args=(name, path, rounds, barrier, queue))
             for _ in range(nproc)]
    for p in procs:
        p.start()
    out = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    errors = [m for s, m in out if s == "error"]
    expect(not errors, errors[0] if errors else "")
    wins = sum(m for _, m in out)
    data = opener(path).find_one({"_id": "run"})["data"]
    expect(wins == rounds and len(data) == rounds,
           f"{wins} wins for {rounds} rounds, {len(data)} datums (double claims)")


CHECKS = [
    ("insert/find_one/count", c_insert_find),
    ("unique index", c_unique),
    ("compound unique", c_compound_unique),
    ("data.$ $set by $elemMatch", c_positional),
    ("$not/$elemMatch claim", c_claim),
    ("$pull", c_pull),
    ("$inc/$unset", c_inc_unset),
    ("update_many/upsert", c_update_many_upsert),
    ("find_one_and_update data.$", c_fou_positional),
    ("sort/limit/data.host proj.", c_sort_limit_projection),
    ("distinct data.host", c_distinct),
    ("tz-aware datetimes", c_datetime),
    ("persists across reopen", c_reopen),
    ("cross-process claim race", c_cross_process),
]


def run_check(name, opener, check, tmp):
    path = tempfile.mkdtemp(dir=tmp)
    try:
        check(opener(path), path, opener)
        return "pass"
    except Fail as e:
        msg = str(e) if str(e).startswith("n/a") else f"FAIL: {e}"
    except Exception as e:
        msg = f"FAIL: {type(e).__name__}: {str(e).splitlines()[0]}"
    return msg if len(msg) <= WIDTH else msg[:WIDTH - 3] + "..."


WIDTH = 48  # table cell width; the full reason is in docs/embedded-store.rst


# -- speed --------------------------------------------------------------------------------------

def timed(fn, budget):
    """Call fn() until ``budget`` seconds pass (at least once); return seconds per call."""
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        el = time.perf_counter() - t0
        if el > budget:
            return el / n


def speed(name, opener, tmp, ndocs, budget):
    path = tempfile.mkdtemp(dir=tmp)
    c = opener(path)
    res = {}
    i = iter(range(10**9))
    k = iter(range(10**9))

    def claim(by_id=False):
        key = {"host": f"h{next(k)}", "type": "raw"}
        f = {"_id": target["_id"]} if by_id else {"number": ndocs // 3}
        c.update_one(dict(f, data={"$not": {"$elemMatch": key}}), {"$push": {"data": key}})

    target = {}

    def bulk():
        t0 = time.perf_counter()
        c.insert_many([_doc(n, A, B, det="tpc") for n in range(ndocs)])
        return ndocs / (time.perf_counter() - t0)

    steps = [
        ("insert_one /s", lambda: 1 / timed(lambda: c.insert_one(_doc(-1 - next(i), A)), budget)),
        (f"insert_many of {ndocs} /s", bulk),
        ("create_index(number)", lambda: c.create_index("number") and None),
        (f"find_one by number, {ndocs} docs, ms",
         lambda: 1e3 * timed(lambda: c.find_one({"number": ndocs // 2}), budget)),
        (f"find 100, sort+proj., {ndocs} docs, ms",
         lambda: 1e3 * timed(lambda: list(
             c.find({"det": "tpc", "number": {"$gte": ndocs - 100}},
                    {"number": 1, "data.host": 1}).sort("number", 1).limit(100)), budget)),
        (f"claim ($push) by number, {ndocs} docs, ms", lambda: 1e3 * timed(claim, budget)),
        ("(fetch _id)", lambda: target.update(c.find_one({"number": ndocs // 4}, {"_id": 1}))),
        (f"find_one by _id, {ndocs} docs, ms",
         lambda: 1e3 * timed(lambda: c.find_one({"_id": target["_id"]}), budget)),
        (f"claim ($push) by _id, {ndocs} docs, ms",
         lambda: 1e3 * timed(lambda: claim(by_id=True), budget)),
    ]
    for label, step in steps:
        try:
            v = step()
        except Exception as e:
            v = f"n/a ({type(e).__name__})"
        if label.startswith(("create_index", "(")):
            continue
        res[label] = v
    return res


def table(headers, rows):
    widths = [max(len(str(r[i])) for r in [headers] + rows) for i in range(len(headers))]
    line = "+".join("-" * (w + 2) for w in widths)
    out = ["+" + line + "+"]
    fmt = lambda r: "| " + " | ".join(str(v).ljust(w) for v, w in zip(r, widths)) + " |"
    out += [fmt(headers), "+" + line.replace("-", "=") + "+"]
    out += [fmt(r) for r in rows]
    out.append("+" + line + "+")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller timing budgets")
    ap.add_argument("--docs", type=int, default=10_000)
    ap.add_argument("--only", nargs="*", default=list(CANDIDATES))
    args = ap.parse_args(argv)
    budget = 0.3 if args.quick else 1.0
    names = [n for n in CANDIDATES if n in args.only]
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for label, check in CHECKS:
            rows.append([label] + [run_check(n, CANDIDATES[n], check, tmp) for n in names])
        print(table(["operation"] + names, rows))
        print()
        results = {}
        for n in names:
            try:
                results[n] = speed(n, CANDIDATES[n], tmp, args.docs, budget)
            except Exception as e:
                traceback.print_exc()
                results[n] = {}
        metrics = list(next(r for r in results.values() if r))
        srows = []
        for m in metrics:
            cells = []
            for n in names:
                v = results[n].get(m, "n/a")
                cells.append(f"{v:,.1f}" if isinstance(v, float) else v)
            srows.append([m] + cells)
        print(table(["speed"] + names, srows))
    print(f"\n(python {sys.version.split()[0]}, {os.cpu_count()} cpus, "
          f"total {time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
