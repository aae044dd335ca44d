"""The classic cax's own config files (tests/data/classic, from the public XENON1T/cax
repository) load unchanged, with one warning per thing this cax does differently."""
import json
import logging
import os

import pytest
from click.testing import CliRunner

from cax import config as cfgmod
from cax.cli import cli

DATA = os.path.join(os.path.dirname(__file__), "data", "classic")
CLASSIC_2016 = os.path.join(DATA, "cax_2016.json")
CLASSIC_2018 = os.path.join(DATA, "cax_2018.json")
TSM_UPLOAD = os.path.join(DATA, "cax_tsm_upload.json")


def site_names(path):
    with open(path) as f:
        return [s["name"] for s in json.load(f)]


def run(*args, env=None):
    return CliRunner().invoke(cli, list(args), env=env)


def error_line(result):
    lines = [ln for ln in result.stderr.splitlines() if ln.strip() and "WARNING" not in ln]
    assert len(lines) == 1, lines
    assert lines[0].startswith("cax: error: ")
    return lines[0]


@pytest.mark.parametrize("path,host", [(p, h) for p in (CLASSIC_2016, CLASSIC_2018)
                                       for h in site_names(p)])
def test_config_check_passes_for_every_classic_site(path, host):
    result = run("--config", path, "config", "check", "--host", host)
    assert result.exit_code == 0, result.output
    assert f"config {path}: OK" in result.output


def test_receive_null_at_a_remote_site_is_scp(caplog):
    caplog.set_level(logging.WARNING, "cax.config")
    config = cfgmod.load(CLASSIC_2016)
    eb0 = config.site("eb0")  # "hostname": "eb0", "receive": null
    assert eb0.method == "scp" and not eb0.unreachable
    notes = [r.getMessage() for r in caplog.records if "'eb0'" in r.getMessage()]
    assert len(notes) == 1 and "scp" in notes[0] and "'receive'" in notes[0], notes


def test_site_without_method_key_is_scp_when_remote_and_local_on_this_machine(tmp_path):
    doc = [{"name": "daq", "hostname": "daq.example.org", "directory": "/tmp/daq"},
           {"name": "here", "directory": "/tmp/here"},
           {"name": "lo", "hostname": "localhost", "directory": "/tmp/lo"}]
    p = tmp_path / "cax.json"
    p.write_text(json.dumps(doc))
    config = cfgmod.load(str(p))
    assert config.site("daq").method == "scp"
    assert config.site("here").method == "local"
    assert config.site("lo").method == "local"


def test_unreachable_sites_load_and_are_warned_about_once(caplog):
    caplog.set_level(logging.WARNING, "cax.config")
    config = cfgmod.load(CLASSIC_2018)
    unreachable = {n for n, s in config.sites.items() if s.unreachable}
    # the gfal-copy sites are reachable since the gfal method (issue 14; tests/test_grid.py)
    assert unreachable == {"tsm-server"}
    assert "'tsm'" in config.site("tsm-server").unreachable
    assert "no hostname" in config.site("tsm-server").unreachable
    assert config.site("lfc").method == "gfal" and not config.site("lfc").unreachable
    for name in unreachable:
        said = [r for r in caplog.records if f"site {name!r}: not reachable" in r.getMessage()]
        assert len(said) == 1, (name, [r.getMessage() for r in caplog.records])
    for name in set(config.sites) - unreachable:
        assert config.reach_problem(name) is None, name


def test_a_host_whose_options_name_an_unreachable_site_is_an_error():
    # classic tsm variant: midway-login1 downloads from xe1t-datamanager, whose method is tsm
    result = run("--config", TSM_UPLOAD, "config", "check", "--host", "midway-login1")
    assert result.exit_code == 2, result.output
    line = error_line(result)
    for needle in ("site 'midway-login1'", "download_options", "'xe1t-datamanager'", "'tsm'"):
        assert needle in line, (needle, line)
    # a site that names none of them is fine in the same file
    assert run("--config", TSM_UPLOAD, "config", "check", "--host", "lena").exit_code == 0


def test_the_daemon_refuses_to_run_as_an_unreachable_site(tmp_path):
    result = run("--config", CLASSIC_2018, "--host", "tsm-server", "--once",
                 env={"XDG_STATE_HOME": str(tmp_path)})
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert "site 'tsm-server'" in line and "'tsm'" in line, line


def test_no_method_reaches_an_unreachable_site():
    from cax.transfer import ServiceUnavailable, features
    from cax.transfer.pool import ConnectionPool
    site = cfgmod.load(CLASSIC_2018).site("tsm-server")
    assert not features(site).local_paths
    pool = ConnectionPool()
    try:
        with pytest.raises(ServiceUnavailable, match="tsm-server.*not reachable"):
            pool.method(site)
    finally:
        pool.close()


# ---- classic task names and flags -----------------------------------------------------------
RUCIAX = os.path.join(DATA, "cax_ruciax.json")


def sites_with_tasks(tmp_path, daq_tasks, buffer_tasks=None):
    from tests.helpers import three_sites
    path = three_sites(tmp_path)
    with open(path) as f:
        doc = json.load(f)
    doc["sites"][0]["task_list"] = daq_tasks
    if buffer_tasks is not None:
        doc["sites"][1]["task_list"] = buffer_tasks
    with open(path, "w") as f:
        json.dump(doc, f)
    return path


def test_classic_task_names_map_to_their_successors(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "cax.config")
    config = cfgmod.load(sites_with_tasks(tmp_path, ["SCPPush", "SCPPull", "AddChecksum"]))
    assert config.tasks_for("daq") == ["CopyPush", "CopyPull", "AddChecksum"]
    said = [r.getMessage() for r in caplog.records if "classic task" in r.getMessage()]
    assert len(said) == 2, said
    assert any("'SCPPush'" in m and "'CopyPush'" in m for m in said), said


@pytest.mark.parametrize("name", ["ClearDAQBuffer", "AddGains", "AddElectronLifetime",
                                  "ProcessBatchQueueHax", "RucioRule"])
def test_classic_tasks_cax_does_not_do_are_skipped_never_mapped(tmp_path, caplog, name):
    caplog.set_level(logging.WARNING, "cax.config")
    config = cfgmod.load(sites_with_tasks(tmp_path, ["CopyPush", name]))
    assert config.tasks_for("daq") == ["CopyPush"]
    said = [r.getMessage() for r in caplog.records if f"classic task {name!r}" in r.getMessage()]
    assert len(said) == 1 and "skipped" in said[0], said


def test_a_task_list_of_only_skipped_tasks_runs_nothing(tmp_path):
    # "task_list": ["ClearDAQBuffer"] must not become "every task", BufferPurger included
    config = cfgmod.load(sites_with_tasks(tmp_path, ["ClearDAQBuffer"]))
    assert config.tasks_for("daq") == []
    assert "BufferPurger" in config.tasks_for("buffer")  # no task_list: the defaults


def test_the_classic_ruciax_config_loads_for_its_reachable_site():
    result = run("--config", RUCIAX, "config", "check", "--host", "lena")
    assert result.exit_code == 0, result.output


def test_an_unknown_task_breaks_only_the_site_naming_it(tmp_path):
    path = sites_with_tasks(tmp_path, ["CopyPush"], buffer_tasks=["Teleport"])
    ok = run("--config", path, "config", "check", "--host", "daq")
    assert ok.exit_code == 0, ok.output
    bad = run("--config", path, "config", "check", "--host", "buffer")
    assert bad.exit_code == 2, bad.output
    line = error_line(bad)
    assert "site 'buffer'" in line and "'Teleport'" in line and "task_list" in line, line
    daemon = run("--config", path, "--host", "buffer", "--once")
    assert daemon.exit_code == 2 and "'Teleport'" in error_line(daemon)


def test_classic_disable_database_update_is_a_dry_run(tmp_path):
    from cax.runsdb import connect
    from tests.helpers import make_raw, run_doc
    path = sites_with_tasks(tmp_path, ["CopyPush"])
    config = cfgmod.load(path)
    src = make_raw(str(tmp_path / "daq"), "160101_0000")
    db = connect(config)
    db.insert_run(run_doc(1, "160101_0000", src, status="transferred"))
    db.close()
    result = run("--config", path, "--host", "daq", "--once", "--disable_database_update")
    assert result.exit_code == 0, result.output
    assert "--disable_database_update" in result.stderr and "dry run" in result.stderr
    assert not os.path.exists(tmp_path / "buffer" / "160101_0000")  # nothing copied
    db = connect(config)
    try:
        assert [d["host"] for d in db.run_by(number=1)["data"]] == ["daq"]  # nothing recorded
    finally:
        db.close()


def test_ncpu_sets_this_hosts_processing_cpus_and_is_bounded(tmp_path):
    path = sites_with_tasks(tmp_path, ["CopyPush"])
    assert run("--config", path, "--host", "daq", "--ncpu", "0", "--once").exit_code == 2
    result = run("--config", path, "--host", "daq", "--ncpu", "4", "--once", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "--ncpu 4 ignored" in result.stderr  # daq does not process
    with open(path) as f:
        doc = json.load(f)
    doc["sites"][1].update(dir_processed=str(tmp_path / "processed"), processing={
        "versions": ["v1"], "command": ["true", "{input}", "{output}"], "ncpus": 2})
    with open(path, "w") as f:
        json.dump(doc, f)
    result = run("--config", path, "--host", "buffer", "--ncpu", "4", "--once", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "ncpus=4" in result.stderr and "ncpus=2" not in result.stderr, result.stderr


def test_runs_add_reads_mongoexport_extended_json(tmp_path):
    from cax.runsdb import connect
    from tests.helpers import three_sites
    path = three_sites(tmp_path)
    export = [{"_id": {"$oid": "57f1a2b3c4d5e6f708192a3b"}, "number": 7, "name": "160101_0007",
               "detector": "tpc", "start": {"$date": "2016-01-01T00:00:00.000Z"},
               "end": {"$date": {"$numberLong": "1451610000000"}},
               "data": [{"host": "daq", "type": "raw", "status": "transferred",
                         "location": "/data/160101_0007",
                         "creation_time": {"$date": 1451606400000}}]},
              {"number": 8, "name": "160101_0008", "detector": "tpc",
               "start": {"$date": "not a date"}}]
    p = tmp_path / "runs.json"
    p.write_text(json.dumps(export))
    result = run("--config", path, "runs", "add", str(p))
    assert result.exit_code == 1, result.output  # the second one is refused, in one line
    assert "added 1 run(s), rejected 1" in result.output
    bad = [ln for ln in result.stderr.splitlines() if ln.startswith("cax: error")]
    assert len(bad) == 1 and "160101_0008" in bad[0] and "$date" in bad[0], bad
    db = connect(cfgmod.load(path))
    try:
        doc = db.run_by(number=7)
        assert doc["start"].isoformat() == "2016-01-01T00:00:00+00:00"
        assert doc["end"].isoformat() == "2016-01-01T01:00:00+00:00"
        assert doc["data"][0]["creation_time"].isoformat() == "2016-01-01T00:00:00+00:00"
    finally:
        db.close()


# ---- naming the Runs DB ---------------------------------------------------------------------
def list_config(tmp_path):
    doc = [{"name": "daq", "directory": str(tmp_path / "daq"), "upload_options": ["buffer"]},
           {"name": "buffer", "directory": str(tmp_path / "buffer")}]
    for s in doc:
        os.makedirs(s["directory"], exist_ok=True)
    p = tmp_path / "cax.json"
    p.write_text(json.dumps(doc))
    return str(p)


def store_with_run(path, number):
    from cax.runsdb import connect
    from tests.helpers import init_store, run_doc
    init_store(path)
    config = cfgmod.load(config_for_store(path))
    db = connect(config)
    try:
        db.insert_run(run_doc(number, f"16010{number}_0000", "/nowhere", status="transferred"))
    finally:
        db.close()


def config_for_store(path):
    p = os.path.join(os.path.dirname(path), "store_cax.json")
    with open(p, "w") as f:
        json.dump({"runs_db": path, "sites": [{"name": "daq", "directory": "/tmp/daq"}]}, f)
    return p


def numbers(result):
    assert result.exit_code == 0, result.output
    return sorted(r["number"] for r in json.loads(result.output))


def test_a_daemon_on_a_list_config_naming_no_runs_db_exits_2(tmp_path):
    path = list_config(tmp_path)
    result = run("--config", path, "--host", "daq", "--once", env={"CAX_RUNS_DB": None})
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert "--runs-db" in line and "CAX_RUNS_DB" in line and path in line, line
    assert not os.path.exists(tmp_path / "cax.runsdb")  # no empty store made behind its back


def test_runs_db_flag_wins_over_the_variable_which_wins_over_the_config(tmp_path):
    from tests.helpers import three_sites
    path = three_sites(tmp_path)  # object form, its own runs_db (empty)
    flag, var = str(tmp_path / "flag.runsdb"), str(tmp_path / "var.runsdb")
    store_with_run(flag, 1)
    store_with_run(var, 2)
    assert numbers(run("--config", path, "status", "--json", env={"CAX_RUNS_DB": None})) == []
    assert numbers(run("--config", path, "status", "--json", env={"CAX_RUNS_DB": var})) == [2]
    assert numbers(run("--runs-db", flag, "--config", path, "status", "--json",
                       env={"CAX_RUNS_DB": var})) == [1]


def test_a_list_config_runs_with_a_runs_db_named_outside_it(tmp_path):
    path = list_config(tmp_path)
    store = str(tmp_path / "named.runsdb")
    store_with_run(store, 3)
    for args, env in ((["--runs-db", store], {"CAX_RUNS_DB": None}), ([], {"CAX_RUNS_DB": store})):
        result = run(*args, "--config", path, "--host", "daq", "--once", "--dry-run", env=env)
        assert result.exit_code == 0, result.output
        assert store in result.stderr  # the starting line names the Runs DB in use


def test_a_bad_uri_in_the_variable_is_named_as_coming_from_it(tmp_path):
    path = list_config(tmp_path)
    result = run("--config", path, "config", "check", env={"CAX_RUNS_DB": "mongodb://h:99999/"})
    assert result.exit_code == 2, result.output
    assert "$CAX_RUNS_DB" in error_line(result)


# ---- strictness -----------------------------------------------------------------------------
def two_sites(tmp_path, daq_extra=None, **top):
    doc = {"runs_db": str(tmp_path / "x.runsdb"), **top,
           "sites": [dict({"name": "daq", "directory": str(tmp_path / "daq"),
                           "upload_options": ["buffer"]}, **(daq_extra or {})),
                     {"name": "buffer", "directory": str(tmp_path / "buffer")}]}
    p = tmp_path / "cax.json"
    p.write_text(json.dumps(doc))
    return str(p)


def test_a_key_one_edit_from_a_known_one_gets_a_suggestion(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "cax.config")
    cfgmod.load(two_sites(tmp_path, {"upload_option": ["buffer"], "grid_cert": "/x"}))
    said = [r.getMessage() for r in caplog.records if "unknown key" in r.getMessage()]
    typo = [m for m in said if "'upload_option'" in m]
    assert len(typo) == 1 and "did you mean 'upload_options'?" in typo[0], said
    other = [m for m in said if "'grid_cert'" in m]
    assert len(other) == 1 and "did you mean" not in other[0], said  # no far-fetched guess


@pytest.mark.parametrize("how", ["flag", "config"])
def test_strict_makes_unknown_keys_errors(tmp_path, how):
    top = {"strict": True} if how == "config" else {}
    path = two_sites(tmp_path, {"upload_option": ["buffer"]}, **top)
    args = ["--strict"] if how == "flag" else []
    result = run(*args, "--config", path, "config", "check", "--host", "daq")
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert "site 'daq'" in line and "'upload_option'" in line and "'upload_options'" in line, line
    # without strict the same file loads (a warning)
    path = two_sites(tmp_path, {"upload_option": ["buffer"]})
    assert run("--config", path, "config", "check", "--host", "daq").exit_code == 0


def test_strict_top_level_key(tmp_path):
    path = two_sites(tmp_path, intreval=30, strict=True)
    line = error_line(run("--config", path, "config", "check", "--host", "daq"))
    assert "'intreval'" in line and "'interval'" in line, line


@pytest.mark.parametrize("section,value,needle", [
    ("purge", {"min_copy": 2}, "key 'purge.min_copy'"),
    ("purge", {"min_copies": 0}, "key 'purge.min_copies'"),
    ("scrub", {"every_day": 3}, "key 'scrub.every_day'"),
    ("processing", {"ncpu": 2}, "key 'processing.ncpu'"),
])
def test_errors_inside_purge_and_processing_name_the_bad_key(tmp_path, section, value, needle):
    path = two_sites(tmp_path, {section: value})
    result = run("--config", path, "config", "check", "--host", "daq")
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert needle in line, line
    if "min_copy" in value:  # two edits from min_copies: named, no guess
        assert "did you mean" not in line, line
    if "every_day" in value:
        assert "did you mean 'every_days'?" in line, line


def test_a_typo_inside_purge_is_named_with_a_suggestion(tmp_path):
    path = two_sites(tmp_path, {"purge": {"older_than_day": 3}})
    line = error_line(run("--config", path, "config", "check", "--host", "daq"))
    assert "key 'purge.older_than_day'" in line and "did you mean 'older_than_days'?" in line, line
