"""Logging setup: one line per event, to stderr and optionally a file."""
from __future__ import annotations

import logging
import sys


def printable(value) -> str:
    """``value`` as text with control and other non-printable characters escaped (and ``\\``,
    so the escaping is unambiguous): names and reasons come from the Runs DB, and a run named
    with a newline must not split one event into two log lines or forge a second one."""
    s = str(value)
    if s.isprintable() and "\\" not in s:
        return s
    return "".join(c if c.isprintable() and c != "\\" else
                   c.encode("unicode_escape").decode("ascii") for c in s)


FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def setup(level: str = "INFO", log_file=None) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handlers = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file))
    fmt = logging.Formatter(FORMAT, "%Y-%m-%dT%H:%M:%S")
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    root.setLevel(getattr(logging, level.upper()))
    # paramiko logs every channel event at INFO; keep the daemon's log about data
    logging.getLogger("paramiko").setLevel(logging.WARNING)
