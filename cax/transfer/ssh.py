"""What the SSH-based methods (``scp``, ``sftp``, ``rsync``) share.

- :class:`ParamikoShell`: one paramiko connection per site per pass (host key verified against the
  site's ``known_hosts``, never auto-added), with large windows and an AES-GCM-first cipher order.
- :class:`OpenSSHMaster`: one OpenSSH ControlMaster connection per site per pass, its socket in a
  private (0700) temporary directory, for ``rsync`` and remote commands. The master ends when cax
  ends, however it ends (its keeper, :mod:`cax.transfer.master_watch`, holds a pipe from cax), and
  :func:`clean_leftovers` removes the directories of cax processes that were killed with it.
- :class:`SshMethod`: the :class:`~cax.transfer.base.TransferMethod` operations done with the small
  remote helper (:mod:`cax.transfer.remote_hash`), and the atomic put/get skeleton: copy into
  ``partial_path(final)``, rename into place only if it holds exactly the expected bytes and
  files (checked in the session that renames), remove the partial copy on any failure, and call
  a failure :class:`~cax.transfer.base.NoSpace` when the destination lacks room for the copy.

Remote paths come from the Runs DB and may be hostile: names with NUL or newline are refused
(:class:`BadPath`), every remote command word is quoted with :func:`shlex.quote`, and no local
command is ever run through a shell.
"""
from __future__ import annotations

import errno
import getpass
import logging
import os
import posixpath
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional

from cax import children
from cax.transfer import remote_hash
from cax.transfer.base import (
    NO_SPACE_ERRNOS,
    DestinationNotAccessible,
    NoSpace,
    ServiceUnavailable,
    SourceNotFound,
    TransferError,
    TransferFailed,
    Features,
    TransferMethod,
    partial_path,
    says_no_space,
)

log = logging.getLogger("cax.transfer.ssh")

CONNECT_TIMEOUT = 20.0
COMMAND_TIMEOUT = 3600.0  # a remote checksum of a large run may take minutes
# Channel window: 16 MiB keeps a 1 Gb/s link busy up to ~100 ms RTT. Larger is slower here:
# paramiko buffers unread channel data in one array and memmoves it on every read.
WINDOW = 1 << 24
PACKET = 1 << 18  # largest SSH packet we accept: big packets halve the per-packet Python cost of pulls
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr",
                     "aes256-ctr", "aes192-ctr")
ACCESS_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


class HostKeyError(DestinationNotAccessible):
    """The remote host key is unknown or does not match known_hosts: possibly not the host we mean."""


class HostKeyUnknown(HostKeyError):
    pass


class HostKeyChanged(HostKeyError):
    pass


class BadPath(TransferFailed):
    """A path cax refuses to hand to a remote host (NUL or newline in it)."""


# --------------------------------------------------------------------------- small helpers
def site_label(site) -> str:
    host = site.hostname if site.port == 22 else f"{site.hostname}:{site.port}"
    return f"{site.name} ({host})" if site.name and site.name != site.hostname else host


def check_path(path: str, where: str) -> str:
    if not isinstance(path, str) or not path:
        raise BadPath(f"{where}: empty or non-string path {path!r}")
    if "\0" in path or "\n" in path or "\r" in path:
        raise BadPath(f"{where}: refusing path with NUL/newline characters: {path!r}")
    return path


def username(site) -> str:
    return site.username or getpass.getuser()


def known_hosts_files(site) -> list:
    """The site's own known_hosts, or the user's and the system's."""
    if site.known_hosts:
        return [os.path.expanduser(site.known_hosts)]
    return [os.path.expanduser("~/.ssh/known_hosts"), "/etc/ssh/ssh_known_hosts"]


def one_line(text, limit: int = 300) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


#: POSIX sh one-liners for the frequent operations (no Python start-up on the remote side).
#: Exit 3: not found, 4: exists. Run as ``sh -c SCRIPT sh ARG...``: arguments are never parsed.
_EXISTS = '[ -e "$1" ] || [ -L "$1" ]'
SH_OPS = {
    "exists": f'{_EXISTS} || exit 3',
    "prepare": f'if {_EXISTS}; then echo "$1 already exists" >&2; exit 4; fi; mkdir -p -- "$2"'
               ' && rm -rf -- "$3"',
    "remove": 'rm -rf -- "$1"',
    "makedirs": 'mkdir -p -- "$1"',
    # rsync's remote side for a push (``--rsync-path``): PARENT PARTIAL FINAL BYTES FILES
    # HELPER, then rsync's own server arguments; the rename needs no session of its own and
    # happens only if the receiving rsync exited 0 (it exits non-zero when the sender reported an
    # I/O error or went away) and the partial copy holds BYTES in FILES regular files (the remote
    # helper's ``expect``, program text HELPER); messages in the C locale, as they are classified
    "rsync-push": ('LC_ALL=C; export LC_ALL; '
                   'if [ -e "$3" ] || [ -L "$3" ]; then echo "$3 already exists" >&2; exit 4; fi; '
                   'mkdir -p -- "$1" || exit; p=$2 f=$3 n=$4 c=$5 h=$6; shift 6; rsync "$@" || exit; '
                   f'{remote_hash.REMOTE_PYTHON} -c "$h" expect "$n" "$c" "$p" || exit; '
                   'if [ -e "$f" ] || [ -L "$f" ]; then echo "$f already exists" >&2; exit 4; fi; '
                   'mv -- "$p" "$f"'),
}


def sh_command(op: str, *args: str) -> str:
    """A remote command line running ``SH_OPS[op]`` with ``args`` as positional parameters, its
    messages in the C locale (they are classified by their text)."""
    return shlex.join(["env", "LC_ALL=C", "sh", "-c", SH_OPS[op], "sh", *args])


# --------------------------------------------------------------------------- paramiko
class _Reject:
    """Missing-host-key policy: never accept a key that is not in known_hosts."""

    def __init__(self, label, files):
        self.label, self.files = label, files

    def missing_host_key(self, client, hostname, key):
        raise HostKeyUnknown(
            f"{self.label}: host key ({key.get_name()}) for {hostname} is not in "
            f"{' or '.join(self.files)}; refusing to connect (add it after checking it)")


class ParamikoShell:
    """One paramiko SSH connection to a site; reconnects when it was lost."""

    def __init__(self, site):
        self.site = site
        self.label = site_label(site)
        self.client = None
        self.connections = 0  # SSH connections opened so far (tests check reuse with it)
        self._lock = threading.Lock()

    @property
    def transport(self):
        return self.client.get_transport() if self.client is not None else None

    @property
    def alive(self) -> bool:
        t = self.transport
        return t is not None and t.is_active()

    def connect(self):
        with self._lock:  # worker threads share the connection: one (re)connects, all use it
            if not self.alive:
                self._connect()
        return self

    def _connect(self):
        self.close()
        import paramiko

        site = self.site
        files = known_hosts_files(site)
        client = paramiko.SSHClient()
        for f in files:
            if os.path.exists(f):
                try:
                    client.load_host_keys(f)
                except (OSError, paramiko.SSHException) as e:
                    raise HostKeyError(f"{self.label}: cannot read known_hosts {f}: {one_line(e)}")
        client.set_missing_host_key_policy(_Reject(self.label, files))

        def transport_factory(sock, **kw):
            t = paramiko.Transport(sock, default_window_size=WINDOW,
                                   default_max_packet_size=PACKET, **kw)
            opts = t.get_security_options()
            have = list(opts.ciphers)
            opts.ciphers = [c for c in PREFERRED_CIPHERS if c in have] + \
                           [c for c in have if c not in PREFERRED_CIPHERS]
            return t

        try:
            # our own socket, for TCP_NODELAY: without it Nagle and delayed ACKs add ~40 ms to
            # every small request/acknowledge exchange (scp's per-file handshake)
            sock = socket.create_connection((site.hostname, site.port), timeout=CONNECT_TIMEOUT)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as e:
            raise ServiceUnavailable(f"{self.label}: cannot connect: {one_line(e)}")
        kwargs = dict(hostname=site.hostname, port=site.port, username=username(site), sock=sock,
                      timeout=CONNECT_TIMEOUT, banner_timeout=CONNECT_TIMEOUT,
                      auth_timeout=CONNECT_TIMEOUT, transport_factory=transport_factory)
        if site.key_file:
            kwargs.update(key_filename=os.path.expanduser(site.key_file), look_for_keys=False,
                          allow_agent=False)
        try:
            client.connect(**kwargs)
        except HostKeyError:
            client.close()
            raise
        except paramiko.BadHostKeyException as e:
            client.close()
            raise HostKeyChanged(
                f"{self.label}: HOST KEY CHANGED for {e.hostname} ({e.key.get_name()} "
                f"{e.key.get_fingerprint().hex()} not the one in {' or '.join(files)}); "
                f"refusing to connect")
        except paramiko.AuthenticationException as e:
            client.close()
            raise DestinationNotAccessible(f"{self.label}: authentication as {username(site)} "
                                           f"failed: {one_line(e)}")
        except (OSError, EOFError, paramiko.SSHException) as e:
            client.close()
            sock.close()
            raise ServiceUnavailable(f"{self.label}: cannot connect: {one_line(e)}")
        client.get_transport().set_keepalive(30)
        self.client = client
        self.connections += 1

    def close(self):
        if self.client is not None:
            try:
                self.client.close()
            except Exception:  # noqa: BLE001 - closing a dead connection
                pass
            self.client = None

    def run(self, command: str, timeout: float = COMMAND_TIMEOUT):
        """Run a (fully quoted) remote command line; return (status, stdout, stderr) bytes."""
        self.connect()
        try:
            chan = self.transport.open_session(timeout=CONNECT_TIMEOUT)
            chan.settimeout(timeout)
            chan.exec_command(command)
            chan.shutdown_write()
            out = chan.makefile("rb").read()  # stderr is buffered meanwhile: no deadlock
            err = chan.makefile_stderr("rb").read()
            if not chan.status_event.wait(timeout):
                raise socket.timeout(f"remote command took over {timeout:.0f} s")
            status = chan.recv_exit_status()
            chan.close()
            if status == -1:
                raise EOFError("connection closed before the command finished")
            return status, out, err
        except TransferError:
            raise
        except Exception as e:  # noqa: BLE001 - any transport failure
            raise ServiceUnavailable(f"{self.label}: connection lost: {one_line(e) or type(e).__name__}")


# --------------------------------------------------------------------------- OpenSSH
def c_locale_env() -> dict:
    """The environment of OpenSSH and rsync children: their messages in the C locale, as
    :func:`classify_ssh_stderr` and the rsync method read them (a refused login, a full disk,
    a lost link must be told apart by their text)."""
    return children.environment({"LC_ALL": "C"})


def classify_ssh_stderr(label: str, status: int, stderr, what: str) -> TransferError:
    """Map an OpenSSH client's failure to a typed error."""
    text = one_line(stderr)
    low = text.lower()
    if "host key verification failed" in low or "remote host identification has changed" in low:
        cls = HostKeyChanged if "changed" in low else HostKeyUnknown
        return cls(f"{label}: host key not known or changed; refusing to connect ({text})")
    if "permission denied" in low and ("publickey" in low or "password" in low):
        return DestinationNotAccessible(f"{label}: authentication failed ({text})")
    for marker in ("connection refused", "timed out", "connection closed", "connection reset",
                   "broken pipe", "lost connection", "no route to host", "could not resolve",
                   "network is unreachable", "connection unexpectedly closed",
                   "kex_exchange_identification", "control socket", "mux_client"):
        if marker in low:
            return ServiceUnavailable(f"{label}: {what}: {text}")
    if status == 255:
        return ServiceUnavailable(f"{label}: {what}: ssh failed: {text or 'status 255'}")
    return TransferFailed(f"{label}: {what} failed (status {status}): {text}")


CONTROL_DIR_PREFIX = "cax-ssh-"
MASTER_WATCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "master_watch.py")
_CONTROL_DIR = re.compile(rf"^{CONTROL_DIR_PREFIX}(\d+)-(\d+)-[A-Za-z0-9_]+$")


def _exit_master(ssh: str, control_path: str, destination: str) -> None:
    """Ask the master listening on ``control_path`` to exit (it closes its connection)."""
    try:
        subprocess.run([ssh, "-o", f"ControlPath={control_path}", "-O", "exit", "--", destination],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=10,
                       env=c_locale_env())
    except (OSError, subprocess.TimeoutExpired):
        pass


def clean_leftovers(tmpdir: Optional[str] = None) -> list:
    """Remove the control directories of cax processes that died without removing theirs (killed
    together with the master's keeper), ending a master still listening in one; returns them.

    Other cax processes (other sites' daemons, massive-cax jobs) keep live directories in the
    same place: a directory is touched only when it is this user's and the process named in it
    (pid *and* start time) no longer runs. Directories of older cax versions carry no owner and
    are left alone.
    """
    tmp = tmpdir or tempfile.gettempdir()
    try:
        names = os.listdir(tmp)
    except OSError:
        return []
    removed = []
    for name in names:
        m = _CONTROL_DIR.match(name)
        if not m or children.alive((int(m.group(1)), m.group(2))):
            continue
        path = os.path.join(tmp, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            continue
        control = os.path.join(path, "ctl")
        if os.path.exists(control):
            _exit_master(shutil.which("ssh") or "ssh", control, "cax-leftover")
        shutil.rmtree(path, ignore_errors=True)
        log.info("site=- removed the ssh control directory %s of cax pid %s, which is gone",
                 path, m.group(1))
        removed.append(path)
    return removed


class OpenSSHMaster:
    """An OpenSSH ControlMaster connection; every ``ssh``/``rsync`` of the pass multiplexes on it."""

    def __init__(self, site, ssh: str = "ssh"):
        self.site = site
        self.label = site_label(site)
        self.ssh = shutil.which(ssh) or ssh
        self.tmpdir: Optional[str] = None
        self.proc: Optional[subprocess.Popen] = None
        self.connections = 0
        self._lock = threading.Lock()

    @property
    def control_path(self) -> str:
        return os.path.join(self.tmpdir, "ctl")

    @property
    def destination(self) -> str:
        return f"{username(self.site)}@{self.site.hostname}"

    def options(self) -> list:
        """ssh options (argument list) for clients that multiplex on the master."""
        site = self.site
        opts = ["-p", str(site.port), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", f"ConnectTimeout={int(CONNECT_TIMEOUT)}",
                "-o", "ServerAliveInterval=30", "-o", "ServerAliveCountMax=4",
                "-o", f"ControlPath={self.control_path}", "-o", "ControlMaster=no",
                "-o", "Ciphers=aes128-gcm@openssh.com,aes256-gcm@openssh.com,"
                      "chacha20-poly1305@openssh.com,aes128-ctr,aes256-ctr"]
        files = known_hosts_files(site)
        opts += ["-o", "UserKnownHostsFile=" + " ".join(f'"{f}"' for f in files)]
        if site.known_hosts:
            opts += ["-o", "GlobalKnownHostsFile=/dev/null"]
        if site.key_file:
            opts += ["-i", os.path.expanduser(site.key_file), "-o", "IdentitiesOnly=yes"]
        return opts

    def rsh(self) -> str:
        """The ``rsync -e`` value: rsync splits it on spaces honouring quotes, so quote each word."""
        return shlex.join([self.ssh] + self.options())

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and \
            os.path.exists(self.control_path)

    def connect(self):
        with self._lock:  # worker threads share the master: one (re)starts it, all use it
            if not self.alive:
                self._connect()
        return self

    def _connect(self):
        self.close()
        # named after its owner (pid and start time): a later cax removes it only once that
        # owner is provably dead (clean_leftovers); mkdtemp makes it 0700
        me = children.ident()  # None without /proc: an unnamed directory, never cleaned
        owner = f"{me[0]}-{me[1]}-" if me else ""
        self.tmpdir = tempfile.mkdtemp(prefix=CONTROL_DIR_PREFIX + owner)
        os.chmod(self.tmpdir, 0o700)
        errlog = os.path.join(self.tmpdir, "master.err")
        opts = [o if o != "ControlMaster=no" else "ControlMaster=yes" for o in self.options()]
        argv = [self.ssh, "-N", *opts, "-o", "ControlPersist=no", "--", self.destination]
        # the master runs under its keeper (master_watch), whose stdin is a pipe only this
        # process holds: when cax ends, however it ends, the keeper ends the master
        with open(errlog, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", MASTER_WATCH, self.tmpdir, errlog, *argv],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err,
                env=c_locale_env(), start_new_session=True)
        deadline = time.monotonic() + CONNECT_TIMEOUT + 5
        while not os.path.exists(self.control_path):
            if self.proc.poll() is not None:
                with open(errlog, "rb") as f:
                    text = f.read()
                status = self.proc.returncode
                self.close()
                raise classify_ssh_stderr(self.label, status, text, "cannot connect")
            if time.monotonic() > deadline:
                self.close()
                raise ServiceUnavailable(f"{self.label}: ssh master did not connect within "
                                         f"{CONNECT_TIMEOUT + 5:.0f} s")
            time.sleep(0.01)  # condition wait (socket appears) with a deadline
        self.connections += 1

    def close(self):
        if self.proc is not None:
            if self.proc.poll() is None and self.tmpdir and os.path.exists(self.control_path):
                _exit_master(self.ssh, self.control_path, self.destination)
            try:
                self.proc.stdin.close()  # the keeper stops the master and removes the directory
            except OSError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None

    def run(self, command: str, timeout: float = COMMAND_TIMEOUT):
        self.connect()
        try:
            r = subprocess.run([self.ssh, *self.options(), "--", self.destination, command],
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
                               env=c_locale_env())
        except subprocess.TimeoutExpired:
            raise ServiceUnavailable(f"{self.label}: remote command took over {timeout:.0f} s")
        if r.returncode == 255:
            raise classify_ssh_stderr(self.label, 255, r.stderr, "remote command")
        return r.returncode, r.stdout, r.stderr


# --------------------------------------------------------------------------- the method base
class SshMethod(TransferMethod):
    """Base of scp/sftp/rsync: remote operations through the helper, atomic put/get."""

    features = Features(remote_checksum=True, shares_connection=True)
    shell_class = ParamikoShell

    def __init__(self, site, *, shell=None, **kw):
        super().__init__(site, **kw)
        self.label = site_label(site)
        self.owns_connection = shell is None
        self.shell = self.shell_class(site) if shell is None else shell

    # life cycle --------------------------------------------------------------
    @property
    def connections(self) -> int:
        """SSH connections this object has opened (one per pass unless the link was lost)."""
        return self.shell.connections

    def connect(self) -> None:
        self.shell.connect()

    def share(self) -> dict:
        return {"shell": self.shell}

    def close(self) -> None:
        if self.owns_connection:
            self.shell.close()

    # remote operations -------------------------------------------------------
    def _shell_op(self, op: str, *paths: str) -> str:
        """A POSIX ``sh`` one-liner on the remote side; paths are separate, quoted arguments."""
        for p in paths:
            check_path(p, self.label)
        status, out, err = self.shell.run(sh_command(op, *paths))
        return self._check(status, out, err, op, paths)

    def _helper(self, op: str, *paths: str, extra=()):
        """The Python helper (checksum, size): needs ``python3`` on the remote host."""
        for p in paths:
            check_path(p, self.label)
        status, out, err = self.shell.run(remote_hash.command(op, *extra, *paths))
        if status == 127:
            raise TransferFailed(f"{self.label}: {remote_hash.REMOTE_PYTHON} not found on the "
                                 f"remote host (needed for {op})")
        return self._check(status, out, err, op, paths)

    def _check(self, status, out, err, op, paths) -> str:
        if status == remote_hash.EXIT_OK:
            return out.decode("utf-8", "replace").strip()
        text = one_line(err) or f"status {status}"
        msg = f"{self.label}: {op} {' '.join(paths)}: {text}"
        low = text.lower()
        if status == remote_hash.EXIT_NOT_FOUND:
            raise SourceNotFound(msg)
        if status == remote_hash.EXIT_NO_SPACE or says_no_space(low):
            raise NoSpace(msg)
        if status in (remote_hash.EXIT_EXISTS, remote_hash.EXIT_ACCESS) or \
                "permission denied" in low or "read-only" in low or "no space" in low:
            raise DestinationNotAccessible(msg)
        raise TransferFailed(msg)

    def exists(self, path: str) -> bool:
        try:
            self._shell_op("exists", path)
            return True
        except SourceNotFound:
            return False

    def size(self, path: str) -> int:
        return int(self._helper("size", path))

    def tree(self, path: str) -> tuple:
        total, files = self._helper("tree", path).split()
        return int(total), int(files)

    def free_bytes(self, path: str) -> int:
        return int(self._helper("free", path))

    def remove(self, path: str) -> None:
        self._shell_op("remove", path)

    def makedirs(self, path: str) -> None:
        self._shell_op("makedirs", path)

    def checksum(self, path: str, algorithm: str = "sha512") -> Optional[str]:
        from cax.checksum import ALGORITHMS
        if algorithm not in ALGORITHMS:
            return None
        return self._helper("checksum", path, extra=(algorithm,))

    # the steps of a copy (cax.transfer.policy) -------------------------------
    def prepare(self, final: str) -> None:
        """Refuse an existing ``final``; create its parent; clear a stale partial copy (one
        remote command)."""
        check_path(final, self.label)
        try:
            self._shell_op("prepare", final, posixpath.dirname(final.rstrip("/")) or "/",
                           partial_path(final))
        except DestinationNotAccessible as e:
            raise DestinationNotAccessible(f"{e}; refusing to overwrite") from None

    def place(self, partial: str, final: str, expect: tuple) -> None:
        """Rename the copy into place only if it is complete, never over an existing path: the
        helper's ``place``, in one session."""
        nbytes, nfiles = expect
        self._helper("place", partial, final, extra=(str(nbytes), str(nfiles)))

    def receive(self, remote: str, partial: str) -> None:
        check_path(remote, self.label)
        self._get(remote, partial)

    def remove_partial(self, partial: str) -> None:
        if not self.shell.alive:
            log.warning("%s: connection lost; partial copy %s left behind", self.label, partial)
            return
        try:
            self._helper("remove", partial)
        except TransferError as e:
            log.warning("%s: could not remove partial copy %s: %s", self.label, partial, e)

    def classify(self, e: BaseException, what: str, local_dest: bool = False) -> BaseException:
        """Any failure of a copy as a typed TransferError (others pass unchanged)."""
        if isinstance(e, TransferError) or not isinstance(e, Exception):
            return e
        if isinstance(e, OSError) and e.errno is not None and not isinstance(e, socket.timeout):
            if e.errno in NO_SPACE_ERRNOS:
                return NoSpace(f"{self.label}: {what}: {e.strerror or e}")
            if e.errno in ACCESS_ERRNOS:
                return DestinationNotAccessible(f"{self.label}: {what}: {e.strerror or e}")
            if e.errno == errno.ENOENT and not local_dest:
                return SourceNotFound(f"{self.label}: {what}: {e.strerror or e}")
        text = one_line(e) or type(e).__name__
        if not self.shell.alive or self._is_link_failure(e):
            return ServiceUnavailable(f"{self.label}: connection lost during {what}: {text}")
        low = text.lower()
        if says_no_space(low):
            return NoSpace(f"{self.label}: {what}: {text}")
        if "permission denied" in low or "read-only" in low:
            return DestinationNotAccessible(f"{self.label}: {what}: {text}")
        return TransferFailed(f"{self.label}: {what} failed: {text}")

    @staticmethod
    def _is_link_failure(e: BaseException) -> bool:
        """An error that means the SSH link or the remote server process went away (the transport
        may not have noticed yet)."""
        if isinstance(e, (EOFError, ConnectionError, socket.timeout)):
            return True
        if isinstance(e, OSError) and e.errno is None and "closed" in str(e).lower():
            return True  # paramiko's "Socket is closed"
        try:
            import paramiko
        except ImportError:
            return False
        if isinstance(e, paramiko.SSHException):
            low = str(e).lower()
            return any(w in low for w in ("closed", "dropped", "eof", "reset", "timeout"))
        return "no response from server" in str(e).lower() or "channel was closed" in str(e)

    # subclasses implement ``send`` (``partial`` never exists beforehand and its parent does)
    # and this
    def _get(self, remote: str, partial: str) -> None:
        raise NotImplementedError
