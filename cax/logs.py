"""Logging setup: one line per event, to stderr and optionally a file.

Timestamps are UTC with an explicit offset, so lines from sites in different time zones (and a
Runs DB that stores UTC) can be read side by side. ``--log-format json`` writes one JSON object
per event for log shippers; the ``run=``/``task=``/``site=``/``datum=`` words every event starts
with become fields. A log file survives logrotate: the handler notices that its file was moved
and reopens the name (and SIGHUP reopens it explicitly). Under cron an idle ``--once`` must not
mail anyone: ``routine`` events (start, pass start and end) are held back and only written when
something else is logged in the same pass.
"""
from __future__ import annotations

import json
import logging
import logging.handlers
import re
import sys
from datetime import datetime, timezone


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
FORMATS = ("text", "json")
#: ``extra=ROUTINE`` marks an event that says only that cax is alive (see module docstring)
ROUTINE = {"routine": True}


def _utc(record) -> str:
    t = datetime.fromtimestamp(record.created, timezone.utc)
    return t.isoformat(timespec="milliseconds")


class TextFormatter(logging.Formatter):
    def formatTime(self, record, datefmt=None) -> str:
        return _utc(record)


#: the event's context words, as Task.log and the daemon write them at the start of a message
_WORD = re.compile(r"(run|task|site|datum)=(\S+)\s*")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, the context words as fields, the rest as
    ``message``; an exception's traceback as ``exc``."""

    def format(self, record) -> str:
        message = record.getMessage()
        out = {"time": _utc(record), "level": record.levelname, "logger": record.name}
        pos = 0
        while (m := _WORD.match(message, pos)) is not None:
            out[m.group(1)] = m.group(2)
            pos = m.end()
        out["message"] = message[pos:]
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class QuietUnlessBusy(logging.Filter):
    """Holds ``routine`` records until a non-routine one passes, then lets the held ones out
    first (in order); ``drop()`` forgets what is held at the end of an idle pass."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level
        self.held: list = []
        self.busy = False

    def filter(self, record) -> bool:
        if getattr(record, "routine", False) and not self.busy:
            self.held.append(record)
            return False
        if record.levelno >= self.level and not getattr(record, "routine", False):
            self.busy = True
            held, self.held = self.held, []
            for h in held:  # the held lines go out before this one, through the same handlers
                for handler in logging.getLogger().handlers:
                    if h.levelno >= handler.level:
                        handler.handle(h)
        return True

    def drop(self) -> None:
        self.held = []
        self.busy = False


_quiet: QuietUnlessBusy | None = None


def setup(level: str = "INFO", log_file=None, fmt: str = "text", quiet_when_idle: bool = False
          ) -> None:
    """``quiet_when_idle``: hold routine lines back (``--once`` without a terminal, as cron
    runs it)."""
    global _quiet
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    for f in list(root.filters):
        root.removeFilter(f)
    handlers = [logging.StreamHandler(sys.stderr)]
    if log_file:
        # WatchedFileHandler reopens the name when logrotate has moved the file away
        handlers.append(logging.handlers.WatchedFileHandler(log_file))
    formatter = JsonFormatter() if fmt == "json" else TextFormatter(FORMAT)
    numeric = getattr(logging, level.upper())
    _quiet = QuietUnlessBusy(numeric) if quiet_when_idle else None
    for h in handlers:
        h.setFormatter(formatter)
        if _quiet is not None:
            h.addFilter(_quiet)
        root.addHandler(h)
    root.setLevel(numeric)
    # paramiko logs every channel event at INFO; keep the daemon's log about data
    logging.getLogger("paramiko").setLevel(logging.WARNING)


def end_of_pass() -> None:
    """Forget the routine lines of a pass in which nothing else was logged."""
    if _quiet is not None:
        _quiet.drop()


def reopen() -> None:
    """Reopen every log file (SIGHUP): a rotation by copy-and-truncate or by a tool that does not
    move the file is seen at once, not at the next write."""
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            h.acquire()
            try:
                if h.stream is not None:
                    h.stream.close()
                h.stream = h._open()
            finally:
                h.release()
