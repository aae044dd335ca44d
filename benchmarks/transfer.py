#!/usr/bin/env python3
"""Throughput of cax's SSH transfer methods against OpenSSH's own tools, over a private sshd.

Run from the repository root:  python benchmarks/transfer.py [--quick] [--repeat N] [--only NAME]

Grid storage (issue 14): cax's gfal method against ``xrdcp`` (push, pull) and a third-party copy
between two private XRootD servers (tests/xrootd.py) against the same copy streamed through this
host, in the same run (``--only xrdcp --only gfal ...`` for those alone).

Starts its own sshd on 127.0.0.1 (tests/sshd.py), makes three data sets (one large file, 200 x
5 MiB files, 5,000 x 4 KiB files; --quick: 256 MiB, 20 x 5 MiB, 500 x 4 KiB), and copies each one
with cax's scp, sftp and rsync methods (put = push, get = pull; a fresh method object per copy, so
connection set-up is included, as it is for the OpenSSH tools) and with OpenSSH ``scp -r`` and
``rsync -a``. OpenSSH tools get ``-c aes128-gcm@openssh.com`` (their fastest cipher here, and the
one cax prefers), so the ratios are not flattered. Prints seconds, MB/s (10^6 bytes) and the ratio
to the fastest OpenSSH tool for the same data and direction (best of --repeat runs).
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cax.transfer import method_class  # noqa: E402
from tests.sshd import SshServer  # noqa: E402

MiB = 1 << 20
CIPHER = "aes128-gcm@openssh.com"


def make_data(base: str, quick: bool) -> dict:
    sets = {}
    os.makedirs(base, exist_ok=True)
    big_n = 256 if quick else 1024
    big = os.path.join(base, f"file_{big_n}MiB.bin")
    with open(big, "wb") as f:
        for _ in range(big_n // 8):
            f.write(os.urandom(8 * MiB))
    sets[f"1 x {big_n} MiB file"] = big
    for count, size, label in ((20 if quick else 200, 5 * MiB, "5 MiB"),
                               (500 if quick else 5000, 4096, "4 KiB")):
        d = os.path.join(base, f"dir_{count}x{size}")
        os.makedirs(d)
        blob = os.urandom(size * min(count, 50))
        for i in range(count):
            with open(os.path.join(d, f"f{i:05d}.bin"), "wb") as f:
                j = i % 50
                f.write(blob[j * size:(j + 1) * size] if size > 4096 else os.urandom(size))
        sets[f"{count} x {label} files"] = d
    return sets


def nbytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(r, f)) for r, _d, fs in os.walk(path) for f in fs)


def remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def ssh_opts(s: SshServer) -> list:
    return ["-i", s.key_file, "-o", f"UserKnownHostsFile={s.known_hosts}",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-c", CIPHER]


def openssh(tool: str, s: SshServer, src: str, dst: str, push: bool) -> None:
    remote = lambda p: f"{s.user}@{s.host}:{p}"  # noqa: E731
    isdir = os.path.isdir(src)  # same host: the pull source is visible locally too
    if tool == "OpenSSH scp":
        cmd = ["scp", "-q", "-r", "-P", str(s.port), *ssh_opts(s),
               src if push else remote(src), remote(dst) if push else dst]
    else:
        rsh = " ".join(["ssh", "-p", str(s.port), *ssh_opts(s)])
        a = src.rstrip("/") + ("/" if isdir else "")
        b = dst.rstrip("/") + ("/" if isdir else "")
        cmd = ["rsync", "-a", "-e", rsh, a if push else remote(a), remote(b) if push else b]
    subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL)


def run_cax(method: str, site, src: str, dst: str, push: bool) -> None:
    import dataclasses
    with method_class(method)(dataclasses.replace(site, method=method)) as m:
        if push:
            m.put(src, dst)
        else:
            m.get(src, dst)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, for development")
    ap.add_argument("--repeat", type=int, default=2, help="runs per measurement (best counts)")
    ap.add_argument("--only", action="append", help="only these tools (e.g. rsync, 'OpenSSH scp')")
    ap.add_argument("--tmp", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                    help="scratch directory (default /dev/shm: measures the transfer, not the "
                         "disk's write-back)")
    args = ap.parse_args()

    base = tempfile.mkdtemp(prefix="cax-bench-", dir=args.tmp)
    server = SshServer(os.path.join(base, "sshd"))
    try:
        server.start()
        site = server.site(root=os.path.join(base, "remote"))
        remote_dir = site.dirs["raw"]
        local_dir = os.path.join(base, "pulled")
        os.makedirs(local_dir)
        t = time.time()
        sets = make_data(os.path.join(base, "data"), args.quick)
        print(f"# data made in {time.time() - t:.1f} s under {base}", flush=True)
        tools = ["OpenSSH scp", "OpenSSH rsync", "scp", "sftp", "rsync"]
        if args.only:
            tools = [x for x in tools if x in args.only]
        rows = []
        for label, src in sets.items():
            size = nbytes(src)
            # the pull source: a plain local copy in the "remote" directory
            pull_src = os.path.join(remote_dir, "pull_src")
            remove(pull_src)
            (shutil.copytree if os.path.isdir(src) else shutil.copyfile)(src, pull_src)
            for push in (True, False):
                for tool in tools:
                    best = None
                    for _ in range(args.repeat):
                        dst = os.path.join(remote_dir if push else local_dir, "copy")
                        remove(dst)
                        os.sync()  # no write-back of the previous copy during this one
                        t0 = time.perf_counter()
                        if tool.startswith("OpenSSH"):
                            openssh(tool, server, src if push else pull_src, dst, push)
                        else:
                            run_cax(tool, site, src if push else pull_src, dst, push)
                        dt = time.perf_counter() - t0
                        got = nbytes(dst)
                        if got != size:
                            raise SystemExit(f"{tool} {label}: copied {got} of {size} bytes")
                        best = dt if best is None else min(best, dt)
                        remove(dst)
                    rows.append((label, "push" if push else "pull", tool, best, size))
                    print(f"# {label:22s} {'push' if push else 'pull'} {tool:14s} {best:7.2f} s "
                          f"{size / best / 1e6:8.1f} MB/s", flush=True)
        rows += grid_rows(base, sets, args.repeat, args.only)
        print_table(rows)
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


# ---------------------------------------------------------------------- grid storage (issue 14)
GRID_TOOLS = ["xrdcp", "gfal", "xrdcp --tpc", "gfal third-party", "gfal streamed"]


def grid_rows(base: str, sets: dict, repeat: int, only) -> list:
    """cax's gfal method against ``xrdcp`` (push and pull) and a third-party copy between two
    private XRootD servers against the same copy streamed through this host, on the same data
    in the same run. Rows as :func:`print_table` takes them; the reference of each is named in
    the tool (``xrdcp`` for gfal, ``gfal streamed`` for the third-party copy)."""
    from cax.transfer import policy
    from tests.xrootd import XrootdServer
    tools = [t for t in GRID_TOOLS if not only or t in only]
    if not tools:
        return []
    os.chmod(base, 0o755)  # the xrootd user reaches its servers' data below
    a = XrootdServer(os.path.join(base, "xrootd-a"), "a").start()
    b = XrootdServer(os.path.join(base, "xrootd-b"), "b").start()
    rows = []
    try:
        sa, sb = a.site(name="grid-a"), b.site(name="grid-b")
        local_dir = os.path.join(base, "grid-pulled")
        os.makedirs(local_dir)
        gfal = method_class("gfal")
        for label, src in sets.items():
            size = nbytes(src)
            pull_src = os.path.join(sa.dirs["raw"], "pull_src")
            with gfal(sa) as m:
                m.remove(pull_src)
                policy.put(m, src, pull_src)
            many = os.path.isdir(src) and len(os.listdir(src)) > 50
            for direction, tool in [("push", "xrdcp"), ("push", "gfal"), ("pull", "xrdcp"),
                                    ("pull", "gfal"), ("A->B", "xrdcp --tpc"),
                                    ("A->B", "gfal third-party"), ("A->B", "gfal streamed")]:
                if tool not in tools or (direction == "A->B" and many):
                    continue  # a TPC costs ~2 s of XRootD's own polling per file
                best = None
                for _ in range(repeat):
                    if direction == "push":
                        dst, where = os.path.join(sa.dirs["raw"], "copy"), sa
                    elif direction == "pull":
                        dst, where = os.path.join(local_dir, "copy"), None
                    else:
                        dst, where = os.path.join(sb.dirs["raw"], "copy"), sb
                    remove(dst)
                    if tool.startswith("xrdcp") and os.path.isdir(src):
                        os.makedirs(dst)  # xrdcp -r copies into an existing directory
                    os.sync()
                    t0 = time.perf_counter()
                    if tool.startswith("xrdcp"):
                        argv = ["xrdcp", "--nopbar", "--cksum", "adler32"]
                        if os.path.isdir(src):
                            argv.append("-r")
                        if tool == "xrdcp --tpc":
                            argv[1:1] = ["--tpc", "only"]
                        s_url = src if direction == "push" else a.url + pull_src
                        d_url = (a.url + dst if direction == "push" else
                                 dst if direction == "pull" else b.url + dst)
                        subprocess.run(argv + [s_url, d_url], check=True,
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
                    elif direction == "push":
                        with gfal(sa) as m:
                            policy.put(m, src, dst)
                    elif direction == "pull":
                        with gfal(sa) as m:
                            policy.get(m, pull_src, dst)
                    else:
                        with gfal(sa) as ma, gfal(sb) as mb:
                            if tool == "gfal streamed":
                                mb.accepts_third_party = lambda _src: False
                            how = policy.copy_between(mb, ma, pull_src, dst,
                                                      ma.tree(pull_src), scratch=base)
                            assert how.startswith(tool.split()[1][:6]), how
                    dt = time.perf_counter() - t0
                    got = nbytes(dst)
                    if got != size:
                        raise SystemExit(f"{tool} {label}: copied {got} of {size} bytes")
                    best = dt if best is None else min(best, dt)
                    remove(dst)
                rows.append((label, direction, tool, best, size))
                print(f"# {label:22s} {direction} {tool:16s} {best:7.2f} s "
                      f"{size / best / 1e6:8.1f} MB/s", flush=True)
    finally:
        a.stop()
        b.stop()
    return rows


def reference_time(rows, label, direction, tool):
    """The time a row is compared with: the best OpenSSH tool (SSH methods), ``xrdcp`` (the
    gfal method), the streamed copy (third-party copies)."""
    if direction == "A->B":
        want = ("gfal streamed",)
    elif tool in GRID_TOOLS:
        want = ("xrdcp",)
    else:
        want = None
    return min((r[3] for r in rows if r[0] == label and r[1] == direction
                and (r[2] in want if want else r[2].startswith("OpenSSH"))), default=None)


def print_table(rows) -> None:
    print()
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, {platform.platform()}; "
          f"client and sshd on the same host (loopback)")
    head = ("data", "dir", "tool", "seconds", "MB/s", "vs reference")
    lines = []
    for label, direction, tool, dt, size in rows:
        ref = reference_time(rows, label, direction, tool)
        ratio = f"{ref / dt:.2f}" if ref else "-"
        lines.append((label, direction, tool, f"{dt:.2f}", f"{size / dt / 1e6:.1f}", ratio))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    sep = "  ".join("=" * w for w in widths)
    print(sep)
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    print(sep)
    for line in lines:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)))
    print(sep)


if __name__ == "__main__":
    sys.exit(main())
