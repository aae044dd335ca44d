"""The Runs DB contract: every operation cax's tasks rely on, checked on every backend.

Run with the fixtures loaded: ``pytest -p tests.backends tests/test_store_contract.py`` (or via
``pytest_plugins = ['tests.backends']`` in tests/conftest.py).
"""
from __future__ import annotations

import datetime
import multiprocessing
import os

import pytest
from bson import ObjectId
from pymongo import ASCENDING, DESCENDING, ReturnDocument
from pymongo.errors import BulkWriteError, DuplicateKeyError

from cax.runsdb.embedded import EmbeddedClient, open_collection
from tests.backends import backend_of

UTC = datetime.timezone.utc


def _run(number, *data, **extra):
    return {"number": number, "name": f"run_{number:05d}", "detector": "tpc",
            "data": [dict(d) for d in data], **extra}


RAW_A = {"host": "a", "type": "raw", "status": "transferred"}
RAW_B = {"host": "b", "type": "raw", "status": "transferring"}
PROC_B = {"host": "b", "type": "processed", "pax_version": "v6", "status": "transferring"}


def _claim(coll, _id, key, datum):
    """cax's claim: push ``datum`` only if no datum with ``key`` exists."""
    return coll.update_one({"_id": _id, "data": {"$not": {"$elemMatch": key}}},
                           {"$push": {"data": datum}})


def known_bug(request, **reasons):
    """Mark this test an expected failure on the named backends (strict: a fix makes it fail loudly,
    so the mark gets removed). Only for bugs in third-party backends, each with what goes wrong."""
    backend = backend_of(request)
    if backend in reasons:
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"{backend}: {reasons[backend]}"))


# -- basic CRUD ---------------------------------------------------------------------------------


def test_insert_one_assigns_objectid_and_find_one_returns_it(collection):
    doc = _run(1, RAW_A)
    r = collection.insert_one(doc)
    assert isinstance(r.inserted_id, ObjectId)
    assert doc["_id"] == r.inserted_id
    got = collection.find_one({"_id": r.inserted_id})
    assert got["number"] == 1 and got["data"] == [RAW_A]
    assert collection.find_one({"number": 2}) is None


def test_insert_many_and_count(collection):
    r = collection.insert_many([_run(i) for i in range(5)])
    assert len(r.inserted_ids) == 5 and all(isinstance(i, ObjectId) for i in r.inserted_ids)
    assert collection.count_documents({}) == 5
    assert collection.count_documents({"number": {"$gte": 3}}) == 2


def test_unique_index_raises_duplicate_key(collection):
    collection.create_index("number", unique=True)
    collection.insert_one(_run(1))
    with pytest.raises(DuplicateKeyError):
        collection.insert_one(_run(1))
    assert collection.count_documents({"number": 1}) == 1
    # the store stays usable after the error
    collection.insert_one(_run(2))
    assert collection.count_documents({}) == 2


def test_compound_unique_index(collection):
    collection.create_index([("detector", ASCENDING), ("number", ASCENDING)], unique=True)
    collection.insert_one({"detector": "tpc", "number": 1})
    collection.insert_one({"detector": "muon_veto", "number": 1})  # differs in one part: fine
    with pytest.raises(DuplicateKeyError):
        collection.insert_one({"detector": "tpc", "number": 1})
    assert collection.count_documents({}) == 2


def test_insert_many_duplicate_raises_and_keeps_prefix(collection):
    collection.create_index("number", unique=True)
    with pytest.raises(BulkWriteError):
        collection.insert_many([_run(1), _run(2), _run(1), _run(3)])
    # ordered=True: what came before the failure is inserted, what came after is not
    assert sorted(collection.distinct("number")) == [1, 2]


def test_create_index_is_idempotent(collection):
    n1 = collection.create_index("number", unique=True)
    n2 = collection.create_index("number", unique=True)
    assert n1 == n2


def test_delete_one_and_many(collection):
    collection.insert_many([_run(i, detector="tpc" if i < 3 else "mv") for i in range(5)])
    assert collection.delete_one({"detector": "tpc"}).deleted_count == 1
    assert collection.count_documents({"detector": "tpc"}) == 2
    assert collection.delete_many({"detector": "tpc"}).deleted_count == 2
    assert collection.delete_many({"detector": "nothing"}).deleted_count == 0
    assert collection.count_documents({}) == 2


def test_distinct(collection, request):
    known_bug(request, wire="SecantusDB 0.7.0b3 distinct('data.host') on an array returns []")
    collection.insert_many([_run(1, RAW_A, RAW_B), _run(2, RAW_A)])
    assert sorted(collection.distinct("data.host")) == ["a", "b"]
    assert sorted(collection.distinct("number", {"data.host": "b"})) == [1]


# -- updates ------------------------------------------------------------------------------------


def test_positional_set_changes_only_the_matched_datum(collection):
    _id = collection.insert_one(_run(1, RAW_A, RAW_B, PROC_B)).inserted_id
    r = collection.update_one(
        {"_id": _id, "data": {"$elemMatch": {"host": "b", "type": "raw", "status": "transferring"}}},
        {"$set": {"data.$.status": "verifying", "data.$.size": 42}})
    assert (r.matched_count, r.modified_count) == (1, 1)
    data = collection.find_one({"_id": _id})["data"]
    assert data[0] == RAW_A
    assert data[1] == dict(RAW_B, status="verifying", size=42)
    assert data[2] == PROC_B
    # expected-status guard: a second identical transition matches nothing
    r = collection.update_one(
        {"_id": _id, "data": {"$elemMatch": {"host": "b", "type": "raw", "status": "transferring"}}},
        {"$set": {"data.$.status": "error"}})
    assert (r.matched_count, r.modified_count) == (0, 0)
    assert collection.find_one({"_id": _id})["data"][1]["status"] == "verifying"


def test_conditional_push_claim_wins_once(collection):
    _id = collection.insert_one(_run(1, RAW_A)).inserted_id
    key = {"host": "b", "type": "raw"}
    assert _claim(collection, _id, key, RAW_B).modified_count == 1
    assert _claim(collection, _id, key, dict(RAW_B, status="other")).modified_count == 0
    # a different pax_version is a different key and may be claimed
    pkey = {"host": "b", "type": "processed", "pax_version": "v6"}
    assert _claim(collection, _id, pkey, PROC_B).modified_count == 1
    data = collection.find_one({"_id": _id})["data"]
    assert data == [RAW_A, RAW_B, PROC_B]


def test_pull_removes_only_the_keyed_datum(collection):
    _id = collection.insert_one(_run(1, RAW_A, RAW_B, PROC_B)).inserted_id
    r = collection.update_one({"_id": _id}, {"$pull": {"data": {"host": "b", "type": "raw"}}})
    assert r.modified_count == 1
    assert collection.find_one({"_id": _id})["data"] == [RAW_A, PROC_B]


def test_inc_and_unset(collection):
    _id = collection.insert_one(_run(1, RAW_A, trigger={"events_built": 10}, tmp=1)).inserted_id
    collection.update_one({"_id": _id}, {"$inc": {"trigger.events_built": 5, "retries": 1},
                                         "$unset": {"tmp": ""}})
    doc = collection.find_one({"_id": _id})
    assert doc["trigger"]["events_built"] == 15 and doc["retries"] == 1
    assert "tmp" not in doc


def test_positional_unset(collection):
    _id = collection.insert_one(
        _run(1, RAW_A, dict(RAW_B, error="boom", error_time=1))).inserted_id
    collection.update_one({"_id": _id, "data": {"$elemMatch": {"host": "b", "type": "raw"}}},
                          {"$unset": {"data.$.error": "", "data.$.error_time": ""}})
    assert collection.find_one({"_id": _id})["data"] == [RAW_A, RAW_B]


def test_update_many_counts(collection):
    collection.insert_many([_run(i, detector="tpc" if i < 3 else "mv") for i in range(5)])
    r = collection.update_many({"detector": "tpc"}, {"$set": {"flag": True}})
    assert (r.matched_count, r.modified_count) == (3, 3)
    assert collection.count_documents({"flag": True}) == 3
    r = collection.update_many({"detector": "tpc"}, {"$set": {"flag": True}})
    assert (r.matched_count, r.modified_count) == (3, 0)


def test_update_upsert(collection):
    r = collection.update_one({"number": 7}, {"$set": {"name": "x"}}, upsert=True)
    assert r.upserted_id is not None and r.matched_count == 0
    assert collection.find_one({"number": 7})["name"] == "x"
    r = collection.update_one({"number": 7}, {"$set": {"name": "y"}}, upsert=True)
    assert r.upserted_id is None and (r.matched_count, r.modified_count) == (1, 1)
    r = collection.update_many({"number": 8}, {"$set": {"name": "z"}}, upsert=True)
    assert r.upserted_id is not None
    assert collection.count_documents({}) == 2


def test_update_one_touches_one_document(collection):
    collection.insert_many([_run(i, detector="tpc") for i in range(3)])
    r = collection.update_one({"detector": "tpc"}, {"$set": {"flag": 1}})
    assert r.modified_count == 1
    assert collection.count_documents({"flag": 1}) == 1


def test_find_one_and_update_positional(collection, request):
    known_bug(request,
              mongomock="mongomock 4.3 find_one_and_update applies data.$ to the wrong element",
              wire="SecantusDB 0.7.0b3 findAndModify with data.$: 'positional operator did not "
                   "find the match'")
    _id = collection.insert_one(_run(1, RAW_A, RAW_B, PROC_B)).inserted_id
    after = collection.find_one_and_update(
        {"_id": _id, "data": {"$elemMatch": {"host": "b", "type": "raw"}}},
        {"$set": {"data.$.status": "verifying"}}, return_document=ReturnDocument.AFTER)
    assert after["data"] == [RAW_A, dict(RAW_B, status="verifying"), PROC_B]
    before = collection.find_one_and_update(
        {"_id": _id, "data": {"$elemMatch": {"host": "b", "type": "processed"}}},
        {"$set": {"data.$.status": "error"}}, return_document=ReturnDocument.BEFORE)
    assert before["data"][2] == PROC_B
    assert collection.find_one({"_id": _id})["data"][2]["status"] == "error"
    assert collection.find_one({"_id": _id})["data"][1]["status"] == "verifying"
    assert collection.find_one_and_update({"number": 99}, {"$set": {"x": 1}}) is None


def test_find_one_and_update_sort_and_projection(collection):
    collection.insert_many([_run(i, detector="tpc") for i in (3, 1, 2)])
    got = collection.find_one_and_update({"detector": "tpc", "taken": {"$exists": False}},
                                         {"$set": {"taken": True}}, projection={"number": 1},
                                         sort=[("number", DESCENDING)],
                                         return_document=ReturnDocument.AFTER)
    assert got["number"] == 3 and "detector" not in got
    assert collection.find_one({"number": 3})["taken"] is True
    assert collection.count_documents({"taken": True}) == 1


# -- reads --------------------------------------------------------------------------------------


def test_find_sort_limit_projection(collection):
    collection.insert_many([_run(i, RAW_A, RAW_B) for i in (4, 1, 3, 2, 5)])
    got = list(collection.find({"number": {"$gt": 1}}, {"number": 1, "_id": 0})
               .sort("number", DESCENDING).limit(3))
    assert got == [{"number": 5}, {"number": 4}, {"number": 3}]
    got = list(collection.find({}, {"number": 1}).sort([("number", ASCENDING)]).limit(2))
    assert [d["number"] for d in got] == [1, 2] and all("_id" in d for d in got)
    assert all(set(d) == {"_id", "number"} for d in got)


def test_subfield_projection(collection):
    collection.insert_one(_run(1, RAW_A, RAW_B))
    got = collection.find_one({"number": 1}, {"data.host": 1, "data.status": 1, "_id": 0})
    assert got == {"data": [{"host": "a", "status": "transferred"},
                            {"host": "b", "status": "transferring"}]}


def test_find_by_datum_fields(collection):
    collection.insert_many([_run(1, RAW_A), _run(2, RAW_B), _run(3, RAW_A, RAW_B)])
    q = {"data": {"$elemMatch": {"host": "b", "status": "transferring"}}}
    assert sorted(d["number"] for d in collection.find(q)) == [2, 3]
    q = {"data": {"$not": {"$elemMatch": {"host": "b"}}}}
    assert sorted(d["number"] for d in collection.find(q)) == [1]


def test_datetimes_round_trip_tz_aware_utc(collection):
    t = datetime.datetime(2016, 3, 15, 14, 32, 5, 123000, tzinfo=UTC)
    cet = datetime.timezone(datetime.timedelta(hours=1))
    collection.insert_one(_run(1, dict(RAW_A, creation_time=t), start=t.astimezone(cet)))
    doc = collection.find_one({"number": 1})
    for got in (doc["start"], doc["data"][0]["creation_time"]):
        assert got.tzinfo is not None and got.utcoffset() == datetime.timedelta(0)
        assert got == t
    assert collection.count_documents({"start": {"$gt": t - datetime.timedelta(seconds=1)}}) == 1
    assert collection.count_documents({"start": {"$gt": t}}) == 0
    now = datetime.datetime.now(UTC)
    collection.update_one({"number": 1, "data": {"$elemMatch": {"host": "a"}}},
                          {"$set": {"data.$.heartbeat": now}})
    hb = collection.find_one({"number": 1})["data"][0]["heartbeat"]
    assert hb.utcoffset() == datetime.timedelta(0)
    assert abs(hb - now) < datetime.timedelta(milliseconds=1)


# -- embedded store: persistence and multi-process ------------------------------------------------


def test_embedded_persists_across_reopen(tmp_path):
    path = tmp_path / "runs.sqlite"
    c = EmbeddedClient(path)
    coll = c["run"]["runs_new"]
    coll.create_index("number", unique=True)
    t = datetime.datetime(2020, 1, 2, 3, 4, 5, tzinfo=UTC)
    _id = coll.insert_one(_run(1, RAW_A, RAW_B, start=t)).inserted_id
    coll.insert_one(_run(2))
    coll.update_one({"_id": _id, "data": {"$elemMatch": {"host": "b"}}},
                    {"$set": {"data.$.status": "verifying"}})
    coll.delete_one({"number": 2})
    c["other"]["runs_new"].insert_one({"number": 1})  # separate namespace in the same file
    c.close()

    coll = open_collection(path)
    doc = coll.find_one({"_id": _id})
    assert doc["data"][1]["status"] == "verifying" and doc["start"] == t
    assert doc["start"].utcoffset() == datetime.timedelta(0)
    assert coll.count_documents({}) == 1
    with pytest.raises(DuplicateKeyError):  # the index persisted too
        coll.insert_one(_run(1))
    assert open_collection(path, "other", "runs_new").count_documents({}) == 1


def test_embedded_two_handles_see_each_other(tmp_path):
    a = open_collection(tmp_path / "x.sqlite")
    b = open_collection(tmp_path / "x.sqlite")
    a.create_index("number", unique=True)
    _id = a.insert_one(_run(1, RAW_A)).inserted_id
    assert b.find_one({"_id": _id})["data"] == [RAW_A]
    # b learns a's unique index and a's deletion
    with pytest.raises(DuplicateKeyError):
        b.insert_one(_run(1))
    key = {"host": "b", "type": "raw"}
    assert _claim(b, _id, key, RAW_B).modified_count == 1
    assert _claim(a, _id, key, RAW_B).modified_count == 0
    a.delete_one({"_id": _id})
    assert b.find_one({"_id": _id}) is None and b.count_documents({}) == 0
    # a value freed by one handle can be reused through the other (sync applies deletes first)
    b.insert_one(_run(1))
    assert a.count_documents({"number": 1}) == 1


def test_embedded_failed_update_leaves_no_trace(tmp_path):
    coll = open_collection(tmp_path / "x.sqlite")
    coll.create_index("name", unique=True)
    coll.insert_many([_run(1), _run(2)])
    with pytest.raises(DuplicateKeyError):
        coll.update_many({}, {"$set": {"name": "same", "touched": True}})
    assert coll.count_documents({"touched": True}) == 0
    assert sorted(coll.distinct("name")) == ["run_00001", "run_00002"]
    assert open_collection(tmp_path / "x.sqlite").count_documents({"touched": True}) == 0


def _claim_worker(path, rounds, barrier, queue):
    """One contending daemon: in every round, try to claim the same key as everyone else."""
    coll = open_collection(path)
    wins = []
    for r in range(rounds):
        barrier.wait(timeout=60)
        key = {"host": f"site{r}", "type": "raw"}
        res = _claim(coll, f"run{r % 3}", key, dict(key, status="transferring", pid=os.getpid()))
        if res.modified_count:
            wins.append(r)
        # counters updated by everyone: a lost update would show up as a short total
        coll.update_one({"_id": "counter"}, {"$inc": {"n": 1}})
    queue.put(wins)


def test_embedded_cross_process_claims_have_one_winner(tmp_path):
    path = str(tmp_path / "race.sqlite")
    coll = open_collection(path)
    coll.insert_many([{"_id": f"run{i}", "data": []} for i in range(3)] + [{"_id": "counter", "n": 0}])
    nproc, rounds = 4, 40
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(nproc), ctx.Queue()
    procs = [ctx.Process(target=_claim_worker, args=(path, rounds, barrier, queue))
             for _ in range(nproc)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    all_wins = sorted(r for wins in results for r in wins)
    assert all_wins == list(range(rounds)), "each round must have exactly one winner"
    keys = [(d["host"], d["type"]) for i in range(3) for d in coll.find_one({"_id": f"run{i}"})["data"]]
    assert len(keys) == rounds and len(set(keys)) == rounds
    assert coll.find_one({"_id": "counter"})["n"] == nproc * rounds


def test_wire_daemon_survives_kill(wire_daemon):
    import pymongo

    client = pymongo.MongoClient(wire_daemon.uri, serverSelectionTimeoutMS=10_000, tz_aware=True)
    coll = client["cax_kill_test"]["runs_new"]
    coll.insert_many([_run(i) for i in range(20)])
    wire_daemon.kill()
    wire_daemon.start()
    assert coll.count_documents({}) == 20
    client.close()


def test_backend_param_is_known(collection, request):
    assert backend_of(request) in {"mongomock", "embedded", "wire", "mongodb"}


def test_embedded_threads_share_one_handle_and_separate_handles(tmp_path):
    """Threads in one daemon: one shared client, and separate clients (separate SQLite connections)."""
    import threading

    path = tmp_path / "threads.sqlite"
    shared = open_collection(path)
    shared.insert_one({"_id": "run", "data": [], "n": 0})
    nthreads, rounds = 6, 30
    barrier = threading.Barrier(nthreads, timeout=60)
    wins, errors = [], []

    def worker(i):
        coll = shared if i % 2 else open_collection(path)
        try:
            for r in range(rounds):
                barrier.wait()
                key = {"host": f"s{r}", "type": "raw"}
                if _claim(coll, "run", key, key).modified_count:
                    wins.append(r)
                coll.update_one({"_id": "run"}, {"$inc": {"n": 1}})
        except Exception as e:  # surfaced by the assertion below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert sorted(wins) == list(range(rounds))
    doc = open_collection(path).find_one({"_id": "run"})
    assert len(doc["data"]) == rounds and doc["n"] == nthreads * rounds


def test_queries_on_id(collection):
    a = collection.insert_one(_run(1, RAW_A)).inserted_id
    b = collection.insert_one(_run(2, RAW_B)).inserted_id
    collection.insert_one({"_id": {"site": "x", "n": 1}, "number": 3})
    assert collection.find_one({"_id": a, "number": 2}) is None
    assert collection.find_one({"_id": ObjectId()}) is None
    assert collection.find_one(b)["number"] == 2
    assert sorted(d["number"] for d in collection.find({"_id": {"$in": [a, b]}})) == [1, 2]
    assert collection.count_documents({"_id": {"$ne": a}}) == 2
    assert collection.find_one({"_id": {"site": "x", "n": 1}})["number"] == 3
    r = collection.update_one({"_id": {"site": "x", "n": 1}}, {"$set": {"k": 1}})
    assert r.modified_count == 1 and collection.find_one({"k": 1})["number"] == 3
    assert collection.delete_one({"_id": {"site": "x", "n": 1}}).deleted_count == 1
    assert collection.count_documents({}) == 2


def test_wire_uri_reaches_the_wire_server(wire_uri):
    import pymongo

    client = pymongo.MongoClient(wire_uri, serverSelectionTimeoutMS=10_000, tz_aware=True)
    try:
        coll = client["cax_uri_test"]["runs_new"]
        coll.insert_one(_run(1))
        assert coll.count_documents({"number": 1}) == 1
        client.drop_database("cax_uri_test")
    finally:
        client.close()


# -- differential: two embedded handles on one file behave like one mongomock collection ----------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_hosts = st.sampled_from(["a", "b", "c"])
_types = st.sampled_from(["raw", "processed"])
_status = st.sampled_from(["transferring", "verifying", "transferred", "error"])
_ops = st.one_of(
    st.tuples(st.just("insert"), st.integers(0, 5)),
    st.tuples(st.just("claim"), st.integers(0, 5), _hosts, _types),
    st.tuples(st.just("set"), st.integers(0, 5), _hosts, _types, _status, _status),
    st.tuples(st.just("pull"), st.integers(0, 5), _hosts, _types),
    st.tuples(st.just("inc"), st.integers(0, 5)),
    st.tuples(st.just("delete"), st.integers(0, 5)),
    st.tuples(st.just("rename"), st.integers(0, 5), st.integers(0, 5)),
    # task-shaped queries: the embedded store answers repeated filters from incremental views
    st.tuples(st.just("find"), st.integers(0, 5), _hosts, _types, _status),
    st.tuples(st.just("find_missing"), st.integers(0, 5), _hosts, _types),
)


def _apply(coll, op):
    """One cax-like operation; returns what the caller would observe."""
    kind, n = op[0], op[1]
    try:
        if kind == "insert":
            return coll.insert_one({"_id": f"r{n}", "number": n, "data": []}).inserted_id
        if kind == "claim":
            key = {"host": op[2], "type": op[3]}
            return _claim(coll, f"r{n}", key, dict(key, status="transferring")).modified_count
        if kind == "set":
            r = coll.update_one({"number": n, "data": {"$elemMatch": {
                "host": op[2], "type": op[3], "status": op[4]}}}, {"$set": {"data.$.status": op[5]}})
            return r.matched_count, r.modified_count
        if kind == "pull":
            return coll.update_one({"_id": f"r{n}"},
                                   {"$pull": {"data": {"host": op[2], "type": op[3]}}}).modified_count
        if kind == "inc":
            return coll.update_many({"number": {"$gte": n}}, {"$inc": {"v": 1}}).modified_count
        if kind == "delete":
            return coll.delete_one({"number": n}).deleted_count
        if kind == "rename":  # may violate the unique index on number
            return coll.update_one({"_id": f"r{n}"}, {"$set": {"number": op[2]}}).modified_count
        if kind == "find":
            return sorted(d["_id"] for d in coll.find(
                {"number": {"$gte": n}, "data": {"$elemMatch": {
                    "host": op[2], "type": op[3], "status": op[4]}}}, {"_id": 1}))
        if kind == "find_missing":
            return sorted(d["_id"] for d in coll.find(
                {"number": {"$lte": n}, "data": {"$not": {"$elemMatch": {
                    "host": op[2], "type": op[3]}}}}, {"number": 1}))
    except DuplicateKeyError:
        return "dup"
    raise AssertionError(op)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.booleans(), _ops), max_size=25))
def test_embedded_matches_mongomock_through_two_handles(tmp_path_factory, ops):
    import mongomock

    path = tmp_path_factory.mktemp("diff") / "x.sqlite"
    handles = [open_collection(path), open_collection(path)]
    handles[0].create_index("number", unique=True)
    ref = mongomock.MongoClient(tz_aware=True)["db"]["c"]
    ref.create_index("number", unique=True)
    for which, op in ops:
        assert _apply(handles[which], op) == _apply(ref, op), op
    want = sorted(ref.find(), key=lambda d: d["_id"])
    handles.append(open_collection(path))  # a fresh process's view: loaded from the file alone
    try:
        for h in handles:
            assert sorted(h.find(), key=lambda d: d["_id"]) == want
    finally:
        for h in handles:
            h.database.client.close()


def test_embedded_repeated_queries_see_every_change(tmp_path):
    """The embedded store answers a repeated filter from a view kept up to date incrementally:
    after each kind of change (own write, another handle's write, insert, delete, pull), the same
    filter must give what a fresh handle scanning the file gives, in the same order."""
    path = tmp_path / "x.sqlite"
    me, other = open_collection(path), open_collection(path)
    me.insert_many([_run(i, RAW_A) for i in range(6)])
    flt = {"data": {"$elemMatch": {"host": "b", "status": "transferring"}}}
    missing = {"data": {"$not": {"$elemMatch": {"host": "b"}}}}

    def check():
        fresh = open_collection(path)
        try:
            for f in (flt, missing):
                assert [d["number"] for d in me.find(f)] == [d["number"] for d in fresh.find(f)]
                assert me.count_documents(f) == fresh.count_documents(f)
        finally:
            fresh.database.client.close()

    check()
    _claim(me, me.find_one({"number": 1})["_id"], {"host": "b"}, RAW_B)  # own write
    check()
    _claim(other, other.find_one({"number": 4})["_id"], {"host": "b"}, RAW_B)  # another's
    check()
    me.update_one({"number": 1, "data.host": "b"}, {"$set": {"data.$.status": "verifying"}})
    check()
    other.insert_one(_run(9, RAW_B))
    check()
    me.delete_one({"number": 4})
    check()
    other.update_one({"number": 9}, {"$pull": {"data": {"host": "b"}}})
    check()
    assert [d["number"] for d in me.find(flt)] == []
    assert [d["number"] for d in me.find(missing)] == [0, 2, 3, 5, 9]
    for h in (me, other):
        h.database.client.close()


def _die_holding_write_lock(path, ready):
    """A cax process killed in the middle of a write: lock taken, a claim half written."""
    coll = open_collection(path)
    conn = coll.database.client._conn
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("UPDATE docs SET doc = NULL")  # would wipe everything if it were ever committed
    ready.set()
    multiprocessing.Event().wait()  # never set: blocks until the parent kills us


def test_embedded_writer_killed_mid_transaction(tmp_path):
    import signal

    path = str(tmp_path / "kill.sqlite")
    coll = open_collection(path)
    _id = coll.insert_one(_run(1, RAW_A)).inserted_id
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    p = ctx.Process(target=_die_holding_write_lock, args=(path, ready))
    p.start()
    try:
        assert ready.wait(timeout=60)
        os.kill(p.pid, signal.SIGKILL)
        p.join(timeout=30)
        assert p.exitcode == -signal.SIGKILL
    finally:
        if p.is_alive():
            p.kill()
    # the lock died with the process and its uncommitted write is gone
    assert _claim(coll, _id, {"host": "b", "type": "raw"}, RAW_B).modified_count == 1
    assert open_collection(path).find_one({"_id": _id})["data"] == [RAW_A, RAW_B]


def test_sparse_unique_index(collection):
    collection.create_index("alias", unique=True, sparse=True)
    collection.insert_many([_run(1), _run(2)])  # no alias: not constrained
    collection.insert_one(_run(3, alias="x"))
    with pytest.raises(DuplicateKeyError):
        collection.insert_one(_run(4, alias="x"))
    assert collection.count_documents({}) == 3


def test_embedded_create_index_rejects_unknown_options(tmp_path):
    coll = open_collection(tmp_path / "x.sqlite")
    with pytest.raises(NotImplementedError):
        coll.create_index("t", expireAfterSeconds=10)
    coll.create_index("alias", unique=True, sparse=True)
    other = open_collection(tmp_path / "x.sqlite")  # options reach other processes too
    other.insert_many([_run(1), _run(2)])
    other.insert_one(_run(3, alias="y"))
    with pytest.raises(DuplicateKeyError):
        other.insert_one(_run(4, alias="y"))
