"""The loop: each pass runs the site's tasks in order; between passes it sleeps ``interval``.

SIGTERM/SIGINT set a stop flag that every task and transfer polls: the current step ends (a copy in
flight is stopped and recorded ``error: interrupted``, its partial file removed) and cax exits 0.
A Runs DB lost mid-pass ends the pass at once with one log line: ``--once`` then exits 1, the daemon
probes the Runs DB with a growing delay (capped at ``interval``) and resumes when it answers.
An advisory lock per (config, host) keeps a second daemon for the same site off this machine.
SIGHUP reopens the log files and re-reads the config between passes (as nginx or sshd do): a new
config that does not load is refused in one line and the old one kept.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import signal
import tempfile
import threading
import time

from cax import logs, metrics
from cax.heartbeat import Heartbeat
from cax.pass_report import PassReport
from cax.runsdb import RunsDBLost
from cax.tasks import task_class
from cax.tasks.base import Context
from cax.transfer.pool import ConnectionPool
from cax.wakeup import Waker

log = logging.getLogger("cax.daemon")


class AlreadyRunning(Exception):
    pass


class SiteLock:
    """``flock`` on a file named after the config path and host; released when the process dies."""

    def __init__(self, config, host: str, scope: str = ""):
        # a pass narrowed to one run (--run/--name, as massive-cax jobs run) locks only that run,
        # so a reprocessing campaign can run many jobs on one host beside the site's daemon
        ident = hashlib.sha1(f"{config.path}\0{host}\0{scope}".encode()).hexdigest()[:16]
        lock_dir = config.lock_dir or os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
        self.path = os.path.join(lock_dir, f"cax-{host}-{ident}.lock")
        self.description = f"site {host!r} with config {config.path}" + (
            f" ({scope})" if scope else "")
        self.fd = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise AlreadyRunning(f"another cax (pid {other}) is already running for "
                                 f"{self.description} (lock {self.path})")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def build_tasks(ctx: Context) -> list:
    tasks = []
    for name in ctx.config.tasks_for(ctx.host):
        cls = task_class(name)
        if cls is None:
            log.debug("task %s is not available in this version of cax; skipped", name)
            continue
        tasks.append(cls)
    return tasks


def run_pass(ctx: Context) -> dict:
    """One pass of every task; returns {task name: runs looked at}."""
    stats = {}
    ctx.said.clear()
    ctx.report = PassReport()
    ctx.connections = ConnectionPool(cancel=ctx.stop.is_set)
    try:
        for cls in build_tasks(ctx):
            if ctx.stop.is_set():
                break
            task = cls(ctx)
            started = time.monotonic()
            try:
                stats[task.name] = task.go()
            except RunsDBLost:
                raise  # every later task would fail the same way, each after a timeout
            except Exception as e:  # a broken task must not stop the others
                log.error("task=%s site=%s failed: %s: %s", task.name, ctx.host,
                          type(e).__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))
                ctx.report.failed("task", f"task {task.name}: {type(e).__name__}: {e}")
                stats[task.name] = -1
            log.debug("task=%s site=%s done in %.2f s", task.name, ctx.host,
                      time.monotonic() - started)
    finally:
        pool, ctx.connections = ctx.connections, None
        ctx.report.could_not_reach(pool.unreachable())
        pool.close()
    return stats


class Signals:
    """What the signal handlers asked for; ``wake`` ends the wait between passes for both."""

    def __init__(self, stop: threading.Event):
        self.stop = stop
        self.wake = threading.Event()
        self.reload = False


def install_signal_handlers(stop: threading.Event) -> Signals:
    signals = Signals(stop)

    def handler(signum, _frame):
        log.warning("site=- received %s: finishing the current step, then stopping",
                    signal.Signals(signum).name)
        stop.set()
        signals.wake.set()

    def hangup(_signum, _frame):
        signals.reload = True
        signals.wake.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGHUP, hangup)
    return signals


def apply_reload(ctx: Context, reload):
    """SIGHUP: reopen the log files, then swap in the config from ``reload()`` (``(config,
    interval)``; it raises with a one-line reason when the new file is refused, and the old
    config stays). Returns the new interval, or None when nothing was swapped."""
    logs.reopen()
    if reload is None:
        log.info("site=%s SIGHUP: log reopened", ctx.host)
        return None
    try:
        config, interval = reload()
    except Exception as e:  # any refusal keeps the running config: a typo must not stop a site
        log.error("site=%s SIGHUP: new config refused, keeping the old one: %s", ctx.host, e)
        return None
    ctx.config = config
    log.info("site=%s SIGHUP: log reopened, config %s re-read (interval %g s, tasks %s)",
             ctx.host, config.path, interval, ",".join(config.tasks_for(ctx.host)))
    return interval


#: first delay between probes of a lost Runs DB; it doubles up to the daemon's ``interval``
FIRST_PROBE = 1.0


def wait_for_runs_db(ctx: Context, interval: float) -> bool:
    """Probe the lost Runs DB until it answers (True) or a stop is requested (False).

    The delay doubles from FIRST_PROBE up to ``interval`` (at least FIRST_PROBE): a DB back in
    seconds costs seconds, one down for hours costs one probe per ``interval``, as a pass would.
    The loss was logged once when the pass stopped; probes that fail again are not repeated.
    """
    delay, lost_since = FIRST_PROBE, time.monotonic()
    while not ctx.stop.wait(delay):
        try:
            ctx.db.ping()
        except RunsDBLost as e:
            log.debug("site=%s %s; next probe in %.0f s", ctx.host, e, delay)
            delay = min(delay * 2, max(interval, FIRST_PROBE))
            continue
        log.info("site=%s Runs DB %s back after %.0f s; resuming", ctx.host, ctx.db.description,
                 time.monotonic() - lost_since)
        return True
    return False


#: exit status of ``cax --once``: the pass did everything it could / the Runs DB was lost /
#: a copy failed or a site it needed did not answer (cron tells them apart)
EXIT_OK, EXIT_RUNS_DB, EXIT_INCOMPLETE = 0, 1, 3


def run_loop(ctx: Context, *, once: bool, interval: float, reload=None) -> int:
    """Passes until stopped (or one pass with ``once``); returns the exit status (EXIT_*: for a
    daemon only EXIT_OK). ``reload()`` returns the config re-read on SIGHUP as ``(config,
    interval)``."""
    signals = install_signal_handlers(ctx.stop)
    waker = None
    n = 0
    code = EXIT_OK
    beat = None
    while not ctx.stop.is_set():
        if signals.reload:
            signals.reload = False
            new_interval = apply_reload(ctx, reload)
            interval = interval if new_interval is None else new_interval
        n += 1
        log.info("site=%s pass %d start", ctx.host, n, extra=logs.ROUTINE)
        try:
            if beat is None:
                beat = Heartbeat(ctx.db, ctx.host, interval, once)
            beat.begin(interval)
            queries = ctx.db.queries
            stats = run_pass(ctx)
            beat.end(ctx.report)
            if ctx.site.metrics_file and not ctx.dry_run:  # the pass as the heartbeat timed it
                metrics.write(ctx.site.metrics_file, ctx.host, ctx.report,
                              seconds=beat.doc["pass_seconds"],
                              queries=ctx.db.queries - queries,
                              stuck=metrics.stuck_datums(ctx.db, ctx.host),
                              complete=ctx.report.complete)
        except RunsDBLost as e:
            log.error("site=%s pass %d stopped: %s", ctx.host, n, e)
            if once:
                code = EXIT_RUNS_DB
                break
            if waker is not None:  # its change stream died with the server
                waker.close()
                waker = None
            wait_for_runs_db(ctx, interval)
            continue
        log.info("site=%s pass %d end (%s queries so far; runs looked at: %s)", ctx.host, n,
                 ctx.db.queries, ", ".join(f"{k}={v}" for k, v in stats.items()) or "none",
                 extra=logs.ROUTINE)
        logs.end_of_pass()
        if once:
            if not ctx.report.complete:
                code = EXIT_INCOMPLETE
                log.warning("site=%s pass incomplete: %s", ctx.host, describe(ctx.report))
            break
        if waker is None:
            waker = Waker(ctx.db.collection, getattr(ctx.config, "wake_on_change", False))
        if not signals.reload:  # a SIGHUP during the pass is applied now, not an interval later
            waker.wait(signals.wake, interval)
        signals.wake.clear()
    if waker is not None:
        waker.close()
    if ctx.stop.is_set():
        if beat is not None and not once:
            try:
                beat.stopped()
            except RunsDBLost:
                pass
        log.info("site=%s stopped cleanly", ctx.host)
    return code


def describe(report) -> str:
    parts = [f"{n} {kind}" for kind, n in sorted(report.failures.items())]
    parts += [f"cannot reach {site} ({why})" for site, why in sorted(report.unreachable.items())]
    return "; ".join(parts) or "complete"
