"""The contract every transfer method keeps (docs/design.rst "Transfer methods").

Tasks talk only to this interface, to :mod:`cax.transfer.policy` (the one copy policy: partial
name, send, check, verify, rename into place, leftovers) and catch these error types, so the choice
of transport (local filesystem, scp, sftp, rsync, later grid tools) never leaks into task logic.

A method is a small backend: it implements the abstract verbs of :class:`TransferMethod` and
declares what it can do in its :class:`Features` (never probed with ``getattr``). Every verb's
errors are typed (subclasses of :class:`TransferError`) and documented on the verb; any verb may
also raise ``ServiceUnavailable`` (the site cannot be reached now), ``HostKeyError`` /
``DestinationNotAccessible`` (refused login, unknown or changed host key) and ``Interrupted``
(``cancel()`` said stop). ``progress(nbytes)`` (optional callable given to the constructor) is
called as bytes move; ``cancel()`` (optional) is polled between files and chunks.
"""
from __future__ import annotations

import errno
import os
import stat
from abc import ABC, abstractmethod
from dataclasses import dataclass
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


class ThirdPartyRefused(TransferError):
    """The servers would not copy between each other (no third-party copy there, or refused
    before any byte moved): the policy streams the copy through this host instead."""


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


@dataclass(frozen=True)
class Features:
    """What a method can do beyond the abstract verbs, declared once per method class (rclone's
    ``fs.Features``): the copy policy and the tasks read these, never the class or its name."""

    #: ``checksum`` computes the digest where the data are (a push is verified without pulling
    #: the data back)
    remote_checksum: bool
    #: ``send`` checks the partial copy and renames it to its final name itself, in the copy's own
    #: session (the rsync push: the rename rides in the receiving rsync's ``--rsync-path`` script);
    #: the policy then skips :meth:`TransferMethod.place`
    places_final_name: bool = False
    #: the site's paths are paths of this filesystem (``local``): its data are read, hashed and
    #: removed here, with no session
    local_paths: bool = False
    #: method objects may share one connection (``share()``): the pool opens one per site per
    #: pass and hands the others its ``share()``
    shares_connection: bool = False
    #: copies between two sites of this method may go server to server
    #: (:meth:`TransferMethod.third_party_copy`, asked first through ``accepts_third_party``);
    #: the policy streams them through this host where it is refused
    third_party: bool = False


class TransferMethod(ABC):
    """A transport to one site. Subclasses set ``name`` and ``features`` and implement every
    abstract verb; ``site`` is the :class:`cax.config.Site` being reached (hostname, port,
    username, key_file, known_hosts, ...). For ``local`` all paths are local.

    The copy verbs (:meth:`prepare`, :meth:`send`, :meth:`place`, :meth:`receive`) are steps of
    :mod:`cax.transfer.policy`, which alone decides the order, the checks and the clean-up; call
    ``policy.put``/``policy.get``, not them.
    """

    name = "base"
    features: Features  # every concrete method class declares its own

    def __init__(self, site, *, progress: Optional[Callable[[int], None]] = None,
                 cancel: Optional[Callable[[], bool]] = None):
        self.site = site
        #: how messages name the site
        self.label = self.name
        self.progress = progress or (lambda n: None)
        self.cancel = cancel or (lambda: False)

    #: False for a method object riding on another one's connection (see ``share``): the pool
    #: closes those first
    owns_connection = True

    # connection life cycle: connections are reused across runs within one pass
    def connect(self) -> None:
        """Open (or re-open a lost) connection. Raises ``ServiceUnavailable``, ``HostKeyError``,
        ``DestinationNotAccessible`` (login refused)."""

    def share(self) -> dict:
        """Constructor arguments that make another method object use this one's connection."""
        return {}

    def close(self) -> None:
        """Close the connection this object owns; never raises for a dead one."""

    def __enter__(self):
        self.connect()
        return self

    def __exit__(self, *exc):
        self.close()

    def check_cancel(self) -> None:
        if self.cancel():
            raise Interrupted("interrupted")

    # inspection and housekeeping on the site this method reaches ----------------------------
    @abstractmethod
    def exists(self, path: str) -> bool:
        """Whether anything (a link included) is at ``path``. Raises only connection errors."""

    @abstractmethod
    def size(self, path: str) -> int:
        """Total bytes of a file, or of all files below a directory. ``SourceNotFound`` when
        nothing is there."""

    @abstractmethod
    def tree(self, path: str) -> tuple:
        """(bytes, regular files) at ``path`` on the site, counted as :func:`local_tree` counts:
        the cheap check that a copy is whole (before a rename into place, before a purge trusts
        it). ``SourceNotFound`` when nothing is there."""

    @abstractmethod
    def free_bytes(self, path: str) -> int:
        """Bytes still free for cax on the filesystem that holds (or would hold) ``path`` on the
        site: what a retry of a copy that found no space compares with the copy's size."""

    @abstractmethod
    def remove(self, path: str) -> None:
        """Remove a file or a whole tree (links unlinked, never followed); a missing path is not
        an error. ``DestinationNotAccessible`` when it may not be removed."""

    @abstractmethod
    def makedirs(self, path: str) -> None:
        """Create ``path`` and its parents; an existing directory is fine.
        ``DestinationNotAccessible`` when it cannot be created."""

    @abstractmethod
    def checksum(self, path: str, algorithm: str = "sha512") -> Optional[str]:
        """The digest cax would record (see ``cax.checksum``) of ``path`` on the site, computed
        where the data are (``features.remote_checksum``); None for an algorithm it cannot
        compute. ``SourceNotFound`` when nothing is there."""

    # the steps of a copy (driven by cax.transfer.policy) --------------------------------------
    @abstractmethod
    def prepare(self, final: str) -> None:
        """Before a push: refuse an existing ``final`` (``DestinationNotAccessible``, "refusing to
        overwrite"), create its parent, remove a stale partial copy. A method that
        ``places_final_name`` may do this in ``send``'s session instead."""

    @abstractmethod
    def send(self, local: str, partial: str, final: str, expect: tuple) -> None:
        """Copy the local file or tree ``local`` to ``partial`` on the site (its parent exists,
        it does not). With ``features.places_final_name`` also check that ``partial`` holds
        ``expect`` = (bytes, regular files) and rename it to ``final`` in the same session.
        ``SourceNotFound``, ``NoSpace``, ``DestinationNotAccessible``, ``TransferFailed``
        ("incomplete copy" when ``expect`` is not met), ``Interrupted``."""

    @abstractmethod
    def place(self, partial: str, final: str, expect: tuple) -> None:
        """Rename ``partial`` to ``final`` on the site only if it holds exactly ``expect`` and
        ``final`` does not exist: ``TransferFailed`` (incomplete), ``DestinationNotAccessible``
        (exists)."""

    @abstractmethod
    def receive(self, remote: str, partial: str) -> None:
        """Copy the site's ``remote`` to the local ``partial`` (its parent exists, it does
        not). ``SourceNotFound``, ``NoSpace``, ``TransferFailed``, ``Interrupted``."""

    def accepts_third_party(self, source: "TransferMethod") -> bool:
        """Whether a copy from ``source``'s site to this method's site can go server to server
        (``features.third_party``); the default: never."""
        return False

    def third_party_copy(self, source: "TransferMethod", src_path: str, partial: str) -> None:
        """Copy ``src_path`` on ``source``'s site to ``partial`` on this site without the bytes
        passing through this host. ``ThirdPartyRefused`` (a ``TransferError`` of the method)
        when the servers will not: the policy then streams the copy."""
        raise TransferFailed(f"{self.label}: no third-party copies")

    def remove_partial(self, partial: str) -> None:
        """Best-effort removal of the partial copy of a failed push: never raises (the next
        attempt's ``prepare`` removes what is left)."""
        try:
            self.remove(partial)
        except (TransferError, OSError):
            pass

    def classify(self, e: BaseException, what: str, local_dest: bool = False) -> BaseException:
        """``e`` (raised during the copy ``what``) as a typed :class:`TransferError`; other
        ``BaseException`` (KeyboardInterrupt, ...) unchanged. Methods refine it."""
        if isinstance(e, TransferError) or not isinstance(e, Exception):
            return e
        if isinstance(e, OSError):
            if e.errno in NO_SPACE_ERRNOS:
                return NoSpace(f"{what}: {e.strerror or e}")
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return DestinationNotAccessible(f"{what}: {e.strerror or e}")
            return TransferFailed(f"{what} failed: {e.strerror or e}")
        return TransferFailed(f"{what} failed: {type(e).__name__}: {e}")
