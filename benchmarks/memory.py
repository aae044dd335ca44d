"""Peak memory of a daemon pass (every task, at daq, buffer and archive) over large Runs DBs.

Usage::

    PYTHONPATH=. python benchmarks/memory.py [--quick] [--sizes 1000,10000,100000]
                                             [--backend wire,embedded]

The Runs DB is built by this (parent) process, exactly as in ``benchmarks/loop.py``; the pass then
runs in a fresh Python subprocess per backend and size, which reports its own memory from
``/proc/self/status``: ``VmRSS`` after imports, after ``cax.runsdb.connect`` and the peak
``VmHWM`` over the whole pass (per address space, so nothing of the parent is counted; the
``ru_maxrss`` of ``getrusage`` is printed too). For ``wire`` the server (``secantusd-py``) is a
separate process, so only the client, i.e. cax, is measured. The ``embedded`` store keeps a copy of the
whole collection in memory by design, so its peak grows with N.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import loop  # noqa: E402  (benchmarks/loop.py: documents, config, wire server)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) / 1024  # kB -> MiB
    return out


def child(config_path: str) -> None:
    """The measured process: connect, one pass at each site, report memory as JSON."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    from cax import config as cfgmod
    from cax.daemon import run_pass
    from cax.runsdb import connect
    from cax.tasks.base import Context

    imported = _status()["VmRSS"]
    config = cfgmod.load(config_path)
    t = time.perf_counter()
    db = connect(config)
    connected = _status()["VmRSS"]
    connect_s = time.perf_counter() - t
    t = time.perf_counter()
    looked = 0
    for host in loop.HOSTS:
        stats = run_pass(Context(config=config, host=host, db=db))
        if any(v < 0 for v in stats.values()):
            raise SystemExit(f"a task failed: {stats}")
        looked += sum(stats.values())
    pass_s = time.perf_counter() - t
    st = _status()
    print(json.dumps({"imported": imported, "connected": connected, "peak": st["VmHWM"],
                      "end": st["VmRSS"], "maxrss": resource.getrusage(
                          resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "connect_s": connect_s, "pass_s": pass_s, "runs_looked_at": looked}))


def measure(backend: str, n: int, uri: str | None) -> dict:
    root = tempfile.mkdtemp(prefix=f"cax-mem-{backend}-{n}-")
    try:
        config, db, _ = loop.build(backend, n, root, uri)
        cfg_path = os.path.join(root, "cax.json")
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, os.path.abspath(__file__), "--child", cfg_path]
        if backend == "embedded":
            db.collection._client.close()  # the child opens the file itself
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"child failed: {out.stderr[-2000:]}")
        res = json.loads(out.stdout.strip().splitlines()[-1])
        if backend != "embedded":
            loop.drop(backend, config, db)
        return dict(res, backend=backend, n=n)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def table(rows: list) -> str:
    head = ["backend", "N", "MiB after imports", "MiB after connect", "peak MiB (VmHWM)",
            "peak - imports", "connect s", "pass s", "runs read"]
    lines = [[r["backend"], f"{r['n']:,}", f"{r['imported']:.0f}", f"{r['connected']:.0f}",
              f"{r['peak']:.0f}", f"{r['peak'] - r['imported']:.0f}", f"{r['connect_s']:.1f}",
              f"{r['pass_s']:.1f}", f"{r['runs_looked_at']:,}"] for r in rows]
    widths = [max(len(h), *(len(l[k]) for l in lines)) for k, h in enumerate(head)]
    sep = "  ".join("=" * w for w in widths)
    return "\n".join([sep, "  ".join(h.ljust(w) for h, w in zip(head, widths)), sep]
                     + ["  ".join(c.ljust(w) for c, w in zip(l, widths)) for l in lines] + [sep])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="sizes 1000,5000")
    ap.add_argument("--sizes", help="comma-separated run counts (default 1000,10000,100000)")
    ap.add_argument("--backend", default="wire,embedded", help="comma-separated: wire,embedded")
    ap.add_argument("--child", metavar="CONFIG", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child)
        return
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up the server on SIGTERM
    sizes = [int(s) for s in (args.sizes or ("1000,5000" if args.quick
                                             else "1000,10000,100000")).split(",")]
    rows = []
    for backend in args.backend.split(","):
        server = None
        try:
            uri = None
            if backend == "wire":
                server = loop.WireServer(tempfile.mkdtemp(prefix="cax-mem-secantus-") + "/data")
                uri = server.uri
            for n in sizes:
                t = time.perf_counter()
                rows.append(measure(backend, n, uri))
                print(f"{backend} N={n:,}: {time.perf_counter() - t:.1f} s", file=sys.stderr,
                      flush=True)
        finally:
            if server is not None:
                server.stop()
                shutil.rmtree(os.path.dirname(server.log.name), ignore_errors=True)
    print(f"Machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}. "
          f"Client process only (the wire server runs in its own process).")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
