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
    ap.add_argument("--whole-process", action="store_true",
                    help="embedded store, each pass one 'cax --once' process (as cron runs it): "
                         "idle at each site, 1%% to copy (dry run), a pass marking up to 10,000 "
                         "datums, and 'cax runs add' of N runs")
    ap.add_argument("--runs-add", default="100000",
                    help="with --whole-process: sizes at which to time 'cax runs add'")
    args = ap.parse_args(argv)
    if args.child:
        child(args.child)
        return
    if args.whole_process:
        sizes = [int(s) for s in (args.sizes or ("1000,10000" if args.quick
                                                 else "10000,100000")).split(",")]
        return whole_main(sizes, {int(s) for s in args.runs_add.split(",") if s})
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



# -- whole processes: ``cax --once`` as cron runs it ------------------------------------------------

def _cax(*args, cwd=None) -> dict:
    """One ``cax`` process: wall seconds and peak RSS (``wait4``'s ru_maxrss of that child)."""
    exe = os.path.join(os.path.dirname(sys.executable), "cax")
    t = time.perf_counter()
    proc = subprocess.Popen([exe, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            cwd=cwd, env=dict(os.environ, PYTHONPATH=REPO))
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t
    if proc.returncode not in (0,):
        raise RuntimeError(f"cax {' '.join(args)} exited {proc.returncode}: {err[-1500:]!r}")
    return {"s": seconds, "mib": usage.ru_maxrss / 1024}


def _runs_json(n: int, root: str) -> str:
    """``n`` runs as ``cax runs add`` reads them (one raw copy at daq each)."""
    path = os.path.join(root, f"runs-{n}.json")
    with open(path, "w") as f:
        f.write("[")
        for i in range(n):
            name = f"r{i:07d}"
            f.write(("," if i else "") + json.dumps({
                "number": i, "name": name, "detector": "tpc",
                "start": f"2016-03-15T00:00:00+00:00",
                "data": [{"host": "daq", "type": "raw", "status": "transferred",
                          "location": os.path.join(root, "daq", "raw", name),
                          "checksum": f"{i:0128x}"}]}))
        f.write("]")
    return path


def whole(n: int, runs_add: bool) -> dict:
    """Idle passes at each site, a 1 % dry-run pass, a pass marking 1 % ... 10,000 datums
    (CompareChecksums at archive, each datum its own durable transaction), as processes."""
    from cax.runsdb.embedded import open_collection

    root = tempfile.mkdtemp(prefix=f"cax-once-{n}-")
    try:
        config, db, build_s = loop.build("embedded", n, root)
        db.collection._client.close()
        cfg = os.path.join(root, "cax.json")
        row = {"n": n, "build_s": build_s}
        for host in loop.HOSTS:
            row[f"idle_{host}"] = _cax("--config", cfg, "--once", "--host", host)
        coll = open_collection(os.path.join(root, "runs.sqlite"))
        lacking = list(range(0, n, 100))
        for i in range(0, len(lacking), 10_000):
            coll.update_many({"number": {"$in": lacking[i:i + 10_000]}},
                             {"$pull": {"data": {"host": "archive"}}})
        marks = list(range(1, n, max(1, n // 10_000)))[:10_000]
        for i in range(0, len(marks), 10_000):
            coll.update_many({"number": {"$in": marks[i:i + 10_000]}, "data.host": "archive"},
                             {"$unset": {"data.$.reference_checked": ""}})
        coll.database.client.close()
        row["work_dry"] = _cax("--config", cfg, "--once", "--dry-run", "--host", "archive")
        row["mark"] = _cax("--config", cfg, "--once", "--host", "archive")
        row["marked"] = len(marks)
        check = open_collection(os.path.join(root, "runs.sqlite"))
        left = check.count_documents({"data": {"$elemMatch": {
            "host": "archive", "status": "transferred", "reference_checked": {"$ne": True}}}})
        check.database.client.close()
        if left:
            raise RuntimeError(f"{left} datums left unmarked")
        if runs_add:
            src = _runs_json(n, root)
            os.unlink(os.path.join(root, "runs.sqlite"))
            row["runs_add"] = _cax("--config", cfg, "runs", "add", src)
        return row
    finally:
        shutil.rmtree(root, ignore_errors=True)


def whole_table(rows: list) -> str:
    head = ["N", "idle daq s / MiB", "idle buffer s / MiB", "idle archive s / MiB",
            "1% dry s / MiB", "mark pass s (datums)", "runs add s"]
    lines = []
    for r in rows:
        f = lambda m: f"{m['s']:.2f} / {m['mib']:.0f}"  # noqa: E731
        lines.append([f"{r['n']:,}", f(r["idle_daq"]), f(r["idle_buffer"]), f(r["idle_archive"]),
                      f(r["work_dry"]), f"{r['mark']['s']:.1f} ({r['marked']:,})",
                      f"{r['runs_add']['s']:.1f}" if "runs_add" in r else "-"])
    widths = [max(len(h), *(len(l[k]) for l in lines)) for k, h in enumerate(head)]
    sep = "  ".join("=" * w for w in widths)
    return "\n".join([sep, "  ".join(h.ljust(w) for h, w in zip(head, widths)), sep]
                     + ["  ".join(c.ljust(w) for c, w in zip(l, widths)) for l in lines] + [sep])


def whole_main(sizes, runs_add_sizes) -> list:
    rows = []
    for n in sizes:
        t = time.perf_counter()
        rows.append(whole(n, n in runs_add_sizes))
        print(f"whole-process N={n:,}: {time.perf_counter() - t:.1f} s", file=sys.stderr,
              flush=True)
    print(f"Machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} (shared with "
          f"other work: timings are noisy). Each cell is one 'cax' process: wall seconds / peak "
          f"RSS (ru_maxrss).")
    print(whole_table(rows))
    return rows


if __name__ == "__main__":
    main()
