"""The ``scp`` method: the scp protocol over a reused paramiko connection (the ``scp`` package, as
the original cax used). Copies go to ``partial_path(final)`` and are renamed into place."""
from __future__ import annotations

import shlex

from cax.transfer.ssh import SourceNotFound, SshMethod, TransferFailed, one_line

BUFSIZE = 1 << 20


def _quote(path: bytes) -> bytes:
    return shlex.quote(path.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape")


class ScpMethod(SshMethod):
    name = "scp"

    def _client(self):
        from scp import SCPClient

        self.shell.connect()
        self._file, self._last = None, 0
        return SCPClient(self.shell.transport, buff_size=BUFSIZE, socket_timeout=120.0,
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
            action()
            chan = client.channel
            if chan is not None and not chan.closed:
                chan.shutdown_write()
                status = chan.recv_exit_status()
                err = chan.recv_stderr(4096) if chan.recv_stderr_ready() else b""
                if status not in (0, -1):
                    raise TransferFailed(f"{self.label}: remote scp failed (status {status}): "
                                         f"{one_line(err)}")
                if status == -1 and not self.shell.alive:
                    raise EOFError("connection lost")
        finally:
            if client.channel is not None:
                try:
                    client.channel.close()
                except Exception:  # noqa: BLE001 - closing a broken channel
                    pass
                client.channel = None

    def _put(self, local: str, partial: str) -> None:
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
