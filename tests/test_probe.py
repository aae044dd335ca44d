"""`config check --probe` (issue 16): this host's directories and every site it must reach,
one line per check, against the real sshd; and the plain check's warning for a missing
directory (it said only OK)."""
import json
import os

import pytest
from click.testing import CliRunner

from cax.cli import cli
from tests.test_ssh_sites import config

pytest_plugins = ["tests.sshd"]


def check(cfg, host, *extra):
    return CliRunner().invoke(cli, ["--config", cfg, "config", "check", "--host", host, *extra])


@pytest.mark.parametrize("method", ["rsync", "sftp"])
def test_probe_logs_in_and_finds_every_directory(tmp_path, live_sshd, method):
    cfg = config(tmp_path, live_sshd, method)
    r = check(cfg, "daq", "--probe")
    assert r.exit_code == 0, r.output
    probes = [l for l in r.output.splitlines() if l.startswith("probe:")]
    assert any("this host daq: raw directory" in l and l.startswith("probe: ok") for l in probes)
    assert any(f"site buffer ({method} {live_sshd.host}): login ok" in l for l in probes)
    assert any("site buffer" in l and "raw directory" in l and "present" in l for l in probes)


def test_probe_fails_for_a_missing_remote_directory_and_a_stopped_sshd(tmp_path, live_sshd):
    cfg = config(tmp_path, live_sshd, "rsync")
    doc = json.loads(open(cfg).read())
    doc["sites"][1]["directory"] = str(tmp_path / "never-made")
    open(cfg, "w").write(json.dumps(doc))
    r = check(cfg, "daq", "--probe")
    assert r.exit_code == 1, r.output
    assert "probe: FAIL site buffer (rsync" in r.output and "does not exist" in r.output
    assert "checks failed" in r.stderr
    live_sshd.stop()
    try:
        r = check(cfg, "archive", "--probe")
        assert r.exit_code == 1, r.output
        fail = [l for l in r.output.splitlines() if l.startswith("probe: FAIL")]
        assert len(fail) == 1 and "site buffer" in fail[0], r.output
    finally:
        live_sshd.start()


def test_missing_or_unwritable_local_directory(tmp_path, live_sshd):
    cfg = config(tmp_path, live_sshd, "rsync")
    os.rmdir(tmp_path / "daq")
    r = check(cfg, "daq")
    assert r.exit_code == 0  # a config may be checked on another machine than the site's
    assert "warning: this host daq: raw directory" in r.stderr and "does not exist" in r.stderr
    r = check(cfg, "daq", "--probe")
    assert r.exit_code == 1 and "probe: FAIL this host daq: raw directory" in r.output
    os.makedirs(tmp_path / "daq", mode=0o500)
    r = check(cfg, "daq", "--probe")
    if os.getuid() == 0:  # root writes everywhere: the directory is there and usable
        assert "probe: ok   this host daq: raw directory" in r.output
    else:
        assert r.exit_code == 1 and "not writable by this user" in r.output
