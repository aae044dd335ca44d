"""Daemon heartbeats: one document per (site, machine) in the Runs DB, written at the start and
end of every pass.

Datums say what happened to each copy; nothing said whether a site's daemon is alive, how long
its passes take, or that it has been failing to reach another site for a day. Every site can
read the Runs DB, so the daemons publish that there (a ``daemons`` collection beside the runs)
and ``cax status`` shows it everywhere: a daemon silent for more than three of its intervals, and
a site the others cannot reach, are flagged.
"""
from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta
from typing import Optional

from cax import __version__
from cax.runsdb import RunsDBLost
from cax.runsdb.clock import as_utc, now

log = logging.getLogger("cax.heartbeat")

#: a daemon is silent when its last pass ended longer ago than this many of its intervals
SILENT_AFTER = 3


def machine() -> str:
    return socket.gethostname()


class Heartbeat:
    """The heartbeat document of this daemon; ``begin``/``end`` around each pass."""

    def __init__(self, db, site: str, interval: float, once: bool):
        self.db = db
        self.doc = {"_id": f"{site}@{machine()}", "site": site, "machine": machine(),
                    "version": __version__, "pid": os.getpid(), "started": now(),
                    "interval": interval, "once": once, "pass": 0, "state": "starting",
                    "unreachable": {}, "last_error": None}
        self._warned = False
        old = self._previous()
        if old:  # "since when" outlives a restart, and --once from cron restarts every pass
            self.doc["unreachable"] = old.get("unreachable") or {}
            self.doc["last_error"] = old.get("last_error")
            self.doc["pass"] = old.get("pass") or 0

    def _previous(self) -> Optional[dict]:
        try:
            return next((d for d in self.db.heartbeats() if d.get("_id") == self.doc["_id"]),
                        None)
        except RunsDBLost:
            raise
        except Exception as e:
            self._warn(e)
            return None

    def _warn(self, e) -> None:
        if not self._warned:  # e.g. a Runs DB account without rights on the daemons collection
            log.warning("site=%s heartbeat not written (%s: %s); the daemon goes on without",
                        self.doc["site"], type(e).__name__, e)
            self._warned = True

    def _publish(self) -> None:
        try:
            self.db.beat(dict(self.doc))
        except RunsDBLost:
            raise
        except Exception as e:
            self._warn(e)

    def begin(self, interval: float) -> None:
        self.doc.update({"pass": self.doc["pass"] + 1, "pass_start": now(), "state": "in pass",
                         "interval": interval})
        self._publish()

    def end(self, report) -> None:
        t = now()
        unreachable = {}
        for site, reason in report.unreachable.items():
            old = self.doc["unreachable"].get(site) or {}
            unreachable[site] = {"since": old.get("since") or t, "reason": reason}
        self.doc.update({
            "pass_end": t, "state": "idle",
            "pass_seconds": round((t - self.doc["pass_start"]).total_seconds(), 3),
            "copies": report.total_copies, "bytes": report.total_bytes,
            "failures": dict(report.failures), "retries": report.retries,
            "unreachable": unreachable,
        })
        if report.last_error:
            self.doc["last_error"] = {"time": t, "text": report.last_error}
        self._publish()

    def stopped(self) -> None:
        self.doc["state"] = "stopped"
        self._publish()


def silent(doc: dict, at=None) -> Optional[str]:
    """Why a daemon looks dead (None when it does not): its last pass ended (or, failing that,
    started) more than SILENT_AFTER intervals ago. A daemon stopped on purpose is not silent."""
    if doc.get("state") == "stopped":
        return None
    last = as_utc(doc.get("pass_end") or doc.get("pass_start") or doc.get("started"))
    interval = doc.get("interval")
    if last is None or not isinstance(interval, (int, float)):
        return None
    age = (at or now()) - last
    allowed = timedelta(seconds=max(float(interval), 1.0) * SILENT_AFTER)
    if age > allowed:
        return f"silent for {int(age.total_seconds())} s (more than {SILENT_AFTER} x its " \
               f"{interval:g} s interval)"
    return None


def unreachable_sites(docs: list) -> dict:
    """site -> [(daemon id, since, reason)] for every site some daemon could not reach."""
    out: dict = {}
    for d in docs:
        for site, what in (d.get("unreachable") or {}).items():
            if isinstance(what, dict):
                out.setdefault(site, []).append((d.get("_id"), as_utc(what.get("since")),
                                                 what.get("reason")))
    return out


def _when(t) -> str:
    t = as_utc(t)
    return t.strftime("%Y-%m-%d %H:%M:%SZ") if t else "-"


def lines(docs: list, at=None) -> list:
    """The daemons part of ``cax status``: one line per daemon, then one per site that some
    daemon cannot reach; problems first in each line so a shifter sees them."""
    from cax.logs import printable
    out = []
    for d in sorted(docs, key=lambda d: str(d.get("_id"))):
        flags = []
        why = silent(d, at)
        if why:
            flags.append(f"SILENT: {why}")
        if d.get("state") == "stopped":
            flags.append("stopped")
        failures = d.get("failures") or {}
        if failures:
            flags.append("failures " + ", ".join(f"{k}={v}" for k, v in sorted(failures.items())))
        seconds = d.get("pass_seconds")
        summary = (f"pass {d.get('pass')} ended {_when(d.get('pass_end'))}"
                   + (f" in {seconds:.1f} s" if isinstance(seconds, (int, float)) else "")
                   + f", {d.get('copies') or 0} copies, {d.get('bytes') or 0} bytes")
        out.append(printable(f"daemon {d.get('_id')} (cax {d.get('version')}, pid {d.get('pid')}"
                             f", every {d.get('interval')} s): "
                             + "; ".join(flags + [summary])))
    for site, seen in sorted(unreachable_sites(docs).items()):
        by = ", ".join(f"{who} since {_when(since)}" for who, since, _ in seen)
        reason = seen[0][2]
        out.append(printable(f"site {site}: UNREACHABLE from {by} ({reason})"))
    return out
