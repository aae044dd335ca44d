"""Waiting in tests and benchmarks: one poll loop with a deadline, one free TCP port.

Tests never sleep to let something happen: they wait for the condition, with a timeout that
fails the test naming what never happened. Used without pytest too (the benchmarks).
"""
from __future__ import annotations

import socket
import subprocess
import time
from typing import Callable, Optional


class WaitTimeout(TimeoutError, AssertionError):
    """What was waited for did not happen in time: a failed test (an AssertionError), and a
    TimeoutError for the fixtures that turn a server that never came up into a loud skip."""


def wait_for(predicate: Callable[[], object], timeout: float = 30.0, what: str = "condition",
             interval: float = 0.05, diagnose: Optional[Callable[[], str]] = None):
    """Poll ``predicate`` until it returns a truthy value, and return that value.

    After ``timeout`` seconds raise :class:`WaitTimeout` naming ``what`` (and, with
    ``diagnose``, what it returns: the state seen last, a log's tail). An exception raised by
    ``predicate`` ends the wait at once (a server that exited will never listen).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            extra = f"; {diagnose()}" if diagnose is not None else ""
            raise WaitTimeout(f"timed out after {timeout:.0f} s waiting for {what}{extra}")
        time.sleep(interval)  # the polling interval of a wait with a deadline


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now, for a server the test starts."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float,
                  proc: Optional[subprocess.Popen] = None) -> None:
    """Return once ``host:port`` accepts TCP connections; raise if ``proc`` exits first
    (RuntimeError) or after ``timeout`` s (:class:`WaitTimeout`)."""
    def up():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        return listening(host, port)
    wait_for(up, timeout, f"something listening on {host}:{port}")
