"""OpenSSH and rsync run in the C locale wherever cax classifies their messages by text (issue 11):
a daemon started under another locale must still tell "Permission denied" and "Connection
refused" apart. rsync already did; the OpenSSH ControlMaster and the ``ssh`` clients that
multiplex on it (remote commands of the rsync method) did not."""
import dataclasses

import pytest

from cax.transfer import method_class
from cax.transfer import ssh as sshmod
from tests.sshd import live_sshd, ssh_site, sshd  # noqa: F401 - fixtures

pytestmark = pytest.mark.sshd


def environ_of(pid: int) -> dict:
    with open(f"/proc/{pid}/environ", "rb") as f:
        items = [kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv]
    return {k.decode(): v.decode("utf-8", "replace") for k, v in items}


def test_openssh_children_run_in_the_c_locale(ssh_site, monkeypatch):
    monkeypatch.setenv("LC_ALL", "de_DE.UTF-8")
    monkeypatch.setenv("LANGUAGE", "de")
    seen = []
    real_run = sshmod.subprocess.run

    def spy(argv, *a, **kw):  # the real ssh runs; only its environment is noted
        seen.append((argv[0], (kw.get("env") or {}).get("LC_ALL")))
        return real_run(argv, *a, **kw)

    monkeypatch.setattr(sshmod.subprocess, "run", spy)
    site = dataclasses.replace(ssh_site, method="rsync")
    with method_class("rsync")(site) as m:
        keeper = environ_of(m.shell.proc.pid)  # the master's keeper; the master inherits it
        assert m.exists(site.dirs["raw"])  # a remote command through an ssh client
    assert keeper.get("LC_ALL") == "C"
    assert seen and all(lc == "C" for _argv0, lc in seen), seen
