"""Every config problem: exit status 2 and one line naming the file, the site and the key."""
import json
import logging
import os

import pytest
from click.testing import CliRunner

from cax import config as cfgmod
from cax.cli import cli

GOOD = [
    {"name": "daq", "directory": "/tmp/daq", "upload_options": ["buffer"]},
    {"name": "buffer", "directory": "/tmp/buffer", "download_options": None},
]


def write(tmp_path, doc):
    p = tmp_path / "cax.json"
    p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(p)


def check_error(tmp_path, doc, *needles):
    path = write(tmp_path, doc)
    result = CliRunner().invoke(cli, ["--config", path, "config", "check"])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("cax: error: ")
    for n in (path,) + needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_bad_json_reports_line_and_column(tmp_path):
    line = check_error(tmp_path, '[\n {"name": "daq",\n  "directory": }\n]', "line 3", "column")
    assert "invalid JSON" in line


def test_wrong_type(tmp_path):
    doc = [dict(GOOD[0], port="22"), GOOD[1]]
    check_error(tmp_path, doc, "site 'daq'", "key 'port'")


def test_duplicate_site(tmp_path):
    check_error(tmp_path, [GOOD[0], GOOD[1], dict(GOOD[1])], "site 'buffer'", "duplicate")


def test_option_naming_unknown_site(tmp_path):
    doc = [dict(GOOD[0], upload_options=["nowhere"]), GOOD[1]]
    check_error(tmp_path, doc, "site 'daq'", "key 'upload_options'", "'nowhere'")


def test_missing_directory_for_type(tmp_path):
    doc = [{"name": "daq", "dir_raw": "/tmp/r", "data_type": ["raw", "processed"]}]
    check_error(tmp_path, doc, "site 'daq'", "key 'dir_processed'")


def test_unknown_task(tmp_path):
    check_error(tmp_path, {"sites": GOOD, "task_list": ["CopyPush", "Teleport"]},
                "key 'task_list'", "'Teleport'")


def test_bad_method(tmp_path):
    check_error(tmp_path, [dict(GOOD[0], method="carrier-pigeon"), GOOD[1]],
                "site 'daq'", "key 'method'")


def test_missing_name(tmp_path):
    check_error(tmp_path, [{"directory": "/x"}], "site '#1'", "key 'name'")


def test_unreadable_file(tmp_path):
    result = CliRunner().invoke(cli, ["--config", str(tmp_path / "nope.json"), "config", "check"])
    assert result.exit_code == 2
    assert "cannot read config" in result.stderr


def test_daemon_exits_2_before_touching_anything(tmp_path):
    path = write(tmp_path, [dict(GOOD[0], upload_options=["nowhere"]), GOOD[1]])
    result = CliRunner().invoke(cli, ["--config", path, "--host", "daq", "--once"])
    assert result.exit_code == 2
    assert not (tmp_path / "cax.runsdb").exists()


def test_unknown_keys_warn_once_not_fatal(tmp_path, caplog):
    doc = [dict(GOOD[0], grid_cert="/x", nstreams=4, dir_minitrees="/y"), GOOD[1]]
    with caplog.at_level(logging.WARNING):
        cfg = cfgmod.parse(json.dumps(doc), "x.json")
    assert not hasattr(cfg.sites["daq"], "nstreams")  # accepted, documented as ignored
    warned = [r.getMessage() for r in caplog.records]
    assert sum("grid_cert" in m for m in warned) == 1
    assert sum("dir_minitrees" in m for m in warned) == 1
    assert not any("nstreams" in m for m in warned)  # a known key: no warning


def test_classic_and_object_forms_agree():
    a = cfgmod.parse(json.dumps(GOOD), "/etc/cax.json")
    b = cfgmod.parse(json.dumps({"sites": GOOD}), "/etc/cax.json")
    assert a.sites == b.sites
    assert a.runs_db == "/etc/cax.runsdb"


def test_receive_and_purge_synonyms():
    doc = [dict(GOOD[0], receive="rsync", purge=3), GOOD[1]]
    site = cfgmod.parse(json.dumps(doc), "c.json").sites["daq"]
    assert site.method == "rsync"
    # the classic integer is an age in days, with the classic three copies (issue 12)
    assert (site.purge["older_than_days"], site.purge["min_copies"]) == (3, 2)


def test_task_list_narrows_keeping_order():
    doc = {"sites": [dict(GOOD[0], task_list=["AddChecksum", "CopyPush"]), GOOD[1]],
           "task_list": ["CopyPull"]}
    cfg = cfgmod.parse(json.dumps(doc), "c.json")
    assert cfg.tasks_for("daq") == ["CopyPush", "AddChecksum"]
    assert cfg.tasks_for("buffer") == ["CopyPull"]


def test_unknown_host_lists_known_sites(tmp_path):
    path = write(tmp_path, GOOD)
    result = CliRunner().invoke(cli, ["--config", path, "--host", "mars", "--once"])
    assert result.exit_code == 2
    assert "'mars'" in result.stderr and "daq, buffer" in result.stderr


def test_host_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CAX_HOST", "buffer")
    assert cfgmod.default_host() == "buffer"


def test_packaged_default_config_is_valid():
    import cax
    cfg = cfgmod.load(os.path.join(os.path.dirname(cax.__file__), "cax.json"))
    assert set(cfg.sites) == {"daq", "buffer", "archive"}


def test_packaged_config_keeps_its_store_in_the_user_state_dir(tmp_path, monkeypatch):
    """Not beside the packaged file: that is site-packages, and `cax status` must not write there."""
    import cax
    package_dir = os.path.dirname(cax.__file__)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    cfg = cfgmod.load(os.path.join(package_dir, "cax.json"))
    assert cfg.runs_db == str(tmp_path / "state" / "cax" / "cax.runsdb")
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = cfgmod.load(os.path.join(package_dir, "cax.json"))
    assert cfg.runs_db == str(tmp_path / "home" / ".local" / "state" / "cax" / "cax.runsdb")


def test_without_any_config_cax_says_where_it_looked_and_writes_nothing(tmp_path, monkeypatch):
    """Never the example packaged inside cax: a site whose config went missing must not act on
    the example's sites and Runs DB (issue 16)."""
    import cax
    package_dir = os.path.dirname(cax.__file__)
    before = sorted(os.listdir(package_dir))
    monkeypatch.chdir(tmp_path)  # no ./cax.json here
    monkeypatch.delenv(cfgmod.CONFIG_ENV, raising=False)
    monkeypatch.setattr(cfgmod, "SYSTEM_CONFIG", str(tmp_path / "etc" / "cax.json"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    for argv in (["status"], ["--host", "daq", "--once"], ["db", "init"], ["config", "check"]):
        result = CliRunner().invoke(cli, argv)
        assert result.exit_code == 2, (argv, result.output)
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "no config" in lines[0], (argv, lines)
        assert "$CAX_CONFIG" in lines[0] and "./cax.json" in lines[0]
        assert str(tmp_path / "etc" / "cax.json") in lines[0]
    assert os.listdir(tmp_path) == []
    assert sorted(os.listdir(package_dir)) == before
    help_text = CliRunner().invoke(cli, ["--help"]).output
    assert "CAX_CONFIG" in help_text and "/etc/cax/cax.json" in help_text


def test_config_discovery_order(tmp_path, monkeypatch):
    """--config, then $CAX_CONFIG, then ./cax.json, then /etc/cax/cax.json."""
    def site_config(name):
        d = tmp_path / name
        d.mkdir()
        path = d / "cax.json"
        path.write_text(json.dumps([{"name": name, "directory": str(d)}]))
        return str(path)
    system, cwd, env, flag = (site_config(n) for n in ("system", "cwd", "env", "flag"))
    monkeypatch.setattr(cfgmod, "SYSTEM_CONFIG", system)
    monkeypatch.delenv(cfgmod.CONFIG_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert cfgmod.load().path == system
    monkeypatch.chdir(os.path.dirname(cwd))
    assert cfgmod.load().path == cwd
    monkeypatch.setenv(cfgmod.CONFIG_ENV, env)
    assert cfgmod.load().path == env
    assert cfgmod.load(flag).path == flag
    monkeypatch.setenv(cfgmod.CONFIG_ENV, str(tmp_path / "typo.json"))
    with pytest.raises(cfgmod.ConfigError, match=r"\$CAX_CONFIG=.*typo.json: no such file"):
        cfgmod.load()


def test_packaged_example_keeps_its_store_in_the_state_dir_when_named(tmp_path, monkeypatch):
    """Named on purpose (--config), the example's store goes to the state directory and
    `db init` makes it there, never beside the packaged file (site-packages)."""
    import cax
    package_dir = os.path.dirname(cax.__file__)
    before = sorted(os.listdir(package_dir))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    example = os.path.join(package_dir, "cax.json")
    store = tmp_path / "state" / "cax" / "cax.runsdb"
    result = CliRunner().invoke(cli, ["--config", example, "status"])
    assert result.exit_code == 1 and "cax db init" in result.stderr, result.output
    assert not (tmp_path / "state").exists()
    result = CliRunner().invoke(cli, ["--config", example, "db", "init"])
    assert result.exit_code == 0 and str(store) in result.output, result.output
    result = CliRunner().invoke(cli, ["--config", example, "status"])
    assert result.exit_code == 0 and "(no runs)" in result.output, result.output
    assert sorted(os.listdir(package_dir)) == before


def test_unwritable_log_file_is_one_line_exit_2(tmp_path):
    path = write(tmp_path, GOOD)
    log_file = str(tmp_path / "nonexistent" / "dir" / "x.log")
    result = CliRunner().invoke(cli, ["--config", path, "--host", "daq", "--once",
                                      "--log-file", log_file])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert lines == [f"cax: error: cannot open log file {log_file}: No such file or directory"]
    assert not (tmp_path / "cax.runsdb").exists()


def test_non_finite_numbers_rejected(tmp_path):
    text = json.dumps({"sites": GOOD, "interval": 60}).replace("60", "Infinity")
    check_error(tmp_path, text, "key 'interval'", "line 1", "finite")
    doc = json.dumps([dict(GOOD[0], stalled_after=1), GOOD[1]], indent=1)
    check_error(tmp_path, doc.replace('"stalled_after": 1', '"stalled_after": NaN'),
                "site 'daq'", "key 'stalled_after'", "finite")
    check_error(tmp_path, doc.replace('"stalled_after": 1', '"stalled_after": 1e999'),
                "site 'daq'", "key 'stalled_after'", "finite")


def test_duplicate_keys_rejected_with_site_key_and_line(tmp_path):
    text = ('[\n {"name": "daq", "directory": "/tmp/daq",\n  "upload_options": ["buffer"]},\n'
            ' {"name": "buffer", "directory": "/tmp/a",\n  "directory": "/tmp/b"}\n]')
    check_error(tmp_path, text, "site 'buffer'", "key 'directory'", "twice", "line 4")
    top = '{"sites": [], "interval": 5,\n "interval": 7}'
    check_error(tmp_path, top, "key 'interval'", "twice", "line 1")


def test_interval_option_range(tmp_path):
    path = write(tmp_path, GOOD)
    for bad in ("-5", "inf", "nan", "1e12"):
        result = CliRunner().invoke(cli, ["--config", path, "--host", "daq", "--once",
                                          "--interval", bad])
        assert result.exit_code == 2, (bad, result.output)
        assert "--interval" in result.stderr
    assert not (tmp_path / "cax.runsdb").exists()


def test_classic_null_directories_mean_none(tmp_path):
    doc = [dict(GOOD[0], dir_processed=None, dir_untriggered=None, data_type=["raw"]),
           dict(GOOD[1], directory=None, dir_raw="/tmp/braw")]
    cfg = cfgmod.parse(json.dumps(doc), str(tmp_path / "c.json"))
    assert cfg.sites["daq"].dirs == {"raw": "/tmp/daq"}
    assert cfg.sites["buffer"].dirs == {"raw": "/tmp/braw"}
    check_error(tmp_path, [dict(GOOD[0], dir_processed=None, data_type=["raw", "processed"]),
                           GOOD[1]], "site 'daq'", "key 'dir_processed'", "no directory")


def test_config_check_with_unknown_or_empty_host_exits_2(tmp_path, monkeypatch):
    monkeypatch.delenv("CAX_HOST", raising=False)
    path = write(tmp_path, GOOD)
    for args in (["--host", "mars"], ["--host", ""]):
        for where in (["config", "check"] + args, args + ["config", "check"], args + ["--once"]):
            result = CliRunner().invoke(cli, ["--config", path] + where)
            assert result.exit_code == 2, (where, result.output)
            lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
            assert len(lines) == 1 and "known sites: daq, buffer" in lines[0], (where, lines)
            assert repr(args[1]) in lines[0]
    monkeypatch.setenv("CAX_HOST", "mars")
    assert CliRunner().invoke(cli, ["--config", path, "config", "check"]).exit_code == 2
    monkeypatch.setenv("CAX_HOST", "daq")
    result = CliRunner().invoke(cli, ["--config", path, "config", "check"])
    assert result.exit_code == 0 and "this host: daq; tasks:" in result.output


def test_readme_pass_order_matches_default_tasks():
    import re
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "README.rst"), encoding="utf-8").read()
    paragraph = text[text.index("What each pass does, in order:"):]
    paragraph = paragraph[:paragraph.index("\n\n")]
    named = [n for n in re.findall(r"``(\w+)``", paragraph) if n in cfgmod.DEFAULT_TASKS]
    assert named == list(cfgmod.DEFAULT_TASKS)


def test_two_sites_over_one_directory_on_one_host_refused(tmp_path):
    """One physical copy under two site names would count as two good copies."""
    (tmp_path / "d").mkdir()
    os.symlink(tmp_path / "d", tmp_path / "alias")
    for a, b in ((str(tmp_path / "d"), str(tmp_path / "d")),          # the same directory
                 (str(tmp_path / "d"), str(tmp_path / "d" / "raw")),  # one inside the other
                 (str(tmp_path / "d"), str(tmp_path / "alias"))):     # the same, through a link
        doc = [{"name": "buffer", "directory": a}, {"name": "buffer2", "dir_raw": b}]
        line = check_error(tmp_path, doc, "site 'buffer2'", "key 'dir_raw'", "'buffer'")
        assert "overlaps" in line
    # the same path on two different machines is two copies
    doc = [{"name": "buffer", "directory": "/data", "method": "rsync", "hostname": "a.example.org"},
           {"name": "archive", "directory": "/data", "method": "rsync", "hostname": "b.example.org"},
           {"name": "daq", "directory": str(tmp_path / "daq")}]
    cfgmod.load(write(tmp_path, doc))


def test_non_utf8_config_is_one_line_exit_2(tmp_path):
    (tmp_path / "cax.json").write_bytes(b'[{"name": "d\xffq", "directory": "/tmp/d"}]')
    result = CliRunner().invoke(cli, ["--config", str(tmp_path / "cax.json"), "config", "check"])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "not UTF-8" in lines[0] and "offset 12" in lines[0], lines
    assert str(tmp_path / "cax.json") in lines[0]


def test_deeply_nested_config_is_one_line_exit_2(tmp_path):
    for depth in (100000, 5000):
        line = check_error(tmp_path, "[" * depth + "]" * depth, "nested too deeply")
        assert "Traceback" not in line
    obj = '{"sites": ' + '{"a": ' * 3000 + "1" + "}" * 3000 + "}"
    check_error(tmp_path, obj, "nested too deeply")


def test_runs_add_of_deep_or_non_utf8_input_is_one_line_exit_2(tmp_path):
    path = write(tmp_path, GOOD)
    for name, data in (("deep.json", b"[" * 100000 + b"]" * 100000),
                       ("latin1.json", b'{"name": "caf\xe9"}')):
        (tmp_path / name).write_bytes(data)
        result = CliRunner().invoke(cli, ["--config", path, "runs", "add", str(tmp_path / name)])
        assert result.exit_code == 2, (name, result.output)
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"cax: error: {tmp_path / name}: "), lines
    assert not (tmp_path / "cax.runsdb").exists()


def test_unparseable_mongodb_uri_is_a_config_error(tmp_path):
    for uri in ("mongodb://[::1", "mongodb://cax:pw@[::1/run", "mongodb://h:99999/run",
                "mongodb+srv://[x"):
        doc = {"runs_db": uri, "sites": GOOD}
        line = check_error(tmp_path, doc, "key 'runs_db'", "not a valid MongoDB URI")
        assert "pw" not in line
        for args in (["status"], ["--host", "daq", "--once"]):
            result = CliRunner().invoke(cli, ["--config", str(tmp_path / "cax.json"), *args])
            assert result.exit_code == 2, (uri, args, result.output)
            assert len([ln for ln in result.stderr.splitlines() if ln.strip()]) == 1
