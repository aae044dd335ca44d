"""The ``rsync`` method: OpenSSH ``rsync -a`` through one ControlMaster connection per
site per pass (socket in a private 0700 directory), argument lists only, ``--protect-args`` so no
remote shell ever word-splits or expands a path rsync sends.

Atomic placement: rsync writes into ``partial_path(final)`` (a hidden sibling); the remote shell
that starts the receiving rsync (``--rsync-path``, each path a separately quoted argument of
``sh -c``) first refuses an existing final path and creates the parent, and once rsync exited 0
and the remote helper found exactly the source's bytes and files in the partial copy, renames the
finished tree into place, all in the copy's one session (each session costs a remote
login shell's start-up, which dominates small copies).
``--delay-updates`` and ``--temp-dir`` were not used: they make each *file* appear atomically, but
the run directory itself exists under its final name from the first file on, so a half-copied run
could be taken for data.
"""
from __future__ import annotations

import os
import posixpath
import re
import shlex
import shutil
import subprocess
import threading
import time

from cax.transfer import policy, remote_hash
from cax.transfer.base import HOLDER_SUFFIX, Features, Interrupted, NoSpace, says_no_space
from cax.transfer.ssh import (
    SH_OPS,
    DestinationNotAccessible,
    OpenSSHMaster,
    ServiceUnavailable,
    SourceNotFound,
    SshMethod,
    TransferFailed,
    c_locale_env,
    check_path,
    classify_ssh_stderr,
    one_line,
    username,
)

RSYNC = "rsync"
_PROGRESS = re.compile(rb"^\s*([\d,]+)\s+\d+%")
_ALL_SENT = re.compile(rb"to-chk=0/")  # --no-inc-recursive: the last file is done
POLL = 0.1  # seconds between cancel checks / progress reports while rsync runs
FINISH_GRACE = 10.0  # seconds a stop request waits for an rsync whose every file is sent


class RsyncMethod(SshMethod):
    name = "rsync"
    features = Features(remote_checksum=True, places_final_name=True, shares_connection=True)
    shell_class = OpenSSHMaster

    def __init__(self, site, **kw):
        super().__init__(site, **kw)
        self.rsync = shutil.which(RSYNC) or RSYNC

    def _remote(self, path: str) -> str:
        host = self.site.hostname
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        return f"{username(self.site)}@{host}:{path}"

    def prepare(self, final: str) -> None:
        # no round trip: the remote shell that starts rsync does it (see SH_OPS["rsync-push"])
        check_path(final, self.label)

    def send(self, local: str, partial: str, final: str, expect: tuple) -> None:
        final = final.rstrip("/") or "/"
        nbytes, nfiles = expect
        rsync_path = shlex.join(["sh", "-c", SH_OPS["rsync-push"], "sh",
                                 posixpath.dirname(final) or "/", partial, final, str(nbytes),
                                 str(nfiles), remote_hash.boot()])
        if os.path.isdir(local):
            src, dst = local.rstrip("/") + "/", self._remote(partial + "/")
        else:
            src, dst = local, self._remote(partial)
        self._run(self.command(src, dst, rsync_path), f"push {local}")

    def _get(self, remote: str, partial: str) -> None:
        # rsync HOST:remote into a private holder directory, so a file and a tree need no stat
        # round trip; the result is moved to ``partial`` (same directory, atomic)
        holder = partial + HOLDER_SUFFIX  # a stale one was removed by the policy
        os.mkdir(holder, 0o700)
        try:
            self._run(self.command(self._remote(remote.rstrip("/") or "/"), holder + "/"),
                      f"pull {remote}")
            name = posixpath.basename(remote.rstrip("/"))
            os.rename(os.path.join(holder, name), partial)
        finally:
            policy.remove_local(holder, best_effort=True)

    def command(self, src: str, dst: str, rsync_path: str = "") -> list:
        """The rsync argument vector (never run through a shell)."""
        # connected first: the control socket's path changes when a lost master is restarted
        self.shell.connect()
        # no --partial: a failed copy's partial copy is always removed (nothing resumes), so
        # keeping rsync's partly sent file only delayed that removal
        cmd = [self.rsync, "-a", "--protect-args", "--info=progress2", "--outbuf=N",
               "--no-inc-recursive", "-e", self.shell.rsh()]
        if rsync_path:
            cmd.append(f"--rsync-path={rsync_path}")
        return cmd + ["--", src, dst]

    def _run(self, cmd: list, what: str) -> None:
        self.check_cancel()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=c_locale_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        state = {"bytes": 0, "err": b"", "sent": False}
        ended = threading.Event()  # rsync closed its stdout: it is exiting

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
                        if _ALL_SENT.search(line):
                            state["sent"] = True
            ended.set()

        def read_stderr():
            state["err"] = proc.stderr.read()

        readers = [threading.Thread(target=read_stdout, daemon=True),
                   threading.Thread(target=read_stderr, daemon=True)]
        for t in readers:
            t.start()
        reported = 0
        grace = None
        try:
            while True:
                # woken by the end of rsync's output, not by a polling delay: small copies are
                # a few hundred ms, and Popen.wait(timeout) sleeps up to 50 ms between checks
                if ended.wait(POLL):
                    try:
                        status = proc.wait(timeout=POLL)
                        break
                    except subprocess.TimeoutExpired:
                        pass
                else:
                    status = proc.poll()
                    if status is not None:
                        break
                done = state["bytes"]
                if done > reported:
                    self.progress(done - reported)
                    reported = done
                if state["sent"] and self.cancel():
                    # every file is sent: the copy may already be in place (a push renames in
                    # the remote session), so let it end rather than report a finished copy as
                    # interrupted; a hung link still ends after FINISH_GRACE
                    grace = grace or time.monotonic() + FINISH_GRACE
                    if time.monotonic() < grace:
                        continue
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
        if "incomplete copy" in low:  # from the helper's check in SH_OPS["rsync-push"]
            return TransferFailed(f"{self.label}: {what}: {text}")
        if says_no_space(low):
            return NoSpace(f"{self.label}: {what}: {text}")
        if "already exists" in low:  # from SH_OPS["rsync-push"], which starts no rsync then
            return DestinationNotAccessible(f"{self.label}: {what}: {text}; refusing to "
                                            f"overwrite")
        if status in (255, 12, 10, 35, 30) or "connection unexpectedly closed" in low:
            err = classify_ssh_stderr(self.label, 255, stderr, what)
            if not isinstance(err, TransferFailed):
                return err
        if "host key verification failed" in low:
            return classify_ssh_stderr(self.label, 255, stderr, what)
        if status in (23, 24) and ("no such file" in low or "link_stat" in low):
            return SourceNotFound(f"{self.label}: {what}: {text}")
        if "permission denied" in low or "read-only" in low:
            return DestinationNotAccessible(f"{self.label}: {what}: {text}")
        if not self.shell.alive:
            return ServiceUnavailable(f"{self.label}: connection lost during {what}: {text}")
        return TransferFailed(f"{self.label}: {what}: rsync status {status}: {text}")
