"""CopyPush and CopyPull: make the copies that the sites' upload/download options ask for.

A copy is claimed in the Runs DB before a byte moves (exactly one daemon wins), goes to a temporary
name and is renamed into place (:mod:`cax.transfer.policy`) only once it holds exactly the source's bytes
and files (the source datum's recorded ``size`` and ``files``, else measured where the source is),
and ends ``verifying`` (or straight ``transferred`` when its checksum can be computed where the data
now are). Any failure leaves the datum ``error`` with the reason and the error's kind (``no-space``
for a full destination: RetryStalledTransfer waits for room before sending it again).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from cax import paths, progress
from cax.checksum import checksum
from cax.purge_rule import PurgeRule
from cax.runsdb import RunsDBLost, key_str, lifecycle, now
from cax.runsdb.copies import comparable
from cax.runsdb.lifecycle import ErrorKind
from cax.tasks.base import Task
from cax.tasks.checksum import heartbeat, kept_alive, verify
from cax.transfer import Interrupted, SourceNotFound, TransferError, features, policy
from cax.transfer.base import local_tree


class _Copy(Task):
    """Shared logic; subclasses say which (source, destination) pairs they serve."""

    direction = "push"
    projection = {"name": 1, "number": 1, "data": 1, "references": 1}

    def __init__(self, ctx):
        super().__init__(ctx)
        self._pool = None
        self._futures: list = []

    # (source site, destination site, remote site whose method moves the data)
    def pairs(self) -> list:
        raise NotImplementedError

    def _wanted(self, src, dst):
        """(type, version) combinations to copy from src to dst; version None for raw."""
        out = []
        for dtype in ("raw", "processed"):
            if dtype in src.data_type and dtype in dst.data_type:
                if dtype == "processed" and dst.pax_versions:
                    out.extend((dtype, v) for v in dst.pax_versions)
                else:
                    out.append((dtype, None))
        return out

    def query(self):
        clauses = []
        for src, dst, _remote in self.pairs():
            for dtype, version in self._wanted(src, dst):
                # a copy is verified against the reference: without one, it could only fail
                have = {"host": src.name, "type": dtype, "status": "transferred",
                        "checksum": {"$ne": None}}
                missing = {"host": dst.name, "type": dtype}
                if version is not None:
                    have["pax_version"] = missing["pax_version"] = version
                clause = {"data": {"$elemMatch": have}}
                if dtype == "raw" or version is not None:
                    clause["$nor"] = [{"data": {"$elemMatch": missing}}]
                clauses.append(clause)
        if not clauses:
            return None
        return clauses[0] if len(clauses) == 1 else {"$or": clauses}

    def each_run(self, run):
        paths.check_name(run.get("name"))
        for src, dst, remote in self.pairs():
            for dtype, version in self._wanted(src, dst):
                for datum in list(run.get("data") or []):
                    if self.ctx.stop.is_set():
                        return
                    if (datum.get("host") != src.name or datum.get("type") != dtype
                            or datum.get("status") != "transferred"):
                        continue
                    if version is not None and datum.get("pax_version") != version:
                        continue
                    if self._has_datum(run, dst.name, dtype, datum.get("pax_version")):
                        continue
                    ref = self.expected(run, datum)
                    if ref is None:
                        # no reference yet: AddChecksum makes one for an origin without a
                        # checksum; for one with a checksum something else is wrong, and the
                        # run would wait silently for ever: said once a pass
                        if comparable(datum):
                            self.reference_unknown(run, dtype, datum.get("pax_version"))
                        continue
                    if datum.get("checksum") != ref["checksum"]:
                        continue  # a copy that disagrees with the reference: never spread it
                    if self.skip(run, datum):
                        continue
                    self.copy(run, datum, src, dst, remote)

    def skip(self, run, datum) -> bool:
        """Whether this copy is not to be made at all (CopyPull: this site would purge it)."""
        return False

    @staticmethod
    def _has_datum(run, host, dtype, version):
        return any(d.get("host") == host and d.get("type") == dtype
                   and d.get("pax_version") == version for d in run.get("data") or [])

    # -- one copy ---------------------------------------------------------------------------
    def copy(self, run, src_datum, src, dst, remote):
        """Claim the copy here (so claims are counted in order), then move bytes in a worker."""
        dtype, version = src_datum["type"], src_datum.get("pax_version")
        src_path = src_datum.get("location")
        if src is self.site:
            paths.check_location(src, src_path, dtype)
        else:
            paths.check_remote_location(src, src_path, dtype)
        filename = os.path.basename(src_path.rstrip("/")) if dtype != "raw" else None
        dst_path = paths.data_path(dst, dtype, run["name"], version, filename)
        key = {"host": dst.name, "type": dtype}
        if version is not None:
            key["pax_version"] = version
        if self.dry_run:
            self.log(logging.INFO, run, f"dry-run: would copy {src.name}:{src_path} -> "
                     f"{dst.name}:{dst_path}", datum=key)
            return
        if self.connections().failure(remote) is not None:  # said once, when it failed
            self.log(logging.DEBUG, run, f"skipped: {remote.name} unreachable this pass",
                     datum=key)
            return
        ends = (remote, src) if self.direction == "third-party" else (remote,)
        for end in ends:
            if self.connections().failure(end) is not None:
                return
            try:
                self.method(end)  # connect before claiming: an unreachable site claims nothing
            except TransferError as e:
                self.log(logging.ERROR, run, f"cannot reach {end.name}: {e}; its other copies "
                         f"wait for the next pass", datum=key)
                return
        parallel = self.site.max_transfers > 1
        if parallel:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.site.max_transfers,
                                                thread_name_prefix="copy")
                self._slots = threading.Semaphore(self.site.max_transfers)
            # a free slot before the claim: a copy claimed while waiting for one would look
            # in progress to everyone else (and age towards stalled) without moving a byte
            self._slots.acquire()
        claimed = False
        try:
            t = now()
            datum = dict(key, status="transferring", location=dst_path, checksum=None,
                         creation_time=t, heartbeat=t, creation_place=self.host,
                         source=src.name)
            claimed = self.db.apply(lifecycle.claim(run["_id"], datum))
        finally:
            if parallel and not claimed:
                self._slots.release()
        if not claimed:
            self.log(logging.DEBUG, run, "already claimed by another daemon", datum=key)
            return
        job = (run, key, src_path, dst_path, remote,
               f"{src.name} -> {dst.name} via {remote.method}", recorded_tree(src_datum), src)
        if not parallel:
            self._transfer(*job)
            return
        self._futures.append(self._pool.submit(self._transfer_released, *job))

    def _transfer_released(self, *job):
        try:
            self._transfer(*job)
        finally:
            self._slots.release()

    def _transfer(self, run, key, src_path, dst_path, remote, what, recorded, src=None):
        started = time.monotonic()
        moved = [0]
        bar = None
        how = ""
        try:
            method = self.method(remote)
            expect = self._source_tree(self.method(src) if self.direction == "third-party"
                                       else method, src_path, recorded)
            size = expect[0]
            self.log(logging.INFO, run, f"copy start {what}, {size} bytes in {expect[1]} files",
                     datum=key)
            if progress.wanted():
                bar = progress.Bar(f"{run['name']} {key_str(key)}", size)
            method.progress = self._progress(run, key, moved, bar)
            # no makedirs here: put and get create the destination's parent themselves (a
            # pull's parent is local, and asking the remote site to make it was wrong)
            if self.direction == "push":
                policy.put(method, src_path, dst_path, expect=expect)
            elif self.direction == "pull":
                policy.get(method, src_path, dst_path, expect=expect)
            else:
                how = " " + policy.copy_between(method, self.method(src), src_path, dst_path,
                                                expect)
        except Interrupted:
            self.record_error(run, key, "transferring", "interrupted", kind=ErrorKind.INTERRUPTED)
            return
        except TransferError as e:
            self.record_error(run, key, "transferring", str(e), kind=e.kind)
            return
        except Exception as e:  # still a failed copy: say so in the Runs DB
            self.record_error(run, key, "transferring", f"{type(e).__name__}: {e}")
            return
        finally:
            if bar is not None:
                bar.close()
        seconds = max(time.monotonic() - started, 1e-6)
        self.log(logging.INFO, run, f"copy done{how} {moved[0]} bytes in {seconds:.1f} s "
                 f"({moved[0] / seconds / 1e6:.1f} MB/s)", datum=key)
        self.ctx.report.copied(self.direction, method.name, moved[0])
        if not self.db.apply(lifecycle.copied(run["_id"], key)):
            self.log(logging.WARNING, run, "datum changed during the copy", datum=key)
            return
        if policy.verifies_here(method, self.direction):
            beat = heartbeat(self, run["_id"], key)
            verify(self, run["_id"], key,
                   lambda algo: checksum(dst_path, algo, cancel=self.ctx.stop.is_set,
                                         progress=beat))
        elif method.features.remote_checksum:
            with kept_alive(self, run["_id"], key):
                verify(self, run["_id"], key, lambda algo: method.checksum(dst_path, algo))

    def _source_tree(self, method, src_path, recorded):
        """(bytes, regular files) the copy must hold before it is renamed into place: what the
        source's daemon recorded (AddSize), else measured where the source is (for a pull, the
        one remote command the size for the progress bar cost before)."""
        if recorded is not None:
            return recorded
        if self.direction == "push":
            try:
                return local_tree(src_path)
            except OSError as e:
                raise SourceNotFound(f"local source {src_path}: {e.strerror or e}") from None
        return method.tree(src_path)

    def _progress(self, run, key, moved, bar):
        """Counts bytes and refreshes the heartbeat, so a live slow copy never looks stalled."""
        beat = heartbeat(self, run["_id"], key, "transferring")

        def progress(n):
            moved[0] += n
            if bar is not None:
                bar.update(n)
            beat(n)
        return progress

    def method(self, remote):
        """This worker's method object, on the pass's one connection to ``remote``."""
        return self.connections().method(remote)

    def finish(self):
        lost = None
        for f in self._futures:
            try:
                f.result()
            except RunsDBLost as e:  # the copy may have landed: a later pass verifies it
                lost = lost or e
            except Exception as e:  # _transfer records its own errors; this is a bug guard
                self.log(logging.ERROR, None, f"copy worker failed: {type(e).__name__}: {e}")
        self._futures.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if lost is not None:
            raise lost


def recorded_tree(datum) -> "tuple | None":
    """(size, files) as recorded on ``datum``, if both are."""
    size, files = datum.get("size"), datum.get("files")
    if all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (size, files)):
        return size, files
    return None


class CopyPush(_Copy):
    """This site sends its verified data to the sites in its ``upload_options``."""

    direction = "push"

    def pairs(self):
        cfg = self.ctx.config
        return [(self.site, cfg.site(n), cfg.site(n)) for n in self.site.upload_options]


class CopyPull(_Copy):
    """This site fetches verified data from the sites in its ``download_options``, except what
    its own purge would remove again in the same pass (:mod:`cax.purge_rule`)."""

    direction = "pull"
    projection = dict(_Copy.projection, start=1)  # the purge rule's age

    def __init__(self, ctx):
        super().__init__(ctx)
        self.rule = PurgeRule(self.site)

    def skip(self, run, datum) -> bool:
        why = self.rule.would_purge(run, datum["type"], datum.get("pax_version"))
        if why:
            key = {"host": self.host, "type": datum["type"]}
            if datum.get("pax_version") is not None:
                key["pax_version"] = datum["pax_version"]
            self.log(logging.DEBUG, run, f"not pulled: this site would purge it in the same "
                     f"pass ({why})", datum=key)
        return bool(why)

    def pairs(self):
        cfg = self.ctx.config
        return [(cfg.site(n), self.site, cfg.site(n)) for n in self.site.download_options]


class CopyThirdParty(_Copy):
    """Copies between two sites, neither of them this one, that no daemon runs at: grid storage
    (methods declaring ``features.third_party``) receives what its ``download_options`` name.
    Server to server where both ends allow it, else streamed through this host; the log line
    says which. Whichever daemons run this task, the claim in the Runs DB makes each copy once.
    """

    direction = "third-party"

    def pairs(self):
        cfg = self.ctx.config
        out = []
        for dst in cfg.sites.values():
            if dst.name == self.site.name or dst.unreachable or not features(dst).third_party:
                continue
            for name in dst.download_options:
                src = cfg.site(name)
                if src.name != self.site.name and not src.unreachable:
                    out.append((src, dst, dst))
        return out
