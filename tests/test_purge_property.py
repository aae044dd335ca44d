"""Property: concurrent, crashing purgers never take a run below its required good copies.

Each purger is the real delete protocol (cax.deletion.delete_steps), a generator that yields between
its decision read, its marking update and its file removal; hypothesis chooses the copies (3-5 sites,
statuses, good/bad/missing checksums; the reference recorded, absent, or left to the legacy fallback
with some copies lacking ``source`` and disagreeing), min_copies, and an interleaving
schedule in which purgers advance one step or crash (are abandoned mid-way). Afterwards every site
runs a full BufferPurger pass, which must leave no datum ``deleting``. After every step, the number of
good copies (transferred, the data's true checksum, files present) must stay >= min(min_copies,
initial); "true" is the real checksum of the data, not what cax takes for the reference.
"""
import os
import shutil
import tempfile
from pathlib import Path

import mongomock
from hypothesis import HealthCheck, given, settings, strategies as st

from cax import deletion
from cax.runsdb import RunsDB
from cax.tasks.purge import BufferPurger
from tests.purge_helpers import add_run, ctx, sites_config

NAMES = ("s0", "s1", "s2", "s3", "s4")

copy_spec = st.tuples(st.sampled_from(["transferred"] * 4 + ["verifying", "error", "absent"]),
                      st.sampled_from(["good"] * 4 + ["bad", "nosum"]))


@st.composite
def scenarios(draw):
    n_sites = draw(st.integers(3, 5))
    n_runs = draw(st.integers(1, 2))
    runs = []
    for _ in range(n_runs):
        specs = draw(st.lists(copy_spec, min_size=n_sites, max_size=n_sites))
        if all(s == "absent" for s, _ in specs):
            specs[0] = ("transferred", "good")
        mode = draw(st.sampled_from(["known"] * 4 + ["none", "legacy", "legacy"]))
        # legacy: older cax wrote no 'references' and no 'source'; any copy may lack 'source'
        sourceless = draw(st.lists(st.booleans(), min_size=n_sites, max_size=n_sites))
        runs.append({"specs": specs, "ref": mode, "sourceless": sourceless})
    purgers = draw(st.lists(st.integers(0, n_sites - 1), min_size=1, max_size=n_sites,
                            unique=True))
    schedule = draw(st.lists(st.tuples(st.integers(0, 2 * n_sites),
                                       st.sampled_from(["step"] * 5 + ["crash"])), max_size=40))
    return {"n_sites": n_sites, "runs": runs, "min_copies": draw(st.integers(1, 3)),
            "purgers": purgers, "schedule": schedule}


def good_count(db, run_id, truth):
    run = db.collection.find_one({"_id": run_id})
    good = deletion.good_copies(run, "raw", None, truth)
    for d in good:
        assert os.path.isdir(d["location"]), f"good copy at {d['host']} has no files"
    return len(good)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(scenarios())
def test_concurrent_crashing_purgers_keep_min_copies(sc):
    tmp = Path(tempfile.mkdtemp(prefix="caxprop"))
    try:
        _check(tmp, sc)
    finally:
        shutil.rmtree(tmp)


def _check(tmp, sc):
    names = NAMES[:sc["n_sites"]]
    m = sc["min_copies"]
    cfg = sites_config(tmp, names=names, purge={n: {"min_copies": m} for n in names})
    db = RunsDB(mongomock.MongoClient(tz_aware=True)["run"]["runs_new"])
    run_ids, floors, truth = [], {}, {}
    for number, r in enumerate(sc["runs"], 1):
        copies = {names[i]: s for i, s in enumerate(r["specs"]) if s[0] != "absent"}
        first = next(iter(copies))
        if r["ref"] != "none":
            # the first copy is the origin: its checksum is real (recorded as the reference, or, in
            # a legacy run, it has no 'source'; other copies may lack 'source' too, good or bad)
            copies[first] = (copies[first][0], "good")
        run = add_run(db, tmp, number, copies, ref_host=first)
        truth[run["_id"]] = run["references"][0]   # the real checksum of the data
        if r["ref"] != "known":
            db.collection.update_one({"_id": run["_id"]}, {"$unset": {"references": ""}})
            for i, d in enumerate(run["data"]):
                origin = r["ref"] == "legacy" and d["host"] == first
                if r["ref"] == "none" or not (origin or r["sourceless"][names.index(d["host"])]):
                    db.collection.update_one({"_id": run["_id"]},
                                             {"$set": {f"data.{i}.source": "elsewhere"}})
        run_ids.append(run["_id"])
        floors[run["_id"]] = min(m, good_count(db, run["_id"], truth[run["_id"]]))

    def check():
        for rid in run_ids:
            assert good_count(db, rid, truth[rid]) >= floors[rid]

    site_objs = {n: ctx(cfg, n, db).site for n in names}
    gens = []
    for p in sc["purgers"]:
        host = names[p]
        for rid in run_ids:
            gens.append(deletion.delete_steps(db, site_objs[host], rid,
                                              {"host": host, "type": "raw"}, min_copies=m))
    alive = list(range(len(gens)))
    for who, action in sc["schedule"]:
        if not alive:
            break
        g = alive[who % len(alive)]
        if action == "crash":
            gens[g].close()
            alive.remove(g)
        else:
            try:
                next(gens[g])
            except StopIteration:
                alive.remove(g)
        check()
    # purgers that were not crashed run to their end, still interleaved round-robin
    while alive:
        for g in list(alive):
            try:
                next(gens[g])
            except StopIteration:
                alive.remove(g)
            check()
    # the next pass of every site finishes every crash
    for host in names:
        BufferPurger(ctx(cfg, host, db)).go()
        check()
    for rid in run_ids:
        run = db.collection.find_one({"_id": rid})
        assert not [d for d in run["data"] if d["status"] == "deleting"], run["data"]
        for d in run["data"]:
            assert os.path.exists(d["location"]), f"datum at {d['host']} lost its files"
