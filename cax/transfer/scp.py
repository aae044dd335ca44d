"""The ``scp`` method: the scp protocol over a reused paramiko connection (the ``scp`` package, as
the original cax used). Copies go to ``partial_path(final)`` and are renamed into place."""
from __future__ import annotations

import shlex

from cax.transfer.base import NoSpace, says_no_space
from cax.transfer.ssh import SourceNotFound, SshMethod, TransferFailed, one_line

BUFSIZE = 1 << 20


def _quote(path: bytes) -> bytes:
    return shlex.quote(path.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape")


def _client_class():
    from scp import SCPClient

    class Client(SCPClient):
        """The scp package's client, keeping what its ``close`` throws away: the remote scp's exit
        status. The package ends a tree quietly when the channel closes between two files, so a
        dropped connection looked like the end of the data; only exit status 0 says the remote
        scp sent (or stored) everything."""

        exit_status = None
        stderr = b""

        def close(self):
            chan = self.channel
            if chan is None:
                return
            self.channel = None
            try:
                chan.shutdown_write()
                self.exit_status = chan.recv_exit_status()  # -1: closed without one
                if chan.recv_stderr_ready():
                    self.stderr = chan.recv_stderr(4096)
            except Exception:  # noqa: BLE001 - a broken channel (EOFError, OSError, SSHException)
                self.exit_status = -1
            finally:
                try:
                    chan.close()
                except Exception:  # noqa: BLE001 - closing a broken channel
                    pass

    return Client


class ScpMethod(SshMethod):
    name = "scp"

    def _client(self):
        self.shell.connect()
        self._file, self._last = None, 0
        return _client_class()(self.shell.transport, buff_size=BUFSIZE, socket_timeout=120.0,
                               progress=self._on_progress, sanitize=_quote)

    def _on_progress(self, name, size, sent):
        # the scp package reports (name, size, bytes so far); an empty file as (name, 1, 1)
        if name != self._file:
            self._file, self._last = name, 0
            if size == 1 and sent == 1:  # an empty file: nothing moved
                self._last = 1
        delta = sent - self._last
        self._last = sent
        if delta > 0:
            self.progress(delta)
        self.check_cancel()  # raises Interrupted out of the scp protocol loop

    def _run(self, client, action):
        try:
            action()  # the package closes the channel at the end: Client.close keeps the status
        except BaseException:
            if client.channel is not None:  # no status to wait for: the remote may still send
                try:
                    client.channel.close()
                except Exception:  # noqa: BLE001 - closing a broken channel
                    pass
                client.channel = None
            raise
        client.close()
        status = client.exit_status
        if status == 0:
            return
        if status in (None, -1):
            raise EOFError("connection lost: the remote scp ended without an exit status")
        text = one_line(client.stderr)
        if says_no_space(text):
            raise NoSpace(f"{self.label}: remote scp failed (status {status}): {text}")
        raise TransferFailed(f"{self.label}: remote scp failed (status {status}): {text}")

    def send(self, local: str, partial: str, final: str, expect: tuple) -> None:
        import os
        client = self._client()
        self._run(client, lambda: client.put(local, remote_path=partial,
                                             recursive=os.path.isdir(local)))

    def _get(self, remote: str, partial: str) -> None:
        from scp import SCPException
        client = self._client()
        try:
            # "scp -r -f" sends a lone file as well as a tree: no stat round trip needed
            self._run(client, lambda: client.get(remote, local_path=partial, recursive=True))
        except SCPException as e:
            if "no such file" in str(e).lower():
                raise SourceNotFound(f"{self.label}: {remote} does not exist") from None
            raise
