"""VerifyCopies: re-hash a bounded amount of this site's copies each pass, oldest-verified first.

A byte flipped on disk after a copy was verified says nothing until someone reads the data again:
without a scrub, the first reader is the purge that trusts the copy, or the copy made from it.
Each pass re-hashes at most the site's ``scrub.bytes_per_pass`` of its ``transferred`` copies whose
last verification (``checksum_time``) is older than ``scrub.every_days``, the oldest first. A copy
that matches gets a fresh ``checksum_time``; one whose files are gone or whose bytes or file count
differ from the recorded ones is marked ``error`` kind ``lost``, one whose checksum differs
``corrupt``; both then heal (RetryBadChecksumTransfer) and stop counting as good copies.

The same re-hash where the data lie serves a source suspected by its copies: a source that looks
right in the Runs DB but went bad on disk after its verification makes every copy of it fail, and
would be pulled again on every retry. After two failed verifications of copies from one source
(:func:`failed_verifications`), RetryBadChecksumTransfer re-hashes it (:func:`recheck_source`) and
flags it ``corrupt`` if it differs, so it is no source again (copies come only from ``transferred``
datums) and heals itself.
"""
from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

from cax import paths
from cax.checksum import checksum as compute_checksum
from cax.deletion import CORRUPT, LOST, CopyChecker, find_datum
from cax.runsdb import RunsDBLost, as_utc, datum_key, lifecycle, now
from cax.runsdb.copies import _ctype, comparable
from cax.tasks.base import Task
from cax.transfer.base import local_tree

_NEVER = datetime.min.replace(tzinfo=timezone.utc)


class VerifyCopies(Task):
    """Re-hash this site's oldest-verified copies, within ``scrub.bytes_per_pass`` a pass."""

    projection = {"name": 1, "number": 1, "data": 1}

    def __init__(self, ctx):
        super().__init__(ctx)
        self.settings = self.site.scrub  # None: off
        self._due: list = []

    def cutoff(self):
        return now() - timedelta(days=self.settings["every_days"])

    def query(self):
        """One indexed query (data.host/type/status) for the runs with a copy here that is due."""
        if not self.settings:
            return None
        return {"data": {"$elemMatch": {
            "host": self.host, "status": "transferred", "checksum": {"$ne": None},
            "$or": [{"checksum_time": None}, {"checksum_time": {"$lt": self.cutoff()}}]}}}

    def each_location(self, run, datum):
        """Collect the due copies; the pass's budget is spent oldest first in :meth:`finish`."""
        if datum.get("host") != self.host or datum.get("status") != "transferred" \
                or not comparable(datum):
            return  # a classic tape MD5, Rucio adler32 or "n/a" cannot be re-computed
        last = as_utc(datum.get("checksum_time"))
        if last is not None and last >= self.cutoff():
            return
        self._due.append((last or _NEVER, run.get("number") or 0, run["_id"], datum_key(datum)))

    def finish(self):
        if not self.settings:
            return
        budget = self.settings["bytes_per_pass"]
        spent = 0
        for _last, _number, run_id, key in sorted(self._due, key=lambda t: t[:2]):
            if self.ctx.stop.is_set():
                break
            run = self.db.run(run_id, self.projection)
            _, datum = find_datum(run or {}, key)
            if datum is None or datum.get("status") != "transferred" or not comparable(datum):
                continue
            try:
                size = self.scrub(run, datum, budget - spent, first=spent == 0)
            except RunsDBLost:
                raise  # not this copy's failure: the pass ends (cax.daemon)
            except Exception as e:  # one bad copy never stops the scrub of the others
                self.log(logging.ERROR, run, f"scrub failed: {type(e).__name__}: {e}", datum=key)
                continue
            if size is None:
                break  # the next copy would overrun the budget: the next pass starts with it
            spent += size
        self._due.clear()

    def scrub(self, run, datum, left: int, first: bool):
        """Check one copy; returns the bytes it counts against the budget, or None when it does
        not fit in ``left`` (a copy larger than the whole budget is read alone, first in a pass,
        so no copy is starved)."""
        key = datum_key(datum)
        try:
            location = paths.check_location(self.site, datum.get("location"), datum["type"])
        except paths.UnsafePath as e:
            # cax does not read outside its data directories; the copy itself is not known bad,
            # so only the scrub is refused and the datum stays as it is
            self.log(logging.ERROR, run, f"refused: scrub: {e}; the datum stays transferred",
                     datum=key)
            return 0
        recorded = (datum.get("size"), datum.get("files"))
        try:
            have = local_tree(location)
        except FileNotFoundError:
            self._flag(run, datum, LOST, f"copy missing at {location} (found by the scrub)")
            return 0
        if all(isinstance(v, int) for v in recorded) and have != recorded:
            self._flag(run, datum, LOST, f"{have[0]} bytes in {have[1]} files at {location}, "
                                         f"{recorded[0]} bytes in {recorded[1]} files recorded "
                                         f"(found by the scrub)")
            return 0
        size = have[0]
        if size > left and not first:
            return None
        algorithm = _ctype(datum)
        try:
            digest = compute_checksum(location, algorithm, cancel=self.ctx.stop.is_set)
        except FileNotFoundError:
            self._flag(run, datum, LOST, f"copy missing at {location} (found by the scrub)")
            return size
        except InterruptedError:
            return size
        if digest != datum["checksum"]:
            self._flag(run, datum, CORRUPT, f"{algorithm} checksum {digest[:16]}... of {location} "
                                            f"differs from its verified "
                                            f"{datum['checksum'][:16]}... (found by the scrub)")
            return size
        if not self.dry_run:  # a dry run reads and reports, and writes nothing
            self.db.apply(lifecycle.rehashed(run["_id"], key, datum["checksum"]))
        self.log(logging.DEBUG, run, f"scrubbed {location}: {algorithm} matches", datum=key)
        return size

    def _flag(self, run, datum, kind: str, reason: str) -> None:
        key = datum_key(datum)
        if self.dry_run:
            self.log(logging.WARNING, run, f"dry-run: would flag {kind}: {reason}", datum=key)
            return
        self.log(logging.ERROR, run, f"error ({kind}): {reason}", datum=key)
        self.db.apply(lifecycle.failed(run["_id"], key, "transferred", reason, kind,
                                       expect={"checksum": datum["checksum"]}))


# ---- a source suspected by the copies made from it (RetryBadChecksumTransfer) ----------------
def failed_verifications(task, run, datum) -> int:
    """Record the failed verification of copy ``datum`` on the run (once: it is named by its
    time; the datum itself is pulled by the retry) and return how many copies of it from the
    same source have failed verification so far."""
    entry = {"host": datum["host"], "type": datum["type"],
             "pax_version": datum.get("pax_version"), "source": datum["source"],
             "at": str(datum.get("error_time"))}
    seen = [e for e in run.get("failed_verifications") or [] if isinstance(e, dict)]
    if entry not in seen and not task.dry_run:
        task.db.add_run_entry(run["_id"], "failed_verifications", entry)
        seen.append(entry)
    same = {e["at"] for e in seen if all(e.get(k) == entry[k]
                                         for k in ("host", "type", "pax_version", "source"))}
    return len(same | {entry["at"]})


def recheck_source(task, run, datum) -> None:
    """Re-hash the source of a copy that failed verification twice, where it lies; flag it
    ``corrupt`` if it differs from what it was verified as (copies are only made from a
    source whose recorded checksum is the reference)."""
    _, src = lifecycle.DatumKey(datum["source"], datum["type"], datum.get("pax_version")).find(run)
    if src is None or src.get("status") != "transferred" or not src.get("checksum"):
        return
    ref = {"checksum": src["checksum"], "checksum_type": src.get("checksum_type", "sha512"),
           "host": src["host"]}
    checker = CopyChecker(task.site, task.ctx.config.sites, task.connections(),
                          reverify_days=0, cancel=task.ctx.stop.is_set,
                          occasion="as the source of copies that failed verification")
    result = checker.check(run, src, ref, origin=True)
    key = datum_key(src)
    if result.ok:
        task.log(logging.INFO, run, f"source {src['host']} re-hashed after two failed "
                 f"verifications of its copy: it matches", datum=key)
        if not task.dry_run:
            task.db.apply(lifecycle.rehashed(run["_id"], key, src["checksum"]))
    elif not result.kind:
        task.log(logging.WARNING, run, f"source not re-checked: {result.reason}", datum=key)
    elif task.dry_run:
        task.log(logging.WARNING, run, f"dry-run: would flag the source {result.kind}: "
                 f"{result.reason}", datum=key)
    else:
        reason = f"{result.reason}; two copies from it failed verification"
        task.log(logging.ERROR, run, f"error ({result.kind}): {reason}", datum=key)
        task.db.apply(lifecycle.failed(run["_id"], key, "transferred", reason, result.kind,
                                       expect={"checksum": src["checksum"]}))
