"""scp, sftp and rsync against a real private OpenSSH sshd (tests/sshd.py)."""
import dataclasses
import os
import subprocess

import pytest

from cax.checksum import checksum as local_checksum
from cax.transfer import method_class
from cax.transfer import remote_hash
from cax.transfer.base import (
    DestinationNotAccessible,
    Interrupted,
    ServiceUnavailable,
    SourceNotFound,
    TransferError,
    TransferFailed,
    is_partial_name,
    local_tree,
)
from cax.transfer.ssh import BadPath, HostKeyChanged, HostKeyUnknown
# The lead registers the plugin with pytest_plugins = ["tests.sshd"] in tests/conftest.py; the
# import keeps this module working on its own meanwhile (same fixture functions).
from tests.sshd import live_sshd, ssh_site, sshd  # noqa: F401

pytestmark = pytest.mark.sshd

METHODS = ["scp", "sftp", "rsync"]
BIG = 200 * 1024 * 1024
SOME_BYTES = 20 * 1024 * 1024


def bytes_written(directory, skip=()):
    """Bytes in files below ``directory`` (partial copies included), ``skip`` names excluded."""
    total = 0
    for r, _ds, fs in os.walk(directory):
        for f in fs:
            if f not in skip:
                try:
                    total += os.path.getsize(os.path.join(r, f))
                except OSError:  # rsync renames its temporary files
                    pass
    return total


def make_tree(root):
    os.makedirs(os.path.join(root, "sub", "deeper"))
    os.makedirs(os.path.join(root, "empty_dir"))
    files = {
        "main.bin": os.urandom(3 * 1024 * 1024 + 17),
        ".hidden": b"hidden data\n",
        "zero": b"",
        os.path.join("sub", "données_µ.bin"): os.urandom(70000),
        os.path.join("sub", "deeper", "x.txt"): b"x" * 4096,
    }
    for rel, data in files.items():
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)
    return sum(len(d) for d in files.values())


def tree(root):
    """{relative path: content} of every file, and the set of directories."""
    out, dirs = {}, set()
    for r, ds, fs in os.walk(root):
        rel = os.path.relpath(r, root)
        dirs.update(os.path.normpath(os.path.join(rel, d)) for d in ds)
        for f in fs:
            with open(os.path.join(r, f), "rb") as fh:
                out[os.path.normpath(os.path.join(rel, f))] = fh.read()
    return out, dirs


def no_partials(*dirs):
    for d in dirs:
        if os.path.isdir(d):
            left = [n for n in os.listdir(d) if is_partial_name(n) or ".cax-partial-" in n]
            assert not left, f"partial copies left in {d}: {left}"


def site_for(site, method, **kw):
    return dataclasses.replace(site, method=method, **kw)


@pytest.fixture(scope="session")
def big_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("big") / "big.bin"
    with open(path, "wb") as f:
        for _ in range(BIG // (8 << 20)):
            f.write(os.urandom(8 << 20))
    return str(path)


# ------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("method", METHODS)
def test_put_get_tree_identical_and_checksums_agree(method, ssh_site, tmp_path):
    src = str(tmp_path / "run_000001")
    total = make_tree(src)
    moved = []
    site = site_for(ssh_site, method)
    final = os.path.join(site.dirs["raw"], "run_000001")
    with method_class(method)(site, progress=moved.append) as m:
        m.put(src, final)
        assert tree(final) == tree(src)
        assert sum(moved) == total
        want = local_checksum(src)
        assert local_checksum(final) == want
        assert m.checksum(final) == want
        assert m.exists(final) and not m.exists(final + "-nope")
        assert m.size(final) == total
        assert m.tree(final) == (total, 5) == local_tree(src)
        os.symlink("/etc/passwd", os.path.join(final, "sub", "link"))
        assert m.tree(final) == (total, 5), "a symlink counts as nothing"
        os.unlink(os.path.join(final, "sub", "link"))
        with pytest.raises(SourceNotFound):
            m.tree(final + "-nope")

        back = str(tmp_path / "back" / "run_000001")
        m.get(final, back)
        assert tree(back) == tree(src)
        assert local_checksum(back) == want
        assert sum(moved) == 2 * total

        m.remove(final)
        assert not m.exists(final) and not os.path.exists(final)
    no_partials(site.dirs["raw"], os.path.dirname(back))


@pytest.mark.parametrize("method", METHODS)
def test_put_get_single_file(method, ssh_site, tmp_path):
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(1_000_003))
    site = site_for(ssh_site, method)
    final = os.path.join(site.dirs["processed"], "new", "deep", "f.bin")  # parents created
    with method_class(method)(site) as m:
        m.put(str(src), final)
        assert m.checksum(final) == local_checksum(str(src))
        m.get(final, str(tmp_path / "g.bin"))
    assert (tmp_path / "g.bin").read_bytes() == src.read_bytes()
    with open(final, "rb") as f:
        assert f.read() == src.read_bytes()


def test_remote_helper_checksum_matches_checksumdir(tmp_path):
    checksumdir = pytest.importorskip("checksumdir")
    make_tree(str(tmp_path / "t"))
    r = subprocess.run(remote_hash.argv("checksum", "sha512", str(tmp_path / "t")),
                       capture_output=True, text=True, check=True)
    assert r.stdout.strip() == checksumdir.dirhash(str(tmp_path / "t"), "sha512")
    assert r.stdout.strip() == local_checksum(str(tmp_path / "t"))


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("method", METHODS)
def test_missing_source_and_existing_destination(method, ssh_site, tmp_path):
    site = site_for(ssh_site, method)
    raw = site.dirs["raw"]
    with method_class(method)(site) as m:
        with pytest.raises(SourceNotFound):
            m.put(str(tmp_path / "nope"), os.path.join(raw, "x"))
        with pytest.raises(SourceNotFound, match="127.0.0.1"):
            m.get(os.path.join(raw, "nope"), str(tmp_path / "got"))
        assert not os.path.exists(tmp_path / "got")
        with pytest.raises(SourceNotFound):
            m.checksum(os.path.join(raw, "nope"))

        existing = os.path.join(raw, "existing")
        os.mkdir(existing)
        with open(os.path.join(existing, "keep"), "w") as f:
            f.write("keep")
        src = tmp_path / "src"
        make_tree(str(src))
        with pytest.raises(DestinationNotAccessible, match="exists"):
            m.put(str(src), existing)
        assert os.listdir(existing) == ["keep"]
    no_partials(raw)


@pytest.mark.parametrize("method", METHODS)
def test_unknown_and_changed_host_key_refused(method, ssh_site, tmp_path):
    src = tmp_path / "f"
    src.write_bytes(b"data")
    final = os.path.join(ssh_site.dirs["raw"], "f")

    empty = tmp_path / "known_hosts_empty"
    empty.write_text("")
    with pytest.raises(HostKeyUnknown, match="127.0.0.1") as err:
        with method_class(method)(site_for(ssh_site, method, known_hosts=str(empty))) as m:
            m.put(str(src), final)
    assert isinstance(err.value, DestinationNotAccessible)
    assert "\n" not in str(err.value)

    other = tmp_path / "otherkey"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    keytype, b64 = (tmp_path / "otherkey.pub").read_text().split()[:2]
    wrong = tmp_path / "known_hosts_wrong"
    wrong.write_text(f"[{ssh_site.hostname}]:{ssh_site.port} {keytype} {b64}\n")
    with pytest.raises(HostKeyChanged, match="127.0.0.1"):
        with method_class(method)(site_for(ssh_site, method, known_hosts=str(wrong))) as m:
            m.put(str(src), final)
    assert not os.path.exists(final)
    no_partials(ssh_site.dirs["raw"])


@pytest.mark.parametrize("method", METHODS)
def test_server_down_is_service_unavailable(method, ssh_site, live_sshd):
    live_sshd.kill()
    try:
        with pytest.raises(ServiceUnavailable, match="127.0.0.1"):
            with method_class(method)(site_for(ssh_site, method)) as m:
                m.exists("/")
    finally:
        live_sshd.start()


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
                m.put(big_file, final)
            else:
                m.get(remote_src, final)
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
        m.put(str(small), os.path.join(site.dirs["raw"], "after"))
        assert m.connections == 2
    finally:
        m.close()


@pytest.mark.parametrize("direction", ["put", "get"])
@pytest.mark.parametrize("method", METHODS)
def test_cancel_raises_interrupted_and_cleans_up(method, direction, ssh_site, big_file, tmp_path):
    site = site_for(ssh_site, method)
    raw = site.dirs["raw"]
    remote_src = os.path.join(raw, "big_src.bin")
    if direction == "get":
        os.link(big_file, remote_src)
    local_dir = tmp_path / "local"
    local_dir.mkdir()
    dest_dir = raw if direction == "put" else str(local_dir)
    final = os.path.join(dest_dir, "big.bin")
    moved, asked = [0], []

    def progress(n):
        moved[0] += n

    def cancel():
        if asked or bytes_written(dest_dir, skip={"big_src.bin"}) >= SOME_BYTES:
            asked.append(1)
            return True
        return False

    with method_class(method)(site, progress=progress, cancel=cancel) as m:
        with pytest.raises(Interrupted):
            if direction == "put":
                m.put(big_file, final)
            else:
                m.get(remote_src, final)
        assert asked, "the copy ended before cancel() said stop"
        assert moved[0] < BIG
        assert not os.path.exists(final)
        assert m.shell.alive  # the connection survives a cancel
    no_partials(raw, str(local_dir))
    assert sorted(os.listdir(raw)) == (["big_src.bin"] if direction == "get" else [])


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
        m.put(str(src), final)
        assert os.path.isdir(final)
        assert tree(final) == tree(str(src))
        assert m.checksum(final) == local_checksum(str(src))
        m.get(final, str(tmp_path / HOSTILE))
        assert tree(str(tmp_path / HOSTILE)) == tree(str(src))
        for bad in ("run\nx", "run\0x", "run\rx"):
            with pytest.raises(BadPath):
                m.put(str(src), os.path.join(site.dirs["raw"], bad))
            with pytest.raises(TransferFailed):
                m.get(os.path.join(site.dirs["raw"], bad), str(tmp_path / "bad"))
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
            m.put(str(p), os.path.join(site.dirs["raw"], p.name))
        assert m.exists(os.path.join(site.dirs["raw"], "f00"))
        m.get(os.path.join(site.dirs["raw"], "f01"), str(tmp_path / "back01"))
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
        m.put(str(src), final)
        assert live_sshd.sessions_since(mark) == 1
        mark = live_sshd.log_mark()
        m.get(final, str(tmp_path / "back"))
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
        m.put(str(src), final)  # no Interrupted
    assert moved[0] == total
    assert tree(final) == tree(str(src))
    no_partials(site.dirs["raw"])


@pytest.mark.parametrize("method", METHODS)
def test_get_removes_leftovers_of_a_killed_pull(method, ssh_site, tmp_path):
    """A daemon killed mid-pull leaves its partial copy (and, for rsync, the holder directory
    it receives into); the next pull of that run must not trip over them."""
    from cax.transfer import local_leftovers
    src = tmp_path / "src"
    make_tree(str(src))
    site = site_for(ssh_site, method)
    remote = os.path.join(site.dirs["raw"], "run1")
    local = str(tmp_path / "local" / "run1")
    for left in local_leftovers(local):
        os.makedirs(os.path.join(left, "junk"))
    with method_class(method)(site) as m:
        m.put(str(src), remote)
        m.get(remote, local)
    assert tree(local) == tree(str(src))
    assert os.listdir(tmp_path / "local") == ["run1"]


# ------------------------------------------------------------------------------ completeness
@pytest.mark.parametrize("direction", ["put", "get"])
@pytest.mark.parametrize("method", METHODS + ["local"])
def test_copy_not_holding_the_expected_tree_is_not_renamed_into_place(method, direction,
                                                                       ssh_site, tmp_path):
    """The last check before a rename: the partial copy holds exactly the bytes and regular
    files expected (a push: its local source's; a pull: what the Runs DB recorded)."""
    src = tmp_path / "src"
    total = make_tree(str(src))
    site = site_for(ssh_site, method)
    remote = os.path.join(site.dirs["raw"], "run1")
    local = str(tmp_path / "local" / "run1")
    with method_class(method)(site) as m:
        if direction == "get":
            m.put(str(src), remote)
        for wrong in ((total + 1, 5), (total, 6)):
            with pytest.raises(TransferFailed, match="incomplete copy") as err:
                if direction == "put":
                    m.put(str(src), remote, expect=wrong)
                else:
                    m.get(remote, local, expect=wrong)
            assert "\n" not in str(err.value)
            assert not os.path.exists(remote if direction == "put" else local)
        if direction == "put":
            m.put(str(src), remote, expect=(total, 5))
        else:
            m.get(remote, local, expect=(total, 5))
    assert tree(remote if direction == "put" else local) == tree(str(src))
    no_partials(site.dirs["raw"], str(tmp_path / "local"))


@pytest.mark.parametrize("method", METHODS + ["local"])
def test_free_bytes_is_the_filesystems_room_for_a_path_not_made_yet(method, ssh_site):
    site = site_for(ssh_site, method)
    with method_class(method)(site) as m:
        free = m.free_bytes(os.path.join(site.dirs["raw"], "not", "there", "yet"))
    st = os.statvfs(site.dirs["raw"])
    # the same filesystem, measured twice while other tests may write to it
    assert abs(free - st.f_bavail * st.f_frsize) < 256 * 1024 * 1024
