"""Property: concurrent, crashing purgers never take a run below its required good copies, even
when copies go bad behind cax's back.

Each purger is the real delete protocol (cax.deletion.delete_steps), a generator that yields between
its decision read (which checks the counted copies where they live), its marking update and its
file removal; hypothesis chooses the copies (3-5 sites, statuses, good/bad/missing checksums; the
reference recorded, absent, or left to the legacy fallback with some copies lacking ``source`` and
disagreeing; sizes recorded or not; verified just now or never), min_copies, and an interleaving
schedule in which purgers advance one step or crash (are abandoned mid-way), and in which copies are
deleted, cut short (a file removed) or corrupted (one byte flipped, same size) by hand. Afterwards
every site runs a full BufferPurger pass, which must leave no datum ``deleting``.

The property: no step of cax ever takes the number of *real* good copies of a run (transferred with
the data's true checksum, files present and hashing to it) below ``min(min_copies, what it was)``;
"true" is the real checksum of the data, not what cax takes for the reference. Copies go bad only
between deletions, never between a purger's check and its removal (that window is cax's own; a
copy going bad inside it is a race no check can close). A byte flipped in a copy verified just now
is not damage this property covers: such a copy is re-hashed only once ``reverify_days`` have passed
(or before an origin goes); the scrub (VerifyCopies) is what finds it.
"""
import os
import shutil
import tempfile
from pathlib import Path

import mongomock
from hypothesis import HealthCheck, given, settings, strategies as st

from cax import deletion
from cax.checksum import checksum
from cax.runsdb import RunsDB, now
from cax.tasks.purge import BufferPurger
from cax.transfer.base import local_tree
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
    fresh = draw(st.booleans())  # sizes recorded and verified just now, or neither
    harms = ["delete", "truncate"] + ([] if fresh else ["corrupt"])
    schedule = draw(st.lists(st.tuples(st.integers(0, 4 * n_sites),
                                       st.sampled_from(["step"] * 5 + ["crash"] + harms)),
                             max_size=40))
    return {"n_sites": n_sites, "runs": runs, "min_copies": draw(st.integers(1, 3)),
            "purgers": purgers, "schedule": schedule, "fresh": fresh}


def real_good(db, run_id, truth) -> int:
    """Copies cax counts as good whose files are really there and really hash to the truth."""
    run = db.collection.find_one({"_id": run_id})
    return sum(1 for d in deletion.good_copies(run, "raw", None, truth)
               if os.path.isdir(d["location"]) and checksum(d["location"]) == truth["checksum"])


def harm(location, how):
    """A copy going bad behind cax's back."""
    if how == "delete":
        shutil.rmtree(location)
    elif how == "truncate":
        os.unlink(os.path.join(location, "f0.bin"))
    else:
        with open(os.path.join(location, "f0.bin"), "r+b") as f:
            b = f.read(1)
            f.seek(0)
            f.write(bytes([b[0] ^ 0xFF]))


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
    run_ids, truth = [], {}
    for number, r in enumerate(sc["runs"], 1):
        copies = {names[i]: s for i, s in enumerate(r["specs"]) if s[0] != "absent"}
        first = next(iter(copies))
        if r["ref"] != "none":
            # the first copy is the origin: its checksum is real (recorded as the reference, or, in
            # a legacy run, it has no 'source'; other copies may lack 'source' too, good or bad)
            copies[first] = (copies[first][0], "good")
        run = add_run(db, tmp, number, copies, ref_host=first)
        truth[run["_id"]] = run["references"][0]   # the real checksum of the data
        for i, d in enumerate(run["data"]):
            fields = {}
            if sc["fresh"]:
                size, files = local_tree(d["location"])
                fields.update(size=size, files=files, checksum_time=now())
            if r["ref"] == "known" and d["host"] != first:
                fields["source"] = first  # copies of the origin: re-hashed only when due
            elif r["ref"] != "known":
                origin = r["ref"] == "legacy" and d["host"] == first
                if r["ref"] == "none" or not (origin or r["sourceless"][names.index(d["host"])]):
                    fields["source"] = "elsewhere"
            if fields:
                db.collection.update_one({"_id": run["_id"]}, {"$set": {
                    f"data.{i}.{k}": v for k, v in fields.items()}})
        if r["ref"] != "known":
            db.collection.update_one({"_id": run["_id"]}, {"$unset": {"references": ""}})
        run_ids.append(run["_id"])
    harmed: set = set()

    def counts():
        return {rid: real_good(db, rid, truth[rid]) for rid in run_ids}

    def check(before):
        after = counts()
        for rid in run_ids:
            assert after[rid] >= min(m, before[rid]), (
                f"a cax step took run {rid} from {before[rid]} to {after[rid]} real good copies "
                f"(min_copies {m}): {db.collection.find_one({'_id': rid})['data']}")
        return after

    config = ctx(cfg, names[0], db).config
    gens, in_flight = [], set()
    for p in sc["purgers"]:
        host = names[p]
        for rid in run_ids:
            gens.append(deletion.delete_steps(db, config.site(host), rid,
                                              {"host": host, "type": "raw"}, min_copies=m,
                                              sites=config.sites))
    alive = list(range(len(gens)))
    now_good = counts()
    for who, action in sc["schedule"]:
        if action in ("delete", "truncate", "corrupt"):
            deleting = any(d["status"] == "deleting" for rid in run_ids
                           for d in db.collection.find_one({"_id": rid})["data"])
            if in_flight or deleting:
                continue  # not between a purger's check and its removal (see the docstring)
            rid = run_ids[who // len(names) % len(run_ids)]
            host = names[who % len(names)]
            d = next((d for d in db.collection.find_one({"_id": rid})["data"]
                      if d["host"] == host), None)
            if d is None or not os.path.isdir(d["location"]) or (rid, host) in harmed:
                continue
            harm(d["location"], action)
            harmed.add((rid, host))
            now_good = counts()
            continue
        if not alive:
            continue
        g = alive[who % len(alive)]
        if action == "crash":
            gens[g].close()
            alive.remove(g)
            in_flight.discard(g)
        else:
            try:
                if next(gens[g]) == "decided":
                    in_flight.add(g)
            except StopIteration:
                alive.remove(g)
                in_flight.discard(g)
        now_good = check(now_good)
    # purgers that were not crashed run to their end, still interleaved round-robin
    while alive:
        for g in list(alive):
            try:
                next(gens[g])
            except StopIteration:
                alive.remove(g)
            now_good = check(now_good)
    # the next pass of every site finishes every crash
    for host in names:
        BufferPurger(ctx(cfg, host, db)).go()
        now_good = check(now_good)
    for rid in run_ids:
        run = db.collection.find_one({"_id": rid})
        assert not [d for d in run["data"] if d["status"] == "deleting"], run["data"]
        for d in run["data"]:
            if (rid, d["host"]) not in harmed:
                assert os.path.exists(d["location"]), f"datum at {d['host']} lost its files"
