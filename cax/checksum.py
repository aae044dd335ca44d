"""Checksums of files and directory trees, compatible with existing Runs DBs.

Supported checksum types (the datum's ``checksum_type``):

``sha512`` (default)
    A single file hashes to its plain sha512 hex digest. A directory hashes to exactly
    ``checksumdir.dirhash(path, 'sha512')``: sha512 over the concatenation of the SORTED per-file
    sha512 hex digests of every file below it (``os.walk`` without following symlinked
    directories; hidden files and directories included; file names do not count; a dangling
    symlink counts as an empty file, as in checksumdir).
``adler32``
    As Rucio/FTS record it: 8 lowercase hex digits, zero-padded, of ``zlib.adler32`` over the file
    (starting value 1). A directory: adler32 over the concatenation of the sorted per-file 8-digit
    hex digests (ASCII), again as 8 zero-padded hex digits. Fast but weak (32 bits): it detects
    transfer corruption, not tampering.
``xxh3``
    ``xxhash.xxh3_128`` (32 lowercase hex digits) of the file; a directory: ``xxh3_128`` over the
    concatenation of the sorted per-file hex digests. Needs ``pip install xxhash``.
``blake3``
    ``blake3`` with its default 32-byte output (64 lowercase hex digits); a directory: blake3 over the
    concatenation of the sorted per-file hex digests. Needs ``pip install blake3``.

Every directory digest thus follows the same rule: ``H(''.join(sorted(H(file) for file in tree)))``
with the per-file hex digests as ASCII, and an empty directory hashes to ``H(b'')``.

Speed: files are hashed by a pool of threads (hashlib, zlib, xxhash and blake3 release the GIL on
large updates), each reading into its own large reused buffer, so a tree of big files reaches the
hash limit of every core. The digest format forces each file to be hashed sequentially, so a single
big sha512 file uses one core; many files use all of them.

Unlike checksumdir, an unreadable directory below ``path`` raises instead of being silently left out.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import queue
import threading
import zlib
from typing import Callable, List, Optional

ALGORITHMS = ("sha512", "adler32", "xxh3", "blake3")
BUFSIZE = 1 << 20  # per-thread read buffer; large updates keep the GIL released while hashing
SMALL = 64 << 10  # files up to this size are hashed by the calling thread, larger ones by the pool

# Optional packages per checksum type: (module name, pip package name).
_OPTIONAL = {"xxh3": ("xxhash", "xxhash"), "blake3": ("blake3", "blake3")}


def _import_optional(algorithm: str):
    module, package = _OPTIONAL[algorithm]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"checksum type {algorithm!r} needs the Python package {package!r}: pip install {package}"
        ) from e


class _Adler32:
    """hashlib-like wrapper around zlib.adler32 (zlib releases the GIL on updates > 5 KiB)."""

    __slots__ = ("value",)

    def __init__(self, data=b""):
        self.value = zlib.adler32(data)

    def update(self, data):
        self.value = zlib.adler32(data, self.value)

    def hexdigest(self):
        return "%08x" % self.value


def _hasher_factory(algorithm: str) -> Callable:
    """A callable returning a fresh hasher object with ``update`` and ``hexdigest``."""
    if algorithm == "sha512":
        return hashlib.sha512
    if algorithm == "adler32":
        return _Adler32
    if algorithm == "xxh3":
        return _import_optional("xxh3").xxh3_128
    if algorithm == "blake3":
        return _import_optional("blake3").blake3
    raise ValueError(f"unsupported checksum type {algorithm!r} (supported: {', '.join(ALGORITHMS)})")


def is_supported(algorithm: str) -> bool:
    """True when ``algorithm`` is a known checksum type and its optional package is importable."""
    try:
        _hasher_factory(algorithm)
    except (ValueError, ImportError):
        return False
    return True


def list_files(path: str) -> list:
    """Every file below ``path`` in checksumdir's walk order (symlinked dirs not followed)."""
    out = []

    def fail(err):
        raise err

    for root, dirs, files in os.walk(path, topdown=True, onerror=fail):
        dirs.sort()
        for name in sorted(files):
            out.append(os.path.join(root, name))
    return out


def _cores() -> int:
    """CPUs this process may run on (respects taskset/cgroup affinity), at least 1."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class _Job:
    """Shared state of one checksum() call: cancellation, progress, first error."""

    __slots__ = ("cancel", "progress", "lock", "stop", "error")

    def __init__(self, cancel, progress):
        self.cancel = cancel
        self.progress = progress
        self.lock = threading.Lock()
        self.stop = False
        self.error = None

    def report(self, nbytes):
        # Calls are serialized so the callback need not be thread-safe.
        with self.lock:
            self.progress(nbytes)

    def fail(self, exc):
        with self.lock:
            if self.error is None:
                self.error = exc
            self.stop = True


def _open(path: str):
    """An fd for ``path``, or None for a dangling symlink (which checksumdir hashes as empty)."""
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        if os.path.lexists(path) and not os.path.exists(path):
            return None
        raise


def _hash_fd(fd: int, h, n: int, buf: bytearray, view: memoryview, job: _Job, pending: List[int]) -> str:
    """Feed ``h`` the ``n`` bytes already in ``buf`` and then the rest of ``fd`` (closed by the caller)."""
    cancel, progress = job.cancel, job.progress
    readv = os.readv
    bufs = (buf,)
    while n:
        if job.stop or (cancel is not None and cancel()):
            raise InterruptedError("checksum cancelled")
        h.update(view[:n])
        if progress is not None:
            pending[0] += n
            if pending[0] >= BUFSIZE:
                job.report(pending[0])
                pending[0] = 0
        n = readv(fd, bufs)
    return h.hexdigest()


def _worker(tasks: "queue.SimpleQueue", digests: list, new, job: _Job) -> None:
    """Hash (index, fd) tasks until the None sentinel; always closes every fd it takes."""
    buf = bytearray(BUFSIZE)
    view = memoryview(buf)
    pending = [0]
    readv = os.readv
    try:
        while True:
            task = tasks.get()
            if task is None:
                break
            i, fd = task
            try:
                if not job.stop:
                    if hasattr(os, "posix_fadvise"):
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # more readahead when cold
                    digests[i] = _hash_fd(fd, new(), readv(fd, (buf,)), buf, view, job, pending)
            except BaseException as e:  # noqa: B902 - re-raised by checksum()
                job.fail(e)
            finally:
                os.close(fd)
        if pending[0] and job.progress is not None and not job.stop:
            job.report(pending[0])
    except BaseException as e:  # noqa: B902
        job.fail(e)


def _hash_files(files: List[str], new, workers: int, job: _Job) -> List[str]:
    """Per-file hex digests, in the order of ``files``.

    The calling thread opens every file and reads its first ``SMALL`` bytes. A file that ends there
    is hashed on the spot: for small files the per-file Python work, which holds the GIL, dominates,
    and one thread does it fastest (threads would only fight over the GIL). Larger files are rewound
    and handed to ``workers - 1`` threads; once every file is dispatched the calling thread joins
    them, so big files keep ``workers`` threads busy hashing with the GIL released.
    """
    digests = [None] * len(files)
    buf = bytearray(BUFSIZE)
    view = memoryview(buf)
    small_view = view[:SMALL]
    pending = [0]
    readv = os.readv
    tasks = queue.SimpleQueue()
    threads = []
    try:
        if workers > 1:
            for k in range(workers - 1):
                t = threading.Thread(target=_worker, args=(tasks, digests, new, job),
                                     name=f"cax-checksum-{k}", daemon=True)
                t.start()
                threads.append(t)
        cancel = job.cancel
        for i, path in enumerate(files):
            if job.stop or (cancel is not None and cancel()):
                raise InterruptedError("checksum cancelled")
            fd = _open(path)
            if fd is None:
                digests[i] = new().hexdigest()
                continue
            try:
                n = readv(fd, (small_view,))
                if n < SMALL or workers <= 1:
                    digests[i] = _hash_fd(fd, new(), n, buf, view, job, pending)
                    continue
                os.lseek(fd, 0, os.SEEK_SET)
                tasks.put((i, fd))
                fd = None  # the worker closes it
            finally:
                if fd is not None:
                    os.close(fd)
        if pending[0] and job.progress is not None:
            job.report(pending[0])
    except BaseException as e:  # noqa: B902 - e.g. KeyboardInterrupt: stop the workers too
        job.fail(e)
    finally:
        if threads:
            for _ in range(len(threads) + 1):
                tasks.put(None)  # after every task: FIFO, so each task is taken (and closed) first
            _worker(tasks, digests, new, job)  # the calling thread helps with the big files
            for t in threads:
                while t.is_alive():
                    try:
                        t.join()
                    except BaseException as e:  # noqa: B902
                        job.fail(e)
    if job.error is not None:
        raise job.error
    return digests


def checksum(
    path: str,
    algorithm: str = "sha512",
    workers: Optional[int] = None,
    cancel: Optional[Callable[[], bool]] = None,
    progress: Optional[Callable[[int], None]] = None,
) -> str:
    """The digest cax records for a file or directory (see the module docstring for each type).

    ``workers``: hashing threads; default: the CPUs this process may use (capped by the number of files).
    ``cancel``: called between chunks (about every ``BUFSIZE`` bytes and before each file) from the
    calling and the worker threads; when it returns true, hashing stops and ``InterruptedError`` is raised. It must
    be cheap and thread-safe (e.g. ``threading.Event().is_set``).
    ``progress``: called with the number of bytes hashed since its previous call, roughly every
    ``BUFSIZE`` bytes per worker and once more at the end; calls never overlap (a lock serializes them)
    but may come from any worker thread. Exceptions it raises abort the checksum.
    Raises ``FileNotFoundError`` when ``path`` does not exist, ``ValueError`` for an unknown type and
    ``ImportError`` naming the pip package when an optional one is missing.
    """
    new = _hasher_factory(algorithm)
    job = _Job(cancel, progress)
    if cancel is not None and cancel():
        raise InterruptedError("checksum cancelled")
    if os.path.isdir(path):
        files = list_files(path)
    elif os.path.exists(path):
        return _hash_files([path], new, 1, job)[0]
    else:
        raise FileNotFoundError(2, "No such file or directory", path)
    if workers is None:
        workers = _cores()
    workers = max(1, min(int(workers), len(files)))
    return _combine(new, _hash_files(files, new, workers, job))


def _combine(new, digests) -> str:
    top = new()
    top.update("".join(sorted(digests)).encode("ascii"))
    return top.hexdigest()


def directory_digest(algorithm: str, digests) -> str:
    """The digest of a directory whose files have the per-file hex ``digests`` (any order), by
    the rule :func:`checksum` uses: what a storage system's own per-file checksums (XRootD's,
    gfal2's adler32) add up to, so a copy there is verified without reading it back."""
    return _combine(_hasher_factory(algorithm), [str(d).lower() for d in digests])
