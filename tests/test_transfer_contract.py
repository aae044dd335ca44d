"""The conformance suite of the transfer-method contract (cax/transfer/base.py): every method in
the registry (``cax.transfer.METHODS``: local, scp, sftp, rsync and any later one) goes through the
same cases, under the one copy policy (cax/transfer/policy.py), against the real private OpenSSH
sshd of tests/sshd.py. ``local`` reaches the same directories through this filesystem; the login
cases (refused login, host keys, unreachable host) are for the methods that log in.

A new method is added to the registry, and this suite runs it."""
import dataclasses
import inspect
import os
import re
import subprocess

import pytest

from cax.checksum import checksum as local_checksum
from cax.transfer import METHODS as REGISTRY
from cax.transfer import method_class
from cax.transfer.base import (
    DestinationNotAccessible,
    Features,
    Interrupted,
    ServiceUnavailable,
    SourceNotFound,
    TransferFailed,
    TransferMethod,
    is_partial_name,
    local_tree,
)
from cax.transfer.policy import get, put
from cax.transfer.ssh import HostKeyChanged, HostKeyError, HostKeyUnknown
from cax.transfer.ssh import SshMethod
from tests.sshd import free_port, live_sshd, ssh_site, sshd  # noqa: F401

pytestmark = pytest.mark.sshd

ALL = sorted(REGISTRY)
#: the methods that log in to their site (the others reach it through this filesystem)
REMOTE = [n for n in ALL if not method_class(n).features.local_paths]
#: the methods that log in with SSH (host keys, keys, sshd): the login cases are theirs
SSH = [n for n in ALL if issubclass(method_class(n), SshMethod)]
#: methods whose site is grid storage: the suite runs them against the private XRootD server
#: (tests/xrootd.py), whose namespace is this filesystem's paths
GRID = [n for n in ALL if method_class(n).features.third_party]
BIG = 200 * 1024 * 1024
SOME_BYTES = 20 * 1024 * 1024


def test_registry_holds_the_four_methods():
    assert {"local", "scp", "sftp", "rsync"} <= set(ALL)
    assert set(REMOTE) == set(ALL) - {"local"}
    assert set(SSH) == {"scp", "sftp", "rsync"} and GRID == ["gfal"]


@pytest.fixture
def method_site(request, method):
    """The site the suite reaches ``method`` at: the private sshd's directories (``local`` and
    the SSH methods), or the private XRootD server's (grid methods)."""
    if method in GRID:
        return request.getfixturevalue("xrootd_site")
    return request.getfixturevalue("ssh_site")


@pytest.mark.parametrize("method", ALL)
def test_method_declares_features_and_implements_every_verb(method):
    """Capabilities are declared (one frozen Features object per class), never probed; every
    abstract verb of the contract is implemented (the class can be instantiated)."""
    cls = method_class(method)
    assert issubclass(cls, TransferMethod)
    assert "features" not in vars(TransferMethod), "declared by each method, not inherited"
    assert isinstance(cls.features, Features)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cls.features.remote_checksum = not cls.features.remote_checksum
    assert not inspect.isabstract(cls), f"{cls.__name__} leaves verbs abstract: " \
        f"{sorted(cls.__abstractmethods__)}"
    assert cls.name == method
    for verb in TransferMethod.__abstractmethods__:
        assert getattr(cls, verb) is not getattr(TransferMethod, verb), verb


CONCRETE = re.compile(r"^\s*(from cax\.transfer\.(local|ssh|scp|sftp|rsync)\b|"
                      r"from cax\.transfer import .*\b(local|ssh|scp|sftp|rsync)\b|"
                      r"import cax\.transfer\.(local|ssh|scp|sftp|rsync)\b)", re.M)
BRANCHING = re.compile(r"""method\s*[!=]=\s*["']|\.name\s*[!=]=\s*["'](local|scp|sftp|rsync)|"""
                       r"(getattr|hasattr)\([^)]*(remote_checksum|places_final|owns_connection|"
                       r"local_paths)|LocalMethod|SshMethod")


def test_tasks_reach_transports_only_through_the_contract():
    """Tasks (and the other users of transfers) never branch on a method's name, probe its
    abilities or import a concrete method: they read ``features`` and use the policy."""
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cax")
    files = [os.path.join(root, "tasks", n) for n in os.listdir(os.path.join(root, "tasks"))
             if n.endswith(".py")]
    files += [os.path.join(root, n) for n in ("processing.py", "admin.py", "deletion.py")]
    bad = []
    for path in sorted(files):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for regex in (CONCRETE, BRANCHING):
            for m in regex.finditer(text):
                line = text.count("\n", 0, m.start()) + 1
                bad.append(f"{os.path.relpath(path, root)}:{line}: {m.group(0).strip()}")
    assert not bad, "transport details outside cax/transfer:\n" + "\n".join(bad)


def test_a_method_missing_a_verb_cannot_be_made():
    class Half(TransferMethod):
        name = "half"
        features = Features(remote_checksum=False)

        def exists(self, path):
            return False

    with pytest.raises(TypeError, match="abstract"):
        Half(None)


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
@pytest.mark.parametrize("method", ALL)
def test_put_get_tree_identical_and_checksums_agree(method, method_site, tmp_path):
    src = str(tmp_path / "run_000001")
    total = make_tree(src)
    moved = []
    site = site_for(method_site, method)
    final = os.path.join(site.dirs["raw"], "run_000001")
    with method_class(method)(site, progress=moved.append) as m:
        put(m, src, final)
        assert tree(final) == tree(src)
        assert sum(moved) == total
        want = local_checksum(src)
        assert local_checksum(final) == want
        assert m.checksum(final) == want
        assert m.exists(final) and not m.exists(final + "-nope")
        assert m.size(final) == total
        assert m.tree(final) == (total, 5) == local_tree(src)
        if method not in GRID:  # storage has no links (XRootD stats through one made on its disk)
            os.symlink("/etc/passwd", os.path.join(final, "sub", "link"))
            assert m.tree(final) == (total, 5), "a symlink counts as nothing"
            os.unlink(os.path.join(final, "sub", "link"))
        with pytest.raises(SourceNotFound):
            m.tree(final + "-nope")

        back = str(tmp_path / "back" / "run_000001")
        get(m, final, back)
        assert tree(back) == tree(src)
        assert local_checksum(back) == want
        assert sum(moved) == 2 * total

        m.remove(final)
        assert not m.exists(final) and not os.path.exists(final)
    no_partials(site.dirs["raw"], os.path.dirname(back))


@pytest.mark.parametrize("method", ALL)
def test_put_get_single_file(method, method_site, tmp_path):
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(1_000_003))
    site = site_for(method_site, method)
    final = os.path.join(site.dirs["processed"], "new", "deep", "f.bin")  # parents created
    with method_class(method)(site) as m:
        put(m, str(src), final)
        assert m.checksum(final) == local_checksum(str(src))
        get(m, final, str(tmp_path / "g.bin"))
    assert (tmp_path / "g.bin").read_bytes() == src.read_bytes()
    with open(final, "rb") as f:
        assert f.read() == src.read_bytes()



# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("method", ALL)
def test_missing_source_and_existing_destination(method, method_site, tmp_path):
    site = site_for(method_site, method)
    raw = site.dirs["raw"]
    with method_class(method)(site) as m:
        with pytest.raises(SourceNotFound):
            put(m, str(tmp_path / "nope"), os.path.join(raw, "x"))
        with pytest.raises(SourceNotFound, match="127.0.0.1" if method in REMOTE else "nope"):
            get(m, os.path.join(raw, "nope"), str(tmp_path / "got"))
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
            put(m, str(src), existing)
        assert os.listdir(existing) == ["keep"]
    no_partials(raw)



@pytest.mark.parametrize("method", SSH)
def test_unknown_and_changed_host_key_refused(method, ssh_site, tmp_path):
    src = tmp_path / "f"
    src.write_bytes(b"data")
    final = os.path.join(ssh_site.dirs["raw"], "f")

    empty = tmp_path / "known_hosts_empty"
    empty.write_text("")
    with pytest.raises(HostKeyUnknown, match="127.0.0.1") as err:
        with method_class(method)(site_for(ssh_site, method, known_hosts=str(empty))) as m:
            put(m, str(src), final)
    assert isinstance(err.value, DestinationNotAccessible)
    assert "\n" not in str(err.value)

    other = tmp_path / "otherkey"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    keytype, b64 = (tmp_path / "otherkey.pub").read_text().split()[:2]
    wrong = tmp_path / "known_hosts_wrong"
    wrong.write_text(f"[{ssh_site.hostname}]:{ssh_site.port} {keytype} {b64}\n")
    with pytest.raises(HostKeyChanged, match="127.0.0.1"):
        with method_class(method)(site_for(ssh_site, method, known_hosts=str(wrong))) as m:
            put(m, str(src), final)
    assert not os.path.exists(final)
    no_partials(ssh_site.dirs["raw"])


@pytest.mark.parametrize("method", SSH)
def test_server_down_is_service_unavailable(method, ssh_site, live_sshd):
    live_sshd.kill()
    try:
        with pytest.raises(ServiceUnavailable, match="127.0.0.1"):
            with method_class(method)(site_for(ssh_site, method)) as m:
                m.exists("/")
    finally:
        live_sshd.start()



@pytest.mark.parametrize("direction", ["put", "get"])
@pytest.mark.parametrize("method", ALL)
def test_cancel_raises_interrupted_and_cleans_up(method, direction, method_site, big_file, tmp_path):
    site = site_for(method_site, method)
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
                put(m, big_file, final)
            else:
                get(m, remote_src, final)
        assert asked, "the copy ended before cancel() said stop"
        assert moved[0] < BIG
        assert not os.path.exists(final)
        if method in REMOTE:
            assert m.shell.alive  # the connection survives a cancel (gfal: its worker)
    no_partials(raw, str(local_dir))
    assert sorted(os.listdir(raw)) == (["big_src.bin"] if direction == "get" else [])



# ------------------------------------------------------------------------------ completeness
@pytest.mark.parametrize("direction", ["put", "get"])
@pytest.mark.parametrize("method", ALL)
def test_copy_not_holding_the_expected_tree_is_not_renamed_into_place(method, direction,
                                                                       method_site, tmp_path):
    """The last check before a rename: the partial copy holds exactly the bytes and regular
    files expected (a push: its local source's; a pull: what the Runs DB recorded)."""
    src = tmp_path / "src"
    total = make_tree(str(src))
    site = site_for(method_site, method)
    remote = os.path.join(site.dirs["raw"], "run1")
    local = str(tmp_path / "local" / "run1")
    with method_class(method)(site) as m:
        if direction == "get":
            put(m, str(src), remote)
        for wrong in ((total + 1, 5), (total, 6)):
            with pytest.raises(TransferFailed, match="incomplete copy") as err:
                if direction == "put":
                    put(m, str(src), remote, expect=wrong)
                else:
                    get(m, remote, local, expect=wrong)
            assert "\n" not in str(err.value)
            assert not os.path.exists(remote if direction == "put" else local)
        if direction == "put":
            put(m, str(src), remote, expect=(total, 5))
        else:
            get(m, remote, local, expect=(total, 5))
    assert tree(remote if direction == "put" else local) == tree(str(src))
    no_partials(site.dirs["raw"], str(tmp_path / "local"))


@pytest.mark.parametrize("method", ALL)
def test_free_bytes_is_the_filesystems_room_for_a_path_not_made_yet(method, method_site):
    site = site_for(method_site, method)
    with method_class(method)(site) as m:
        free = m.free_bytes(os.path.join(site.dirs["raw"], "not", "there", "yet"))
    st = os.statvfs(site.dirs["raw"])
    # the same filesystem, measured twice while other tests may write to it
    assert abs(free - st.f_bavail * st.f_frsize) < 256 * 1024 * 1024


@pytest.mark.parametrize("method", ALL)
def test_inspection_verbs_on_a_file_a_tree_and_nothing(method, method_site, tmp_path):
    """exists, size, tree, remove, makedirs and checksum on the site, with their documented
    errors: nothing there is ``SourceNotFound`` (remove: not an error)."""
    site = site_for(method_site, method)
    raw = site.dirs["raw"]
    run = os.path.join(raw, "run")
    total = make_tree(run)
    one = os.path.join(raw, "one.bin")
    with open(one, "wb") as f:
        f.write(b"x" * 1001)
    nope = os.path.join(raw, "nope")
    with method_class(method)(site) as m:
        assert m.exists(run) and m.exists(one) and not m.exists(nope)
        assert m.size(one) == 1001 and m.tree(one) == (1001, 1)
        assert m.size(run) == total and m.tree(run) == (total, 5) == local_tree(run)
        for verb in (m.size, m.tree, m.checksum):
            with pytest.raises(SourceNotFound):
                verb(nope)
        assert m.checksum(one) == local_checksum(one)
        m.makedirs(os.path.join(raw, "a", "b"))
        m.makedirs(os.path.join(raw, "a", "b"))  # an existing directory is fine
        assert os.path.isdir(os.path.join(raw, "a", "b"))
        if method not in GRID:  # storage has no links (see docs/grid.rst)
            os.symlink(run, os.path.join(raw, "link"))
            m.remove(os.path.join(raw, "link"))  # the link, never what it points to
            assert os.path.isdir(run) and not os.path.lexists(os.path.join(raw, "link"))
        m.remove(one)
        m.remove(run)
        m.remove(nope)  # nothing there: not an error
        assert not m.exists(one) and not m.exists(run)
    assert sorted(os.listdir(raw)) == ["a"]


@pytest.mark.parametrize("method", SSH)
def test_refused_login_is_destination_not_accessible(method, ssh_site, tmp_path):
    """A key the site does not accept: the login is refused (not "down", not a host key)."""
    other = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    src = tmp_path / "f"
    src.write_bytes(b"data")
    final = os.path.join(ssh_site.dirs["raw"], "f")
    with pytest.raises(DestinationNotAccessible, match="authentication") as err:
        with method_class(method)(site_for(ssh_site, method, key_file=str(other))) as m:
            put(m, str(src), final)
    assert not isinstance(err.value, HostKeyError)
    assert "127.0.0.1" in str(err.value) and "\n" not in str(err.value)
    assert not os.path.exists(final)


@pytest.mark.parametrize("method", SSH)
def test_unreachable_host_is_service_unavailable(method, ssh_site, tmp_path):
    """Nobody listens at the site's address: try again on a later pass."""
    site = site_for(ssh_site, method, port=free_port())
    with pytest.raises(ServiceUnavailable, match="127.0.0.1") as err:
        with method_class(method)(site) as m:
            m.exists("/")
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------ grid storage
@pytest.mark.parametrize("method", GRID)
def test_storage_down_is_service_unavailable(method, xrootd_site, xrootd):
    xrootd.kill()
    try:
        with pytest.raises(ServiceUnavailable, match="127.0.0.1") as err:
            with method_class(method)(xrootd_site) as m:
                m.exists(xrootd_site.dirs["raw"])
        assert "\n" not in str(err.value)
    finally:
        xrootd.start()


@pytest.mark.parametrize("method", GRID)
def test_unreachable_storage_is_service_unavailable(method, xrootd_site):
    site = site_for(xrootd_site, method, hostname=f"root://127.0.0.1:{free_port()}/")
    with pytest.raises(ServiceUnavailable, match="127.0.0.1"):
        with method_class(method)(site) as m:
            m.exists(site.dirs["raw"])


@pytest.mark.parametrize("method", GRID)
def test_storage_that_never_answers_is_given_up_in_time(method, xrootd_site, xrootd,
                                                        monkeypatch):
    """A server that accepts connections and never answers (SIGSTOP) must not hang a pass:
    every call has a deadline, after which the call is given up as ``ServiceUnavailable``."""
    import cax.transfer.gfal as gfal
    monkeypatch.setattr(gfal, "OP_TIMEOUT", 3.0)
    with method_class(method)(xrootd_site) as m:
        assert m.exists(xrootd_site.dirs["raw"])
        xrootd.pause()
        try:
            with pytest.raises(ServiceUnavailable, match="no answer within 3 s"):
                m.exists(os.path.join(xrootd_site.dirs["raw"], "x"))
        finally:
            xrootd.resume()
        assert m.exists(xrootd_site.dirs["raw"]), "the next call starts a new worker"


@pytest.mark.parametrize("method", GRID)
def test_storage_refusing_a_write_is_destination_not_accessible(method, xrootd_site, tmp_path):
    src = tmp_path / "f"
    src.write_bytes(b"data")
    locked = os.path.join(xrootd_site.dirs["raw"], "locked")
    os.mkdir(locked)
    subprocess.run(["setfacl", "-b", locked], check=True)
    os.chmod(locked, 0o755)  # root's: the xrootd user may not write here
    with method_class(method)(xrootd_site) as m:
        with pytest.raises(DestinationNotAccessible) as err:
            put(m, str(src), os.path.join(locked, "f"))
    assert "\n" not in str(err.value) and "127.0.0.1" in str(err.value)
    assert os.listdir(locked) == []


@pytest.mark.parametrize("method", GRID)
def test_missing_plugin_or_unknown_prefix_says_so_at_connect(method, xrootd_site):
    """davs/srm storage cannot be tested here: where gfal2 lacks the plugin, connecting says
    which package brings it, instead of failing each copy."""
    site = site_for(xrootd_site, method, hostname="gsiftp://gridftp.example.org/")
    with pytest.raises(ServiceUnavailable, match="gridftp plugin.*gfal2-plugin-gridftp"):
        with method_class(method)(site):
            pass
    with pytest.raises(ServiceUnavailable, match="not a storage URL prefix"):
        with method_class(method)(site_for(xrootd_site, method, hostname="example.org")):
            pass
