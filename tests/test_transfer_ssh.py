"""scp, sftp and rsync against a real private OpenSSH sshd (tests/sshd.py): what only the SSH
methods do (a killed sshd, hostile paths through remote shells, connection and session reuse).
The cases every method shares are in tests/test_transfer_contract.py."""
import os
import subprocess

import pytest

from cax.checksum import checksum as local_checksum
from cax.transfer import method_class
from cax.transfer import remote_hash
from cax.transfer.base import ServiceUnavailable, TransferError, TransferFailed
from cax.transfer.policy import get, put
from cax.transfer.ssh import BadPath
# The lead registers the plugin with pytest_plugins = ["tests.sshd"] in tests/conftest.py; the
# import keeps this module working on its own meanwhile (same fixture functions).
from tests.sshd import live_sshd, ssh_site, sshd  # noqa: F401
# the helpers of the conformance suite, which holds the cases every method shares
from tests.test_transfer_contract import (  # noqa: F401
    big_file,
    bytes_written,
    make_tree,
    no_partials,
    site_for,
    tree,
)

pytestmark = pytest.mark.sshd

METHODS = ["scp", "sftp", "rsync"]
BIG = 200 * 1024 * 1024
SOME_BYTES = 20 * 1024 * 1024


def test_remote_helper_checksum_matches_checksumdir(tmp_path):
    checksumdir = pytest.importorskip("checksumdir")
    make_tree(str(tmp_path / "t"))
    r = subprocess.run(remote_hash.argv("checksum", "sha512", str(tmp_path / "t")),
                       capture_output=True, text=True, check=True)
    assert r.stdout.strip() == checksumdir.dirhash(str(tmp_path / "t"), "sha512")
    assert r.stdout.strip() == local_checksum(str(tmp_path / "t"))


# The trigger is polled through ``cancel`` (every chunk for scp/sftp, every 0.1 s for rsync,
# whose own progress reports come only once a second) and fires once SOME_BYTES of the copy are
# really on the destination disk.
# paramiko's SFTP prefetch thread dies with "Socket is closed" when the server is killed: expected
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("direction", ["put", "get"])
@pytest.mark.parametrize("method", METHODS)
def test_sshd_killed_mid_copy(method, direction, ssh_site, live_sshd, big_file, tmp_path):
    site = site_for(ssh_site, method)
    remote_src = os.path.join(site.dirs["raw"], "big_src.bin")
    if direction == "get":
        os.link(big_file, remote_src)  # the "remote" copy of the data
    local_dir = tmp_path / "local"
    local_dir.mkdir()
    dest_dir = site.dirs["raw"] if direction == "put" else str(local_dir)
    final = os.path.join(dest_dir, "big.bin")
    moved, killed = [0], []

    def progress(n):
        moved[0] += n

    def kill_midway():
        if not killed and bytes_written(dest_dir, skip={"big_src.bin"}) >= SOME_BYTES:
            killed.append(moved[0])
            live_sshd.kill()
        return False

    m = method_class(method)(site, progress=progress, cancel=kill_midway)
    try:
        with pytest.raises(TransferError) as err:
            m.connect()
            if direction == "put":
                put(m, big_file, final)
            else:
                get(m, remote_src, final)
        assert killed and not live_sshd.running, "the copy ended before the kill"
        assert isinstance(err.value, ServiceUnavailable), repr(err.value)
        assert "127.0.0.1" in str(err.value) and "\n" not in str(err.value)
        assert not os.path.exists(final)
        if direction == "get":
            assert os.listdir(local_dir) == []  # local partial removed
        assert moved[0] < BIG

        # the same method object reconnects once the server is back
        live_sshd.start()
        small = tmp_path / "small"
        small.write_bytes(b"after restart")
        put(m, str(small), os.path.join(site.dirs["raw"], "after"))
        assert m.connections == 2
    finally:
        m.close()


# ------------------------------------------------------------------------------ hostile paths
HOSTILE = "run 'q' \"dq\" $(touch PWNED) `touch PWNED` ;x&y|z *"


@pytest.mark.parametrize("method", METHODS)
def test_hostile_path_characters_copied_literally(method, ssh_site, tmp_path):
    home = os.path.expanduser("~")
    pwned = [os.path.join(d, "PWNED") for d in (home, str(tmp_path), ssh_site.dirs["raw"], "/")]
    for p in pwned:
        assert not os.path.exists(p)
    src = tmp_path / "src"
    make_tree(str(src))
    (src / "file $(touch PWNED) 'x'.bin").write_bytes(b"literal")
    site = site_for(ssh_site, method)
    final = os.path.join(site.dirs["raw"], HOSTILE)
    with method_class(method)(site) as m:
        put(m, str(src), final)
        assert os.path.isdir(final)
        assert tree(final) == tree(str(src))
        assert m.checksum(final) == local_checksum(str(src))
        get(m, final, str(tmp_path / HOSTILE))
        assert tree(str(tmp_path / HOSTILE)) == tree(str(src))
        for bad in ("run\nx", "run\0x", "run\rx"):
            with pytest.raises(BadPath):
                put(m, str(src), os.path.join(site.dirs["raw"], bad))
            with pytest.raises(TransferFailed):
                get(m, os.path.join(site.dirs["raw"], bad), str(tmp_path / "bad"))
    for p in pwned:
        assert not os.path.exists(p), f"a remote shell expanded a path: {p}"
    assert sorted(os.listdir(site.dirs["raw"])) == [HOSTILE]


# ------------------------------------------------------------------------------ reuse
@pytest.mark.parametrize("method", METHODS)
def test_one_connection_serves_many_files(method, ssh_site, live_sshd, tmp_path):
    files = []
    for i in range(50):
        p = tmp_path / f"f{i:02d}"
        p.write_bytes(os.urandom(1000 + i))
        files.append(p)
    site = site_for(ssh_site, method)
    before = live_sshd.accepted_logins()
    with method_class(method)(site) as m:
        for p in files:
            put(m, str(p), os.path.join(site.dirs["raw"], p.name))
        assert m.exists(os.path.join(site.dirs["raw"], "f00"))
        get(m, os.path.join(site.dirs["raw"], "f01"), str(tmp_path / "back01"))
        assert m.connections == 1
    seen = live_sshd.wait_logins(before + 1)
    assert seen == before + 1, f"{seen - before} SSH logins for 50 files, expected 1"
    assert sorted(os.listdir(site.dirs["raw"])) == [p.name for p in files]
    assert (tmp_path / "back01").read_bytes() == files[1].read_bytes()


def test_rsync_push_and_pull_are_one_remote_session_each(ssh_site, live_sshd, tmp_path):
    """Each remote session costs the site's login shell start-up (0.2 s on this machine, where
    root's .bashrc runs pyenv), which dominates the copy of a small run: the remote rename of a
    push rides in the session of the receiving rsync."""
    src = tmp_path / "run"
    make_tree(str(src))
    site = site_for(ssh_site, "rsync")
    final = os.path.join(site.dirs["raw"], "new", "run")
    with method_class("rsync")(site) as m:
        mark = live_sshd.log_mark()
        put(m, str(src), final)
        assert live_sshd.sessions_since(mark) == 1
        mark = live_sshd.log_mark()
        get(m, final, str(tmp_path / "back"))
        assert live_sshd.sessions_since(mark) == 1
    assert tree(final) == tree(str(src)) == tree(str(tmp_path / "back"))
    no_partials(os.path.dirname(final), str(tmp_path))


def test_rsync_stop_after_every_file_is_sent_lets_the_push_land(ssh_site, tmp_path, monkeypatch):
    """Once every file is sent the remote shell may already be renaming the push into place:
    a stop request then must not report a copy that lands as interrupted (its retry would leave
    the final name alone and every later copy would refuse to overwrite it)."""
    from cax.transfer import ssh as sshmod
    slow = sshmod.SH_OPS["rsync-push"].replace("mv -- ", "sleep 1; mv -- ")
    assert slow != sshmod.SH_OPS["rsync-push"]
    monkeypatch.setitem(sshmod.SH_OPS, "rsync-push", slow)  # a wide window before the rename
    src = tmp_path / "run"
    total = make_tree(str(src))
    moved = [0]
    site = site_for(ssh_site, "rsync")
    final = os.path.join(site.dirs["raw"], "run")
    with method_class("rsync")(site, progress=lambda n: moved.__setitem__(0, moved[0] + n),
                               cancel=lambda: moved[0] >= total) as m:
        put(m, str(src), final)  # no Interrupted
    assert moved[0] == total
    assert tree(final) == tree(str(src))
    no_partials(site.dirs["raw"])


@pytest.mark.parametrize("method", METHODS)
def test_get_removes_leftovers_of_a_killed_pull(method, ssh_site, tmp_path):
    """A daemon killed mid-pull leaves its partial copy (and, for rsync, the holder directory
    it receives into); the next pull of that run must not trip over them."""
    from cax.transfer.policy import leftovers as local_leftovers
    src = tmp_path / "src"
    make_tree(str(src))
    site = site_for(ssh_site, method)
    remote = os.path.join(site.dirs["raw"], "run1")
    local = str(tmp_path / "local" / "run1")
    for left in local_leftovers(local):
        os.makedirs(os.path.join(left, "junk"))
    with method_class(method)(site) as m:
        put(m, str(src), remote)
        get(m, remote, local)
    assert tree(local) == tree(str(src))
    assert os.listdir(tmp_path / "local") == ["run1"]




# ------------------------------------------------------------------------------ dead code gone
@pytest.mark.parametrize("op", ["stat", "exists", "makedirs", "prepare", "rename"])
def test_remote_helper_has_no_unused_operations(op, tmp_path):
    """The helper does only what a method asks of it (tree, expect, place, free, size,
    checksum, remove); exists/makedirs/prepare are sh one-liners (SH_OPS)."""
    (tmp_path / "a").write_text("a")
    r = subprocess.run(remote_hash.argv(op, str(tmp_path / "a"), str(tmp_path / "b")),
                       capture_output=True, text=True)
    assert r.returncode == remote_hash.EXIT_USAGE and "unknown operation" in r.stderr
    assert (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_rsync_keeps_no_partly_sent_file(ssh_site, tmp_path):
    """A failed copy's partial copy is always removed, so nothing could resume from rsync's
    ``--partial`` file: the flag is not used (docs/design.rst "Transfer methods")."""
    with method_class("rsync")(site_for(ssh_site, "rsync")) as m:
        argv = m.command(str(tmp_path / "src"), "remote:/dst")
    assert argv[:2] == [m.rsync, "-a"]
    assert not any(a.startswith("--partial") for a in argv)
