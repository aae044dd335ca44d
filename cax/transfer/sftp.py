"""The ``sftp`` method: paramiko SFTP over a reused connection, with pipelined writes, prefetched
reads, large requests and a large channel window (on large files it reaches about three quarters
of OpenSSH's speed here, see "Transfers" in docs/performance.rst; many small files cost one round
trip each, so prefer rsync for them).

paramiko files its pipelined writes' replies under no file and ``close()`` ignores errors, so a
full disk went unnoticed (copies renamed into place truncated): :meth:`SftpMethod._put_file` reads
every write's status itself, and a push is renamed into place only after an SFTP walk of the
partial copy shows every byte and file there."""
from __future__ import annotations

import os
import posixpath
import stat

from cax.transfer.ssh import (
    WINDOW,
    DestinationNotAccessible,
    SourceNotFound,
    SshMethod,
    TransferFailed,
    check_path,
)
from cax.transfer.base import check_complete, partial_path

READ_CHUNK = 1 << 20  # local read size per write call
REQUEST = 255 * 1024  # bytes per SFTP read/write request (OpenSSH's limit is 256 KiB - 1 KiB)
PREFETCH = 32  # outstanding read requests (32 x 255 KiB = 8 MiB in flight)


def paramiko_status() -> int:
    from paramiko.sftp import CMD_STATUS
    return CMD_STATUS


class SftpMethod(SshMethod):
    name = "sftp"

    def __init__(self, site, **kw):
        super().__init__(site, **kw)
        self._sftp = None
        self._sftp_conn = None

    def sftp(self):
        """The SFTP session on the pass's connection (re-opened after a reconnect)."""
        self.shell.connect()
        if self._sftp is None or self._sftp_conn != self.shell.connections or \
                self._sftp.sock.closed:
            import paramiko
            self._sftp = paramiko.SFTPClient.from_transport(self.shell.transport,
                                                            window_size=WINDOW)
            self._sftp_conn = self.shell.connections
        return self._sftp

    def close(self) -> None:
        if self._sftp is not None:
            try:
                self._sftp.close()
            except Exception:  # noqa: BLE001
                pass
            self._sftp = None
        super().close()

    # ------------------------------------------------------------------ SFTP-protocol operations
    # (no remote shell start-up: one round trip each)
    def _lexists(self, sftp, path: str) -> bool:
        try:
            sftp.lstat(path)
            return True
        except FileNotFoundError:
            return False

    def exists(self, path: str) -> bool:
        check_path(path, self.label)
        try:
            return self._lexists(self.sftp(), path)
        except Exception as e:  # noqa: BLE001
            raise self.classify(e, f"exists {path}") from e

    def prepare(self, remote: str) -> None:
        check_path(remote, self.label)
        sftp = self.sftp()
        try:
            if self._lexists(sftp, remote):
                raise DestinationNotAccessible(f"{self.label}: {remote} already exists; refusing "
                                               f"to overwrite")
            missing, d = [], posixpath.dirname(remote.rstrip("/")) or "/"
            while not self._lexists(sftp, d):
                missing.append(d)
                d = posixpath.dirname(d)
            for d in reversed(missing):
                sftp.mkdir(d)
            if not missing and self._lexists(sftp, partial_path(remote)):
                self.remove(partial_path(remote))  # stale, from a copy that died with its link
        except Exception as e:  # noqa: BLE001
            raise self.classify(e, f"prepare {remote}") from e

    def _tree(self, sftp, path: str) -> tuple:
        """(bytes, regular files) at ``path`` as :func:`cax.transfer.base.local_tree` counts
        them (lstat: links count nothing), over SFTP: one round trip per directory."""
        st = sftp.lstat(path)
        if not stat.S_ISDIR(st.st_mode or 0):
            return (st.st_size, 1) if stat.S_ISREG(st.st_mode or 0) else (0, 0)
        total = files = 0
        for a in sftp.listdir_attr(path):
            if stat.S_ISDIR(a.st_mode or 0):
                b, f = self._tree(sftp, posixpath.join(path, a.filename))
                total, files = total + b, files + f
            elif stat.S_ISREG(a.st_mode or 0):
                total, files = total + a.st_size, files + 1
        return total, files

    def place(self, partial: str, remote: str, expect: tuple) -> None:
        sftp = self.sftp()
        check_complete(self.label, partial, self._tree(sftp, partial), expect)
        if self._lexists(sftp, remote):
            raise DestinationNotAccessible(f"{self.label}: {remote} already exists; refusing to "
                                           f"overwrite")
        sftp.rename(partial, remote)  # plain SFTP rename never replaces an existing path

    # ------------------------------------------------------------------ push
    def send(self, local: str, partial: str, final: str, expect: tuple) -> None:
        sftp = self.sftp()
        if not os.path.isdir(local):
            self._put_file(sftp, local, partial)
            return
        sftp.mkdir(partial)
        for root, dirs, files in os.walk(local):
            dirs.sort()
            rel = os.path.relpath(root, local)
            rroot = partial if rel == "." else posixpath.join(partial, *rel.split(os.sep))
            for d in dirs:
                self.check_cancel()
                sftp.mkdir(check_path(posixpath.join(rroot, d), self.label))
            for f in sorted(files):
                self._put_file(sftp, os.path.join(root, f),
                               check_path(posixpath.join(rroot, f), self.label))

    def _put_file(self, sftp, local: str, remote: str) -> None:
        self.check_cancel()
        with open(local, "rb") as fl:
            fr = sftp.open(remote, "wb")
            try:
                fr.MAX_REQUEST_SIZE = REQUEST
                fr.set_pipelined(True)
                while True:
                    self.check_cancel()
                    data = fl.read(READ_CHUNK)
                    if not data:
                        break
                    fr.write(data)
                    self.progress(len(data))
                    self._write_statuses(sftp, fr, wait=False)  # a full disk stops the copy early
                fr.flush()
                self._write_statuses(sftp, fr, wait=True)
            finally:
                fr.close()  # raises nothing, whatever the server says

    @staticmethod
    def _write_statuses(sftp, fr, wait: bool) -> None:
        """Read the status of the file's outstanding pipelined writes (all of them when ``wait``,
        else those already answered); a failed write raises (``OSError``, e.g. "Failure" for a
        full disk). paramiko keeps the request ids in ``_reqs`` and checks them itself only when
        over 100 are outstanding; it drops the replies otherwise."""
        reqs = fr._reqs
        while reqs and (wait or sftp.sock.recv_ready()):
            t, _msg = sftp._read_response(reqs.popleft())  # raises on an error status
            if t != paramiko_status():
                raise OSError(f"unexpected SFTP reply {t} to a write")

    # ------------------------------------------------------------------ pull
    def _get(self, remote: str, partial: str) -> None:
        sftp = self.sftp()
        try:
            st = sftp.stat(remote)
        except FileNotFoundError:
            raise SourceNotFound(f"{self.label}: {remote} does not exist") from None
        if not stat.S_ISDIR(st.st_mode or 0):
            self._get_file(sftp, remote, partial, st.st_size)
            return
        os.mkdir(partial)
        self._get_dir(sftp, remote, partial)

    def _get_dir(self, sftp, remote: str, local: str) -> None:
        entries = sorted(sftp.listdir_attr(remote), key=lambda a: a.filename)
        for a in entries:
            self.check_cancel()
            rp = check_path(posixpath.join(remote, a.filename), self.label)
            lp = os.path.join(local, a.filename)
            mode = a.st_mode or 0
            if stat.S_ISLNK(mode):  # like os.walk: links to files count, links to dirs do not
                try:
                    a = sftp.stat(rp)
                except OSError:
                    continue
                if not stat.S_ISREG(a.st_mode or 0):
                    continue
                mode = a.st_mode
            if stat.S_ISDIR(mode):
                os.mkdir(lp)
                self._get_dir(sftp, rp, lp)
            elif stat.S_ISREG(mode):
                self._get_file(sftp, rp, lp, a.st_size)

    def _get_file(self, sftp, remote: str, local: str, size: int) -> None:
        self.check_cancel()
        with sftp.open(remote, "rb") as fr, open(local, "wb") as fl:
            fr.MAX_REQUEST_SIZE = REQUEST
            if size > REQUEST:
                fr.prefetch(size, max_concurrent_requests=PREFETCH)
            got = 0
            while got < size:
                self.check_cancel()
                # whole prefetch chunks: paramiko keeps the unread head of a chunk split by an
                # unaligned read in its prefetch table, which then grows with the file (O(n²))
                data = fr.read(min(REQUEST, size - got))
                if not data:
                    break
                fl.write(data)
                got += len(data)
                self.progress(len(data))
        if got != size:
            raise TransferFailed(f"{self.label}: {remote} ended after {got} of {size} bytes")
