"""The loop: each pass runs the site's tasks in order; between passes it sleeps ``interval``.

SIGTERM/SIGINT set a stop flag that every task and transfer polls: the current step ends (a copy in
flight is stopped and recorded ``error: interrupted``, its partial file removed) and cax exits 0.
An advisory lock per (config, host) keeps a second daemon for the same site off this machine.
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
    ctx.connections = ConnectionPool(cancel=ctx.stop.is_set)
    try:
        for cls in build_tasks(ctx):
            if ctx.stop.is_set():
                break
            task = cls(ctx)
            started = time.monotonic()
            try:
                stats[task.name] = task.go()
            except Exception as e:  # a broken task must not stop the others
                log.error("task=%s site=%s failed: %s: %s", task.name, ctx.host,
                          type(e).__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))
                stats[task.name] = -1
            log.debug("task=%s site=%s done in %.2f s", task.name, ctx.host,
                      time.monotonic() - started)
    finally:
        pool, ctx.connections = ctx.connections, None
        pool.close()
    return stats


def install_signal_handlers(stop: threading.Event) -> None:
    def handler(signum, _frame):
        log.warning("site=- received %s: finishing the current step, then stopping",
                    signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def run_loop(ctx: Context, *, once: bool, interval: float) -> None:
    install_signal_handlers(ctx.stop)
    waker = None
    n = 0
    while not ctx.stop.is_set():
        n += 1
        log.info("site=%s pass %d start", ctx.host, n)
        stats = run_pass(ctx)
        log.info("site=%s pass %d end (%s queries so far; runs looked at: %s)", ctx.host, n,
                 ctx.db.queries, ", ".join(f"{k}={v}" for k, v in stats.items()) or "none")
        if once:
            break
        if waker is None:
            waker = Waker(ctx.db.collection, getattr(ctx.config, "wake_on_change", False))
        waker.wait(ctx.stop, interval)
    if waker is not None:
        waker.close()
    if ctx.stop.is_set():
        log.info("site=%s stopped cleanly", ctx.host)
