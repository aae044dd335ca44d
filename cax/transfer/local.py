"""The ``local`` method: the other site's data directories are reachable through this filesystem
(shared disks, NFS, and the demo). Copies stream in 1 MiB chunks so cancel and progress work."""
from __future__ import annotations

import errno
import os
import shutil

from cax.checksum import checksum as _checksum
from cax.transfer.base import (
    NO_SPACE_ERRNOS,
    DestinationNotAccessible,
    NoSpace,
    SourceNotFound,
    TransferFailed,
    TransferMethod,
    check_complete,
    local_free_bytes,
    local_tree,
    partial_path,
)

CHUNK = 1 << 20


class LocalMethod(TransferMethod):
    name = "local"
    remote_checksum = True

    def exists(self, path):
        return os.path.lexists(path)

    def size(self, path):
        if os.path.isfile(path):
            return os.path.getsize(path)
        total = 0
        for root, _dirs, files in os.walk(path):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        return total

    def tree(self, path):
        try:
            return local_tree(path)
        except FileNotFoundError:
            raise SourceNotFound(f"{path}: No such file or directory")

    def remove(self, path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)

    def makedirs(self, path):
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise DestinationNotAccessible(f"cannot create {path}: {e.strerror}")

    def free_bytes(self, path):
        return local_free_bytes(path)

    def checksum(self, path, algorithm="sha512"):
        return _checksum(path, algorithm)

    def put(self, local, remote, expect=None):
        self._copy(local, remote, expect)

    def get(self, remote, local, expect=None):
        self._copy(remote, local, expect)

    # ---------------------------------------------------------------------------------------
    def _copy(self, src: str, dst: str, expect=None) -> None:
        if not os.path.exists(src):
            raise SourceNotFound(f"source {src} does not exist")
        expect = tuple(expect) if expect is not None else local_tree(src)
        if os.path.lexists(dst):
            raise DestinationNotAccessible(f"destination {dst} already exists and is not ours; "
                                           f"refusing to overwrite")
        parent = os.path.dirname(dst)
        self.makedirs(parent)
        tmp = partial_path(dst)
        self.remove(tmp)  # stale, from a copy that was killed
        try:
            if os.path.isdir(src):
                self._copy_tree(src, tmp)
            else:
                self._copy_file(src, tmp)
            self.check_cancel()
            check_complete("local", tmp, local_tree(tmp), expect)
            os.rename(tmp, dst)
        except BaseException as e:
            self.remove(tmp)
            if isinstance(e, OSError):
                if e.errno in NO_SPACE_ERRNOS:
                    raise NoSpace(f"cannot write {dst}: {e.strerror}") from e
                if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                    raise DestinationNotAccessible(f"cannot write {dst}: {e.strerror}") from e
                raise TransferFailed(f"copy {src} -> {dst} failed: {e.strerror or e}") from e
            raise

    def _copy_tree(self, src: str, dst: str) -> None:
        os.mkdir(dst)
        for root, dirs, files in os.walk(src):
            rel = os.path.relpath(root, src)
            target = dst if rel == "." else os.path.join(dst, rel)
            for d in dirs:
                os.mkdir(os.path.join(target, d))
            for f in files:
                self._copy_file(os.path.join(root, f), os.path.join(target, f))

    def _copy_file(self, src: str, dst: str) -> None:
        self.check_cancel()
        with open(src, "rb") as fi, open(dst, "wb") as fo:
            while True:
                self.check_cancel()
                chunk = fi.read(CHUNK)
                if not chunk:
                    break
                fo.write(chunk)
                self.progress(len(chunk))
        shutil.copystat(src, dst)
