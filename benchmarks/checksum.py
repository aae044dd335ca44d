#!/usr/bin/env python
"""Benchmark cax.checksum against sha512sum, xargs -P sha512sum, checksumdir and the openssl limit.

Not a test. Usage: ``python benchmarks/checksum.py [--quick] [--repeat N] [--dir DIR]``

Creates a data set in a temporary directory (20 x 100 MiB and 10,000 x 4 KiB; with --quick
4 x 100 MiB and 2,000 x 4 KiB), reads it once so the page cache is warm, then times every method
``--repeat`` times and reports the best run (the machine may be shared, so the best run is the
least disturbed one). Prints an reStructuredText table.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cax import checksum as cx  # noqa: E402

MiB = 1 << 20


def make_tree(root: str, n_big: int, n_small: int) -> int:
    big = os.path.join(root, "big")
    small = os.path.join(root, "small")
    os.makedirs(big)
    block = os.urandom(MiB)
    for i in range(n_big):
        with open(os.path.join(big, f"raw_{i:03d}.zip"), "wb") as f:
            for k in range(100):
                f.write(block[k:] + block[:k])  # distinct content per MiB, cheap to generate
    for i in range(n_small):
        d = os.path.join(small, f"d{i // 1000:02d}")
        if i % 1000 == 0:
            os.makedirs(d)
        with open(os.path.join(d, f"f{i:05d}"), "wb") as f:
            f.write(os.urandom(4096))
    return n_big * 100 * MiB + n_small * 4096


def warm(root: str) -> None:
    for path in cx.list_files(root):
        with open(path, "rb", buffering=0) as f:
            while f.read(8 * MiB):
                pass


def best_of(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def sha512sum_single(root: str) -> None:
    files = cx.list_files(root)
    # One sha512sum process over every file (argument list chunked only if it would be too long).
    chunk = 4000
    for i in range(0, len(files), chunk):
        subprocess.run(["sha512sum", "--", *files[i:i + chunk]], check=True, stdout=subprocess.DEVNULL)


def xargs_batch(n_files: int, cores: int) -> int:
    """Files per sha512sum call: without -n xargs packs everything into one call (no parallelism)."""
    return max(1, -(-n_files // (4 * cores)))


def sha512sum_xargs(root: str, cores: int, per_call: int) -> None:
    find = subprocess.Popen(["find", root, "-type", "f", "-print0"], stdout=subprocess.PIPE)
    xargs = subprocess.Popen(["xargs", "-0", f"-P{cores}", f"-n{per_call}", "sha512sum"], stdin=find.stdout,
                             stdout=subprocess.DEVNULL)
    find.stdout.close()
    if xargs.wait() != 0 or find.wait() != 0:
        raise RuntimeError("find | xargs sha512sum failed")


def openssl_limit() -> float:
    """MB/s (10^6 bytes/s) of one core as reported by openssl speed for 1 MiB blocks."""
    out = subprocess.run(["openssl", "speed", "-evp", "sha512", "-bytes", "1048576", "-seconds", "3"],
                         check=True, capture_output=True, text=True).stdout
    line = [l for l in out.splitlines() if l.lower().startswith("sha512")][-1]
    kbs = float(re.findall(r"([\d.]+)k", line)[-1])  # openssl reports 1000s of bytes per second
    return kbs / 1000.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small data set")
    ap.add_argument("--repeat", type=int, default=3, help="runs per method; the best is reported")
    ap.add_argument("--dir", default=None, help="parent of the temporary data directory")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    n_big, n_small = (4, 2000) if args.quick else (20, 10000)

    tmp = tempfile.mkdtemp(prefix="cax-bench-", dir=args.dir)
    try:
        print(f"creating {n_big} x 100 MiB + {n_small} x 4 KiB in {tmp} ...", file=sys.stderr)
        total = make_tree(tmp, n_big, n_small)
        warm(tmp)
        subsets = {"big": os.path.join(tmp, "big"), "small": os.path.join(tmp, "small"), "all": tmp}
        n_files = {p: len(cx.list_files(p)) for p in subsets.values()}  # counted outside the timing
        sizes = {"big": n_big * 100 * MiB, "small": n_small * 4096, "all": total}

        import checksumdir

        ref = checksumdir.dirhash(tmp, "sha512")
        assert cx.checksum(tmp) == ref, "cax sha512 differs from checksumdir"

        methods = [("cax sha512", lambda p: cx.checksum(p, "sha512")),
                   ("cax sha512 workers=1", lambda p: cx.checksum(p, "sha512", workers=1))]
        for alg in ("adler32", "xxh3", "blake3"):
            if cx.is_supported(alg):
                methods.append((f"cax {alg}", lambda p, a=alg: cx.checksum(p, a)))
        methods += [("sha512sum (1 process)", sha512sum_single),
                    (f"find | xargs -P{cores} -n<N/{4 * cores}> sha512sum",
                     lambda p: sha512sum_xargs(p, cores, xargs_batch(n_files[p], cores))),
                    ("checksumdir.dirhash sha512", lambda p: checksumdir.dirhash(p, "sha512"))]

        print("measuring openssl speed ...", file=sys.stderr)
        limit1 = max(openssl_limit() for _ in range(2))
        limit = limit1 * cores

        load_before = os.getloadavg()[0]
        results = {}
        # Rounds interleave the methods, so a burst of foreign load does not hit one method only.
        for r in range(args.repeat):
            for name, fn in methods:
                if name.startswith("checksumdir") and r and not args.quick:
                    continue  # slow and single-threaded: one run is enough
                for key in ("big", "small"):
                    t = best_of(lambda: fn(subsets[key]), 1)
                    results[(name, key)] = min(results.get((name, key), t), t)
                    print(f"  round {r} {name:34s} {key:5s} {t:8.3f} s", file=sys.stderr)
        load_after = os.getloadavg()[0]

        single = {k: results[("sha512sum (1 process)", k)] for k in ("big", "small")}
        cdir = {k: results[("checksumdir.dirhash sha512", k)] for k in ("big", "small")}

        print()
        print(f"Machine: {cores} cores; openssl speed -evp sha512 (1 MiB blocks): {limit1:.0f} MB/s per core, "
              f"limit x {cores} cores = {limit:.0f} MB/s. Best of {args.repeat} runs, page cache warm. "
              f"Load average before/after: {load_before:.2f}/{load_after:.2f}.")
        print(f"Data: big = {n_big} x 100 MiB ({sizes['big'] / 1e6:.0f} MB), "
              f"small = {n_small} x 4 KiB ({sizes['small'] / 1e6:.0f} MB). MB = 10^6 bytes.")
        print()
        hdr = ["method", "big s", "big MB/s", "big vs sha512sum", "big vs openssl limit", "big vs checksumdir",
               "small s", "small MB/s", "small vs sha512sum", "small vs checksumdir"]
        rows = []
        for name, _ in methods:
            b, s = results[(name, "big")], results[(name, "small")]
            rows.append([name, f"{b:.2f}", f"{sizes['big'] / b / 1e6:.0f}", f"{single['big'] / b:.2f}x",
                         f"{sizes['big'] / b / 1e6 / limit * 100:.0f} %", f"{cdir['big'] / b:.2f}x",
                         f"{s:.3f}", f"{sizes['small'] / s / 1e6:.0f}", f"{single['small'] / s:.2f}x",
                         f"{cdir['small'] / s:.2f}x"])
        widths = [max(len(r[i]) for r in rows + [hdr]) for i in range(len(hdr))]
        sep = "  ".join("=" * w for w in widths)
        print(sep)
        print("  ".join(h.ljust(w) for h, w in zip(hdr, widths)))
        print(sep)
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        print(sep)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
