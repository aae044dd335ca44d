"""AddSize: record how big each copy here is, and flag a copy whose size betrays a bad transfer.

Sizes are what admins and disk planning read, and a size that differs from the reference copy's is
the cheapest sign of a truncated or padded copy. Which copy is bad the size cannot tell: a copy
that differs is re-hashed once before it is flagged, so a reference copy that changed behind cax's
back never gets the good copy flagged (and healed away).
"""
from __future__ import annotations

import logging

from cax import paths
from cax.checksum import checksum
from cax.deletion import find_datum, key_of
from cax.runsdb import lifecycle
from cax.runsdb.copies import expected_checksum, is_good
from cax.runsdb.lifecycle import ErrorKind
from cax.tasks.base import Task
from cax.transfer.base import local_tree


measure = local_tree  # (bytes, regular files); symlinks count as nothing


def reference_size(run: dict, datum: dict, prefer=()):
    """(size, host) of the reference site's copy to compare with; (None, host) while that copy is
    not measured yet; None when there is nothing to compare with.

    Only the reference site's copy: comparing with whichever copy happened to be measured first
    let a bad copy measured early flag the reference copy itself.
    """
    ref = expected_checksum(run, datum, prefer)  # processed: the origin this copy descends from
    if ref is None or not ref.get("host") or ref["host"] == datum["host"]:
        return None
    _, d = find_datum(run, key_of(dict(datum, host=ref["host"])))
    if d is None or d.get("status") != "transferred" or not is_good(d, ref):
        return None
    if not isinstance(d.get("size"), int):
        return None, d["host"]
    return d["size"], d["host"]


class AddSize(Task):
    """Record ``size`` (bytes) and ``files`` on this site's transferred copies that lack them."""

    projection = {"name": 1, "number": 1, "data": 1, "references": 1}

    def query(self):
        return {"data": {"$elemMatch": {"host": self.host, "status": "transferred",
                                        "$or": [{"size": None}, {"files": None}]}}}

    def each_location(self, run, datum):
        if (datum.get("host") != self.host or datum.get("status") != "transferred"
                or (datum.get("size") is not None and datum.get("files") is not None)):
            return
        key = key_of(datum)
        try:
            location = paths.check_location(self.site, datum.get("location"), datum["type"])
            size, files = measure(location)
        except paths.UnsafePath as e:
            self.record_error(run, key, "transferred", str(e))
            return
        except FileNotFoundError:
            self.record_error(run, key, "transferred",
                              f"data missing at {datum.get('location')}")
            return
        except OSError as e:
            self.record_error(run, key, "transferred", f"cannot measure size: {e}")
            return
        fields = {"size": size, "files": files}
        refsize = reference_size(run, datum, self.ctx.config.reference_sites)
        if refsize is not None and refsize[0] is None:
            # measured again on a later pass: recording now would never compare this copy
            self.log(logging.DEBUG, run, f"size waits for the reference copy at {refsize[1]}",
                     datum=key)
            return
        if refsize is not None and refsize[0] != size:
            reason = (f"size {size} bytes differs from reference copy at {refsize[1]} "
                      f"({refsize[0]} bytes)")
            matches = self.still_matches(run, datum, location)
            if matches is None:
                return  # asked to stop mid-hash: decided on a later pass
            if matches:
                # the size recorded at the reference copy is what is wrong (that copy changed
                # behind cax's back before it was measured): flagging this good copy would heal it
                # away from a bad source. The purge's check and the scrub find the reference copy.
                self.log(logging.WARNING, run, f"{reason}, but this copy still hashes to the "
                         f"reference checksum: kept; the copy at {refsize[1]} is suspect",
                         datum=key)
            else:
                self.log(logging.ERROR, run, f"error: {reason}", datum=key)
                self.db.apply(lifecycle.failed(run["_id"], key, "transferred", reason,
                                               ErrorKind.SIZE, **fields))
                return
        if self.dry_run:
            self.log(logging.INFO, run, f"dry-run: would record size {size} bytes, {files} files",
                     datum=key)
            return
        if self.db.apply(lifecycle.measured(run["_id"], key, fields)):
            self.log(logging.INFO, run, f"size {size} bytes, {files} files", datum=key)

    def still_matches(self, run, datum, location):
        """Whether this copy, found with a size other than the reference copy's, still hashes to
        the checksum it descends from: the size alone cannot say which of the two went bad. None
        when the daemon is stopping."""
        ref = self.expected(run, datum)
        if ref is None or not ref.get("checksum"):
            return False
        try:
            digest = checksum(location, ref.get("checksum_type") or "sha512",
                              cancel=self.ctx.stop.is_set)
        except InterruptedError:
            return None
        except (OSError, ValueError):
            return False
        return digest == ref["checksum"]
