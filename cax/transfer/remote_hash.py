"""The small program cax runs on the far side of an SSH connection.

It computes checksums where the data are (the same digest as :func:`cax.checksum.checksum`: a
file's plain digest; for a directory checksumdir's ``dirhash``, the digest of the sorted hex digests
of every file below it, names not counted, hidden files counted) and does the few filesystem
operations the methods need (size, tree, free space, remove, ``expect`` and ``place``: a rename
of a complete copy that never overwrites). The frequent cheap ones (exists, makedirs, prepare,
remove) are POSIX ``sh`` one-liners instead (``SH_OPS`` in :mod:`cax.transfer.ssh`).

It needs only ``python3`` (3.6+) on the remote host. The program is sent base64-encoded inside
``python3 -c``, so it survives any login shell; every argument is passed separately and quoted with
:func:`shlex.quote` by :func:`command`.

Exit status: 0 ok, 3 path not found, 4 destination exists, 5 not accessible (permission,
read-only), 6 other OS error, 7 incomplete copy (``expect``/``place``), 8 no space (disk full,
quota), 2 usage. One line on stderr says why.
"""
from __future__ import annotations

import base64
import shlex
import zlib

REMOTE_PYTHON = "python3"

SCRIPT = r'''
import errno, hashlib, os, shutil, stat, sys
from concurrent.futures import ThreadPoolExecutor

def files_below(p):
    out = []
    for root, dirs, files in os.walk(p, topdown=True):
        dirs.sort()
        for n in sorted(files):
            out.append(os.path.join(root, n))
    return out

def fdigest(p, alg):
    h = hashlib.new(alg)
    buf = bytearray(1 << 20)
    mv = memoryview(buf)
    with open(p, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(mv[:n])
    return h.hexdigest()

def total_size(p):
    if not os.path.isdir(p):
        return os.path.getsize(p)
    return sum(os.path.getsize(f) for f in files_below(p))

def tree(p):
    if os.path.islink(p) or not os.path.isdir(p):
        st = os.lstat(p)
        return (st.st_size, 1) if stat.S_ISREG(st.st_mode) else (0, 0)
    total = files = 0
    for root, dirs, names in os.walk(p):
        for n in names:
            st = os.lstat(os.path.join(root, n))
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
                files += 1
    return total, files

def expect(p, nbytes, nfiles):
    got = tree(p)
    if got != (int(nbytes), int(nfiles)):
        sys.stderr.write("incomplete copy %s: %d bytes in %d files, expected %s bytes in %s files;"
                         " not renamed into place\n" % (p, got[0], got[1], nbytes, nfiles))
        sys.exit(7)

def free(p):
    p = os.path.abspath(p)
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize

def need(p):
    if not os.path.lexists(p):
        sys.stderr.write("%s: No such file or directory\n" % p)
        sys.exit(3)

def main(op, args):
    if op == "tree":
        need(args[0])
        print("%d %d" % tree(args[0]))
    elif op == "expect":
        need(args[2])
        expect(args[2], args[0], args[1])
    elif op == "free":
        print(free(args[0]))
    elif op == "size":
        need(args[0])
        print(total_size(args[0]))
    elif op == "checksum":
        alg, p = args
        need(p)
        if not os.path.isdir(p):
            print(fdigest(p, alg))
            return
        fs = files_below(p)
        with ThreadPoolExecutor(max(1, min(len(fs), os.cpu_count() or 1))) as pool:
            ds = sorted(pool.map(lambda f: fdigest(f, alg), fs))
        top = hashlib.new(alg)
        for d in ds:
            top.update(d.encode())
        print(top.hexdigest())
    elif op == "remove":
        p = args[0]
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        elif os.path.lexists(p):
            os.unlink(p)
    elif op == "place":  # BYTES FILES SRC DST: a rename only of a complete copy
        nbytes, nfiles, src, dst = args
        need(src)
        expect(src, nbytes, nfiles)
        if os.path.lexists(dst):
            sys.stderr.write("%s already exists\n" % dst)
            sys.exit(4)
        os.rename(src, dst)
    else:
        sys.stderr.write("unknown operation %r\n" % op)
        sys.exit(2)

try:
    main(sys.argv[1], sys.argv[2:])
except OSError as e:
    sys.stderr.write("%s: %s\n" % (e.filename or "", e.strerror or e))
    if e.errno == errno.ENOENT:
        sys.exit(3)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        sys.exit(8)
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        sys.exit(5)
    sys.exit(6)
'''

_BOOT = 'import base64,zlib;exec(zlib.decompress(base64.b64decode("%s")))' % (
    base64.b64encode(zlib.compress(SCRIPT.encode(), 9)).decode())

EXIT_OK, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_EXISTS, EXIT_ACCESS, EXIT_OS = 0, 2, 3, 4, 5, 6
EXIT_INCOMPLETE, EXIT_NO_SPACE = 7, 8


def boot() -> str:
    """The ``python3 -c`` program text, for a remote shell script that runs the helper itself
    (``"$PY" -c "$BOOT" op args``)."""
    return _BOOT


def argv(op: str, *args: str) -> list:
    """The helper's argument vector (for running it locally, e.g. in tests)."""
    return [REMOTE_PYTHON, "-c", _BOOT, op, *args]


def command(op: str, *args: str) -> str:
    """The remote command line: every word quoted, for the remote login shell; its messages in
    the C locale, as they are classified by their text."""
    return " ".join(shlex.quote(a) for a in ["env", "LC_ALL=C", *argv(op, *args)])
