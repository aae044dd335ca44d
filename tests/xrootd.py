"""Private XRootD servers on 127.0.0.1 for tests and benchmarks (shared RECIPES.md, "Two private
XRootD servers on loopback"), with adler32 checksums and third-party copies.

Pytest plugin module (``tests/conftest.py`` registers it). Fixtures:
- ``xrootd_pair`` (session): two running :class:`XrootdServer` (A and B), both able to take
  third-party copies (``ofs.tpc pgm xrdcp --server``); a test may ``kill()`` one and
  ``start()`` it again.
- ``xrootd`` (function): server A, restarted first if an earlier test killed it.
- ``xrootd_site`` (function): a :class:`cax.config.Site` with method ``gfal`` on server A, with
  fresh ``raw`` and ``processed`` directories.

``xrootd`` refuses to run as root: it runs as the ``xrootd`` user (``-R xrootd``, the Debian
package creates it) and its data directory carries a default ACL for that user, so trees the
tests (root) make there are the server's to rename and remove, as on a real storage element.
The storage namespace is this filesystem's paths (``all.export`` of the data directory, no
``oss.localroot``): a site's data directories are the same paths locally and on the server.

:class:`XrootdServer` works without pytest too (``benchmarks/transfer.py`` uses it).
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from typing import Optional

from tests.waiting import WaitTimeout, free_port, listening, wait_for

XROOTD = shutil.which("xrootd") or "/usr/bin/xrootd"
XRDCP = shutil.which("xrdcp") or "/usr/bin/xrdcp"
SETFACL = shutil.which("setfacl") or "/usr/bin/setfacl"
USER = "xrootd"


class XrootdError(RuntimeError):
    """The server could not be set up or started; the message ends with its log's tail."""


class XrootdServer:
    def __init__(self, tmpdir: Optional[str] = None, name: str = "a", tpc: bool = True,
                 port: Optional[int] = None):
        for tool in (XROOTD, XRDCP, SETFACL):
            if not os.path.exists(tool):
                raise XrootdError(f"{tool} not found (scripts/system-deps.sh installs "
                                  f"xrootd-server, xrootd-client and acl)")
        try:
            self.uid = pwd.getpwnam(USER).pw_uid
        except KeyError:
            raise XrootdError(f"no user {USER!r} (Debian package xrootd-server creates it)")
        self.name = name
        self.tmpdir = tmpdir or tempfile.mkdtemp(prefix=f"cax-xrootd-{name}-")
        os.makedirs(self.tmpdir, exist_ok=True)
        os.chmod(self.tmpdir, 0o755)  # the xrootd user must reach its data below
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.tpc = tpc
        self.data = os.path.join(self.tmpdir, "data")
        self.admin = os.path.join(self.tmpdir, "admin")
        self.pids = os.path.join(self.tmpdir, "pid")
        self.logdir = os.path.join(self.tmpdir, "log")
        self.config = os.path.join(self.tmpdir, "xrootd.cfg")
        self.proc: Optional[subprocess.Popen] = None
        for d in (self.data, self.admin, self.pids, self.logdir):
            os.makedirs(d, exist_ok=True)
            os.chown(d, self.uid, -1)
        # what root makes below data stays writable by the server (and mkdir keeps mode 0777's
        # group bits as the ACL mask: the umask does not apply under a default ACL)
        subprocess.run([SETFACL, "-m", f"u:{USER}:rwx,d:u:{USER}:rwx", self.data], check=True,
                       capture_output=True)
        self._write_config()

    @property
    def url(self) -> str:
        """The site ``hostname`` (URL prefix) of this server."""
        return f"root://{self.host}:{self.port}/"

    def _write_config(self):
        lines = [f"all.export {self.data}/", f"xrd.port {self.port}", "xrootd.chksum adler32",
                 f"all.adminpath {self.admin}", f"all.pidpath {self.pids}"]
        if self.tpc:
            lines.append(f"ofs.tpc pgm {XRDCP} --server")
        with open(self.config, "w") as f:
            f.write("\n".join(lines) + "\n")

    @property
    def log(self) -> str:
        return os.path.join(self.logdir, self.name, "xrootd.log")

    def log_tail(self, n: int = 10) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return " | ".join(line.rstrip() for line in f.readlines()[-n:])
        except OSError:
            return "(no xrootd log)"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 20.0) -> "XrootdServer":
        if self.running:
            return self
        self.proc = subprocess.Popen(
            [XROOTD, "-R", USER, "-l", os.path.join(self.logdir, "xrootd.log"), "-c", self.config,
             "-n", self.name], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)

        def up():
            if self.proc.poll() is not None:
                raise XrootdError(f"xrootd exited with status {self.proc.returncode}: "
                                  f"{self.log_tail()}")
            return listening(self.host, self.port)
        try:
            wait_for(up, timeout, f"xrootd {self.name} on port {self.port}")
        except WaitTimeout:
            self.kill()
            raise XrootdError(f"xrootd did not listen on {self.port} within {timeout:.0f} s: "
                              f"{self.log_tail()}") from None
        return self

    def kill(self) -> None:
        """SIGKILL the server and what it started (third-party copy helpers): every
        connection drops, as when a storage node dies."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        self.kill()

    def pause(self) -> None:
        """SIGSTOP: the server accepts connections (the kernel does) and never answers."""
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def site(self, method: str = "gfal", root: Optional[str] = None, **kw):
        """A :class:`cax.config.Site` on this server, data directories under ``root``."""
        from cax.config import Site
        if root is None:
            root = tempfile.mkdtemp(prefix="site-", dir=self.data)
            os.chmod(root, 0o775)  # mkdtemp's 0700 would mask the xrootd user's ACL entry
        dirs = {"raw": os.path.join(root, "raw"), "processed": os.path.join(root, "processed")}
        for d in dirs.values():
            os.makedirs(d, exist_ok=True)
        return Site(name=kw.pop("name", f"xrootd-{self.name}"), hostname=self.url, port=self.port,
                    method=method, dirs=dirs, **kw)


# ---------------------------------------------------------------------- pytest fixtures
try:
    import pytest
except ImportError:  # used from benchmarks without pytest
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="session")
    def xrootd_pair(tmp_path_factory):
        from tests.conftest import missing_component
        servers = []
        try:
            for name in ("a", "b"):
                base = tempfile.mkdtemp(prefix=f"cax-xrootd-{name}-")
                servers.append(XrootdServer(base, name))
                servers[-1].start()
        except (XrootdError, OSError, subprocess.CalledProcessError) as e:
            for s in servers:
                s.kill()
            missing_component(f"private XRootD servers: {e}")
        yield servers
        for s in servers:
            s.stop()
            shutil.rmtree(s.tmpdir, ignore_errors=True)

    def _live(server):
        from tests.conftest import missing_component
        if not server.running:
            try:
                server.start()
            except XrootdError as e:
                missing_component(f"private XRootD server restart: {e}")
        return server

    @pytest.fixture
    def xrootd(xrootd_pair):
        return _live(xrootd_pair[0])

    @pytest.fixture
    def xrootd_b(xrootd_pair):
        return _live(xrootd_pair[1])

    @pytest.fixture
    def xrootd_site(xrootd):
        site = xrootd.site()
        yield site
        shutil.rmtree(os.path.dirname(site.dirs["raw"]), ignore_errors=True)
