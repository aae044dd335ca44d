"""Checksums of files and directory trees, compatible with existing Runs DBs.

The default ``sha512`` digest of a directory equals ``checksumdir.dirhash(path, 'sha512')``: the
sha512 of the sorted hex digests of every file below it (names do not count, hidden files do). A
single file hashes to its plain sha512. Files are hashed in parallel threads: hashlib releases the GIL
on large updates, so threads reach the hash limit of every core without extra processes.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

ALGORITHMS = ("sha512",)
BUFSIZE = 1 << 20


def _file_digest(path: str, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    buf = bytearray(BUFSIZE)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def list_files(path: str) -> list:
    """Every file below ``path`` in checksumdir's walk order (symlinked dirs not followed)."""
    out = []
    for root, dirs, files in os.walk(path, topdown=True):
        dirs.sort()
        for name in sorted(files):
            out.append(os.path.join(root, name))
    return out


def checksum(path: str, algorithm: str = "sha512", workers: Optional[int] = None) -> str:
    """The digest cax records for a file or directory."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unsupported checksum type {algorithm!r} (supported: {', '.join(ALGORITHMS)})")
    if os.path.isfile(path):
        return _file_digest(path, algorithm)
    if not os.path.isdir(path):
        raise FileNotFoundError(path)
    files = list_files(path)
    workers = workers or min(len(files), os.cpu_count() or 1) or 1
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            digests = list(pool.map(lambda p: _file_digest(p, algorithm), files))
    else:
        digests = [_file_digest(p, algorithm) for p in files]
    top = hashlib.new(algorithm)
    for d in sorted(digests):
        top.update(d.encode())
    return top.hexdigest()
