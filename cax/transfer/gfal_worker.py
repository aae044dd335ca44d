"""The gfal2 side of the ``gfal`` method: a small server run by the Python that has the gfal2
binding (Debian's ``python3-gfal2`` is built for ``/usr/bin/python3``), spoken to over its
stdin/stdout in JSON lines by :mod:`cax.transfer.gfal`.

Why a separate process: the binding is built for one interpreter (cax's virtual environment may
be another), and a call into a C library that hangs on a dead endpoint cannot be interrupted
from Python; the method kills this process when a call outlives its deadline, so nothing in cax
ever waits on a storage endpoint without a timeout. The process is the method's "connection":
started once per method object, it keeps gfal2's own connections open across calls.

Runs under any Python 3 with ``gfal2`` importable and imports nothing from cax (it is started as
a script, ``python3 -I gfal_worker.py``).

Requests (one JSON object a line): ``{"id": N, "op": NAME, "args": [...]}``; ``{"cancel": N}``
cancels the copy in flight (``gfal2`` ``cancel()``). Answers: ``{"id": N, "ok": VALUE}``,
``{"id": N, "error": [CODE, MESSAGE]}`` (CODE an errno where gfal2 gives one), and for copies
``{"id": N, "progress": BYTES_SO_FAR}``. The first line is ``{"hello": {...}}`` or
``{"fatal": MESSAGE}``.
"""
import errno
import hashlib
import json
import stat
import sys
import threading

_out_lock = threading.Lock()


def send(obj):
    line = json.dumps(obj, separators=(",", ":")) + "\n"
    with _out_lock:
        sys.stdout.write(line)
        sys.stdout.flush()


class Worker:
    def __init__(self, gfal2):
        self.gfal2 = gfal2
        self.ctx = gfal2.creat_context()
        self.busy = None  # id of the request being served

    # -- namespace ------------------------------------------------------------------------
    def _stat(self, url):
        try:
            return self.ctx.lstat(url)
        except self.gfal2.GError as e:
            if e.code in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
                return self.ctx.stat(url)
            raise

    def op_stat(self, url):
        """[kind, size]: kind "file", "dir", "link" or "other"."""
        st = self._stat(url)
        mode = st.st_mode
        kind = ("dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode)
                else "link" if stat.S_ISLNK(mode) else "other")
        return [kind, st.st_size]

    def op_exists(self, url):
        try:
            self._stat(url)
            return True
        except self.gfal2.GError as e:
            if e.code == errno.ENOENT:
                return False
            raise

    def op_walk(self, url):
        """{"kind", "size", "files": [[relative path, size], ...], "dirs": [relative path]}:
        everything below ``url`` (directories before what they hold); a file is its own only
        entry, with relative path ""."""
        kind, size = self.op_stat(url)
        if kind != "dir":
            return {"kind": kind, "size": size, "files": [["", size]] if kind == "file" else [],
                    "dirs": [], "other": [] if kind == "file" else [""]}
        files, dirs, other = [], [], []
        todo = [""]
        base = url.rstrip("/")
        while todo:
            rel = todo.pop()
            here = base + "/" + rel if rel else base
            for name in sorted(self.ctx.listdir(here + "/")):
                if name in (".", ".."):
                    continue
                sub = rel + "/" + name if rel else name
                k, s = self.op_stat(base + "/" + sub)
                if k == "dir":
                    dirs.append(sub)
                    todo.append(sub)
                elif k == "file":
                    files.append([sub, s])
                else:
                    other.append(sub)
        return {"kind": "dir", "size": size, "files": files, "dirs": sorted(dirs),
                "other": other}

    def op_mkdir_p(self, url):
        try:
            self.ctx.mkdir_rec(url, 0o755)
        except self.gfal2.GError as e:
            if e.code != errno.EEXIST:
                raise
        return True

    def op_remove(self, url):
        """A file or a whole tree; nothing there is not an error."""
        try:
            tree = self.op_walk(url)
        except self.gfal2.GError as e:
            if e.code == errno.ENOENT:
                return False
            raise
        if tree["kind"] != "dir":
            self.ctx.unlink(url)
            return True
        base = url.rstrip("/")
        for rel, _size in tree["files"]:
            self.ctx.unlink(base + "/" + rel)
        for rel in tree["other"]:
            self.ctx.unlink(base + "/" + rel)
        for rel in sorted(tree["dirs"], key=lambda d: -d.count("/")):
            self.ctx.rmdir(base + "/" + rel)
        self.ctx.rmdir(base)
        return True

    def op_rename(self, src, dst):
        self.ctx.rename(src, dst)
        return True

    def op_checksum(self, url, algorithm):
        """The storage's own checksum of one file (8 hex digits for ADLER32)."""
        value = self.ctx.checksum(url, algorithm).strip().lower()
        if algorithm.upper() == "ADLER32":
            value = value.rjust(8, "0")
        return value

    def op_read_digest(self, url, algorithm):
        """A hashlib digest of one file, read through gfal2 (for algorithms the storage does
        not compute)."""
        h = hashlib.new(algorithm)
        f = self.ctx.open(url, "r")
        while True:
            chunk = f.read_bytes(1 << 22)
            if not chunk:
                break
            h.update(chunk)
        return h.hexdigest()

    def op_space(self, url):
        """Bytes free at ``url`` as the storage reports them (``spacetoken`` attribute)."""
        text = self.ctx.getxattr(url, "spacetoken")
        data = json.loads(text)
        if isinstance(data, list):
            data = data[0] if data else {}
        return int(data.get("unusedsize", data.get("freesize", -1)))

    # -- copies ---------------------------------------------------------------------------
    def op_copy(self, src, dst, checksum, timeout):
        """gfal2 ``filecopy`` of one file; with ``checksum`` (e.g. "ADLER32") the source's and
        the destination's checksums are compared by gfal2, end to end."""
        gfal2 = self.gfal2
        params = self.ctx.transfer_parameters()
        params.overwrite = False
        params.create_parent = False
        params.timeout = int(timeout)
        if checksum:
            params.set_checksum(gfal2.checksum_mode.both, checksum, "")
        rid = self.busy
        last = [-1]

        def monitor(_src, _dst, _avg, _inst, transferred, _elapsed):
            if transferred != last[0]:
                last[0] = transferred
                send({"id": rid, "progress": transferred})

        params.monitor_callback = monitor
        self.ctx.filecopy(params, src, dst)
        return True

    def op_hello(self):
        return {"version": self.gfal2.get_version(), "plugins": self.ctx.get_plugin_names(),
                "python": sys.version.split()[0]}


def main():
    try:
        import gfal2
    except ImportError as e:
        send({"fatal": f"gfal2 Python binding not importable by {sys.executable}: {e}"})
        return 3
    worker = Worker(gfal2)
    requests = []
    cond = threading.Condition()
    done = [False]

    def reader():
        for line in sys.stdin:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "cancel" in msg:
                if worker.busy == msg["cancel"]:
                    try:
                        worker.ctx.cancel()
                    except Exception:  # noqa: BLE001 - nothing to cancel
                        pass
                continue
            with cond:
                requests.append(msg)
                cond.notify()
        with cond:
            done[0] = True
            cond.notify()

    threading.Thread(target=reader, daemon=True).start()
    send({"hello": worker.op_hello()})
    while True:
        with cond:
            while not requests and not done[0]:
                cond.wait()
            if not requests:
                return 0
            msg = requests.pop(0)
        rid = msg.get("id")
        worker.busy = rid
        try:
            fn = getattr(worker, "op_" + str(msg.get("op")), None)
            if fn is None:
                send({"id": rid, "error": [errno.ENOSYS, f"unknown op {msg.get('op')!r}"]})
                continue
            send({"id": rid, "ok": fn(*msg.get("args", []))})
        except gfal2.GError as e:
            send({"id": rid, "error": [e.code, " ".join(str(e.message).split())]})
        except Exception as e:  # noqa: BLE001 - reported to the method, which types it
            send({"id": rid, "error": [errno.EIO, f"{type(e).__name__}: {e}"]})
        finally:
            worker.busy = None


if __name__ == "__main__":
    sys.exit(main())
