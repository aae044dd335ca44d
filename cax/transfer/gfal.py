"""The ``gfal`` method (classic name ``gfal-copy``): grid storage through the gfal2 library, the
one Rucio and FTS3 move their bytes with (docs/grid.rst).

A site's ``hostname`` is a storage URL prefix (``root://host:port/``, ``davs://host/``,
``srm://host:port/srm/managerv2?SFN=``, ``lfn:``) and its data directories are paths below it:
the Runs DB keeps paths, as for every site, and this module alone turns them into URLs.

gfal2 runs in a worker process (:mod:`cax.transfer.gfal_worker`) under the Python that has its
binding: every call has a deadline and a worker that misses it is killed (a dead endpoint never
hangs a pass), and the binding built for Debian's ``/usr/bin/python3`` serves cax whatever
Python cax runs on. Each file is copied with gfal2's end-to-end adler32 check (the source's
checksum against the one the destination storage computes); a run's adler32 is built from the
storage's per-file values as :mod:`cax.checksum` builds it from local files, so a copy on grid
storage is verified without reading it back. Other checksum types are read back through gfal2.

Third-party copies (:meth:`GfalMethod.third_party_copy`): between two XRootD sites the bytes go
server to server with ``xrdcp --tpc only`` (an argument list, a timeout); a refusal is
:class:`ThirdPartyRefused` and the policy streams the copy through this host instead.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import posixpath
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Optional

from cax import children
from cax.checksum import directory_digest
from cax.transfer.base import (
    NO_SPACE_ERRNOS,
    DestinationNotAccessible,
    Features,
    Interrupted,
    NoSpace,
    ServiceUnavailable,
    SourceNotFound,
    TransferError,
    TransferFailed,
    ThirdPartyRefused,
    TransferMethod,
    check_complete,
    partial_path,
    says_no_space,
)

log = logging.getLogger("cax.transfer.gfal")

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gfal_worker.py")
#: Pythons tried for the worker, first that imports gfal2 wins (cached per process)
PYTHONS = (sys.executable, "/usr/bin/python3")
#: deadline of one namespace call (stat, listing, checksum of one file, rename, ...)
OP_TIMEOUT = 120.0
#: a copy that reports no progress for this long is given up (its worker killed)
STALL_TIMEOUT = 300.0
#: gfal2's own limit for one file's copy
COPY_TIMEOUT = 6 * 3600
#: how long a cancelled copy may take to stop before its worker is killed
CANCEL_GRACE = 10.0
#: XRootD client settings of the worker: fail fast on a refused connection, never retry for
#: minutes (the client's defaults); the worker's deadline is the last word
XRD_ENV = {"XRD_CONNECTIONRETRY": "1", "XRD_CONNECTIONWINDOW": "15", "XRD_REQUESTTIMEOUT": "60",
           "XRD_STREAMTIMEOUT": "60", "XRD_TIMEOUTRESOLUTION": "1", "LC_ALL": "C"}

#: URL scheme -> (gfal2 plugin name prefix, Debian package that brings it)
PLUGINS = {"root": ("xrootd", "gfal2-plugin-xrootd"), "xroot": ("xrootd", "gfal2-plugin-xrootd"),
           "davs": ("http", "gfal2-plugin-http"), "dav": ("http", "gfal2-plugin-http"),
           "https": ("http", "gfal2-plugin-http"), "http": ("http", "gfal2-plugin-http"),
           "srm": ("srm", "gfal2-plugin-srm"), "gsiftp": ("gridftp", "gfal2-plugin-gridftp"),
           "lfn": ("lfc", "gfal2-plugin-lfc"), "file": ("file", "gfal2-plugin-file")}
#: schemes whose servers copy between each other with ``xrdcp --tpc``
TPC_SCHEMES = ("root", "xroot")

_UNREACHABLE_ERRNOS = (errno.ESTALE, errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH,
                       errno.ETIMEDOUT, errno.ECONNRESET, errno.ECOMM, errno.ENOTCONN,
                       errno.EPIPE, errno.ECONNABORTED)
_UNREACHABLE_TEXT = ("connection refused", "socket error", "operation expired", "timed out",
                     "connection error", "no route to host", "network is unreachable",
                     "connection reset", "broken pipe", "socket timeout", "stream error",
                     "host is unreachable", "name or service not known")
_ACCESS_TEXT = ("permission denied", "not authorized", "is disallowed", "unauthorized",
                "read-only", "forbidden")


def scheme(prefix: str) -> str:
    return prefix.split(":", 1)[0].lower()


def join_url(prefix: str, path: str) -> str:
    """The storage URL of ``path`` (absolute) on a site whose hostname is ``prefix``."""
    if scheme(prefix) in TPC_SCHEMES:
        return prefix + path if prefix.endswith("/") else prefix + "/" + path
    if prefix.endswith("/") and path.startswith("/"):
        return prefix[:-1] + path
    return prefix + path


def file_url(path: str) -> str:
    return "file://" + os.path.abspath(path)


def check_path(path: str, where: str) -> str:
    """Paths come from the Runs DB: refuse what would change a URL's meaning."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise TransferFailed(f"{where}: not an absolute path: {path!r}")
    bad = [c for c in ("\0", "\n", "\r", "?", "#") if c in path]
    if bad:
        raise TransferFailed(f"{where}: refusing path with {bad[0]!r} in it (it would change "
                             f"the storage URL): {path!r}")
    return path


def one_line(text, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


class GfalError(Exception):
    """An error the worker reported: ``code`` (an errno where gfal2 gave one) and message."""

    def __init__(self, code: int, message: str):
        super().__init__(code, message)
        self.code, self.message = code, message


def typed(label: str, what: str, code: int, message: str) -> TransferError:
    """A worker's error as the contract's typed error."""
    low = message.lower()
    text = f"{label}: {what}: {one_line(message)}"
    if code == errno.ECANCELED or "operation canceled" in low or "cancelled" in low:
        return Interrupted("interrupted")
    if code in NO_SPACE_ERRNOS or says_no_space(low):
        return NoSpace(text)
    if code == errno.EPROTONOSUPPORT or "protocol not supported" in low:
        return ServiceUnavailable(f"{text} (no gfal2 plugin for this URL here)")
    if code == errno.EEXIST or "file exists" in low:
        return DestinationNotAccessible(f"{text}; already exists, refusing to overwrite")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS) or any(t in low for t in _ACCESS_TEXT):
        return DestinationNotAccessible(text)
    if code in _UNREACHABLE_ERRNOS or any(t in low for t in _UNREACHABLE_TEXT):
        return ServiceUnavailable(text)
    if code == errno.ENOENT or "no such file" in low:
        if "(destination)" in low:
            return TransferFailed(text)
        return SourceNotFound(text)
    return TransferFailed(text)


_python_lock = threading.Lock()
_python: list = []  # the interpreter found to import gfal2, once per process


class GfalSession:
    """One worker process: the method's connection to gfal2 (and, through it, to the storage)."""

    def __init__(self, label: str):
        self.label = label
        self.proc: Optional[subprocess.Popen] = None
        self.hello: dict = {}
        self._buf = b""
        self._id = 0
        self._lock = threading.Lock()
        self._errlog = None
        self.started = 0  # worker processes started (tests check reuse)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        if self.alive:
            return
        self.close()
        with _python_lock:
            candidates = list(_python) or [p for p in dict.fromkeys(PYTHONS) if p]
            last = "no Python found"
            for python in candidates:
                try:
                    self._spawn(python)
                except ServiceUnavailable as e:
                    last = str(e)
                    self.close()
                    continue
                _python[:] = [python]
                return
        raise ServiceUnavailable(f"{self.label}: gfal2 is not available ({last}); install "
                                 f"Debian packages python3-gfal2 and gfal2-plugin-xrootd "
                                 f"(scripts/system-deps.sh)")

    def _spawn(self, python: str) -> None:
        if not os.path.exists(python):
            raise ServiceUnavailable(f"{python} not found")
        self._errlog = tempfile.TemporaryFile(prefix="cax-gfal-")
        self.proc = subprocess.Popen([python, "-I", WORKER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._errlog,
                                     env=children.environment(XRD_ENV), start_new_session=True)
        self._buf = b""
        self.started += 1
        self._limit = OP_TIMEOUT
        msg = self._read(time.monotonic() + OP_TIMEOUT, "start")
        if "fatal" in msg:
            raise ServiceUnavailable(msg["fatal"])
        self.hello = msg.get("hello") or {}

    def stderr_tail(self) -> str:
        if self._errlog is None:
            return ""
        try:
            self._errlog.seek(0)
            return one_line(self._errlog.read()[-600:].decode("utf-8", "replace"))
        except OSError:
            return ""

    def kill(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            self.proc.wait()

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()
            for f in (self.proc.stdout,):
                try:
                    f.close()
                except OSError:
                    pass
            self.proc = None
        if self._errlog is not None:
            self._errlog.close()
            self._errlog = None

    # -- one request --------------------------------------------------------------------------
    def _read(self, deadline: float, what: str, tick: Optional[Callable[[], None]] = None,
              wait: float = 0.2) -> dict:
        """The worker's next message, waiting at most until ``deadline``; ``tick`` is called
        between waits (cancel checks)."""
        fd = self.proc.stdout.fileno()
        sel = selectors.DefaultSelector()
        sel.register(fd, selectors.EVENT_READ)
        try:
            while b"\n" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.kill()
                    raise ServiceUnavailable(f"{self.label}: {what}: no answer within "
                                             f"{self._limit:.0f} s; the endpoint does not "
                                             f"respond (call given up)")
                if sel.select(min(left, wait)):
                    chunk = os.read(fd, 1 << 16)
                    if not chunk:
                        status = self.proc.wait()
                        raise ServiceUnavailable(f"{self.label}: {what}: the gfal2 worker ended "
                                                 f"(status {status}): {self.stderr_tail()}")
                    self._buf += chunk
                elif tick is not None:
                    tick()
        finally:
            sel.close()
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def call(self, op: str, *args, progress: Optional[Callable[[int], None]] = None,
             cancel: Optional[Callable[[], bool]] = None, timeout: Optional[float] = None):
        """Run ``op`` in the worker; its value, or :class:`GfalError`. A copy (``progress``
        given) may go on as long as it reports progress; ``cancel()`` true cancels it."""
        with self._lock:
            self.start()
            self._id += 1
            rid = self._id
            try:
                self.proc.stdin.write((json.dumps({"id": rid, "op": op, "args": list(args)})
                                       + "\n").encode())
                self.proc.stdin.flush()
            except OSError as e:
                self.kill()
                raise ServiceUnavailable(f"{self.label}: {op}: the gfal2 worker is gone: {e}")
            limit = STALL_TIMEOUT if progress is not None else (timeout or OP_TIMEOUT)
            self._limit = limit
            deadline = time.monotonic() + limit
            cancelled = [False]

            def tick():
                if cancel is not None and not cancelled[0] and cancel():
                    cancelled[0] = True
                    nonlocal deadline
                    deadline = time.monotonic() + CANCEL_GRACE
                    try:
                        self.proc.stdin.write((json.dumps({"cancel": rid}) + "\n").encode())
                        self.proc.stdin.flush()
                    except OSError:
                        pass
            try:
                while True:
                    msg = self._read(deadline, op, tick if cancel is not None else None)
                    if msg.get("id") != rid:
                        continue
                    if "progress" in msg:
                        if not cancelled[0]:
                            deadline = time.monotonic() + limit
                        if progress is not None:
                            progress(int(msg["progress"]))
                        if cancel is not None:
                            tick()
                        continue
                    if "error" in msg:
                        code, message = msg["error"]
                        if cancelled[0]:
                            raise Interrupted("interrupted")
                        raise GfalError(int(code), str(message))
                    if cancelled[0]:
                        raise Interrupted("interrupted")
                    return msg.get("ok")
            except ServiceUnavailable:
                if cancelled[0]:
                    raise Interrupted("interrupted") from None
                raise


class GfalMethod(TransferMethod):
    """Grid storage through gfal2. The site's ``hostname`` is the URL prefix of its paths."""

    name = "gfal"
    #: the storage computes adler32 where the data are (other types are read back through
    #: gfal2); no shared connection (each method object has its own worker); the copy policy
    #: renames into place; XRootD sites copy server to server
    features = Features(remote_checksum=True, third_party=True)

    def __init__(self, site, *, session: Optional[GfalSession] = None, **kw):
        super().__init__(site, **kw)
        self.prefix = site.hostname or ""
        self.scheme = scheme(self.prefix)
        self.label = f"{site.name} ({self.prefix})" if site.name else self.prefix
        self.session = session or GfalSession(self.label)
        self.owns_connection = session is None

    # -- life cycle -----------------------------------------------------------------------
    def connect(self) -> None:
        if self.scheme not in PLUGINS or ":" not in self.prefix:
            raise ServiceUnavailable(f"{self.label}: hostname {self.prefix!r} is not a storage URL "
                                     f"prefix this method knows (schemes: "
                                     f"{', '.join(sorted(PLUGINS))})")
        self.session.start()
        plugin, package = PLUGINS[self.scheme]
        have = [p.split("-")[0] for p in self.session.hello.get("plugins", [])]
        if plugin not in have:
            raise ServiceUnavailable(f"{self.label}: gfal2 here has no {plugin} plugin for "
                                     f"{self.scheme}:// URLs (it has {', '.join(have) or 'none'});"
                                     f" install Debian package {package}")

    def close(self) -> None:
        if self.owns_connection:
            self.session.close()

    @property
    def shell(self):
        """The worker process standing for the connection (``alive``), as the SSH methods'."""
        return self.session

    # -- helpers --------------------------------------------------------------------------
    def url(self, path: str) -> str:
        return join_url(self.prefix, check_path(path, self.label))

    def _call(self, what: str, op: str, *args, **kw):
        try:
            return self.session.call(op, *args, **kw)
        except GfalError as e:
            raise typed(self.label, what, e.code, e.message) from None

    def _walk(self, path: str) -> dict:
        return self._call(f"list {path}", "walk", self.url(path))

    # -- inspection and housekeeping ------------------------------------------------------
    def exists(self, path):
        return bool(self._call(f"stat {path}", "exists", self.url(path)))

    def tree(self, path):
        w = self._walk(path)
        return sum(s for _rel, s in w["files"]), len(w["files"])

    def size(self, path):
        return self.tree(path)[0]

    def free_bytes(self, path):
        path = path.rstrip("/") or "/"
        while path != "/" and not self.exists(path):
            path = posixpath.dirname(path)
        free = self._call(f"space at {path}", "space", self.url(path.rstrip("/") + "/"))
        if free is None or free < 0:
            raise TransferFailed(f"{self.label}: the storage does not say how much space is free "
                                 f"at {path}")
        return int(free)

    def remove(self, path):
        try:
            self._call(f"remove {path}", "remove", self.url(path))
        except SourceNotFound:
            pass

    def makedirs(self, path):
        try:
            self._call(f"mkdir {path}", "mkdir_p", self.url(path))
        except SourceNotFound as e:
            raise DestinationNotAccessible(str(e)) from None

    def file_checksums(self, path: str, algorithm: str = "adler32") -> dict:
        """{relative path: digest} of every file at ``path``, computed by the storage (adler32)
        or read back through gfal2 (hashlib types)."""
        w = self._walk(path)
        base = path.rstrip("/")
        out = {}
        for rel, _size in w["files"]:
            url = self.url(base + "/" + rel if rel else base)
            if algorithm == "adler32":
                out[rel] = self._call(f"checksum {path}", "checksum", url, "ADLER32")
            else:
                out[rel] = self._call(f"checksum {path}", "read_digest", url, algorithm,
                                      timeout=COPY_TIMEOUT)
        return out

    def checksum(self, path, algorithm="sha512"):
        import hashlib
        if algorithm != "adler32" and algorithm not in hashlib.algorithms_guaranteed:
            return None  # xxh3, blake3: neither the storage nor the worker's Python computes it
        w = self._walk(path)
        digests = self.file_checksums(path, algorithm)
        if w["kind"] != "dir":
            return digests[""]
        return directory_digest(algorithm, digests.values())

    # -- the steps of a copy (cax.transfer.policy) ----------------------------------------
    def prepare(self, final):
        if self.exists(final):
            raise DestinationNotAccessible(f"{self.label}: destination {final} already exists; "
                                           f"refusing to overwrite")
        self.makedirs(posixpath.dirname(final.rstrip("/")) or "/")
        self.remove(partial_path(final))

    def _copy_file(self, src_url: str, dst_url: str, size: int, what: str) -> None:
        self.check_cancel()
        sent = [0]

        def progress(total):
            if total > sent[0]:
                self.progress(total - sent[0])
                sent[0] = total
        self._call(what, "copy", src_url, dst_url, "ADLER32", COPY_TIMEOUT,
                   progress=progress, cancel=self.cancel)
        if size > sent[0]:
            self.progress(size - sent[0])

    def send(self, local, partial, final, expect):
        check_path(partial, self.label)
        if not os.path.isdir(local) or os.path.islink(local):
            self._copy_file(file_url(local), self.url(partial), os.path.getsize(local),
                            f"put {local}")
            return
        self._call(f"mkdir {partial}", "mkdir_p", self.url(partial))
        for root, dirs, files in os.walk(local, followlinks=False):
            rel = os.path.relpath(root, local)
            target = partial if rel == "." else posixpath.join(partial, rel)
            for d in sorted(dirs):
                if not os.path.islink(os.path.join(root, d)):
                    self._call(f"mkdir {target}/{d}", "mkdir_p", self.url(posixpath.join(target, d)))
            for f in sorted(files):
                src = os.path.join(root, f)
                if os.path.islink(src) or not os.path.isfile(src):
                    continue  # as local_tree counts: links and specials are not data
                self._copy_file(file_url(src), self.url(posixpath.join(target, f)),
                                os.path.getsize(src), f"put {src}")

    def place(self, partial, final, expect):
        check_complete(self.label, partial, self.tree(partial), expect)
        if self.exists(final):
            raise DestinationNotAccessible(f"{self.label}: {final} already exists; refusing to "
                                           f"overwrite")
        self._call(f"rename {partial}", "rename", self.url(partial), self.url(final))

    def receive(self, remote, partial):
        w = self._walk(remote)
        base = remote.rstrip("/")
        if w["kind"] != "dir":
            self._copy_file(self.url(remote), file_url(partial), w["size"], f"get {remote}")
            return
        os.mkdir(partial)
        for rel in w["dirs"]:
            os.makedirs(os.path.join(partial, rel), exist_ok=True)
        for rel, size in w["files"]:
            self._copy_file(self.url(base + "/" + rel), file_url(os.path.join(partial, rel)),
                            size, f"get {remote}")

    def remove_partial(self, partial):
        if not self.session.alive:
            log.warning("%s: gfal2 worker gone; partial copy %s left for the next attempt",
                        self.label, partial)
            return
        try:
            self.remove(partial)
        except TransferError as e:
            log.warning("%s: could not remove partial copy %s: %s", self.label, partial, e)

    # -- third-party copies ---------------------------------------------------------------
    def accepts_third_party(self, source: TransferMethod) -> bool:
        """Whether a copy from ``source``'s site to this one can go server to server."""
        return (isinstance(source, GfalMethod) and self.scheme in TPC_SCHEMES
                and source.scheme in TPC_SCHEMES and shutil.which("xrdcp") is not None)

    def third_party_copy(self, source: TransferMethod, src_path: str, partial: str) -> None:
        """Copy ``src_path`` on ``source``'s site to ``partial`` here, server to server, file by
        file with ``xrdcp --tpc only`` and an end-to-end adler32 check. A refusal (either server
        cannot do TPC) is :class:`ThirdPartyRefused`, before any file lands."""
        if not self.accepts_third_party(source):
            raise ThirdPartyRefused(f"{self.label}: no third-party copy from {source.label}")
        w = source._walk(src_path)
        base = src_path.rstrip("/")
        if w["kind"] != "dir":
            items = [("", w["size"])]
        else:
            self.makedirs(partial)
            for rel in w["dirs"]:
                self.makedirs(posixpath.join(partial, rel))
            items = w["files"]
        for i, (rel, size) in enumerate(items):
            self.check_cancel()
            src = source.url(base + "/" + rel if rel else base)
            dst = self.url(posixpath.join(partial, rel) if rel else partial)
            self._xrdcp_tpc(src, dst, first=(i == 0))
            self.progress(size)

    def _xrdcp_tpc(self, src: str, dst: str, first: bool) -> None:
        argv = [shutil.which("xrdcp") or "xrdcp", "--nopbar", "--tpc", "only",
                "--cksum", "adler32", src, dst]
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=children.environment(XRD_ENV),
                                    start_new_session=True)
        except OSError as e:
            raise ThirdPartyRefused(f"{self.label}: cannot run xrdcp: {e}") from None
        deadline = time.monotonic() + COPY_TIMEOUT
        while True:
            try:
                out, err = proc.communicate(timeout=0.1)
                break
            except subprocess.TimeoutExpired:
                if self.cancel() or time.monotonic() > deadline:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.communicate()
                    if self.cancel():
                        raise Interrupted("interrupted") from None
                    raise ServiceUnavailable(f"{self.label}: third-party copy {src} took over "
                                             f"{COPY_TIMEOUT} s") from None
        if proc.returncode == 0:
            return
        text = one_line(err.decode("utf-8", "replace") or out.decode("utf-8", "replace"))
        low = text.lower()
        if first and any(t in low for t in ("tpc", "third party", "third-party", "not supported",
                                            "file exists (destination)")):
            raise ThirdPartyRefused(f"{self.label}: third-party copy refused: {text}")
        raise typed(self.label, f"third-party copy {src}", errno.EIO, text)
