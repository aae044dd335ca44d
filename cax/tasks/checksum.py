"""AddChecksum and CompareChecksums, and the one verification rule both copies and sites use.

The reference checksum of a run's data is the one written by the first site that verified it (the
DAQ for raw data, the processing site for processed data). A copy becomes ``transferred`` only when
its checksum, computed with the reference's algorithm, equals the reference; otherwise it is
``error`` with the reason, and the purge tasks will never count it as a good copy.
"""
from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from datetime import timedelta

from cax import paths
from cax.checksum import checksum as compute_checksum
from cax.runsdb import RunsDBLost, datum_key, last_beat, lifecycle, now
from cax.runsdb.copies import _ctype, comparable
from cax.runsdb.lifecycle import ErrorKind
from cax.tasks.base import Task
from cax.transfer import Interrupted, TransferError, features

#: how often a long checksum refreshes its datum's heartbeat (as copies do), so the stalled-copy
#: check never takes a live verification of a big run for a dead one and removes its files
HEARTBEAT_SECONDS = 30.0

#: ``error_kind`` of a copy that landed under its final name but could not be verified there. The
#: files under that name were written by this datum's own claim, so a retry removes them too
#: (unlike ``failed``, where whatever sits under the final name is not ours).
UNVERIFIED = ErrorKind.UNVERIFIED


def heartbeat(task, run_id, key, status: str = "verifying"):
    """A ``progress`` callback for :func:`cax.checksum.checksum` that keeps the datum alive.

    A heartbeat the Runs DB cannot take does not stop the work: a copy goes on and lands (a
    later pass finds it whole and verifies it), and the write of the work's outcome is what
    reports the lost Runs DB and ends the pass.
    """
    last = [time.monotonic()]

    def progress(_nbytes):
        if time.monotonic() - last[0] >= HEARTBEAT_SECONDS and not task.dry_run:
            last[0] = time.monotonic()
            try:
                task.db.apply(lifecycle.heartbeat(run_id, key, status))
            except RunsDBLost as e:
                task.log(logging.DEBUG, None, f"heartbeat not written: {e}", datum=key)
    return progress


@contextmanager
def kept_alive(task, run_id, key, status: str = "verifying"):
    """Refresh the datum's heartbeat from a thread while a call that reports no progress runs.

    A checksum computed on the far side of an SSH connection says nothing until it ends; for a
    big run that can outlast ``stalled_after``, and the stalled-copy check would then remove a
    live verification's data.
    """
    done = threading.Event()

    def beat():
        while not done.wait(HEARTBEAT_SECONDS):
            if task.dry_run:
                continue
            try:
                task.db.apply(lifecycle.heartbeat(run_id, key, status))
            except RunsDBLost as e:  # the outcome's write reports it and ends the pass
                task.log(logging.DEBUG, None, f"heartbeat not written: {e}", datum=key)
            except Exception as e:  # the verification's own outcome is what gets recorded
                task.log(logging.WARNING, None, f"heartbeat not written: {e}", datum=key)

    thread = threading.Thread(target=beat, name="cax-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def verify(task, run_id, key, compute, status: str = "verifying") -> None:
    """Move the datum ``key`` from ``verifying`` to ``transferred`` or ``error``.

    With ``status="transferred"``: an origin recorded ``transferred`` without a checksum (classic
    DAQ records) gets its checksum, which becomes the reference, so its data can be copied.

    ``compute(algorithm)`` returns the digest of the data where they are now. A checksum cut short
    by SIGTERM/SIGINT says nothing about the data: the datum stays ``verifying`` and the next pass's
    AddChecksum starts again, instead of an ``error`` nobody heals (an origin copy has nowhere to be
    re-copied from).
    """
    db = task.db
    run = db.run(run_id, {"name": 1, "number": 1, "data": 1, "references": 1})
    if run is None:
        return
    _, datum = lifecycle.DatumKey.of(key).find(run)
    if datum is None or datum.get("status") != status:
        return
    if status != "verifying":
        if datum.get("checksum") or datum.get("source"):
            return
        key = dict(key, checksum=None)  # the update re-checks that nobody added one meanwhile
    # a copy is held to what it was copied from (see expected_checksum); an origin to the reference
    ref = (task.expected(run, datum) if datum.get("source")
           else task.reference(run, key["type"], key.get("pax_version")))
    if ref is None and datum.get("source"):
        task.record_error(run, key, status,
                          "no reference checksum to verify this copy against", kind=UNVERIFIED)
        return
    algorithm = ref["checksum_type"] if ref else task.site.checksum_type
    try:
        digest = compute(algorithm)
    except (InterruptedError, Interrupted):
        task.log(logging.INFO, run, f"checksum interrupted; left {status} for the next pass",
                 datum=key)
        return
    except RunsDBLost:
        raise
    except FileNotFoundError:
        task.record_error(run, key, status, f"data missing at {datum.get('location')}",
                          kind=UNVERIFIED)
        return
    except Exception as e:
        if task.ctx.stop.is_set():  # e.g. a connection closed under us while stopping
            task.log(logging.INFO, run, f"checksum ended by the stop ({type(e).__name__}: {e}); "
                     f"left {status} for the next pass", datum=key)
            return
        task.record_error(run, key, status, f"checksum failed: {type(e).__name__}: {e}",
                          kind=UNVERIFIED)
        return
    if digest is None:
        return  # cannot compute here; the destination's AddChecksum will
    fields = {"checksum": digest, "checksum_type": algorithm, "checksum_time": now()}
    if ref is None:
        # the origin copy: its checksum becomes the reference for every other copy
        db.set_reference(run_id, key["type"], key.get("pax_version"), algorithm, digest, task.host)
        ref = task.reference(db.run(run_id, {"references": 1, "data": 1}) or {}, key["type"],
                             key.get("pax_version")) or {"checksum": digest, "host": task.host}
    # Processed data made here (no ``source``) is its own origin: processors are not
    # bit-reproducible, so another site's (or an earlier) output of the same version is no
    # reference for it. Only copies are held to the reference.
    own_origin = key["type"] == "processed" and not datum.get("source")
    if ref["checksum"] != digest and not own_origin:
        task.record_error(run, key, status,
                          f"{algorithm} checksum {digest[:16]}... differs from reference "
                          f"{ref['checksum'][:16]}... (from {ref.get('host')})",
                          kind=ErrorKind.CHECKSUM)
        return
    fields["reference_checked"] = True
    if db.apply(lifecycle.verified(run_id, key, status, fields)):
        task.log(logging.INFO, run, f"verified, {algorithm} {digest[:16]}...", datum=key)


class AddChecksum(Task):
    """Checksum this site's ``verifying`` data and decide ``transferred`` or ``error``."""

    projection = {"name": 1, "number": 1, "data": 1}

    def query(self):
        clauses = [
            {"data": {"$elemMatch": {"host": self.host, "status": "verifying"}}},
            # classic DAQ records: an origin already transferred, never checksummed
            {"data": {"$elemMatch": {"host": self.host, "status": "transferred",
                                     "checksum": None, "source": None}}}]
        if self.site.upload_options:
            # copies this site pushed whose verification was cut short (see resume_push)
            clauses.append({"data": {"$elemMatch": {
                "host": {"$in": list(self.site.upload_options)}, "status": "verifying",
                "creation_place": self.host}}})
        return {"$or": clauses}

    def each_location(self, run, datum):
        if datum["host"] != self.host:
            if (datum.get("status") == "verifying" and datum.get("creation_place") == self.host
                    and datum["host"] in self.site.upload_options and self._silent(datum)):
                self.resume_push(run, datum)
            return
        status = datum.get("status")
        if not (status == "verifying" or (status == "transferred" and not datum.get("checksum")
                                          and not datum.get("source"))):
            return
        key = datum_key(datum)
        try:
            location = paths.check_location(self.site, datum.get("location"), datum["type"])
        except paths.UnsafePath as e:
            self.record_error(run, key, status, str(e))
            return
        if self.dry_run:
            self.log(logging.INFO, run, f"dry-run: would checksum {location}", datum=key)
            return
        self.log(logging.INFO, run, f"checksum start {location}", datum=key)
        beat = heartbeat(self, run["_id"], key) if status == "verifying" else None
        verify(self, run["_id"], key,
               lambda algo: compute_checksum(location, algo, cancel=self.ctx.stop.is_set,
                                             progress=beat), status)

    def _silent(self, datum) -> bool:
        """Nobody is verifying ``datum`` now: no heartbeat for half of ``stalled_after``.

        A live verification by cax beats every HEARTBEAT_SECONDS; half the stall limit also spares
        a slow verifier that does not beat (an older cax at the destination), and still comes
        well before the stalled check would remove the copy.
        """
        last = last_beat(datum)
        return last is None or now() - last >= timedelta(seconds=self.site.stalled_after / 2)

    def resume_push(self, run, datum):
        """Verify a copy this site pushed that was left ``verifying`` (the daemon stopped during
        its checksum). The destination may run no cax; without this only the stalled check would
        heal it, an hour later, by deleting the copy and sending all of it again."""
        verify_copy(self, run, datum)


def verify_copy(task, run, datum) -> None:
    """Checksum the ``verifying`` copy ``datum`` where it lives and decide ``transferred`` or
    ``error``: here with a local read, at another site through its transfer method (when that
    can hash remotely; otherwise the destination's own AddChecksum will).

    For copies whose verification was cut short: a push resumed by its sender (AddChecksum) and
    a stalled copy found whole at its destination (RetryStalledTransfer), so a copy that landed
    is verified, not deleted and sent again.
    """
    key = datum_key(datum)
    location = datum.get("location")
    here = datum["host"] == task.host
    site = task.site if here else task.ctx.config.site(datum["host"])
    local_paths = here or features(site).local_paths
    try:
        if local_paths:
            location = paths.check_location(site, location, datum["type"])
        else:
            paths.check_remote_location(site, location, datum["type"])
    except paths.UnsafePath as e:
        task.record_error(run, key, "verifying", str(e))
        return
    if task.dry_run:
        task.log(logging.INFO, run, f"dry-run: would verify copy {location}", datum=key)
        return
    if here:
        task.log(logging.INFO, run, f"checksum start {location}", datum=key)
        beat = heartbeat(task, run["_id"], key)
        verify(task, run["_id"], key,
               lambda algo: compute_checksum(location, algo, cancel=task.ctx.stop.is_set,
                                             progress=beat))
        return
    if local_paths:
        def compute(algo):
            return compute_checksum(location, algo, cancel=task.ctx.stop.is_set)
    else:
        try:
            method = task.connections().method(site)
        except TransferError as e:
            task.log(logging.WARNING, run, f"cannot reach {site.name} to verify: {e}", datum=key)
            return
        if not method.features.remote_checksum:
            return  # the destination's own AddChecksum will

        def compute(algo):
            return method.checksum(location, algo)
    task.log(logging.INFO, run, f"resuming verification of pushed copy {location}", datum=key)
    with kept_alive(task, run["_id"], key):
        verify(task, run["_id"], key, compute)


class CompareChecksums(Task):
    """Flag a copy here whose recorded checksum differs from the reference.

    Copies verified by this cax were compared when they became ``transferred`` and carry
    ``reference_checked``; only datums without it (written by older tools, or whose checksum a
    scrub rewrote and unflagged) are read, and each is flagged once it matches. So an idle pass
    reads no runs, instead of every run with data here.
    """

    projection = {"name": 1, "number": 1, "data": 1, "references": 1}

    def query(self):
        return {"data": {"$elemMatch": {"host": self.host, "status": "transferred",
                                        "reference_checked": {"$ne": True}}}}

    def each_location(self, run, datum):
        if datum["host"] != self.host or datum.get("status") != "transferred" \
                or datum.get("reference_checked"):
            return
        ref = self.reference(run, datum["type"], datum.get("pax_version"))
        if ref is None:
            if comparable(datum):  # one awaiting its first checksum (AddChecksum) is no news
                self.reference_unknown(run, datum["type"], datum.get("pax_version"))
            return
        if not comparable(datum) or _ctype(datum) != _ctype(ref):
            # compare like with like only: a classic tape MD5 or Rucio adler32 (or "n/a") says
            # nothing about the copy, and must never turn it into an error
            return
        key = datum_key(datum)
        own_origin = datum["type"] == "processed" and not datum.get("source")  # see verify
        if datum["checksum"] == ref["checksum"] or own_origin:
            self.db.apply(lifecycle.reference_checked(run["_id"], key, datum["checksum"]))
            return
        if self.dry_run:
            self.log(logging.WARNING, run, "dry-run: would flag checksum mismatch", datum=key)
            return
        self.record_error(run, key, "transferred",
                          f"checksum {datum['checksum'][:16]}... differs from reference "
                          f"{ref['checksum'][:16]}... (from {ref.get('host')})",
                          kind=ErrorKind.CHECKSUM)
