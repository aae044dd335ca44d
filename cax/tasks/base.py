"""The Task base class: choose candidate runs with one indexed query, act on each, record.

A pass over 100,000 runs must not cost 100,000 queries, so every task states the Mongo query that
selects the runs it may have work on; the base class narrows it by ``--run``/``--name``/
``dataset_list`` and streams the matches. A failure on one run is logged with run, task and site and
never stops the pass: the other runs still move. A lost Runs DB (:class:`cax.runsdb.RunsDBLost`) is
no failure of one run: it ends the task, once the copies it has in flight are done, and the pass.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Optional

from cax.logs import printable
from cax.pass_report import PassReport
from cax.paths import UnsafePath
from cax.runsdb import RunsDB, RunsDBLost, copies, key_str, lifecycle

log = logging.getLogger("cax.task")


@dataclass
class Context:
    """What every task of one pass shares."""

    config: object  # cax.config.Config
    host: str
    db: RunsDB
    dry_run: bool = False
    stop: threading.Event = field(default_factory=threading.Event)
    run_filter: dict = field(default_factory=dict)
    #: the pass's :class:`cax.transfer.pool.ConnectionPool` (set by ``run_pass``)
    connections: Optional[object] = None
    #: what was said once this pass (``run_pass`` empties it): a run whose reference is unknown
    #: is named once per pass, not by every task that skips it
    said: set = field(default_factory=set)
    #: what this pass did (a new one per pass, made by ``run_pass``)
    report: PassReport = field(default_factory=PassReport)

    @property
    def site(self):
        return self.config.site(self.host)


def run_filter(number: Optional[int] = None, name: Optional[str] = None,
               dataset_list: Optional[list] = None, detector: Optional[str] = None) -> dict:
    """The Mongo filter for ``--run``, ``--name``, ``--detector`` and ``dataset_list`` (names or
    numbers)."""
    from cax.runsdb.identity import detector_clause
    clauses = []
    if detector is not None:
        clauses.append(detector_clause(detector))
    if number is not None:
        clauses.append({"number": number})
    if name is not None:
        clauses.append({"name": name})
    if dataset_list:
        names = [d for d in dataset_list if isinstance(d, str)]
        numbers = [d for d in dataset_list if isinstance(d, int)]
        clauses.append({"$or": [{"name": {"$in": names}}, {"number": {"$in": numbers}}]})
    if not clauses:
        return {}
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}


class Task:
    """Subclasses set ``query()`` and override ``each_run`` or ``each_location``."""

    #: fields the task reads; None means the whole document
    projection: Optional[dict] = None
    #: order in which candidate runs are visited
    sort: tuple = (("number", 1),)

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.db = ctx.db
        self.site = ctx.site
        self.host = ctx.host
        self.dry_run = ctx.dry_run
        self.name = type(self).__name__
        self._own_pool = None

    # -- selection --------------------------------------------------------------------------
    def query(self) -> Optional[dict]:
        """Mongo filter of candidate runs; None means the task has nothing to do at this site."""
        return {"data": {"$elemMatch": {"host": self.host}}}

    def candidates(self):
        q = self.query()
        if q is None:
            return []
        if self.ctx.run_filter:
            q = {"$and": [q, self.ctx.run_filter]}
        return self.db.find_runs(q, self.projection, sort=self.sort)

    # -- the pass ---------------------------------------------------------------------------
    def go(self) -> int:
        """Run the task over its candidates; returns how many runs it looked at."""
        n = 0
        try:
            for run in self.candidates():
                if self.ctx.stop.is_set():
                    self.log(logging.INFO, run, "stop requested; ending the pass")
                    break
                n += 1
                try:
                    self.each_run(run)
                except RunsDBLost:
                    raise  # nothing can be recorded for any run: the pass ends
                except UnsafePath as e:
                    self.log(logging.ERROR, run, f"refused: {e}")
                except Exception as e:  # one bad run never stops the others
                    self.log(logging.ERROR, run, f"failed: {type(e).__name__}: {e}",
                             exc_info=log.isEnabledFor(logging.DEBUG))
        finally:
            self._finish()
        return n

    def _finish(self) -> None:
        """``finish`` even when the Runs DB was lost: copies in flight land (and are verified on
        a later pass) rather than being cut off with their connections."""
        try:
            self.finish()
        finally:
            if self._own_pool is not None:
                self._own_pool.close()
                self._own_pool = None

    def each_run(self, run: dict) -> None:
        for datum in list(run.get("data") or []):
            if self.ctx.stop.is_set():
                return
            if isinstance(datum, dict) and datum.get("host") and datum.get("type"):
                self.each_location(run, datum)

    def each_location(self, run: dict, datum: dict) -> None:
        pass

    def finish(self) -> None:
        """Called once after the pass (e.g. to wait for parallel transfers)."""

    # -- helpers ----------------------------------------------------------------------------
    def connections(self):
        """The pass's connection pool: one connection per remote site, whichever task asks."""
        if self.ctx.connections is not None:
            return self.ctx.connections
        if self._own_pool is None:  # a task run on its own, outside run_pass
            from cax.transfer.pool import ConnectionPool
            self._own_pool = ConnectionPool(cancel=self.ctx.stop.is_set)
        return self._own_pool

    def reference(self, run: dict, dtype: str, version=None) -> Optional[dict]:
        """The run's reference checksum, preferring the configured reference sites'."""
        return copies.reference(run, dtype, version, self.ctx.config.reference_sites)

    def expected(self, run: dict, datum: dict) -> Optional[dict]:
        """What ``datum`` (or a copy of it) must hash to (:func:`copies.expected_checksum`)."""
        return copies.expected_checksum(run, datum, self.ctx.config.reference_sites)

    def reference_unknown(self, run: dict, dtype: str, version=None) -> None:
        """Say, once per run and data per pass, at INFO, why no copy of it is verified or made,
        naming the datums involved: such a run would otherwise wait silently for ever."""
        key = (run.get("_id"), dtype, version)
        if key in self.ctx.said:
            return
        line = copies.unknown_reference(run, dtype, version, self.ctx.config.reference_sites)
        if line:
            self.ctx.said.add(key)
            self.log(logging.INFO, run, line)

    def log(self, level: int, run: Optional[dict], msg: str, datum: Optional[dict] = None,
            **kw) -> None:
        name = run.get("name", run.get("number", "?")) if run else "-"
        where = f" datum={key_str(datum)}" if datum and "host" in datum and "type" in datum else ""
        log.log(level, "run=%s task=%s site=%s%s %s", printable(name), self.name, self.host,
                printable(where), printable(msg), **kw)

    def record_error(self, run: dict, key: dict, expected_status, reason: str,
                     kind: str = "failed") -> None:
        """Every failure leaves the Runs DB saying what happened."""
        # a deliberate stop (SIGTERM) is not a fault: it is retried at once on the next pass
        level = logging.WARNING if kind == lifecycle.ErrorKind.INTERRUPTED else logging.ERROR
        self.log(level, run, f"error: {reason}", datum=key)
        if not self.dry_run:  # a dry run previews; its exit status says it ran
            self.ctx.report.failed(str(kind), f"run {printable(run.get('name'))} "
                                              f"{key_str(key)}: {printable(reason)}")
        if not self.db.apply(lifecycle.failed(run["_id"], key, expected_status, reason, kind)) \
                and not self.dry_run:
            self.log(logging.WARNING, run, "could not record the error: datum changed meanwhile",
                     datum=key)
