"""The ``rsync`` method: OpenSSH ``rsync -a --partial`` through one ControlMaster connection per
site per pass (socket in a private 0700 directory), argument lists only, ``--protect-args`` so no
remote shell ever word-splits or expands a path.

Atomic placement: rsync writes into ``partial_path(final)`` (a hidden sibling), then one remote
``rename`` over the same control socket moves the finished tree into place. ``--delay-updates`` and
``--temp-dir`` were not used: they make each *file* appear atomically, but the run directory itself
exists under its final name from the first file on, so a half-copied run could be taken for data.
"""
from __future__ import annotations

import os
import posixpath
import re
import shlex
import shutil
import subprocess
import threading

from cax.transfer.base import Interrupted
from cax.transfer.ssh import (
    DestinationNotAccessible,
    OpenSSHMaster,
    ServiceUnavailable,
    SourceNotFound,
    SshMethod,
    TransferFailed,
    classify_ssh_stderr,
    one_line,
    username,
)

RSYNC = "rsync"
_PROGRESS = re.compile(rb"^\s*([\d,]+)\s+\d+%")
POLL = 0.1  # seconds between cancel checks / progress reports while rsync runs


class RsyncMethod(SshMethod):
    name = "rsync"
    shell_class = OpenSSHMaster

    def __init__(self, site, **kw):
        super().__init__(site, **kw)
        self.rsync = shutil.which(RSYNC) or RSYNC

    def _remote(self, path: str) -> str:
        host = self.site.hostname
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        return f"{username(self.site)}@{host}:{path}"

    def _prepare(self, remote: str) -> None:
        # No separate round trip: the remote rsync creates the parent (see _put), and _finish
        # refuses to rename over an existing path. Each remote shell start costs a round trip
        # plus the login shell's start-up, which matters for small runs.
        self._parent = posixpath.dirname(remote.rstrip("/")) or "/"

    def _put(self, local: str, partial: str) -> None:
        # "mkdir -p PARENT && rsync": the remote rsync is started by the remote shell, so the
        # parent is created in the same round trip; the path is quoted for that shell.
        rsync_path = f"mkdir -p -- {shlex.quote(self._parent)} && rsync"
        if os.path.isdir(local):
            src, dst = local.rstrip("/") + "/", self._remote(partial + "/")
        else:
            src, dst = local, self._remote(partial)
        self._run(self.command(src, dst, rsync_path), f"push {local}")

    def _get(self, remote: str, partial: str) -> None:
        # rsync HOST:remote into a private holder directory, so a file and a tree need no stat
        # round trip; the result is moved to ``partial`` (same directory, atomic)
        holder = partial + ".d"
        os.mkdir(holder, 0o700)
        try:
            self._run(self.command(self._remote(remote.rstrip("/") or "/"), holder + "/"),
                      f"pull {remote}")
            name = posixpath.basename(remote.rstrip("/"))
            os.rename(os.path.join(holder, name), partial)
        finally:
            shutil.rmtree(holder, ignore_errors=True)

    def command(self, src: str, dst: str, rsync_path: str = "") -> list:
        """The rsync argument vector (never run through a shell)."""
        # connected first: the control socket's path changes when a lost master is restarted
        self.shell.connect()
        cmd = [self.rsync, "-a", "--partial", "--protect-args", "--info=progress2", "--outbuf=N",
               "--no-inc-recursive", "-e", self.shell.rsh()]
        if rsync_path:
            cmd.append(f"--rsync-path={rsync_path}")
        return cmd + ["--", src, dst]

    def _run(self, cmd: list, what: str) -> None:
        self.shell.connect()
        self.check_cancel()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        state = {"bytes": 0, "err": b""}

        def read_stdout():
            buf = b""
            while True:
                chunk = proc.stdout.read1(65536)
                if not chunk:
                    break
                buf += chunk
                *lines, buf = re.split(rb"[\r\n]", buf)
                # a progress line is terminated only when the next one starts: read the
                # unterminated tail too (numbers only grow, so a partial line is harmless)
                for line in lines + [buf]:
                    m = _PROGRESS.match(line)
                    if m:
                        state["bytes"] = max(state["bytes"], int(m.group(1).replace(b",", b"")))

        def read_stderr():
            state["err"] = proc.stderr.read()

        readers = [threading.Thread(target=read_stdout, daemon=True),
                   threading.Thread(target=read_stderr, daemon=True)]
        for t in readers:
            t.start()
        reported = 0
        try:
            while True:
                try:
                    status = proc.wait(timeout=POLL)
                    break
                except subprocess.TimeoutExpired:
                    pass
                done = state["bytes"]
                if done > reported:
                    self.progress(done - reported)
                    reported = done
                self.check_cancel()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
        finally:
            for t in readers:
                t.join(timeout=10)
        if status == 0:
            if state["bytes"] > reported:
                self.progress(state["bytes"] - reported)
            return
        if self.cancel():
            raise Interrupted(f"{self.label}: {what} interrupted")
        raise self._error(status, state["err"], what)

    def _error(self, status: int, stderr: bytes, what: str):
        text = one_line(stderr)
        low = text.lower()
        if status in (255, 12, 10, 35, 30) or "connection unexpectedly closed" in low:
            err = classify_ssh_stderr(self.label, 255, stderr, what)
            if not isinstance(err, TransferFailed):
                return err
        if "host key verification failed" in low:
            return classify_ssh_stderr(self.label, 255, stderr, what)
        if status in (23, 24) and ("no such file" in low or "link_stat" in low):
            return SourceNotFound(f"{self.label}: {what}: {text}")
        if "permission denied" in low or "no space left" in low or "read-only" in low \
                or "quota" in low:
            return DestinationNotAccessible(f"{self.label}: {what}: {text}")
        if not self.shell.alive:
            return ServiceUnavailable(f"{self.label}: connection lost during {what}: {text}")
        return TransferFailed(f"{self.label}: {what}: rsync status {status}: {text}")
