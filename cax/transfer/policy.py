"""The one copy policy, above every transfer method (rclone's ``operations`` layer over its
backends): nothing incomplete ever stands under a final name.

Every copy cax makes -- a push or pull between sites (:func:`put`, :func:`get`), the output of a
processing job and a ``cax mv`` across filesystems (:func:`write_local`) -- goes the same way:

1. refuse an existing final name; create its parent; remove what a killed attempt left
   (:func:`leftovers`: the partial copy, and an rsync pull's holder directory);
2. write into ``partial_path(final)``, a hidden sibling on the same filesystem;
3. check that the partial copy holds exactly the expected bytes and regular files;
4. rename it into place (never over an existing path);
5. on any failure remove the partial copy and raise a typed error (``NoSpace`` when the
   destination has less room than the copy needs, whatever the tool said).

A method whose ``send`` does steps 3-4 itself in the copy's own session
(``features.places_final_name``: the rsync push) is trusted to; the policy skips its ``place``.
Verification by checksum happens after the rename, through the Runs DB (``verifying``):
:func:`verifies_here` says where it can be computed. Local files are removed by
:func:`remove_local` only.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable, Optional

from cax.transfer.base import (
    HOLDER_SUFFIX,
    DestinationNotAccessible,
    NoSpace,
    SourceNotFound,
    ThirdPartyRefused,
    TransferError,
    TransferFailed,
    TransferMethod,
    check_complete,
    local_free_bytes,
    local_tree,
    partial_path,
)


# ------------------------------------------------------------------------------ local files
def remove_local(path: str, best_effort: bool = False) -> bool:
    """Remove a local file, link or tree (a link itself, never what it points to); False if
    nothing was there. Another daemon removing the same tree meanwhile is not an error; other
    errors raise unless ``best_effort`` (clean-up after a failure that is already reported)."""
    if not os.path.lexists(path):
        return False

    def gone_already(func, p, exc_info):
        if not issubclass(exc_info[0], FileNotFoundError):
            raise exc_info[1]

    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, onerror=gone_already)  # unlinks links inside, never follows
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        if not best_effort:
            raise
    return True


def leftovers(final: str) -> tuple:
    """What a copy to ``final`` may leave when its daemon dies mid-copy: the partial copy, and an
    rsync pull's holder directory. Both must go before the next attempt (a leftover holder made
    every later pull of that run fail with "File exists")."""
    partial = partial_path(final)
    return partial, partial + HOLDER_SUFFIX


def clear_leftovers(final: str, best_effort: bool = False) -> None:
    for left in leftovers(final):
        remove_local(left, best_effort=best_effort)


def existing_tree(path: str) -> tuple:
    """:func:`local_tree` of ``path``, ``SourceNotFound`` when nothing is there."""
    try:
        return local_tree(path)
    except FileNotFoundError:
        raise SourceNotFound(f"{path}: No such file or directory") from None


def place_local(partial: str, final: str, expect: Optional[tuple] = None, label: str = "local",
                replace: bool = False) -> None:
    """Rename the local ``partial`` to ``final`` only if it holds ``expect`` (when given);
    ``replace``: an existing ``final`` is removed first (processing output made again), else it
    is refused."""
    if expect is not None:
        check_complete(label, partial, local_tree(partial), expect)
    if replace:
        remove_local(final)
    elif os.path.lexists(final):
        raise DestinationNotAccessible(f"{label}: {final} already exists; refusing to overwrite")
    os.rename(partial, final)


def write_local(final: str, produce: Callable[[str], None], expect: Optional[tuple] = None,
                replace: bool = False, label: str = "local") -> None:
    """Make ``final`` with ``produce(partial)`` under the policy: leftovers cleared first, the
    result checked (``expect``) and renamed into place, the partial removed on any failure.
    ``produce`` writing nothing is a ``TransferFailed``."""
    if not replace and os.path.lexists(final):
        raise DestinationNotAccessible(f"{label}: {final} already exists; refusing to overwrite")
    os.makedirs(os.path.dirname(final) or ".", exist_ok=True)
    partial = partial_path(final)
    clear_leftovers(final)
    try:
        produce(partial)
        if not os.path.lexists(partial):
            raise TransferFailed(f"{label}: nothing was written to {partial}")
        place_local(partial, final, expect, label, replace=replace)
    except BaseException:
        clear_leftovers(final, best_effort=True)
        raise


# ------------------------------------------------------------------------------ site copies
def no_room(method: TransferMethod, err, where: str, need: int, local: bool = False):
    """``err`` as :class:`NoSpace` when the destination has less room than the copy needs.

    Some servers say nothing more than "Failure" for a full disk (SFTP), others say it in the
    remote host's language: after a failed copy (its partial copy already removed) the free
    space decides. Costs one remote command, only on a failure."""
    if type(err) is not TransferFailed:
        return err
    parent = os.path.dirname(where.rstrip("/")) or "/"
    try:
        free = local_free_bytes(parent) if local else method.free_bytes(parent)
    except (TransferError, OSError, ValueError):
        return err
    if free >= need:
        return err
    return NoSpace(f"{err}; {free} bytes free at {parent}, the copy needs {need}")


def put(method: TransferMethod, local: str, remote: str, expect: Optional[tuple] = None) -> None:
    """Copy the local file or tree ``local`` to ``remote`` on the method's site.

    ``expect`` = (bytes, regular files) the copy must hold before it is named final; by default
    the local source's :func:`local_tree`."""
    local = os.path.abspath(local)
    if not os.path.exists(local):
        raise SourceNotFound(f"{method.label}: local source {local} does not exist")
    expect = tuple(expect) if expect is not None else local_tree(local)
    method.check_cancel()
    method.prepare(remote)
    partial = partial_path(remote)
    try:
        method.send(local, partial, remote, expect)
        if not method.features.places_final_name:
            method.check_cancel()
            method.place(partial, remote, expect)
    except BaseException as e:
        method.remove_partial(partial)
        err = method.classify(e, f"put {local} -> {remote}")
        raise no_room(method, err, remote, expect[0]) from e


def get(method: TransferMethod, remote: str, local: str, expect: Optional[tuple] = None) -> None:
    """Copy ``remote`` on the method's site to the local ``local``.

    ``expect`` as for :func:`put`; None means the method's own accounting of what the far side
    sent (and, for a site on this filesystem, the source's tree)."""
    local = os.path.abspath(local)
    if os.path.lexists(local):
        raise DestinationNotAccessible(f"{method.label}: local destination {local} already "
                                       f"exists; refusing to overwrite")
    if expect is None and method.features.local_paths:
        expect = method.tree(remote)
    method.check_cancel()
    try:
        os.makedirs(os.path.dirname(local), exist_ok=True)
    except OSError as e:
        raise DestinationNotAccessible(f"cannot create {os.path.dirname(local)}: {e.strerror}")
    partial = partial_path(local)
    clear_leftovers(local, best_effort=True)  # from a copy that died with its connection
    try:
        method.receive(remote, partial)
        method.check_cancel()
        place_local(partial, local, expect, method.label)
    except BaseException as e:
        clear_leftovers(local, best_effort=True)
        err = method.classify(e, f"get {remote} -> {local}", local_dest=True)
        if expect is not None:
            err = no_room(method, err, local, expect[0], local=True)
        raise err from e


def copy_between(dest: TransferMethod, source: TransferMethod, src: str, final: str,
                 expect: tuple, scratch: Optional[str] = None) -> str:
    """Copy ``src`` on ``source``'s site to ``final`` on ``dest``'s site, neither of them this
    host: server to server where ``dest`` accepts a third-party copy from ``source``, else (or
    when it is refused) streamed through this host, in a private directory under ``scratch``
    removed afterwards. The same steps as :func:`put` (partial name, check, rename). Returns
    how the bytes went: ``"third-party"`` or ``"streamed"`` with the refusal's reason."""
    expect = tuple(expect)
    dest.check_cancel()
    dest.prepare(final)
    partial = partial_path(final)
    how = "streamed (no third-party copy between these sites)"
    try:
        done = False
        if dest.features.third_party and dest.accepts_third_party(source):
            try:
                dest.third_party_copy(source, src, partial)
                done, how = True, "third-party"
            except ThirdPartyRefused as e:
                how = f"streamed (third-party copy refused: {e})"
                dest.remove_partial(partial)
        if not done:
            holder = tempfile.mkdtemp(prefix="cax-stream-", dir=scratch)
            try:
                local = os.path.join(holder, os.path.basename(final.rstrip("/")))
                get(source, src, local, expect)
                dest.send(local, partial, final, expect)
            finally:
                remove_local(holder, best_effort=True)
        if not dest.features.places_final_name or how == "third-party":
            dest.check_cancel()
            dest.place(partial, final, expect)
    except BaseException as e:
        dest.remove_partial(partial)
        err = dest.classify(e, f"copy {source.label}:{src} -> {final}")
        raise no_room(dest, err, final, expect[0]) from e
    return how


def discard(method: Optional[TransferMethod], location: str, final: bool = True) -> None:
    """Remove what a copy to ``location`` left (its partial copy, an rsync pull's holder) and,
    with ``final``, the copy itself: through ``method`` on its site, or here (``method`` None)."""
    if method is None:
        for path in leftovers(location) + ((location,) if final else ()):
            remove_local(path)
        return
    # a pull's holder is only ever local: one remote command less
    for path in (partial_path(location),) + ((location,) if final else ()):
        method.remove(path)


def verifies_here(method: TransferMethod, direction: str) -> bool:
    """Whether a finished copy's checksum is computed by reading it here: a pull's copy is
    here, and so is a push to a site on this filesystem."""
    return direction == "pull" or method.features.local_paths
