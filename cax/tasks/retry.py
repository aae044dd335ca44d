"""Healing: copies that stalled, failed, or arrived corrupt are removed and claimed again.

Only the daemon that owns a copy heals it (the one that claimed it, ``creation_place``, else the
site holding it), and it first moves the datum to ``retrying`` with a conditional update, so one
daemon removes the files and no new copy can be under that name yet. Retries are counted on the run
(``retries``); after the site's ``max_retries`` the datum stays ``error`` for a human.
"""
from __future__ import annotations

import logging
from datetime import timedelta

from cax import paths
from cax.runsdb import as_utc, datum_key, last_beat, lifecycle, now
from cax.runsdb.copies import _ctype, comparable, good_copies, placeholder
from cax.runsdb.lifecycle import DatumKey, ErrorKind
from cax.tasks import scrub
from cax.tasks.base import Task
from cax.tasks.checksum import verify_copy
from cax.tasks.space import waits_for_space
from cax.transfer import ServiceUnavailable, TransferError, policy
from cax.transfer.base import SourceNotFound

#: kinds RetryStalledTransfer heals: copies that never landed, stalled, or could not be verified
HEALABLE = (ErrorKind.STALLED, *lifecycle.NOT_LANDED, ErrorKind.UNVERIFIED)
NOT_LANDED = lifecycle.NOT_LANDED

#: reasons older cax recorded as ``failed`` although the copy had landed under its final name
#: (verification, not the copy, failed): such a copy is ours to remove, like ``unverified``
_LANDED_REASONS = ("checksum failed:", "no reference checksum", "data missing at")


def _landed(datum) -> bool:
    kind = datum.get("error_kind")
    return kind not in NOT_LANDED or (
        kind == "failed" and str(datum.get("error") or "").startswith(_LANDED_REASONS))


class _Heal(Task):
    projection = {"name": 1, "number": 1, "data": 1, "references": 1, "retries": 1}

    def owner(self, datum) -> str:
        """Who heals the datum: the daemon that claimed the copy, else the site holding it. A
        datum without ``source`` was claimed by nobody cax knows (an origin, or a copy the
        classic cax made: its processed copies carry the processing site's
        ``creation_place``), so its own site heals it, as the classic cax did."""
        if not datum.get("source"):
            return datum["host"]
        return datum.get("creation_place") or datum["host"]

    def remove_files(self, run, datum, final: bool = True) -> None:
        """Remove a copy's files (and any partial copy) here or, for a copy this daemon pushed,
        at the destination. ``final=False`` removes only the partial copy.

        Before removing a final copy the location must be this run's own data (as for a purge):
        a datum naming another run's directory must never make a retry delete that run's data.
        """
        location = datum.get("location")
        if not datum.get("source") and placeholder(location):
            return  # a classic record of a copy that wrote nothing under a name ("n/a")
        if datum["host"] == self.host:
            # here is this filesystem, whatever method other sites use to reach this one; a
            # copy killed here may also have left an rsync pull's holder directory
            if final:
                paths.check_run_location(self.site, location, run.get("name"), datum["type"],
                                         datum.get("pax_version"))
            else:
                paths.check_location(self.site, location, datum["type"])
            method = None
        else:
            site = self.ctx.config.site(datum["host"])
            paths.check_remote_location(site, location, datum["type"])
            if final:
                paths.check_run_name(location, run.get("name"), datum["type"])
            method = self.connections().method(site)  # the pass's connection, not one per datum
        policy.discard(method, location, final=final)

    def retry(self, run, datum, index, why: str) -> None:
        """error -> retrying -> files removed -> datum pulled (claim again on a later pass)."""
        key = datum_key(datum)
        limit = self.site.max_retries
        if (run.get("retries") or 0) >= limit:
            self.log(logging.WARNING, run, f"not retried: {run.get('retries')} retries reached "
                     f"(max_retries {limit}); left in error for a human", datum=key)
            return
        if self.dry_run:
            self.log(logging.INFO, run, f"dry-run: would remove and re-copy ({why})", datum=key)
            return
        if not self.db.apply(lifecycle.mark_retrying(run["_id"], run["data"], index)):
            return  # someone changed the run meanwhile: decide again next pass
        self.finish_retry(run, datum, why)

    def finish_retry(self, run, datum, why: str) -> None:
        key = datum_key(datum)
        try:
            # a failed or interrupted copy never reached its final name, and whatever is there
            # now is not ours to delete; only its partial copy may be left (lost connection)
            self.remove_files(run, datum, final=_landed(datum))
        except ServiceUnavailable as e:  # the site is down: stay retrying, finish next pass
            self.log(logging.WARNING, run, f"retry waits for the site: {e}", datum=key)
            return
        except (TransferError, paths.UnsafePath, OSError) as e:
            self.record_error(run, key, "retrying", f"retry could not remove files: {e}",
                              kind=ErrorKind.RETRY_FAILED)
            return
        if self.db.apply(lifecycle.retried(run["_id"], key)):
            self.ctx.report.retried()
            self.log(logging.WARNING, run, f"removed for retry ({why}); retry "
                     f"{(run.get('retries') or 0) + 1} of {self.site.max_retries}", datum=key)

    def each_location(self, run, datum):
        # a retry that crashed after marking is finished by its owner on the next pass
        if datum.get("status") == "retrying" and self.owner(datum) == self.host:
            self.finish_retry(run, datum, "unfinished retry")


#: the source of a stalled copy is gone (purged, lost): only the copy's checksum can judge it
SOURCE_GONE = ()

#: how long the classic cax let a copy go without progress before it removed and re-sent it
#: (its RetryStalledTransfer: a day since the copy was made or its files last changed)
CLASSIC_STALLED_AFTER = timedelta(days=1)


class RetryStalledTransfer(_Heal):
    """Copies with no progress for ``stalled_after`` seconds, and copies that failed, go again.

    Except a copy that landed whole: its daemon may have died while verifying it, or the Runs DB
    may have been lost when the copy ended, so its datum still says ``transferring`` or
    ``verifying``. If its final name holds the source's bytes and files, it is verified where it
    is (and kept if it matches): sending it again would cost the whole transfer, and a daemon
    back after ``stalled_after`` would re-send every copy it was verifying.
    """

    def query(self):
        owned = [{"host": self.host}, {"creation_place": self.host}]
        return {"data": {"$elemMatch": {
            "$or": owned,
            "status": {"$in": ["transferring", "verifying", "error", "retrying"]}}}}

    def each_location(self, run, datum):
        if self.owner(datum) != self.host:
            return
        if not datum.get("source"):
            self.heal_classic(run, datum)
            return
        index = run["data"].index(datum)
        status = datum.get("status")
        if status in ("transferring", "verifying"):
            last = last_beat(datum)
            stalled = last is None or now() - last >= timedelta(seconds=self.site.stalled_after)
            if not stalled:
                # this daemon has no copy in flight now (its copy tasks wait for their copies):
                # a transferring copy under its final name ended while the Runs DB was gone
                if status == "transferring" and self.whole(run, datum, quiet=True):
                    self.verify_landed(run, datum, index)
                return
            if self.dry_run:
                self.log(logging.INFO, run, f"dry-run: would mark stalled (no progress since "
                         f"{last.isoformat()})", datum=datum)
                return
            whole = self.whole(run, datum)
            if whole is None:
                return  # cannot look now: decide on a later pass, delete nothing
            if whole:
                self.verify_landed(run, datum, index)
                return
            reason = f"stalled: no progress since {last.isoformat()}"
            if not self.db.apply(lifecycle.stalled(run["_id"], run["data"], index, reason)):
                return
            self.log(logging.WARNING, run, reason, datum=datum)
            run = self.db.run(run["_id"], self.projection)
            _, datum = DatumKey.of(datum).find(run)
            index = run["data"].index(datum)
            status = "error"
        if status == "error" and datum.get("error_kind") in HEALABLE:
            if datum.get("error_kind") == "no-space":
                wait = waits_for_space(self, run, datum)
                if wait:
                    self.log(logging.INFO, run, wait, datum=datum)
                    return
            if datum.get("error_kind") != "stalled":
                # back off: a site that is down for an hour must not use up every retry
                wait = self.site.retry_delay * 2 ** (run.get("retries") or 0)
                failed_at = as_utc(datum.get("error_time"))
                if failed_at is not None and now() - failed_at < timedelta(seconds=wait):
                    return
            self.retry(run, datum, index, datum.get("error_kind"))
        elif status == "retrying":
            super().each_location(run, datum)

    # -- classic copies ---------------------------------------------------------------------
    def heal_classic(self, run, datum) -> None:
        """A copy the classic cax left ``transferring`` (a day without progress) or ``error``
        (without ``error_kind``) is removed and copied again, as the classic
        RetryStalledTransfer did; it wrote no ``source``, so cax cannot tell such a copy from
        an origin by its record. Only at a site copies come to, other than a reference site
        (the classic cax never retried its master site's errors), and only when a good copy
        exists elsewhere: then it is not the only data of the run (an origin still being
        written has none), and is copied again from there. Anything else without ``source``
        is an origin: it has nowhere to come from."""
        status, kind = datum.get("status"), datum.get("error_kind")
        if status == "retrying":
            super().each_location(run, datum)
            return
        if not (status == "transferring" or (status == "error" and kind in (None, "stalled"))):
            return
        if not self.receives() or self.host in self.ctx.config.reference_sites:
            return  # nothing would bring the data here again (the DAQ), or the reference site
        dtype, version = datum["type"], datum.get("pax_version")
        good = good_copies(run, dtype, version, self.reference(run, dtype, version),
                           exclude_host=datum["host"])
        if not good:
            return
        index = run["data"].index(datum)
        if status == "transferring":
            last = last_beat(datum)
            limit = timedelta(seconds=max(self.site.stalled_after,
                                          CLASSIC_STALLED_AFTER.total_seconds()))
            if last is None or now() - last < limit:
                return  # the classic cax gave a copy a day; one of its daemons may be at it
            reason = (f"stalled: classic copy without 'source', no progress since "
                      f"{last.isoformat()} (the classic cax allowed a day)")
            if self.dry_run:
                self.log(logging.INFO, run, f"dry-run: would mark {reason}", datum=datum)
                return
            if not self.db.apply(lifecycle.stalled(run["_id"], run["data"], index, reason)):
                return
            self.log(logging.WARNING, run, reason, datum=datum)
            run = self.db.run(run["_id"], self.projection)
            _, datum = DatumKey.of(datum).find(run)
            if datum is None:
                return
            index = run["data"].index(datum)
        elif kind is None:
            # back off as for any failed copy; a classic error has no error_time: its age is
            # its creation's
            wait = self.site.retry_delay * 2 ** (run.get("retries") or 0)
            failed_at = as_utc(datum.get("error_time") or datum.get("creation_time"))
            if failed_at is not None and now() - failed_at < timedelta(seconds=wait):
                return
        self.retry(run, datum, index, f"classic {status} copy without 'source'; good copy at "
                                      f"{good[0]['host']}")

    def receives(self) -> bool:
        """Whether copies come to this site (it pulls, or some site pushes to it): only then is
        a record without ``source`` here a copy that can be made again, and not an origin."""
        return bool(self.site.download_options) or any(
            self.host in s.upload_options for s in self.ctx.config.sites.values())

    # -- a copy that landed -----------------------------------------------------------------
    def _tree(self, site, location, dtype):
        """(bytes, files) at ``location`` of ``site``, through the site's method (a local read
        for this site): what a complete copy must equal."""
        if site.name == self.host:
            return policy.existing_tree(paths.check_location(site, location, dtype))
        paths.check_remote_location(site, location, dtype)
        return self.connections().method(site).tree(location)

    def whole(self, run, datum, quiet: bool = False):
        """True when the copy's final name holds exactly the source's bytes and files (or the
        source cannot be measured any more: its checksum then decides); False when it is
        missing, incomplete or not this run's own location; None when a site cannot be reached
        now. ``quiet``: a missing copy is the normal case (a copy not landed), said nowhere."""
        key = datum_key(datum)
        location = datum.get("location")
        dst = self.site if datum["host"] == self.host else self.ctx.config.site(datum["host"])
        try:
            # what healing would remove must be the run's own data; so must what it keeps
            if dst.name == self.host:
                paths.check_run_location(dst, location, run.get("name"), datum["type"],
                                         datum.get("pax_version"))
            else:
                paths.check_run_name(location, run.get("name"), datum["type"])
            have = self._tree(dst, location, datum["type"])
        except SourceNotFound:
            return False
        except paths.UnsafePath as e:
            if not quiet:
                self.log(logging.WARNING, run, f"cannot check the copy: {e}", datum=key)
            return False
        except ServiceUnavailable as e:
            self.log(logging.WARNING, run, f"cannot check the copy at {dst.name} now: {e}",
                     datum=key)
            return None
        except (TransferError, OSError) as e:
            if not quiet:
                self.log(logging.WARNING, run, f"cannot check the copy: {e}", datum=key)
            return False
        want = self._source_tree(run, datum)
        if want is None:
            return None
        if want is SOURCE_GONE:
            return True
        if have != want:
            self.log(logging.INFO if quiet else logging.WARNING, run,
                     f"copy incomplete: {have[0]} bytes in {have[1]} files, source has "
                     f"{want[0]} bytes in {want[1]} files", datum=key)
            return False
        return True

    def _source_tree(self, run, datum):
        """(bytes, files) of the copy's source: as recorded there (AddSize), else measured;
        SOURCE_GONE when the source copy is gone, None when its site cannot be reached now."""
        _, src = DatumKey(datum.get("source"), datum["type"], datum.get("pax_version")).find(run)
        if src is None or src.get("status") not in ("transferred", "verifying"):
            return SOURCE_GONE
        size, files = src.get("size"), src.get("files")
        if all(isinstance(v, int) and not isinstance(v, bool) for v in (size, files)):
            return size, files
        try:
            return self._tree(self.ctx.config.site(src["host"]), src.get("location"),
                              src["type"])
        except SourceNotFound:
            return SOURCE_GONE
        except (TransferError, OSError, paths.UnsafePath) as e:
            self.log(logging.WARNING, run, f"cannot measure the source at {src['host']}: {e}",
                     datum=datum)
            return None

    def verify_landed(self, run, datum, index) -> None:
        """Verify a whole copy where it is (``transferring`` first becomes ``verifying``)."""
        key = datum_key(datum)
        if self.dry_run:
            self.log(logging.INFO, run, "dry-run: would verify the copy found whole", datum=key)
            return
        was, last = datum.get("status"), last_beat(datum)
        if was == "transferring":
            if not self.db.apply(lifecycle.landed(run["_id"], run["data"], index)):
                return  # someone changed the run meanwhile: decide again next pass
            datum = dict(datum, status="verifying")
        self.log(logging.INFO, run, f"copy found whole at {datum['host']} ({was}, no progress "
                 f"recorded since {last.isoformat() if last else '?'}): verifying it instead "
                 f"of sending it again", datum=key)
        verify_copy(self, run, datum)


#: a copy found bad where it lies (by a purge's check, the scrub, or its size), healed like a
#: checksum mismatch
FOUND_BAD = tuple(k for k in lifecycle.LANDED_BAD if k != ErrorKind.CHECKSUM)


class RetryBadChecksumTransfer(_Heal):
    """A corrupt copy here is removed and fetched again, but only if a good copy exists elsewhere.

    When copies from one source failed verification twice, the source is re-hashed where it lies
    (:func:`cax.tasks.scrub.recheck_source`) before this one is retried.
    """

    projection = dict(_Heal.projection, failed_verifications=1)

    def query(self):
        # CompareChecksums (earlier in the pass) turns a transferred mismatch into an error
        mine = {"data": {"$elemMatch": {"host": self.host,
                                        "status": {"$in": ["error", "retrying"]}}}}
        if not self.site.upload_options:
            return mine
        # a copy this site pushed (to a site that may run no cax) is healed from here when found
        # bad; naming the hosts keeps the query on the data.host index
        return {"$or": [mine, {"data": {"$elemMatch": {
            "host": {"$in": list(self.site.upload_options)}, "status": "error",
            "error_kind": {"$in": [str(k) for k in FOUND_BAD]}, "creation_place": self.host}}}]}

    def each_location(self, run, datum):
        if datum["host"] != self.host and not (
                self.owner(datum) == self.host and datum.get("source")
                and datum.get("status") == "error" and datum.get("error_kind") in FOUND_BAD):
            return
        if datum.get("status") == "retrying":
            if self.owner(datum) == self.host or datum.get("error_kind") == "checksum":
                self.finish_retry(run, datum, "unfinished retry")
            return
        ref = self.reference(run, datum["type"], datum.get("pax_version"))
        if ref is None:
            self.reference_unknown(run, datum["type"], datum.get("pax_version"))
            return
        bad = ((datum.get("status") == "error"
                and datum.get("error_kind") in lifecycle.LANDED_BAD)
               or (datum.get("status") == "transferred" and comparable(datum)
                   and _ctype(datum) == _ctype(ref) and datum["checksum"] != ref["checksum"]))
        if not bad:
            return
        if datum.get("error_kind") == "checksum" and datum.get("source") \
                and scrub.failed_verifications(self, run, datum) >= 2:
            scrub.recheck_source(self, run, datum)
            run = self.db.run(run["_id"], self.projection) or run
            _, datum = DatumKey.of(datum).find(run)
            if datum is None or datum.get("status") != "error":
                return
        # verified copies only: a Rucio or tape record's checksum is no evidence of one (a
        # Rucio adler32 taken for the reference once made this remove the DAQ's only copy)
        good = good_copies(run, datum["type"], datum.get("pax_version"), ref,
                           exclude_host=datum["host"])
        if not good:
            self.log(logging.ERROR, run, "corrupt copy is the only copy: left in place, "
                     "flagged for a human", datum=datum)
            if datum.get("status") == "transferred" and not self.dry_run:
                self.record_error(run, datum_key(datum), "transferred",
                                  "checksum differs from reference and no good copy exists "
                                  "elsewhere", kind=ErrorKind.CHECKSUM)
            return
        self.retry(run, datum, run["data"].index(datum),
                   f"bad checksum; good copy at {good[0]['host']}")
