"""cax mv / rm / stray: files and the Runs DB change together, never outside the data directories."""
import os
import time

import click
import mongomock
import pytest
from click.testing import CliRunner

from cax import admin, deletion
from cax import cli as cli_mod
from cax.runsdb import RunsDB
from tests.purge_helpers import add_run, copies, sites_config


@pytest.fixture
def env(tmp_path, tmp_path_factory, monkeypatch):
    # stray sightings live in the state directory: outside the tree the tests snapshot
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))
    coll = mongomock.MongoClient(tz_aware=True)["run"]["runs_new"]
    def open_db(config, dry_run=False):
        return RunsDB(coll, dry_run=dry_run)

    monkeypatch.setattr(cli_mod, "open_db", open_db)  # cax status
    monkeypatch.setattr(admin, "open_db", open_db)  # cax mv / rm / stray
    cfg = sites_config(tmp_path, purge={"buffer": {"min_copies": 2}},
                       extra={"buffer": {"stray_grace_days": 1}})
    return tmp_path, cfg, RunsDB(coll)


def invoke(cmd, *args, input=None):
    return CliRunner().invoke(cmd, list(args), input=input, catch_exceptions=False)


def snapshot(db, root):
    files = sorted(os.path.join(d, f) for d, ds, fs in os.walk(root) for f in fs + ds)
    return list(db.collection.find({}, sort=[("number", 1)])), files


# ---- mv -------------------------------------------------------------------------------------
def test_mv_moves_and_updates_location(env):
    tmp, cfg, db = env
    add_run(db, tmp, 1, {"daq": "transferred", "buffer": "transferred"})
    # a copy left out of place by hand is put back where cax keeps it
    src, dst = str(tmp / "buffer" / "old" / "160301_1200"), str(tmp / "buffer" / "160301_1200")
    os.makedirs(tmp / "buffer" / "old")
    os.rename(dst, src)
    db.collection.update_one({"number": 1}, {"$set": {"data.1.location": src}})
    r = invoke(admin.mv, "--config", cfg, "--host", "buffer", "--input", src, "--output", dst)
    assert r.exit_code == 0, r.output
    d = next(d for d in db.collection.find_one({"number": 1})["data"] if d["host"] == "buffer")
    assert d["location"] == dst and "moving_to" not in d
    assert os.path.isdir(dst) and not os.path.exists(src)


def test_mv_refuses_outside_and_unknown(env):
    tmp, cfg, db = env
    add_run(db, tmp, 1, {"buffer": "transferred"})
    src = str(tmp / "buffer" / "old" / "160301_1200")
    os.makedirs(tmp / "buffer" / "old")
    os.rename(tmp / "buffer" / "160301_1200", src)
    db.collection.update_one({"number": 1}, {"$set": {"data.0.location": src}})
    before = snapshot(db, tmp)
    r = invoke(admin.mv, "--config", cfg, "--host", "buffer", "--input", src,
               "--output", str(tmp / "elsewhere"))
    assert r.exit_code == 2 and "outside the data directories" in r.output
    os.makedirs(tmp / "buffer" / "nodatum")
    r = invoke(admin.mv, "--config", cfg, "--host", "buffer", "--input",
               str(tmp / "buffer" / "nodatum"), "--output", str(tmp / "buffer" / "x"))
    assert r.exit_code == 1 and "no datum of site buffer" in r.output
    r = invoke(admin.mv, "--config", cfg, "--host", "buffer", "--dry-run", "--input", src,
               "--output", str(tmp / "buffer" / "160301_1200"))
    assert r.exit_code == 0 and "dry-run: would move" in r.output
    os.rmdir(tmp / "buffer" / "nodatum")
    assert snapshot(db, tmp) == before


def test_mv_destination_must_be_the_runs_place_for_its_type(env):
    tmp, cfg, db = env
    import json
    doc = json.loads(open(cfg).read())
    doc["sites"][1].update(dir_raw=str(tmp / "buffer" / "raw"),
                           dir_processed=str(tmp / "buffer" / "processed"))
    del doc["sites"][1]["directory"]
    open(cfg, "w").write(json.dumps(doc))
    add_run(db, tmp, 1, {"buffer": "transferred"})
    src = str(tmp / "buffer" / "raw" / "old" / "160301_1200")   # out of place
    os.makedirs(tmp / "buffer" / "raw" / "old")
    os.makedirs(tmp / "buffer" / "processed")
    os.rename(tmp / "buffer" / "160301_1200", src)
    db.collection.update_one({"number": 1}, {"$set": {"data.0.location": src}})
    before = snapshot(db, tmp)
    for dst in (tmp / "buffer" / "processed" / "160301_1200",     # another type's directory
                tmp / "buffer" / "raw" / "other_name",            # not the run's name
                tmp / "buffer" / "raw" / "sub" / "160301_1200"):  # not directly in raw/
        r = invoke(admin.mv, "--config", cfg, "--host", "buffer", "--input", src,
                   "--output", str(dst))
        assert r.exit_code == 2 and "refusing location" in r.output, r.output
        assert snapshot(db, tmp) == before
    dst = str(tmp / "buffer" / "raw" / "160301_1200")
    r = invoke(admin.mv, "--config", cfg, "--host", "buffer", "--input", src, "--output", dst)
    assert r.exit_code == 0, r.output
    assert db.collection.find_one({"number": 1})["data"][0]["location"] == dst


# ---- rm -------------------------------------------------------------------------------------
def test_rm_refuses_unsafe_delete(env):
    tmp, cfg, db = env
    add_run(db, tmp, 1, {"daq": "transferred", "buffer": "transferred"})
    before = snapshot(db, tmp)
    r = invoke(admin.rm, "--config", cfg, "--host", "buffer", "--run", "1",
               "--location", str(tmp / "buffer" / "160301_1200"))
    assert r.exit_code == 1 and "refusing to delete" in r.output and "2 required" in r.output
    # --force without a terminal and without the explicit flag: refused too
    r = invoke(admin.rm, "--config", cfg, "--host", "buffer", "--run", "1", "--force",
               "--location", str(tmp / "buffer" / "160301_1200"))
    assert r.exit_code == 2 and "not a terminal" in r.output
    assert snapshot(db, tmp) == before


def test_rm_safe_delete_and_dry_run(env):
    tmp, cfg, db = env
    add_run(db, tmp, 1, {"daq": "transferred", "buffer": "transferred", "archive": "transferred"})
    loc = str(tmp / "buffer" / "160301_1200")
    before = snapshot(db, tmp)
    r = invoke(admin.rm, "--config", cfg, "--host", "buffer", "--run", "160301_1200",
               "--location", loc, "--dry-run")
    assert r.exit_code == 0 and "would delete" in r.output and "daq, archive" in r.output
    assert snapshot(db, tmp) == before
    r = invoke(admin.rm, "--config", cfg, "--host", "buffer", "--run", "1", "--location", loc)
    assert r.exit_code == 0, r.output
    assert copies(db, 1) == {"daq": "transferred", "archive": "transferred"}
    assert not os.path.exists(loc)


def test_rm_min_copies_zero_needs_force(env, monkeypatch):
    tmp, cfg, db = env
    add_run(db, tmp, 1, {"buffer": "transferred"})   # the only copy
    loc = str(tmp / "buffer" / "160301_1200")
    before = snapshot(db, tmp)
    monkeypatch.setattr(admin, "stdin_is_tty", lambda: True)
    r = invoke(admin.rm, "--config", cfg, "--host", "buffer", "--run", "1",
               "--min-copies", "0", "--location", loc, input="160301_1200\n")
    assert r.exit_code == 2 and "--force" in r.output, r.output
    assert snapshot(db, tmp) == before
    # the library refuses too, whoever calls it
    with pytest.raises(ValueError):
        deletion.delete_copy(db, cli_mod.load_config(cfg).site("buffer"),
                             db.collection.find_one({"number": 1})["_id"],
                             {"host": "buffer", "type": "raw"}, min_copies=0)
    assert snapshot(db, tmp) == before


def test_rm_dry_run_of_deleting_copy_deletes_nothing(env):
    tmp, cfg, db = env
    add_run(db, tmp, 1, {"daq": "transferred", "buffer": "transferred", "archive": "transferred"})
    db.collection.update_one({"number": 1}, {"$set": {"data.1.status": "deleting"}})
    loc = str(tmp / "buffer" / "160301_1200")
    before = snapshot(db, tmp)
    r = invoke(admin.rm, "--config", cfg, "--host", "buffer", "--run", "1", "--location", loc,
               "--dry-run")
    assert r.exit_code == 0 and f"would finish deleting {loc}" in r.output, r.output
    assert snapshot(db, tmp) == before
    r = invoke(admin.rm, "--config", cfg, "--host", "buffer", "--run", "1", "--location", loc)
    assert r.exit_code == 0, r.output
    assert not os.path.exists(loc) and "buffer" not in copies(db, 1)


def test_rm_force_needs_typed_run_name(env, monkeypatch):
    tmp, cfg, db = env
    add_run(db, tmp, 1, {"buffer": "transferred"})
    loc = str(tmp / "buffer" / "160301_1200")
    monkeypatch.setattr(admin, "stdin_is_tty", lambda: True)
    r = invoke(admin.rm, "--config", cfg, "--host", "buffer", "--run", "1", "--force",
               "--location", loc, input="wrong\n")
    assert r.exit_code == 1 and os.path.isdir(loc) and copies(db, 1) == {"buffer": "transferred"}
    r = invoke(admin.rm, "--config", cfg, "--host", "buffer", "--run", "1", "--force",
               "--location", loc, input="160301_1200\n")
    assert r.exit_code == 0, r.output
    assert not os.path.exists(loc) and copies(db, 1) == {}


# ---- stray ----------------------------------------------------------------------------------
@pytest.fixture
def aged(monkeypatch):
    """Paths whose ctime (which no test can set) stray treats as 3 days old."""
    old = set()
    real = admin._newest_change
    monkeypatch.setattr(admin, "_newest_change",
                        lambda p: real(p) - (3 * 86400 if p in old else 0))
    return lambda path, days=3: old.add(str(path))


def seen_days_ago(days, site="buffer"):
    """Move every recorded first sighting of ``site``'s strays ``days`` into the past: what an
    earlier `cax stray` run that many days ago would have left."""
    import glob
    import json
    [path] = glob.glob(os.path.join(os.environ["XDG_STATE_HOME"], "cax", f"strays-{site}-*.json"))
    doc = json.load(open(path))
    doc["first_seen"] = {p: t - days * 86400 for p, t in doc["first_seen"].items()}
    json.dump(doc, open(path, "w"))


def test_stray_finds_and_deletes_only_old_strays(env, aged):
    tmp, cfg, db = env
    _age = aged
    for n in (1, 2, 3, 4):  # strays are not more than half of the buffer's entries
        add_run(db, tmp, n, {"daq": "transferred", "buffer": "transferred"})
    import shutil
    shutil.rmtree(tmp / "buffer" / "160302_1200")   # datum with missing files
    (tmp / "buffer" / "old_stray").mkdir()
    (tmp / "buffer" / "old_stray" / "f").write_text("x")
    _age(tmp / "buffer" / "old_stray", 3)
    (tmp / "buffer" / "new_stray.bin").write_text("x")
    os.symlink(tmp / "daq", tmp / "buffer" / "link_out")   # a stray symlink: never followed
    _age(tmp / "buffer" / "link_out", 3)
    before = snapshot(db, tmp)
    for args in ([], ["--dry-run", "--delete"]):
        r = invoke(admin.stray, "--config", cfg, "--host", "buffer", *args)
        assert r.exit_code == 0, r.output
        assert f"stray: {tmp / 'buffer' / 'old_stray'}" in r.output
        assert f"stray: {tmp / 'buffer' / 'new_stray.bin'}" in r.output
        assert "missing: run 160302_1200 datum raw@buffer" in r.output
        assert "160301_1200 " not in r.output.replace("missing: run 160302", "")
        assert snapshot(db, tmp) == before
    r = invoke(admin.stray, "--config", cfg, "--host", "buffer", "--delete")
    assert r.exit_code == 0, r.output
    # seen by the listing run above, but just now: nothing goes before stray_grace_days (1 d)
    assert r.output.count("less than stray_grace_days=1") == 2, r.output
    assert snapshot(db, tmp)[1] == before[1]
    seen_days_ago(2)
    r = invoke(admin.stray, "--config", cfg, "--host", "buffer", "--delete")
    assert r.exit_code == 0, r.output
    assert not os.path.exists(tmp / "buffer" / "old_stray")
    assert not os.path.lexists(tmp / "buffer" / "link_out")
    assert os.path.isdir(tmp / "daq" / "160301_1200")          # the link's target is untouched
    assert (tmp / "buffer" / "new_stray.bin").exists()          # younger than the grace period
    assert os.path.isdir(tmp / "buffer" / "160301_1200")        # claimed data untouched
    assert copies(db, 2)["buffer"] == "error"


def test_stray_lists_copies_being_deleted(env):
    tmp, cfg, db = env
    add_run(db, tmp, 1, {"daq": "transferred", "buffer": "transferred"})
    db.collection.update_one({"number": 1}, {"$set": {"data.1.status": "deleting",
                                                      "data.1.deleting_time": "yesterday",
                                                      "data.1.error": "removing failed: EACCES"}})
    r = invoke(admin.stray, "--config", cfg, "--host", "buffer")
    assert r.exit_code == 0, r.output
    assert (f"deleting: run 160301_1200 datum raw@buffer: {tmp / 'buffer' / '160301_1200'} "
            f"(removing failed: EACCES)") in r.output
    assert "1 copy(ies) being deleted" in r.output


def test_stray_age_is_ctime_not_a_copied_mtime(env):
    """rsync -t / cp -p give files being copied their source's old mtime; only ctime is honest."""
    tmp, cfg, db = env
    add_run(db, tmp, 1, {"buffer": "transferred"})
    (tmp / "buffer" / "incoming").mkdir()
    (tmp / "buffer" / "incoming" / "f").write_text("x")
    t = time.time() - 30 * 86400
    for p in (tmp / "buffer" / "incoming" / "f", tmp / "buffer" / "incoming"):
        os.utime(p, (t, t))
    invoke(admin.stray, "--config", cfg, "--host", "buffer")
    seen_days_ago(30)
    r = invoke(admin.stray, "--config", cfg, "--host", "buffer", "--delete")
    assert r.exit_code == 0 and "kept, younger than" in r.output, r.output
    assert (tmp / "buffer" / "incoming" / "f").exists()


def test_stray_delete_rechecks_the_runs_db(env, aged, monkeypatch):
    """A copy claimed after the listing began is no stray any more."""
    tmp, cfg, db = env
    add_run(db, tmp, 1, {"daq": "transferred"})
    add_run(db, tmp, 2, {"buffer": "transferred"})
    (tmp / "buffer" / "160301_1200").mkdir()
    aged(tmp / "buffer" / "160301_1200")
    invoke(admin.stray, "--config", cfg, "--host", "buffer")
    seen_days_ago(3)
    real = admin.find_strays

    def listing_then_claim(*a, **kw):
        out = real(*a, **kw)
        db.collection.update_one({"number": 1}, {"$push": {"data": {
            "host": "buffer", "type": "raw", "status": "transferring",
            "location": str(tmp / "buffer" / "160301_1200")}}})
        return out
    monkeypatch.setattr(admin, "find_strays", listing_then_claim)
    r = invoke(admin.stray, "--config", cfg, "--host", "buffer", "--delete")
    assert r.exit_code == 0 and "kept, a datum of this site names it now" in r.output, r.output
    assert (tmp / "buffer" / "160301_1200").is_dir()


def test_stray_reports_interrupted_move_not_missing(env):
    tmp, cfg, db = env
    add_run(db, tmp, 1, {"daq": "transferred", "buffer": "transferred"})
    old, new = tmp / "buffer" / "old" / "160301_1200", tmp / "buffer" / "160301_1200"
    os.makedirs(old.parent)
    db.collection.update_one({"number": 1}, {"$set": {"data.1.location": str(old),
                                                      "data.1.moving_to": str(new)}})
    # the crash came after the rename: the files are at the new place only
    r = invoke(admin.stray, "--config", cfg, "--host", "buffer", "--delete")
    assert r.exit_code == 0, r.output
    assert f"interrupted move: run 160301_1200 datum raw@buffer: {old} -> {new} (files at {new})" \
        in r.output
    assert "missing:" not in r.output and copies(db, 1)["buffer"] == "transferred"
    assert new.is_dir()


def test_stray_skips_a_missing_data_directory(env):
    tmp, cfg, db = env
    import json
    doc = json.loads(open(cfg).read())
    doc["sites"][1].update(dir_processed=str(tmp / "unmounted"))
    open(cfg, "w").write(json.dumps(doc))
    add_run(db, tmp, 1, {"daq": "transferred", "buffer": "transferred"})
    add_run(db, tmp, 2, {"buffer": "transferred"}, dtype="processed", version="v1")
    import shutil
    shutil.rmtree(tmp / "buffer" / "v1")   # where the processed datum says it is: not mounted
    db.collection.update_one({"number": 2}, {"$set": {
        "data.0.location": str(tmp / "unmounted" / "v1" / "160302_1200")}})
    before = snapshot(db, tmp)
    r = invoke(admin.stray, "--config", cfg, "--host", "buffer", "--delete")
    assert r.exit_code == 0, r.output
    assert f"note: data directory {tmp / 'unmounted'} of site buffer does not exist" in r.output
    assert "missing:" not in r.output
    assert snapshot(db, tmp) == before


def test_admin_messages_once(env):
    tmp, cfg, db = env
    add_run(db, tmp, 1, {"daq": "transferred", "buffer": "transferred", "archive": "transferred"})
    group = click.Group("cax", callback=cli_mod.cli.callback, params=cli_mod.cli.params)
    for c in admin.COMMANDS + (cli_mod.status,):
        group.add_command(c)
    loc = str(tmp / "buffer" / "160301_1200")
    r = CliRunner().invoke(group, ["rm", "--config", cfg, "--host", "buffer", "--run", "1",
                                   "--location", loc], catch_exceptions=False)
    assert r.exit_code == 0 and r.output.count(f"removed {loc}") == 1, r.output
    r = invoke(admin.mv, "--config", cfg, "--host", "buffer", "--input", str(tmp / "elsewhere"),
               "--output", loc)
    assert r.exit_code == 2 and r.output.count(str(tmp / "buffer")) == 1, r.output
    db.collection.update_one({"number": 1}, {"$set": {"data": []}})
    r = CliRunner().invoke(group, ["status", "--config", cfg, "--host", "buffer"],
                           catch_exceptions=False)
    assert "no transferred copy" in r.output and "all equal (0)" not in r.output, r.output


def test_root_dry_run_flag_reaches_commands(env):
    tmp, cfg, db = env
    add_run(db, tmp, 1, {"daq": "transferred", "buffer": "transferred", "archive": "transferred"})
    group = click.Group("cax", callback=cli_mod.cli.callback, params=cli_mod.cli.params,
                        invoke_without_command=False)
    for c in admin.COMMANDS:
        group.add_command(c)
    before = snapshot(db, tmp)
    r = CliRunner().invoke(group, ["--dry-run", "rm", "--config", cfg, "--host", "buffer",
                                   "--run", "1", "--location", str(tmp / "buffer" / "160301_1200")],
                           catch_exceptions=False)
    assert r.exit_code == 0 and "would delete" in r.output, r.output
    assert snapshot(db, tmp) == before


def test_rm_force_without_terminal_needs_explicit_flag(env):
    tmp, cfg, db = env
    add_run(db, tmp, 1, {"buffer": "transferred"})
    loc = str(tmp / "buffer" / "160301_1200")
    r = invoke(admin.rm, "--config", cfg, "--host", "buffer", "--run", "1", "--force",
               "--yes-i-know-this-deletes-data", "--location", loc)
    assert r.exit_code == 0, r.output
    assert not os.path.exists(loc) and copies(db, 1) == {}


# ---- status and stray on odd Runs DB contents -----------------------------------------------
def test_status_shows_runs_whose_data_hold_non_objects(env):
    """Any tool may write a Runs DB: one bad entry must not hide every run (it crashed status)."""
    import json
    tmp, cfg, db = env
    add_run(db, tmp, 1, {"daq": "transferred", "buffer": "transferred"})
    add_run(db, tmp, 2, {"daq": "transferred"})
    db.collection.update_one({"number": 2}, {"$push": {"data": {"$each": ["junk", 5, None]},
                                                       "references": "x"}})
    db.collection.insert_one({"number": 3, "name": "160303_1200", "data": "not a list"})
    for args in ([], ["--json"]):
        r = CliRunner().invoke(cli_mod.status, ["--config", cfg, *args], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        warnings = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(warnings) == 2, warnings
        assert warnings[0] == ("cax: warning: run 160302_1200: data[1], data[2], data[3], "
                               "references[1] are not objects; skipped"), warnings
        assert "run 160303_1200: data is not a list" in warnings[1], warnings
        if args:
            out = {r_["number"]: r_ for r_ in json.loads(r.stdout)}
            assert [d["host"] for d in out[2]["data"]] == ["daq"] and out[3]["data"] == []
            assert len(out[1]["data"]) == 2
        else:
            rows = r.stdout.splitlines()
            assert rows[1].split()[:2] == ["1", "160301_1200"] and "160302_1200" in rows[2]
            assert "all equal (1)" in rows[2] and "160303_1200" in rows[3]


def test_stray_and_status_escape_names_from_the_runs_db(env):
    """A crafted run name (or file name) must not fake output lines."""
    tmp, cfg, db = env
    for n in (1, 2, 3):
        add_run(db, tmp, n, {"daq": "transferred", "buffer": "transferred"})
    fake = "stray: /etc/passwd (age 99.0 d): deleted"
    db.collection.update_one({"number": 1}, {"$set": {"name": f"160301_1200\n{fake}"}})
    import shutil
    shutil.rmtree(tmp / "buffer" / "160301_1200")       # its datum is reported as missing
    db.collection.update_one({"number": 2}, {"$set": {"data.1.status": "deleting",
                                                      "data.1.error": f"x\r\n{fake}"}})
    (tmp / "buffer" / "junk\nstray: forged").write_text("x")  # a file name with a newline
    r = CliRunner().invoke(admin.stray, ["--config", cfg, "--host", "buffer"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert not any(ln.startswith(("stray: /etc", "stray: forged")) for ln in r.output.splitlines())
    assert "missing: run 160301_1200\\nstray: /etc/passwd" in r.output
    assert "(x\\r\\nstray: /etc/passwd" in r.output
    assert f"stray: {tmp / 'buffer' / 'junk'}\\nstray: forged" in r.output
    r = CliRunner().invoke(cli_mod.status, ["--config", cfg], catch_exceptions=False)
    assert r.exit_code == 0 and "160301_1200\\nstray: /etc/passwd" in r.output, r.output
    assert not any(ln.startswith("stray: /etc") for ln in r.output.splitlines()), r.output


def test_stray_force_passes_the_refusal_but_not_the_grace(env, aged):
    """--force says "these really are strays"; it does not make a first sighting old."""
    import glob
    tmp, cfg, db = env
    add_run(db, tmp, 1, {"daq": "transferred"})   # no datum at the buffer
    for name in ("a", "b"):
        (tmp / "buffer" / name).mkdir()
        aged(tmp / "buffer" / name)
    r = invoke(admin.stray, "--config", cfg, "--host", "buffer")
    assert r.exit_code == 0 and "holds no datum of site buffer" in r.output, r.output
    state = os.path.join(os.environ["XDG_STATE_HOME"], "cax")
    assert not glob.glob(os.path.join(state, "strays-*"))  # a suspect listing starts no clock
    r = invoke(admin.stray, "--config", cfg, "--host", "buffer", "--delete", "--force")
    assert r.exit_code == 0 and r.output.count("kept, first seen now") == 2, r.output
    [path] = glob.glob(os.path.join(state, "strays-buffer-*.json"))
    open(path, "w").write("{not json")
    r = invoke(admin.stray, "--config", cfg, "--host", "buffer", "--delete", "--force")
    assert "unreadable" in r.output and r.output.count("kept, first seen now") == 2, r.output
    seen_days_ago(2)
    r = invoke(admin.stray, "--config", cfg, "--host", "buffer", "--delete", "--force",
               "--max-delete", "1")
    assert r.exit_code == 0 and r.output.count(": deleted") == 1, r.output
    assert sum((tmp / "buffer" / n).exists() for n in ("a", "b")) == 1
    assert os.path.isdir(tmp / "daq" / "160301_1200")


def test_every_installed_command_answers_dash_h():
    """`cax-mv -h` said "No such option '-h'" while `cax mv -h` worked (issue 16)."""
    import re
    import subprocess
    import sys
    import tomllib
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert len(scripts) >= 7
    for name, target in scripts.items():
        module, func = target.split(":")
        for flag in ("-h", "--help"):
            r = subprocess.run([sys.executable, "-c", f"import sys; sys.argv[0] = {name!r}; "
                                f"from {module} import {func}; {func}()", flag],
                               capture_output=True, text=True, timeout=60,
                               env=dict(os.environ, PYTHONPATH=root))
            assert r.returncode == 0 and re.match(rf"Usage: {re.escape(name)} ", r.stdout), \
                (name, flag, r.stdout, r.stderr)
