"""BufferPurger and PurgeProcessed: free this site's disk without ever losing the last good copy.

Both delete through :mod:`cax.deletion` (the counted copies checked where they live, on the pass's
one connection per remote site; invariant re-checked by the marking update; mark -> remove -> pull),
so two sites purging the same run at once can never both go, and a crash mid-way is
finished by the next pass: any ``deleting`` datum of this host is finished first, at every site
(BufferPurger finishes them even where nothing is purged).
"""
from __future__ import annotations

import logging
from datetime import timedelta

from cax import deletion
from cax.purge_rule import PurgeRule
from cax.runsdb import now
from cax.tasks.base import Task


class _Purge(Task):
    projection = dict(deletion.PROJECTION, start=1)
    sort = (("start", 1), ("number", 1))  # oldest first: a space-driven purge frees old data

    def __init__(self, ctx):
        super().__init__(ctx)
        #: what this site's purge selects, shared with CopyPull (which does not fetch it)
        self.rule = PurgeRule(self.site)
        self.settings = self.site.purge  # None: this site never starts new deletions
        self.min_copies = self.rule.min_copies
        self._disk_full_enough = False
        #: bytes a dry run would have freed so far, per data type: without it a dry run with
        #: min_free_fraction sees the disk as full as ever and lists every candidate
        self._would_free: dict = {}

    # -- selection --------------------------------------------------------------------------
    def finish_clause(self) -> dict:
        return {"data": {"$elemMatch": {"host": self.host, "status": "deleting"}}}

    def new_clause(self):
        raise NotImplementedError

    def query(self):
        """Finish this site's ``deleting`` datums first, then start new deletions.

        Even a site without purge settings asks for its ``deleting`` datums (one indexed query
        per pass): a crashed ``cax rm`` leaves one there, and nothing else would ever finish it,
        so it would stay ``deleting`` (never a good copy, files possibly half removed) for good.
        """
        if self.settings is None:
            return self.finish_clause()
        clauses = [self.finish_clause()]
        new = self.new_clause()
        if new is not None:
            clauses.append(new)
        return clauses[0] if len(clauses) == 1 else {"$or": clauses}


    def wants(self, datum) -> bool:
        raise NotImplementedError

    # -- space ------------------------------------------------------------------------------
    def free_fraction(self, dtype: str) -> float:
        return self.rule.free_fraction(dtype, self._would_free.get(dtype, 0))

    def space_wanted(self, run, dtype) -> bool:
        """With ``min_free_fraction`` set, new deletions happen only while the disk is too full."""
        threshold = self.rule.min_free_fraction
        if not threshold:
            return True
        try:
            frac = self.free_fraction(dtype)
        except OSError as e:
            self.log(logging.ERROR, run, f"cannot read free space of {dtype} directory: {e}; "
                     "not purging")
            return False
        if frac >= threshold:
            self.log(logging.DEBUG, run, f"free space {frac:.1%} >= {threshold:.1%}; not purging")
            return False
        return True

    def old_enough(self, run) -> bool:
        return self.rule.old_enough(run)

    # -- the work ---------------------------------------------------------------------------
    def each_location(self, run, datum):
        if datum.get("host") != self.host:
            return
        key = deletion.key_of(datum)
        say = lambda level, msg: self.log(level, run, msg, datum=key)  # noqa: E731
        if datum.get("status") == "deleting":
            if self.dry_run:
                say(logging.INFO, f"dry-run: would finish deleting {datum.get('location')} "
                    f"({datum.get('deleting_reason', 'marked earlier')})")
                return
            self.report(run, key, deletion.drive(
                deletion.finish_steps(self.db, self.site, run["_id"], key, say=say)))
            return
        if self.settings is None or datum.get("status") != "transferred" or not self.wants(datum):
            return
        if not self.old_enough(run) or not self.space_wanted(run, datum["type"]):
            return
        outcome = deletion.delete_copy(self.db, self.site, run["_id"], key,
                                       min_copies=self.min_copies, dry_run=self.dry_run, say=say,
                                       sites=self.ctx.config.sites,
                                       connections=self.connections(),
                                       reverify_days=self.settings.get("reverify_days"),
                                       cancel=self.ctx.stop.is_set)
        if outcome.action == "would-delete":
            self._would_free[datum["type"]] = (self._would_free.get(datum["type"], 0)
                                               + _size_of(datum))
        self.report(run, key, outcome)

    def report(self, run, key, outcome) -> None:
        if outcome.action == "unsafe":
            level = logging.WARNING if outcome.warn else self.unsafe_level(key)
            self.log(level, run, f"kept: {outcome.reason}", datum=key)
        elif outcome.action == "lost-race":
            self.log(logging.INFO, run, f"not deleted: {outcome.reason}", datum=key)

    def unsafe_level(self, key) -> int:
        return logging.DEBUG


def _size_of(datum) -> int:
    """Bytes the copy takes: its recorded size, else measured (0 if it cannot be)."""
    if isinstance(datum.get("size"), int):
        return datum["size"]
    from cax.tasks.size import measure  # late import: size imports deletion, like this module
    try:
        return measure(datum.get("location"))[0]
    except (OSError, TypeError):
        return 0


class BufferPurger(_Purge):
    """Delete this site's copies of ``purge.types`` once enough verified copies exist elsewhere."""

    def new_clause(self):
        if not self.rule.types:
            return None  # "types": [] purges nothing here (PurgeProcessed may retire versions)
        clause: dict = {"data": {"$elemMatch": {"host": self.host,
                                                "type": {"$in": self.rule.types},
                                                "status": "transferred"}}}
        if self.rule.days:
            clause["start"] = {"$lt": now() - timedelta(days=self.rule.days)}
        return clause

    def wants(self, datum) -> bool:
        return self.rule.buffers(datum.get("type"))


class PurgeProcessed(_Purge):
    """Delete processed data of retired versions here, under the same invariant.

    When this site holds the only good copies of a retired version, they are kept and reported: the
    invariant is not waived because the admin retired a version.
    """

    def __init__(self, ctx):
        super().__init__(ctx)
        self.retired = self.rule.retired
        self.current = self.rule.current
        self.old_versions = self.rule.old_versions
        if (self.settings or {}).get("old_versions") and not self.current:
            self.log(logging.WARNING, None, "purge.old_versions is set but the site lists no "
                     "current versions (pax_versions/processing.versions); retiring nothing")

    def finish_clause(self):
        return {"data": {"$elemMatch": {"host": self.host, "type": "processed",
                                        "status": "deleting"}}}

    def query(self):
        if not (self.retired or self.old_versions):
            return None  # nothing retired: BufferPurger finishes any 'deleting' datum here
        return super().query()

    def new_clause(self):
        versions = []
        if self.retired:
            versions.append({"pax_version": {"$in": self.retired}})
        if self.old_versions:
            versions.append({"pax_version": {"$nin": sorted(self.current)}})
        if not versions:
            return None
        return {"$or": [{"data": {"$elemMatch": dict(v, host=self.host, type="processed",
                                                     status="transferred")}} for v in versions]}

    def wants(self, datum) -> bool:
        return self.rule.retires(datum.get("type"), datum.get("pax_version"))

    def each_location(self, run, datum):
        if datum.get("type") == "processed":
            super().each_location(run, datum)

    def old_enough(self, run) -> bool:
        return True  # a retired version goes regardless of the run's age

    def space_wanted(self, run, dtype) -> bool:
        return True

    def unsafe_level(self, key) -> int:
        return logging.WARNING  # the admin asked for this version to go: say why it stays
