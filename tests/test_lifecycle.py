"""The datum state machine (cax/runsdb/lifecycle.py), one row per transition, on every backend.

Each case puts a datum in the transition's from-status, takes the decision on that read, and
applies the transition: the datum moves. Then the same decision is applied after another daemon
moved the datum to a wrong status: compare-and-set, nothing is written. The table, the documented
error kinds and docs/design.rst's "Datum states" are checked against the code.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from cax.runsdb import RunsDB, lifecycle
from cax.runsdb.lifecycle import BY_NAME, SAME, TRANSITIONS, DatumKey, ErrorKind, Status

ROOT = Path(__file__).resolve().parent.parent
RAW = DatumKey("a", "raw")
PROC = DatumKey("a", "processed", "v1")
SUM = "c" * 128


def _datum(key, status, **extra):
    d = dict(key.as_dict(), status=status, location=f"/data/{key.type}/run_1", checksum=SUM,
             checksum_type="sha512")
    d.update(extra)
    return d


GOOD_B = {"host": "b", "type": "raw", "status": "transferred", "location": "/b/run_1",
          "checksum": SUM, "checksum_type": "sha512"}


def _idx(run, key):
    return key.find(run)[0]


#: transition -> (key, from status (None: no datum), wrong status, datum extras,
#:                build(run_id, run as read) -> Change, check(datum after, run after))
CASES = {
    "claim": (RAW, None, "transferred", {},
              lambda i, r: lifecycle.claim(i, _datum(RAW, "transferring", checksum=None)),
              lambda d, r: d["status"] == "transferring"),
    "claim_processing": (PROC, None, "error", {},
                         lambda i, r: lifecycle.claim_processing(i, _datum(PROC, "x")),
                         lambda d, r: d["status"] == "processing"),
    "heartbeat": (RAW, "transferring", "transferred", {},
                  lambda i, r: lifecycle.heartbeat(i, RAW, "transferring"),
                  lambda d, r: d["status"] == "transferring" and d.get("heartbeat")),
    "copied": (RAW, "transferring", "verifying", {},
               lambda i, r: lifecycle.copied(i, RAW),
               lambda d, r: d["status"] == "verifying" and d.get("heartbeat")),
    "verified": (RAW, "verifying", "transferring", {},
                 lambda i, r: lifecycle.verified(i, RAW, "verifying", {"checksum": "d" * 128}),
                 lambda d, r: d["status"] == "transferred" and d["checksum"] == "d" * 128),
    "origin_checksummed": (RAW, "transferred", "verifying", {"checksum": None},
                           lambda i, r: lifecycle.verified(i, dict(RAW.as_dict(), checksum=None),
                                                           "transferred", {"checksum": SUM}),
                           lambda d, r: d["status"] == "transferred" and d["checksum"] == SUM),
    "reference_checked": (RAW, "transferred", "error", {},
                          lambda i, r: lifecycle.reference_checked(i, RAW, SUM),
                          lambda d, r: d["reference_checked"] is True),
    "rehashed": (RAW, "transferred", "deleting", {},
                 lambda i, r: lifecycle.rehashed(i, RAW, SUM),
                 lambda d, r: d["status"] == "transferred" and d.get("checksum_time")),
    "measured": (RAW, "transferred", "verifying", {},
                 lambda i, r: lifecycle.measured(i, RAW, {"size": 7, "files": 1}),
                 lambda d, r: (d["status"], d["size"], d["files"]) == ("transferred", 7, 1)),
    "failed": (RAW, "transferring", "verifying", {},
               lambda i, r: lifecycle.failed(i, RAW, "transferring", "boom\n  twice " + "x" * 900,
                                             ErrorKind.NO_SPACE),
               lambda d, r: (d["status"], d["error_kind"]) == ("error", "no-space")
               and d["error"].startswith("boom twice x") and len(d["error"]) == 500
               and d.get("error_time")),
    "stalled": (RAW, "transferring", "error", {},
                lambda i, r: lifecycle.stalled(i, r["data"], _idx(r, RAW), "stalled: no progress"),
                lambda d, r: (d["status"], d["error_kind"]) == ("error", "stalled")),
    "landed": (RAW, "transferring", "error", {},
               lambda i, r: lifecycle.landed(i, r["data"], _idx(r, RAW)),
               lambda d, r: d["status"] == "verifying"),
    "mark_retrying": (RAW, "error", "transferred", {"error_kind": "checksum"},
                      lambda i, r: lifecycle.mark_retrying(i, r["data"], _idx(r, RAW)),
                      lambda d, r: d["status"] == "retrying" and d.get("retry_time")),
    "retried": (RAW, "retrying", "error", {},
                lambda i, r: lifecycle.retried(i, RAW),
                lambda d, r: d is None and r["retries"] == 1),
    "resubmit": (PROC, "error", "processing", {"error_kind": "submit"},
                 lambda i, r: lifecycle.resubmit(i, PROC),
                 lambda d, r: d is None and not r.get("processing_retries")),
    "retry_processing": (PROC, "error", "processing", {"error_kind": "processing"},
                         lambda i, r: lifecycle.retry_processing(i, PROC, {"pax_version": "v1"}),
                         lambda d, r: d is None and r["processing_retries"] == [
                             {"pax_version": "v1"}]),
    "job_recorded": (PROC, "processing", "error", {"job_id": None},
                     lambda i, r: lifecycle.job_recorded(i, PROC, {"job_id": "42"},
                                                         expect={"job_id": None}),
                     lambda d, r: (d["status"], d["job_id"]) == ("processing", "42")),
    "job_ended": (PROC, "processing", "error", {},
                  lambda i, r: lifecycle.job_ended(i, PROC, processing_seconds=1.5),
                  lambda d, r: (d["status"], d["processing_seconds"]) == ("verifying", 1.5)),
    "mark_deleting": (RAW, "transferred", "verifying", {},
                      lambda i, r: lifecycle.mark_deleting(
                          i, _idx(r, RAW), RAW, "transferred",
                          [{"host": "b", "type": "raw", "status": "transferred",
                            "checksum": SUM}], deleting_by="a"),
                      lambda d, r: (d["status"], d["deleting_by"]) == ("deleting", "a")),
    "delete_failed": (RAW, "deleting", "transferred", {},
                      lambda i, r: lifecycle.delete_failed(i, RAW, "removing failed:\nEIO"),
                      lambda d, r: (d["status"], d["error"]) == ("deleting",
                                                                 "removing failed: EIO")),
    "deleted": (RAW, "deleting", "transferred", {},
                lambda i, r: lifecycle.deleted(i, RAW),
                lambda d, r: d is None),
    "refused": (RAW, "deleting", "verifying", {},
                lambda i, r: lifecycle.refused(i, RAW, "deleting", "not deleted: unsafe"),
                lambda d, r: (d["status"], d["error_kind"]) == ("error", "unsafe-location")),
    "moving": (RAW, "transferred", "verifying", {},
               lambda i, r: lifecycle.moving(i, RAW, "transferred", "/elsewhere/run_1"),
               lambda d, r: d["status"] == "transferred" and d["moving_to"] == "/elsewhere/run_1"),
}


def test_every_transition_has_a_case():
    assert set(CASES) == set(BY_NAME)


def _insert(coll, key, status, extras):
    data = [dict(GOOD_B)] + ([] if status is None else [_datum(key, status, **extras)])
    return coll.insert_one({"number": 1, "name": "run_1", "data": data}).inserted_id


def _read(coll, _id):
    run = coll.find_one({"_id": _id})
    return run, [d for d in run["data"] if d.get("host") == "a"]


@pytest.mark.parametrize("name", list(CASES))
def test_transition(collection, name):
    key, source, wrong, extras, build, check = CASES[name]
    t = BY_NAME[name]
    db = RunsDB(collection)
    _id = _insert(collection, key, source, extras)
    run, _ = _read(collection, _id)
    assert db.apply(build(_id, run)), f"{name} did not apply from {source}"
    after, mine = _read(collection, _id)
    assert len(mine) <= 1, mine  # at most one datum per key
    datum = mine[0] if mine else None
    assert check(datum, after), (name, datum)
    assert source in t.source
    if t.target is None:
        assert datum is None
    else:
        assert datum["status"] == (source if t.target == SAME else t.target)
    assert [d for d in after["data"] if d.get("host") == "b"] == [GOOD_B]


@pytest.mark.parametrize("name", list(CASES))
def test_transition_from_a_wrong_status_does_not_apply(collection, name):
    """The decision is taken on a read in the from-status; another daemon moves the datum on
    before the write: the transition must not apply."""
    key, source, wrong, extras, build, check = CASES[name]
    assert wrong not in BY_NAME[name].source or name in ("claim", "claim_processing", "failed")
    db = RunsDB(collection)
    _id = _insert(collection, key, source, extras)
    run, _ = _read(collection, _id)
    change = build(_id, run)
    if source is None:  # another daemon claimed first
        collection.update_one({"_id": _id}, {"$push": {"data": _datum(key, wrong)}})
    else:
        collection.update_one({"_id": _id, "data.host": "a"},
                              {"$set": {"data.$.status": wrong}})
    before = collection.find_one({"_id": _id})
    assert not db.apply(change), f"{name} applied to a datum in {wrong}"
    assert collection.find_one({"_id": _id}) == before


def test_resubmit_only_takes_a_refused_submission(collection):
    db = RunsDB(collection)
    _id = _insert(collection, PROC, "error", {"error_kind": "processing"})
    assert not db.apply(lifecycle.resubmit(_id, PROC))
    assert _read(collection, _id)[1][0]["status"] == "error"


def test_key_rule_is_one_rule():
    """pax_version missing and None are the same key; a version never matches another."""
    assert RAW.matches({"host": "a", "type": "raw"})
    assert RAW.matches({"host": "a", "type": "raw", "pax_version": None})
    assert not RAW.matches({"host": "a", "type": "raw", "pax_version": "v1"})
    assert not PROC.matches({"host": "a", "type": "processed"})
    assert DatumKey.of({"host": "a", "type": "raw", "status": "x"}) == RAW
    run = {"data": [{"host": "a", "type": "processed", "pax_version": "v2"}, PROC.as_dict()]}
    assert PROC.find(run) == (1, PROC.as_dict())
    assert str(PROC) == "processed@a[v1]" and str(RAW) == "raw@a"


def test_claim_uses_the_key_rule_on_the_server(collection):
    """A raw datum and a processed one of another version are other keys; the same key is not."""
    db = RunsDB(collection)
    _id = collection.insert_one({"number": 1, "data": [
        {"host": "a", "type": "processed", "pax_version": "v2", "status": "transferred"}]}
    ).inserted_id
    assert db.apply(lifecycle.claim(_id, _datum(PROC, "transferring")))
    assert not db.apply(lifecycle.claim(_id, _datum(PROC, "transferring")))
    assert db.apply(lifecycle.claim(_id, _datum(RAW, "transferring")))
    assert not db.apply(lifecycle.claim(_id, dict(_datum(RAW, "verifying"), pax_version=None)))
    assert len(collection.find_one({"_id": _id})["data"]) == 3


# ---- the guard: no update operator and no _write outside cax/runsdb/ ---------------------------
OPERATORS = {"$set", "$push", "$pull", "$inc", "$unset", "$addToSet", "$pop", "$pullAll",
             "$rename"}
#: RunsDB's generic writers: tasks change datums through named transitions (``db.apply``)
PRIVATE = {"_write", "update_datum", "set_status", "set_error", "pull_datum",
           "update_datum_if_unchanged", "mark_deleting", "inc_run"}


def _docstrings(tree) -> set:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def raw_writes(source: str) -> list:
    """(line, what) of every update operator and RunsDB private writer used in ``source``;
    comments and docstrings are not code and do not count."""
    tree = ast.parse(source)
    docs = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and id(node) not in docs and node.value.split(".")[0] in OPERATORS:
            found.append((node.lineno, node.value))
        elif isinstance(node, ast.Attribute) and node.attr in PRIVATE and not (
                isinstance(node.value, ast.Name) and node.value.id == "lifecycle"):
            found.append((node.lineno, node.attr))
    return found


def test_guard_finds_what_it_looks_for():
    sample = ('"""Docstrings may say $set and _write."""\n'
              '# a comment: {"$push": 1}\n'
              'def f(db, i):\n'
              '    """db._write and $pull here are prose."""\n'
              '    db._write("x", {}, {"$inc": {"n": 1}})\n'
              '    db.update_datum(i, {}, None, {})\n'
              '    return {"$unset": 1, "note": "$set is fine inside a sentence"}\n')
    assert sorted(raw_writes(sample)) == [(5, "$inc"), (5, "_write"), (6, "update_datum"),
                                          (7, "$unset")]


def test_no_update_operator_outside_runsdb():
    offenders = []
    for path in sorted((ROOT / "cax").rglob("*.py")):
        if (ROOT / "cax" / "runsdb") in path.parents:
            continue
        for line, what in raw_writes(path.read_text()):
            offenders.append(f"{path.relative_to(ROOT)}:{line}: {what}")
    assert not offenders, "datum changes belong in cax/runsdb/lifecycle.py:\n" + "\n".join(
        offenders)


# ---- error kinds: written and documented -------------------------------------------------------
def _design() -> str:
    return (ROOT / "docs" / "design.rst").read_text()


def documented_kinds() -> set:
    """The kinds in docs/design.rst's error-kinds table (its rows start with ``kind``)."""
    text = _design()
    section = text.split(".. error-kinds-table", 1)[1].split("\n\n", 2)[1]
    return {m.group(1) for m in re.finditer(r"^``([a-z-]+)``", section, re.M)}


def written_kinds() -> set:
    """Kinds some code path in cax/ writes: ``ErrorKind.X``, a string passed as ``kind=`` or
    assigned to a ``kind`` (the transfer errors' class attribute), and the one kind of an error
    transition whose builder is called (``lifecycle.stalled``, ``lifecycle.refused``)."""
    values = {k.value for k in ErrorKind}
    found = set()
    for path in (ROOT / "cax").rglob("*.py"):
        if path.name == "lifecycle.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if node.value.id == "ErrorKind" and node.attr in ErrorKind.__members__:
                    found.add(ErrorKind[node.attr].value)
                t = BY_NAME.get(node.attr)
                if node.value.id == "lifecycle" and t and t.target == Status.ERROR \
                        and len(t.kinds) == 1:
                    found.add(t.kinds[0].value)
            elif isinstance(node, ast.keyword) and node.arg == "kind" \
                    and isinstance(node.value, ast.Constant):
                found.add(node.value.value)
            elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) \
                    and any(isinstance(t, ast.Name) and t.id.lower().endswith("kind")
                            for t in node.targets):
                found.add(node.value.value)
    return found & values | (found - values)


def test_every_kind_is_documented_and_written():
    kinds = {k.value for k in ErrorKind}
    assert documented_kinds() == kinds
    assert written_kinds() == kinds


def test_datum_states_section_is_the_transition_table():
    """docs/design.rst's "Datum states" holds lifecycle.states_table() exactly; regenerate with
    ``python -c 'from cax.runsdb.lifecycle import states_table; print(states_table())'``."""
    section = _design().split("\nDatum states\n", 1)[1]
    assert lifecycle.states_table() in section
    rows = set(re.findall(r"^``(\w+)``  ", section, re.M))
    assert rows == {t.name for t in TRANSITIONS}


def test_every_change_the_code_builds_is_a_row_of_the_table():
    """The transition names the builders of lifecycle.py write (first argument of its update
    helpers) are all rows of TRANSITIONS, and every public builder is named after one."""
    tree = ast.parse((ROOT / "cax" / "runsdb" / "lifecycle.py").read_text())
    helpers = {"_set", "_pull", "_on_array", "Change", "claim"}
    named = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in helpers and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            named.add(node.args[0].value)
    assert named - set(BY_NAME) == set(), named - set(BY_NAME)
    builders = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)
                and not n.name.startswith("_")} - {"trim_reason", "states_table", "error_fields"}
    extra = {"moved": "moving", "move_undone": "moving"}  # cax mv's three steps
    assert {extra.get(b, b) for b in builders} <= set(BY_NAME)
    assert set(BY_NAME) - {extra.get(b, b) for b in builders} == {"origin_checksummed"}  # verified()


def test_server_and_python_agree_on_the_key(collection):
    """Before one rule, a key without pax_version matched any version on the server ($elemMatch
    of host and type only) but only a datum without one in Python (deletion.find_datum): a
    processed datum without a version could not be claimed beside one with a version, and an
    update of it changed the other one."""
    db = RunsDB(collection)
    v2 = {"host": "a", "type": "processed", "pax_version": "v2", "status": "transferred"}
    _id = collection.insert_one({"number": 1, "data": [dict(v2)]}).inserted_id
    bare = {"host": "a", "type": "processed", "status": "transferring"}
    assert db.claim(_id, dict(bare))
    assert db.update_datum(_id, {"host": "a", "type": "processed"}, "transferring",
                           {"status": "verifying"})
    data = collection.find_one({"_id": _id})["data"]
    assert data[0] == v2 and data[1]["status"] == "verifying"


def test_a_transition_from_a_status_not_in_its_row_is_refused():
    with pytest.raises(ValueError, match="copied is not made from verifying"):
        lifecycle._set("copied", 1, RAW, "verifying", {"status": "verifying"})
    with pytest.raises(ValueError, match="mark_deleting is not made from deleting"):
        lifecycle.mark_deleting(1, 0, RAW, ("transferred", "deleting"))
    with pytest.raises(ValueError, match="refused is not made from verifying"):
        lifecycle.refused(1, RAW, "verifying", "no")
