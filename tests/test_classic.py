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
    assert unreachable == {"tsm-server", "lfc", "osg-connect-srm", "midway-srm", "cnaf-srm",
                           "nikhef-srm", "wipp-srm"}
    assert "'tsm'" in config.site("tsm-server").unreachable
    assert "no hostname" in config.site("tsm-server").unreachable
    assert "'gfal-copy'" in config.site("lfc").unreachable
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
    result = run("--config", CLASSIC_2018, "--host", "wipp-srm", "--once",
                 env={"XDG_STATE_HOME": str(tmp_path)})
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert "site 'wipp-srm'" in line and "'gfal-copy'" in line, line


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
