"""The ``local`` method: the other site's data directories are reachable through this filesystem
(shared disks, NFS, and the demo). Copies stream in 1 MiB chunks so cancel and progress work."""
from __future__ import annotations

import os
import shutil

from cax.checksum import checksum as _checksum
from cax.transfer import policy
from cax.transfer.base import (
    DestinationNotAccessible,
    Features,
    SourceNotFound,
    TransferMethod,
    local_free_bytes,
    partial_path,
)

CHUNK = 1 << 20


class LocalMethod(TransferMethod):
    name = "local"
    features = Features(remote_checksum=True, local_paths=True)

    def exists(self, path):
        return os.path.lexists(path)

    def size(self, path):
        if not os.path.lexists(path):
            raise SourceNotFound(f"{self.label}: {path}: No such file or directory")
        if os.path.isfile(path):
            return os.path.getsize(path)
        total = 0
        for root, _dirs, files in os.walk(path):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        return total

    def tree(self, path):
        return policy.existing_tree(path)

    def remove(self, path):
        try:
            policy.remove_local(path)
        except OSError as e:
            raise DestinationNotAccessible(f"cannot remove {path}: {e.strerror or e}") from e

    def makedirs(self, path):
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise DestinationNotAccessible(f"cannot create {path}: {e.strerror}")

    def free_bytes(self, path):
        return local_free_bytes(path)

    def checksum(self, path, algorithm="sha512"):
        if not os.path.lexists(path):
            raise SourceNotFound(f"{path}: No such file or directory")
        return _checksum(path, algorithm)

    # the steps of a copy (cax.transfer.policy) ------------------------------------------------
    def prepare(self, final):
        if os.path.lexists(final):
            raise DestinationNotAccessible(f"destination {final} already exists and is not ours; "
                                           f"refusing to overwrite")
        self.makedirs(os.path.dirname(final))
        self.remove(partial_path(final))  # stale, from a copy that was killed

    def send(self, local, partial, final, expect):
        self._copy(local, partial)

    def place(self, partial, final, expect):
        policy.place_local(partial, final, expect, self.label)

    def receive(self, remote, partial):
        self._copy(remote, partial)

    # ---------------------------------------------------------------------------------------
    def _copy(self, src: str, dst: str) -> None:
        if os.path.isdir(src):
            self._copy_tree(src, dst)
        else:
            self._copy_file(src, dst)

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
