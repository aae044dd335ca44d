"""The one interface every transfer method implements (DESIGN.md "Transfer methods").

Tasks only ever talk to this interface and catch these error types, so the choice of transport
(local filesystem, scp, sftp, rsync, later grid tools) never leaks into task logic.

Contract every method keeps:
- ``put(local, remote)`` and ``get(remote, local)`` copy a file or a whole directory tree. Nothing
  appears under the final name until the copy is complete: data go to ``partial_path(final)`` (a
  hidden name in the same directory, so the rename is atomic) and are renamed into place at the end.
  Before that rename the partial copy must hold exactly the expected bytes and regular files
  (``expect=(bytes, files)``; a push defaults to the local source's :func:`local_tree`), else
  ``TransferFailed`` and no final name. On any failure the partial copy is removed (best effort)
  and a typed error is raised; a stale partial left by a copy that died with its connection is
  removed before a new copy starts. A destination without room for the copy raises ``NoSpace``.
- ``progress(nbytes)`` (optional callable given to the constructor) is called as bytes move; the task
  uses it for heartbeats and progress bars.
- ``cancel()`` (optional callable) is polled between files and chunks; when it returns True the copy
  stops, the partial copy is removed and ``Interrupted`` is raised.
- ``checksum(path, algorithm)`` returns the digest cax would record (see ``cax.checksum``) computed
  where the data are, or ``None`` when the method cannot compute it remotely.
"""
from __future__ import annotations

import errno
import os
import stat
from typing import Callable, Optional


class TransferError(Exception):
    """Base of all transfer errors; ``str(err)`` is a one-line reason fit for the Runs DB."""

    #: the datum's ``error_kind`` when a copy fails with this error (docs/design.rst)
    kind = "failed"


class SourceNotFound(TransferError):
    """The data to copy are not where the Runs DB says they are."""


class DestinationNotAccessible(TransferError):
    """The destination cannot be written (permissions, missing mount, full disk, bad host key)."""


class NoSpace(DestinationNotAccessible):
    """The destination's disk (or quota) has no room for the copy: re-sending it before space is
    freed would only fill the disk again, so the retry waits for :meth:`TransferMethod.free_bytes`
    to show room (see ``cax.tasks.retry``)."""

    kind = "no-space"


class ServiceUnavailable(TransferError):
    """The remote end cannot be reached now (connection refused, timeout): try again on a later pass."""


class TransferFailed(TransferError):
    """The copy started but did not complete."""


class Interrupted(TransferError):
    """The daemon was asked to stop (SIGTERM/SIGINT) while the copy was in flight."""

    kind = "interrupted"


NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
#: how tools say it in the C locale (cax runs rsync and remote commands with LC_ALL=C)
NO_SPACE_TEXT = ("no space left on device", "disk quota exceeded", "quota exceeded")


def says_no_space(text) -> bool:
    low = str(text).lower()
    return any(t in low for t in NO_SPACE_TEXT)


def check_complete(label: str, partial: str, got: tuple, expect: tuple) -> None:
    """Refuse to name a copy final unless it holds exactly ``expect`` = (bytes, regular files)."""
    if tuple(got) != tuple(expect):
        raise TransferFailed(f"{label}: incomplete copy {partial}: {got[0]} bytes in {got[1]} "
                             f"files, expected {expect[0]} bytes in {expect[1]} files; not "
                             f"renamed into place")


def local_free_bytes(path: str) -> int:
    """Bytes an unprivileged writer may still use on the filesystem that holds (or would hold)
    ``path``: statvfs of its nearest existing ancestor."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize

PARTIAL_MARK = ".cax-partial"


def partial_path(final: str) -> str:
    """A hidden sibling of ``final``: same filesystem (atomic rename), never mistaken for data.

    The name is fixed for a final path: exactly one daemon owns a final path at a time (the Runs
    DB claim), so there is no collision, and a copy that died with its connection leaves a partial
    the next attempt (or the retry task) knows how to find and remove.
    """
    head, tail = os.path.split(final.rstrip("/"))
    return os.path.join(head, f".{tail}{PARTIAL_MARK}")


#: suffix of the private directory an rsync pull receives into (``partial_path(final)`` + it)
HOLDER_SUFFIX = ".d"


def local_leftovers(final: str) -> tuple:
    """What a copy into the local ``final`` may leave when the daemon dies mid-copy: the partial
    copy, and an rsync pull's holder directory. Both must go before the next attempt (a
    leftover holder made every later pull of that run fail with "File exists")."""
    partial = partial_path(final)
    return partial, partial + HOLDER_SUFFIX


def local_tree(location: str) -> tuple:
    """(bytes, regular files) under a local ``location``: what a copy must reproduce exactly.

    Symlinks count as nothing and are never followed, so a link pointing out of the data cannot
    make a copy look complete; the remote helper (``tree`` in :mod:`cax.transfer.remote_hash`)
    counts the same way, so local and remote summaries compare like with like.
    """
    if os.path.islink(location) or not os.path.isdir(location):
        st = os.lstat(location)
        return (st.st_size, 1) if os.path.isfile(location) and not os.path.islink(location) \
            else (0, 0)
    total = files = 0
    for dirpath, _dirs, names in os.walk(location, followlinks=False):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):  # not links, FIFOs, sockets: as the remote helper
                total += st.st_size
                files += 1
    return total, files


def is_partial_name(name: str) -> bool:
    return name.startswith(".") and PARTIAL_MARK in name


class TransferMethod:
    """Base class; subclasses set ``name`` and implement the operations they support.

    ``site`` is the :class:`cax.config.Site` being reached (hostname, port, username, key_file,
    known_hosts, ...). For ``local`` all paths are local.
    """

    name = "base"
    #: True when ``checksum`` can run where the data are (no pulling back to verify a push).
    remote_checksum = False

    def __init__(self, site, *, progress: Optional[Callable[[int], None]] = None,
                 cancel: Optional[Callable[[], bool]] = None):
        self.site = site
        self.progress = progress or (lambda n: None)
        self.cancel = cancel or (lambda: False)

    #: False for a method object riding on another one's connection (see ``share``)
    owns_connection = True

    # connection life cycle: connections are reused across runs within one pass
    def connect(self) -> None:
        pass

    def share(self) -> dict:
        """Constructor arguments that make another method object use this one's connection."""
        return {}

    def close(self) -> None:
        pass

    def __enter__(self):
        self.connect()
        return self

    def __exit__(self, *exc):
        self.close()

    def check_cancel(self) -> None:
        if self.cancel():
            raise Interrupted("interrupted")

    # remote-side operations (on the site this method reaches)
    def exists(self, path: str) -> bool:
        raise NotImplementedError

    def size(self, path: str) -> int:
        """Total bytes of a file, or of all files below a directory."""
        raise NotImplementedError

    def tree(self, path: str) -> tuple:
        """(bytes, regular files) at ``path`` on the site, counted as :func:`local_tree` counts:
        the cheap check that a copy is whole (before a rename into place, before a purge trusts
        it). Raises ``SourceNotFound`` when nothing is there."""
        raise NotImplementedError

    def remove(self, path: str) -> None:
        """Remove a file or a whole tree; a missing path is not an error."""
        raise NotImplementedError

    def makedirs(self, path: str) -> None:
        raise NotImplementedError

    def free_bytes(self, path: str) -> int:
        """Bytes still free for cax on the filesystem that holds (or would hold) ``path`` on the
        site: what a retry of a copy that found no space compares with the copy's size."""
        raise NotImplementedError

    def checksum(self, path: str, algorithm: str = "sha512") -> Optional[str]:
        return None

    # copies: ``expect`` is the (bytes, regular files) the copy must hold before it is renamed
    # into place; None means the local source's for a put, and the method's own accounting of
    # what the far side sent for a get
    def put(self, local: str, remote: str, expect: Optional[tuple] = None) -> None:
        raise NotImplementedError

    def get(self, remote: str, local: str, expect: Optional[tuple] = None) -> None:
        raise NotImplementedError
