"""cax.checksum: compatibility with checksumdir, the optional algorithms, cancellation and progress.

No timing assertions here: speed is measured by benchmarks/checksum.py.
"""
import builtins
import hashlib
import importlib
import os
import threading
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cax import checksum as cx
from tests.conftest import missing_component

try:
    import checksumdir
except ImportError:  # the compatibility reference: CI must fail, not skip, without it
    checksumdir = None


def dirhash(path):
    """checksumdir's sha512 dirhash: what existing Runs DBs hold and cax must reproduce."""
    if checksumdir is None:
        missing_component("the PyPI package checksumdir (the sha512 reference) is not installed")
    return checksumdir.dirhash(path, "sha512")

OPTIONAL_PACKAGE = {"xxh3": "xxhash", "blake3": "blake3"}


def write(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


@pytest.fixture
def tree(tmp_path):
    """Nested dirs, hidden file and dir, 0-byte file, non-ASCII names, files above BUFSIZE and SMALL."""
    root = tmp_path / "run"
    write(str(root / "a.txt"), b"alpha\n")
    write(str(root / ".hidden"), b"secret")
    write(str(root / ".hiddendir" / "inner" / "x.bin"), b"\x00\x01\x02" * 1000)
    write(str(root / "empty"), b"")
    write(str(root / "sub" / "deeper" / "dëtectör_数据.zip"), "naïve ü".encode())
    write(str(root / "sub" / "big.raw"), os.urandom(cx.BUFSIZE * 2 + 12345))
    write(str(root / "sub" / "medium.raw"), os.urandom(cx.SMALL + 1))
    write(str(root / "sub" / "exactly_small"), os.urandom(cx.SMALL))
    write(str(root / "z" / "dup1"), b"same")
    write(str(root / "z" / "dup2"), b"same")  # duplicate contents count twice
    return str(root)


# ---------------------------------------------------------------------------------------------
# sha512 compatibility


@pytest.mark.parametrize("workers", [None, 1, 2, 7])
def test_dir_equals_checksumdir(tree, workers):
    assert cx.checksum(tree, workers=workers) == dirhash(tree)


def test_default_algorithm_is_sha512(tree):
    assert cx.checksum(tree) == cx.checksum(tree, "sha512")


def test_file_larger_than_buffer_equals_hashlib(tree):
    path = os.path.join(tree, "sub", "big.raw")
    assert os.path.getsize(path) > cx.BUFSIZE
    with open(path, "rb") as f:
        assert cx.checksum(path) == hashlib.sha512(f.read()).hexdigest()


@pytest.mark.parametrize("name", ["a.txt", "empty", ".hidden", "sub/medium.raw", "sub/exactly_small"])
def test_single_file_equals_hashlib(tree, name):
    path = os.path.join(tree, name)
    with open(path, "rb") as f:
        assert cx.checksum(path) == hashlib.sha512(f.read()).hexdigest()


def test_empty_dir(tmp_path):
    assert cx.checksum(str(tmp_path)) == dirhash(str(tmp_path)) == hashlib.sha512().hexdigest()


def test_names_do_not_count_but_contents_do(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write(str(a / "one"), b"1")
    write(str(a / "two" / "two"), b"2")
    write(str(b / "x"), b"2")
    write(str(b / "y"), b"1")
    assert cx.checksum(str(a)) == cx.checksum(str(b))
    write(str(b / "y"), b"3")
    assert cx.checksum(str(a)) != cx.checksum(str(b))


def test_hidden_files_count(tree):
    before = cx.checksum(tree)
    write(os.path.join(tree, ".hiddendir", "inner", "x.bin"), b"changed")
    assert cx.checksum(tree) != before
    assert cx.checksum(tree) == dirhash(tree)


def test_symlinks_like_checksumdir(tree, tmp_path):
    outside = tmp_path / "outside"
    write(str(outside / "f"), b"outside data")
    os.symlink(str(outside), os.path.join(tree, "linked_dir"))  # not followed
    os.symlink(os.path.join(tree, "a.txt"), os.path.join(tree, "linked_file"))  # hashed as its target
    os.symlink(os.path.join(tree, "nowhere"), os.path.join(tree, "dangling"))  # hashed as empty
    assert cx.checksum(tree) == dirhash(tree)
    files = cx.list_files(tree)
    assert os.path.join(tree, "linked_file") in files
    assert not any(p.startswith(os.path.join(tree, "linked_dir")) for p in files)


def test_list_files_walk_order(tree):
    files = cx.list_files(tree)
    expected = []
    for root, dirs, names in os.walk(tree):
        dirs.sort()
        expected += [os.path.join(root, n) for n in sorted(names)]
    assert files == expected
    assert len(files) == 10


# Random trees: hypothesis builds names (including dot files and non-ASCII) and contents.
_name = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\\x00"),
                min_size=1, max_size=12).filter(lambda s: s not in (".", "..") and len(s.encode()) < 200)
_content = st.one_of(st.binary(max_size=300), st.integers(0, 3).map(lambda k: bytes([k]) * (cx.SMALL + k)))
_tree = st.recursive(st.dictionaries(_name, _content, max_size=4),
                     lambda children: st.dictionaries(_name, st.one_of(_content, children), max_size=4),
                     max_leaves=20)


def _materialize(root, spec):
    os.makedirs(root, exist_ok=True)
    for name, value in spec.items():
        p = os.path.join(root, name)
        if isinstance(value, dict):
            _materialize(p, value)
        else:
            with open(p, "wb") as f:
                f.write(value)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=_tree, workers=st.sampled_from([None, 1, 2, 3]))
def test_random_trees_equal_checksumdir(tmp_path_factory, spec, workers):
    root = str(tmp_path_factory.mktemp("h"))
    try:
        _materialize(root, spec)
    except OSError:  # e.g. a name the file system rejects (case folding, length): not our concern
        return
    assert cx.checksum(root, workers=workers) == dirhash(root)


# ---------------------------------------------------------------------------------------------
# all algorithms

SUPPORTED = [a for a in cx.ALGORITHMS if cx.is_supported(a)]


def test_algorithms_listed():
    assert set(cx.ALGORITHMS) == {"sha512", "adler32", "xxh3", "blake3"}
    assert cx.is_supported("sha512") and cx.is_supported("adler32")
    assert not cx.is_supported("md5") and not cx.is_supported("")


@pytest.mark.parametrize("algorithm", SUPPORTED)
def test_deterministic_and_worker_independent(tree, algorithm):
    digests = {cx.checksum(tree, algorithm, workers=w) for w in (None, 1, 2, 5)}
    digests.add(cx.checksum(tree, algorithm))
    assert len(digests) == 1


@pytest.mark.parametrize("algorithm", SUPPORTED)
@pytest.mark.parametrize("target", ["sub/big.raw", "a.txt", "sub/medium.raw"])
def test_one_byte_changes_digest(tree, algorithm, target):
    path = os.path.join(tree, target)
    before_dir, before_file = cx.checksum(tree, algorithm), cx.checksum(path, algorithm)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x01]))
    assert cx.checksum(path, algorithm) != before_file
    assert cx.checksum(tree, algorithm) != before_dir


def _reference(algorithm, data: bytes) -> str:
    if algorithm == "sha512":
        return hashlib.sha512(data).hexdigest()
    if algorithm == "adler32":
        return "%08x" % zlib.adler32(data)
    if algorithm == "xxh3":
        return importlib.import_module("xxhash").xxh3_128(data).hexdigest()
    return importlib.import_module("blake3").blake3(data).hexdigest()


@pytest.mark.parametrize("algorithm", SUPPORTED)
def test_documented_definitions(tree, algorithm):
    """File: the plain digest of the contents; dir: H(concatenation of sorted per-file hex digests)."""
    per_file = []
    for p in cx.list_files(tree):
        with open(p, "rb") as f:
            d = _reference(algorithm, f.read())
        assert cx.checksum(p, algorithm) == d
        per_file.append(d)
    assert cx.checksum(tree, algorithm) == _reference(algorithm, "".join(sorted(per_file)).encode())


def test_adler32_format(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"")
    assert cx.checksum(str(p), "adler32") == "00000001"  # zero-padded, like Rucio
    p.write_bytes(b"a")
    assert cx.checksum(str(p), "adler32") == "00620062"
    p.write_bytes(b"Wikipedia")
    assert cx.checksum(str(p), "adler32") == "11e60398"


def test_digest_lengths(tree):
    lengths = {"sha512": 128, "adler32": 8, "xxh3": 32, "blake3": 64}
    for a in SUPPORTED:
        for p in (tree, os.path.join(tree, "a.txt")):
            d = cx.checksum(p, a)
            assert len(d) == lengths[a] and d == d.lower() and int(d, 16) >= 0


@pytest.mark.parametrize("algorithm", ["xxh3", "blake3"])
def test_missing_optional_package_is_a_clear_error(tree, monkeypatch, algorithm):
    package = OPTIONAL_PACKAGE[algorithm]
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == package or name.startswith(package + "."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(__import__("sys").modules, package, raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: fake_import(name))
    with pytest.raises(ImportError, match=f"pip install {package}"):
        cx.checksum(tree, algorithm)
    assert cx.is_supported(algorithm) is False
    assert cx.checksum(tree, "sha512")  # the others keep working


def test_unknown_algorithm(tree):
    with pytest.raises(ValueError, match="unsupported checksum type"):
        cx.checksum(tree, "md5")


@pytest.mark.parametrize("algorithm", ["sha512", "adler32"])
def test_missing_path(tmp_path, algorithm):
    with pytest.raises(FileNotFoundError):
        cx.checksum(str(tmp_path / "nope"), algorithm)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads everything")
def test_unreadable_file_raises(tree):
    path = os.path.join(tree, "sub", "big.raw")
    os.chmod(path, 0)
    try:
        with pytest.raises(PermissionError):
            cx.checksum(tree)
    finally:
        os.chmod(path, 0o644)


# ---------------------------------------------------------------------------------------------
# cancellation and progress


@pytest.mark.parametrize("workers", [1, 2])
def test_cancel_before_start_raises(tree, workers):
    with pytest.raises(InterruptedError):
        cx.checksum(tree, workers=workers, cancel=lambda: True)


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("what", ["dir", "file"])
def test_cancel_midway_raises(tree, workers, what):
    """cancel() becomes true after a few polls: hashing stops with InterruptedError."""
    polls = []
    lock = threading.Lock()

    def cancel():
        with lock:
            polls.append(1)
            return len(polls) > 2

    path = tree if what == "dir" else os.path.join(tree, "sub", "big.raw")
    with pytest.raises(InterruptedError):
        cx.checksum(path, workers=workers, cancel=cancel)
    # it stopped soon: far fewer polls than chunks + files in the tree
    assert len(polls) <= 3 + workers


def test_cancel_event_never_set_gives_normal_result(tree):
    ev = threading.Event()
    assert cx.checksum(tree, cancel=ev.is_set) == dirhash(tree)


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_progress_sums_to_total_bytes(tree, workers):
    calls = []
    active = []

    def progress(n):
        active.append(1)
        assert len(active) == 1, "progress calls overlapped"
        calls.append(n)
        active.pop()

    assert cx.checksum(tree, workers=workers, progress=progress) == dirhash(tree)
    total = sum(os.path.getsize(p) for p in cx.list_files(tree))
    assert sum(calls) == total
    assert all(n > 0 for n in calls)
    assert len(calls) >= 2  # the big file reports during hashing, not only at the end


def test_progress_error_aborts(tree):
    def progress(n):
        raise RuntimeError("heartbeat failed")

    with pytest.raises(RuntimeError, match="heartbeat failed"):
        cx.checksum(tree, progress=progress)


def test_no_fd_leak_after_cancel(tree):
    fd_dir = "/proc/self/fd"
    if not os.path.isdir(fd_dir):
        pytest.skip("needs /proc/self/fd")
    before = len(os.listdir(fd_dir))
    for _ in range(5):
        with pytest.raises(InterruptedError):
            calls = iter(range(1000))
            cx.checksum(tree, workers=3, cancel=lambda: next(calls) > 3)
    assert len(os.listdir(fd_dir)) == before


# ---------------------------------------------------------------------------------------------
# the reference itself


def test_missing_checksumdir_fails_under_ci_and_skips_loudly_otherwise(tmp_path):
    """A CI run without checksumdir must not go green by skipping the compatibility tests."""
    import subprocess
    import sys
    fake = tmp_path / "fake" / "checksumdir"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('hidden for this test')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake.parent), root]))
    args = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
            os.path.join(root, "tests", "test_checksum.py"), "-k", "test_empty_dir"]
    ci = subprocess.run(args, cwd=root, env=dict(env, CI="true"), capture_output=True,
                        text=True, timeout=120)
    assert ci.returncode == 1, ci.stdout
    assert "required test component missing under CI=true" in ci.stdout
    local = subprocess.run(args, cwd=root, env=dict(env, CI="false"), capture_output=True,
                           text=True, timeout=120)
    assert local.returncode == 0, local.stdout
    assert "SKIPPED FOR LACK OF A REAL COMPONENT" in local.stdout
