"""The keeper of an OpenSSH ControlMaster: it ends the master when cax ends, however cax ends.

Run as a script (``python -I -S master_watch.py CONTROL_DIR ERRLOG SSH_ARGV...``; standard library
only, nothing of cax imported), by :class:`cax.transfer.ssh.OpenSSHMaster`, with its stdin the read
end of a pipe whose write end only cax holds. The kernel closes that end when cax exits for any
reason, SIGKILL included, so end of file on stdin means "cax is gone or done with the master".

Why not the master alone: ``ssh -N`` never reads its stdin, and the parent-death signal
(``PR_SET_PDEATHSIG``) fires when the *thread* that started the child ends, not the process, while
cax starts masters from copy worker threads. ``ControlPersist`` would keep an idle master for its
timeout and detach it from anyone who could stop it.

It starts the master with stdin and stdout on /dev/null and stderr to ERRLOG (cax reads why a
connection failed there), then waits for either:

- end of file on stdin: it stops the master (SIGTERM, SIGKILL after a grace), removes CONTROL_DIR
  and exits 0;
- the master's exit (connection lost, refused): it exits with the master's status and leaves
  CONTROL_DIR to cax, which still reads ERRLOG from it.
"""
import os
import select
import shutil
import signal
import sys
import time

GRACE = 5.0


def _reap(pid):
    """The master's exit status once it has ended, else None."""
    done, status = os.waitpid(pid, os.WNOHANG)
    if not done:
        return None
    return os.waitstatus_to_exitcode(status)


def _drain(fd):
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def main(argv):
    control_dir, errlog, command = argv[0], argv[1], argv[2:]
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)  # only cax (its pipe) or SIGTERM/SIGKILL end us
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    err = os.open(errlog, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    pid = os.fork()
    if pid == 0:
        try:
            for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE, signal.SIGCHLD,
                        signal.SIGTERM):
                signal.signal(sig, signal.SIG_DFL)
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 0)
            os.dup2(null, 1)
            os.dup2(err, 2)
            os.execv(command[0], command)
        finally:
            os._exit(127)
    os.close(err)
    while not stopping:
        code = _reap(pid)
        if code is not None:
            return code if code >= 0 else 128 - code
        try:
            ready, _, _ = select.select([0, wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in ready:
            _drain(wake_r)
        if 0 in ready and not os.read(0, 4096):
            break  # cax closed the pipe or died
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + GRACE
    while _reap(pid) is None:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            break
        select.select([wake_r], [], [], 0.1)  # woken by SIGCHLD; the timeout bounds the grace
        _drain(wake_r)
    shutil.rmtree(control_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
