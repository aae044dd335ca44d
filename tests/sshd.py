"""A private OpenSSH sshd on 127.0.0.1 for tests and benchmarks (RECIPES.md "A private sshd").

Pytest plugin module: register it with ``pytest_plugins = ["tests.sshd"]`` in ``tests/conftest.py``.

Fixtures:
- ``sshd`` (session): a running :class:`SshServer` (own host key, client key, authorized_keys,
  known_hosts line for ``[127.0.0.1]:PORT``); a test may ``kill()`` it and ``start()`` it again.
- ``live_sshd`` (function): the same server, restarted first if an earlier test killed it.
- ``ssh_site`` (function): a :class:`cax.config.Site` reaching ``live_sshd`` with fresh ``raw`` and
  ``processed`` directories; use ``dataclasses.replace(ssh_site, method=...)`` for another method.

:class:`SshServer` works without pytest too (``benchmarks/transfer.py`` uses it).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from typing import Optional

from tests.waiting import WaitTimeout, free_port, wait_for

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"


class SshdError(RuntimeError):
    """sshd could not be set up or started; the message ends with the tail of its log."""


def _children(pid: int) -> list:
    """All descendants of ``pid`` (read from /proc), deepest last."""
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cmdline(pid: int) -> list:
    """The argument vector of process ``pid`` ([] once it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def masters(pid: int) -> list:
    """``[(pid, ControlPath)]`` of the OpenSSH ControlMasters below process ``pid`` (at any depth:
    cax starts each master under a keeper process)."""
    out = []
    for child in _children(pid):
        argv = cmdline(child)
        if argv and os.path.basename(argv[0]) == "ssh" and "ControlMaster=yes" in argv:
            path = next(a.split("=", 1)[1] for a in argv if a.startswith("ControlPath="))
            out.append((child, path))
    return out


class SshServer:
    """One private sshd. ``user`` is the current user, who logs in with ``key_file``."""

    def __init__(self, tmpdir: Optional[str] = None, port: Optional[int] = None):
        if not os.path.exists(SSHD):
            raise SshdError(f"{SSHD} not found (install Debian package openssh-server)")
        self.tmpdir = tmpdir or tempfile.mkdtemp(prefix="cax-sshd-")
        os.makedirs(self.tmpdir, mode=0o700, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        import getpass
        self.user = getpass.getuser()
        self.host_key = os.path.join(self.tmpdir, "host_key")
        self.key_file = os.path.join(self.tmpdir, "client_key")
        self.known_hosts = os.path.join(self.tmpdir, "known_hosts")
        self.authorized_keys = os.path.join(self.tmpdir, "authorized_keys")
        self.config = os.path.join(self.tmpdir, "sshd_config")
        self.pidfile = os.path.join(self.tmpdir, "sshd.pid")
        self.log = os.path.join(self.tmpdir, "sshd.log")
        self.proc: Optional[subprocess.Popen] = None
        for key in (self.host_key, self.key_file):
            if not os.path.exists(key):
                subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "cax-test",
                                "-f", key], check=True, stdin=subprocess.DEVNULL)
        shutil.copyfile(self.key_file + ".pub", self.authorized_keys)
        self._write_config()

    def _write_config(self):
        with open(self.config, "w") as f:
            f.write("\n".join([
                f"Port {self.port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {self.host_key}",
                f"PidFile {self.pidfile}",
                f"AuthorizedKeysFile {self.authorized_keys}",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PubkeyAuthentication yes",
                "PermitRootLogin yes",
                "UsePAM no",
                "StrictModes no",
                "LogLevel VERBOSE",  # "Starting session" lines: tests count them
                "MaxStartups 100:30:200",
                "MaxSessions 100",
                "Subsystem sftp internal-sftp",
                "",
            ]))
        with open(self.host_key + ".pub") as f:
            keytype, b64 = f.read().split()[:2]
        with open(self.known_hosts, "w") as f:
            f.write(f"[{self.host}]:{self.port} {keytype} {b64}\n")

    # ------------------------------------------------------------------ life cycle
    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 15) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return " | ".join(line.rstrip() for line in f.readlines()[-n:])
        except OSError:
            return "(no sshd log)"

    def start(self, timeout: float = 15.0) -> "SshServer":
        if self.running:
            return self
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        check = subprocess.run([SSHD, "-t", "-f", self.config], capture_output=True, text=True)
        if check.returncode != 0:
            raise SshdError(f"sshd -t rejected {self.config}: {check.stderr.strip()}")
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", self.config], stdin=subprocess.DEVNULL,
                                     stdout=logf, stderr=logf, start_new_session=True)
        logf.close()

        def up():
            if self.proc.poll() is not None:
                raise SshdError(f"sshd exited with status {self.proc.returncode} on port "
                                f"{self.port}: {self.log_tail()}")
            return self._banner_ok()
        try:
            wait_for(up, timeout, f"sshd on port {self.port}")
        except WaitTimeout:
            self.kill()
            raise SshdError(f"sshd did not accept connections on port {self.port} within "
                            f"{timeout:.0f} s: {self.log_tail()}") from None
        return self

    def _banner_ok(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as s:
                return s.recv(8).startswith(b"SSH-")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL the listener and every session process it forked: all connections drop."""
        if self.proc is None:
            return
        victims = [self.proc.pid] + _children(self.proc.pid)
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        self.kill()

    # ------------------------------------------------------------------ helpers
    def accepted_logins(self) -> int:
        """How many logins sshd has accepted so far (from its log)."""
        try:
            with open(self.log, errors="replace") as f:
                return sum("Accepted publickey" in line for line in f)
        except OSError:
            return 0

    def wait_logins(self, n: int, timeout: float = 5.0) -> int:
        """Wait until the log shows at least ``n`` accepted logins; return the count seen."""
        seen = [0]

        def enough():
            seen[0] = self.accepted_logins()
            return seen[0] >= n
        try:
            wait_for(enough, timeout, f"{n} logins")
        except WaitTimeout:
            pass  # the caller asserts on the count
        return seen[0]

    def log_mark(self) -> int:
        """A position in sshd's log; :meth:`logins_since` counts the logins logged after it."""
        try:
            return os.path.getsize(self.log)
        except OSError:
            return 0

    def logins_since(self, mark: int, timeout: float = 10.0) -> int:
        """Logins accepted since ``mark`` (see :meth:`count_since`)."""
        return self.count_since(mark, "Accepted publickey", timeout)

    def sessions_since(self, mark: int, timeout: float = 10.0) -> int:
        """Remote commands and subsystems (sftp) started since ``mark``: each costs a login
        shell's start-up on a real site (see :meth:`count_since`)."""
        return self.count_since(mark, "Starting session:", timeout)

    def count_since(self, mark: int, needle: str, timeout: float = 10.0) -> int:
        """Log lines with ``needle`` since ``mark``, counted only once sshd has logged a login of
        our own made afterwards: sshd's monitor writes a line after the client already goes on,
        so a plain count right after a pass could miss a late line and pass a test that should
        fail. The sentinel's own lines are not counted.
        """
        port = self._sentinel_login()
        tag = f" port {port}"

        def logged():
            with open(self.log, errors="replace") as f:
                f.seek(mark)
                lines = f.readlines()
            return lines if any("Accepted publickey" in line and tag + " " in line
                                for line in lines) else None
        try:
            lines = wait_for(logged, timeout, f"the sentinel login from port {port}")
        except WaitTimeout:
            raise SshdError(f"sshd never logged the sentinel login from port {port}: "
                            f"{self.log_tail()}") from None
        return sum(needle in line and not line.rstrip().endswith(tag)
                   and tag + " " not in line for line in lines)

    def _sentinel_login(self) -> int:
        import paramiko
        sock = socket.create_connection((self.host, self.port), timeout=10)
        port = sock.getsockname()[1]
        client = paramiko.SSHClient()
        client.load_host_keys(self.known_hosts)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            client.connect(self.host, self.port, username=self.user, key_filename=self.key_file,
                           sock=sock, look_for_keys=False, allow_agent=False, timeout=10)
        finally:
            client.close()
            sock.close()
        return port

    def site(self, method: str = "rsync", root: Optional[str] = None, **kw):
        """A :class:`cax.config.Site` reaching this sshd, data dirs under ``root``."""
        from cax.config import Site
        root = root or tempfile.mkdtemp(prefix="remote-", dir=self.tmpdir)
        dirs = {"raw": os.path.join(root, "raw"), "processed": os.path.join(root, "processed")}
        for d in dirs.values():
            os.makedirs(d, exist_ok=True)
        return Site(name=kw.pop("name", "remote"), hostname=self.host, port=self.port,
                    username=self.user, method=method, key_file=self.key_file,
                    known_hosts=self.known_hosts, dirs=dirs, **kw)


# ---------------------------------------------------------------------- pytest fixtures
try:
    import pytest
except ImportError:  # used from benchmarks without pytest
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="session")
    def sshd(tmp_path_factory):
        from tests.conftest import missing_component
        server = None
        try:
            server = SshServer(str(tmp_path_factory.mktemp("sshd")))
            server.start()
        except (SshdError, OSError, subprocess.CalledProcessError) as e:
            if server is not None:
                server.kill()
            missing_component(f"private sshd: {e}")
        yield server
        server.stop()

    @pytest.fixture
    def live_sshd(sshd):
        from tests.conftest import missing_component
        if not sshd.running:
            try:
                sshd.start()
            except SshdError as e:
                missing_component(f"private sshd restart: {e}")
        return sshd

    @pytest.fixture
    def ssh_site(live_sshd, tmp_path):
        return live_sshd.site(root=str(tmp_path / "remote"))
