"""The deletion safety invariant and the delete protocol, shared by the purge tasks and ``cax rm``.

Invariant (DESIGN.md "Deletion safety"): a copy's files may be deleted only when at least
``min_copies`` *other* datums of the same type (and version) are ``transferred`` with a checksum equal
to the reference checksum, compared like with like (same ``checksum_type``). It is checked on a fresh
read *and* again by the update that marks the datum ``deleting``: that update names the very copies
that made the decision safe (``$all`` of ``$elemMatch``), so if any of them changed meanwhile (another
site marked it ``deleting``, a checksum task flagged it ``error``) the mark fails and nothing is
deleted. Good copies only ever leave the good set through such a mark, so the number of good copies
never drops below ``min_copies`` (or below what it was, if fewer).

Before a copy is deleted, every copy that is counted for it is checked where it lives
(:class:`CopyChecker`, through its site's transfer method): its files exist and their bytes and
file count are what was recorded, and, when its last verification is old (always, by default, before
an origin such as the DAQ buffer's copy goes), it is re-hashed. A copy that fails is marked
``error`` (``error_kind`` ``lost`` or ``corrupt``) so it heals, is not counted, and the deletion
waits: the Runs DB records what the copies were, and only the files say what they are.

Protocol: mark ``deleting`` -> remove files -> pull the datum. A crash after any step leaves either a
``transferred`` datum with its files (nothing happened) or a ``deleting`` datum of this host, which the
next pass finishes (files removed if still present, datum pulled). A ``deleting`` datum is never
counted as a good copy, so a half-removed copy is never relied on.

The protocol is written as a generator (:func:`delete_steps`) that yields between its steps, so the
property test can interleave several sites' purges in any order; :func:`delete_copy` runs it through.
"""
from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, Optional

from cax import paths
from cax.config import same_machine
from cax.runsdb import as_utc, datum_key, key_str, lifecycle, now
# deletion.is_good, good_copies and good_spec stay importable from here
from cax.runsdb.copies import (  # noqa: F401
    _ctype, good_copies, good_spec, is_good, reference, reference_problem, unverifiable)
from cax.runsdb.lifecycle import DatumKey, ErrorKind
from cax.transfer.base import SourceNotFound, TransferError
from cax.transfer.policy import remove_local

log = logging.getLogger("cax.deletion")

PROJECTION = {"name": 1, "number": 1, "data": 1, "references": 1}

#: test hook: ``CAX_TEST_CRASH_AT=marked`` (or ``removed``) kills this process with SIGKILL right after
#: that step, so tests can show a real crash there is finished by the next pass.
CRASH_ENV = "CAX_TEST_CRASH_AT"


def _crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


key_of = datum_key  # the name this module's callers know


def matches(datum: dict, key: dict) -> bool:
    return DatumKey.of(key).matches(datum)


def find_datum(run: dict, key: dict):
    """(index, datum) of the datum with ``key`` in ``run['data']``, or (None, None)."""
    return DatumKey.of(key).find(run)


def _same_copy_test(site, location: str, sites: Optional[dict]):
    """A predicate: is this datum the same files as ``location`` of ``site`` (another site name on
    the same machine with the same path, as written or real)? Such a datum is no "other" copy:
    deleting ours deletes it too. Sites not in ``sites`` are taken as elsewhere."""
    if not sites:
        return None
    mine = {os.path.normpath(location), os.path.realpath(location)}

    def same(d: dict) -> bool:
        other = sites.get(d.get("host"))
        loc = d.get("location")
        if other is None or not isinstance(loc, str) or not same_machine(site, other):
            return False
        return bool({os.path.normpath(loc), os.path.realpath(loc)} & mine)
    return same


#: ``error_kind`` of a copy whose files are gone, or whose bytes or file count are not what was
#: recorded, and of one whose re-computed checksum differs from the reference: both heal
#: (RetryBadChecksumTransfer) and neither is counted as a good copy
LOST, CORRUPT = ErrorKind.LOST, ErrorKind.CORRUPT

#: days after which a counted copy is re-hashed before a copy that is not an origin is deleted,
#: when the site sets no ``purge.reverify_days`` (before an origin goes, every counted copy is)
DEFAULT_REVERIFY_DAYS = 30.0


def trusted_hosts(site) -> tuple:
    """Hosts whose records cax cannot verify (classic Rucio/tape) count toward this site's
    ``min_copies`` as recorded: the site's ``purge.count_unverified_at``."""
    return tuple((getattr(site, "purge", None) or {}).get("count_unverified_at") or ())


@dataclass
class Check:
    """What checking one counted copy found. ``kind`` is LOST or CORRUPT for a bad copy, '' when
    it could not be checked (site unreachable, not in the config): not counted, not flagged."""

    ok: bool
    kind: str = ""
    reason: str = ""
    rehashed: bool = False


def is_origin(datum: dict, ref: Optional[dict]) -> bool:
    """The copy data were first verified in (the DAQ buffer for raw data): no ``source``, or
    the reference's site. Deleting it is where a silent fault elsewhere would cost the run."""
    return not datum.get("source") or (ref is not None and datum.get("host") == ref.get("host"))


def recorded_tree(run: dict, datum: dict, ref: Optional[dict]):
    """((bytes, files), whose) the copy must have: its own ``size``/``files`` (AddSize), else the
    reference site's copy's; (None, '') when neither is recorded."""
    def of(d):
        size, files = d.get("size"), d.get("files")
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (size, files))
        return (size, files) if ok else None
    if of(datum):
        return of(datum), "recorded"
    if ref is not None and ref.get("host") and ref["host"] != datum.get("host"):
        _, d = find_datum(run, datum_key(dict(datum, host=ref["host"])))
        if d is not None and is_good(d, ref) and of(d):
            return of(d), f"recorded for the reference copy at {ref['host']}"
    return None, ""


class CopyChecker:
    """Checks a counted copy where it lives, through its site's transfer method.

    ``sites`` (name -> Site, the config's) says how to reach each site; this site's own copies
    are read from this filesystem. Remote sites are reached through ``pool`` (the pass's
    :class:`cax.transfer.pool.ConnectionPool`: one connection per remote site), or through a pool
    of the checker's own, closed by :meth:`close`. ``reverify_days`` is ``purge.reverify_days``.
    """

    def __init__(self, site, sites: Optional[dict] = None, pool=None,
                 reverify_days: Optional[float] = None, cancel=None,
                 occasion: str = "before a purge"):
        self.site = site
        self.occasion = occasion
        self.sites = sites or {}
        self.reverify_days = reverify_days
        self.cancel = cancel
        self._pool, self._own_pool = pool, None

    def close(self) -> None:
        if self._own_pool is not None:
            self._own_pool.close()
            self._own_pool = None

    def _method(self, host: str):
        """(site, method) reaching ``host``'s files; raises LookupError for an unknown site."""
        from cax.transfer import features, local_method
        if host == self.site.name:
            return self.site, local_method(self.site, cancel=self.cancel)
        other = self.sites.get(host)
        if other is None:
            raise LookupError(f"site {host!r} is not in the config: its copy cannot be checked")
        if features(other).local_paths:
            return other, local_method(other, cancel=self.cancel)
        pool = self._pool
        if pool is None:
            if self._own_pool is None:
                from cax.transfer.pool import ConnectionPool
                self._own_pool = ConnectionPool(cancel=self.cancel)
            pool = self._own_pool
        return other, pool.method(other)

    def due(self, datum: dict, origin: bool) -> bool:
        """Re-hash this counted copy first? Its last verification is ``checksum_time``."""
        days = self.reverify_days
        if days is None:
            if origin:
                return True
            days = DEFAULT_REVERIFY_DAYS
        last = as_utc(datum.get("checksum_time"))
        return last is None or now() - last >= timedelta(days=days)

    def check(self, run: dict, datum: dict, ref: dict, origin: bool) -> Check:
        host, location = datum.get("host"), datum.get("location")
        if unverifiable(datum) and host in trusted_hosts(self.site):
            return Check(True)  # counted as recorded: the site's config says so
        try:
            site, method = self._method(host)
            if method.features.local_paths:
                location = paths.check_location(site, location, datum.get("type"))
            else:
                location = paths.check_remote_location(site, location, datum.get("type"))
        except LookupError as e:
            return Check(False, reason=str(e.args[0]))
        except paths.UnsafePath as e:
            return Check(False, reason=f"copy at {host} not checked: {e}")
        except TransferError as e:
            return Check(False, reason=f"cannot reach {host} to check its copy: {e}")
        try:
            have = tuple(method.tree(location))
        except (SourceNotFound, FileNotFoundError):
            return Check(False, LOST, f"copy missing at {host}:{location} (checked "
                                      f"{self.occasion})")
        except (TransferError, OSError) as e:
            return Check(False, reason=f"cannot check the copy at {host}: {e}")
        want, whose = recorded_tree(run, datum, ref)
        if want is not None and have != want:
            return Check(False, LOST, f"{have[0]} bytes in {have[1]} files at {host}:{location}, "
                                      f"{want[0]} bytes in {want[1]} files {whose} (checked "
                                      f"{self.occasion})")
        if want is not None and not self.due(datum, origin):
            return Check(True)
        algorithm = _ctype(ref)
        try:
            if method.features.local_paths:  # here: hashed with the stop request honoured
                from cax.checksum import checksum
                digest = checksum(location, algorithm, cancel=self.cancel)
            else:
                digest = method.checksum(location, algorithm) \
                    if method.features.remote_checksum else None
        except (SourceNotFound, FileNotFoundError):
            return Check(False, LOST, f"copy missing at {host}:{location} (checked "
                                      f"{self.occasion})")
        except (TransferError, OSError, InterruptedError, ValueError) as e:
            return Check(False, reason=f"cannot re-hash the copy at {host}: {e}")
        if digest is None:
            return Check(False, reason=f"the copy at {host} cannot be re-hashed where it is "
                                       f"(method {method.name})")
        if digest != ref["checksum"]:
            return Check(False, CORRUPT, f"{algorithm} checksum {digest[:16]}... of "
                                         f"{host}:{location} differs from reference "
                                         f"{ref['checksum'][:16]}... (re-hashed {self.occasion})")
        return Check(True, rehashed=True)


@dataclass
class Outcome:
    """What happened to one copy; ``action`` is one of the ACTIONS below."""

    action: str
    reason: str = ""
    safe_by: list = field(default_factory=list)
    #: the admin should hear about it on every pass (not just a copy waiting for more copies)
    warn: bool = False

    ACTIONS = ("deleted", "would-delete", "unsafe", "refused", "gone", "skipped", "lost-race",
               "failed")

    @property
    def deleted(self) -> bool:
        return self.action == "deleted"


Say = Callable[[int, str], None]


def _default_say(level: int, msg: str) -> None:
    log.log(level, msg)


def check_deletable_location(site, run: dict, datum: dict, db=None) -> str:
    """The datum's location, if cax may delete it as this run's copy; UnsafePath otherwise.

    The good-copy count is made for *this run's* data, so the location must be exactly where this
    site keeps this run's data of this type and version (:func:`paths.check_run_location`), must
    not itself be a symlink (it could point at another copy's data), and, given ``db``, no other
    datum of this site (any run) may name the same real path: deleting it would delete their data
    too, and no count was made for them.
    """
    location = paths.check_run_location(site, datum.get("location"), run.get("name"),
                                        datum.get("type"), datum.get("pax_version"))
    if os.path.islink(location):
        raise paths.UnsafePath(f"refusing location {location!r}: it is a symlink")
    if db is not None:
        other = _other_claim(db, site, run, datum, location)
        if other:
            raise paths.UnsafePath(f"refusing location {location!r}: it is also the location of "
                                   f"{other}")
    return location


def _other_claim(db, site, run, datum, location) -> str:
    """'run R datum K' of another datum of this site at ``location`` (as spelled or real), or ''."""
    real = os.path.realpath(location)
    spelled = sorted({location, real, location + "/", real + "/"})
    q = {"data": {"$elemMatch": {"host": site.name, "location": {"$in": spelled}}}}
    own = key_of(datum)
    for r in db.find_runs(q, {"name": 1, "data": 1}):
        for d in r.get("data") or []:
            if not isinstance(d, dict) or d.get("host") != site.name \
                    or d.get("location") not in spelled:
                continue
            if r.get("_id") == run.get("_id") and matches(d, own):
                continue
            return f"run {r.get('name')} datum {key_str(key_of(d))}"
    return ""


#: error_kind of a ``deleting`` datum whose location is refused when the deletion is finished:
#: not one the healing tasks retry (a retry would pull the datum and the admin would never see
#: why its files were not removed). A good datum whose location is refused stays as it was: only
#: the action is refused (lifecycle: ``refused`` is made from ``deleting`` only)
REFUSED_KIND = ErrorKind.UNSAFE_LOCATION


def delete_steps(db, site, run_id, key: dict, *, min_copies: int,
                 own_statuses=("transferred",), force: bool = False, dry_run: bool = False,
                 say: Say = _default_say, attempts: int = 3, sites: Optional[dict] = None,
                 connections=None, reverify_days: Optional[float] = None, cancel=None):
    """Delete this site's copy ``key`` of run ``run_id`` under the invariant (generator).

    Yields after the decision (``'decided'``), the mark (``'marked'``), the file removal
    (``'removed'``); returns an :class:`Outcome`. A datum already ``deleting`` skips straight to the
    finish (a dry run only says it would). ``force`` (``cax rm --force`` after a typed
    confirmation) drops the invariant, never the path checks or the protocol. ``sites`` (name ->
    Site, the config's) says how to reach the counted copies to check them (a copy of a site not
    in it is not counted), and lets a copy of another site name on this machine at the same path
    be recognised as this very copy. ``connections`` is the pass's connection pool (one
    connection per remote site); ``reverify_days`` the site's ``purge.reverify_days``;
    ``cancel`` (the daemon's stop request) cuts a local re-hash short (the deletion then waits).
    ``min_copies`` below 1 without ``force`` is a caller's bug (it would let the last good copy go
    without the admin's typed confirmation), so it raises.
    """
    if min_copies < 1 and not force:
        raise ValueError(f"min_copies={min_copies} without force: refusing to allow deleting the "
                         f"last good copy")
    checker = CopyChecker(site, sites, connections, reverify_days, cancel=cancel)
    try:
        outcome = yield from _delete_steps(db, site, run_id, key, min_copies=min_copies,
                                           own_statuses=own_statuses, force=force,
                                           dry_run=dry_run, say=say, attempts=attempts,
                                           sites=sites, checker=checker)
    finally:
        checker.close()
    return outcome


def _check_counted(db, run_id, run, named: list, ref: dict, origin: bool, checker, checked: dict,
                   dry_run: bool, say: Say) -> Optional[Outcome]:
    """Check every named copy where it lives; None when all are sound, else why the deletion
    waits (bad copies flagged ``error`` so they heal and are not counted again)."""
    problems = []
    for d in named:
        ident = (d["host"], d.get("location"), d.get("checksum"))
        result = checked.get(ident)
        if result is None:
            result = checked[ident] = checker.check(run, d, ref, origin)
            if result.ok and result.rehashed and not dry_run:
                db.apply(lifecycle.rehashed(run_id, key_of(d), d["checksum"]))
            if not result.ok and result.kind:
                if dry_run:
                    say(logging.WARNING, f"dry-run: would flag the copy at {d['host']} "
                        f"{result.kind}: {result.reason}")
                else:
                    say(logging.ERROR, f"copy at {d['host']} is {result.kind}: {result.reason}; "
                        f"marked error so it heals")
                    db.apply(lifecycle.failed(run_id, key_of(d), "transferred", result.reason,
                                              result.kind, expect={"checksum": d["checksum"]}))
        if not result.ok:
            problems.append(f"{d['host']} {result.kind}" if result.kind else result.reason)
    if not problems:
        return None
    bad = any(r.kind for r in (checked.get((d["host"], d.get("location"), d.get("checksum")))
                               for d in named) if r is not None and not r.ok)
    return Outcome("unsafe", f"a counted copy failed its check ({'; '.join(problems)}); "
                             + ("waiting for it to heal" if bad else "waiting until it can be "
                                                                     "checked"), warn=True)


def _delete_steps(db, site, run_id, key: dict, *, min_copies, own_statuses, force, dry_run, say,
                  attempts, sites, checker):
    checked: dict = {}
    for attempt in range(attempts):
        run = db.run(run_id, PROJECTION)
        if run is None:
            return Outcome("gone", "run no longer exists")
        index, datum = find_datum(run, key)
        if datum is None:
            return Outcome("gone", "datum no longer exists")
        status = datum.get("status")
        if status == "deleting":
            if dry_run:
                why = datum.get("deleting_reason") or "marked earlier"
                say(logging.INFO, f"dry-run: would finish deleting {datum.get('location')} ({why})")
                return Outcome("would-delete", why)
            break
        if status not in own_statuses:
            return Outcome("skipped", f"status is {status!r}")
        try:
            location = check_deletable_location(site, run, datum, db)
        except paths.UnsafePath as e:
            # the copy is as good as it was: only this deletion is refused. Flipping the datum to
            # error would take a good copy out of every count (and out of the copies made from
            # it) because of where its record says it lies
            say(logging.ERROR, f"{'dry-run: would be ' if dry_run else ''}refused: not deleted: "
                f"{e}; the datum stays {status}")
            return Outcome("refused", str(e))
        prefer = tuple(n for n, s in (sites or {}).items() if getattr(s, "reference", False))
        ref = reference(run, key["type"], key.get("pax_version"), prefer)
        good = good_copies(run, key["type"], key.get("pax_version"), ref, exclude_host=key["host"],
                           same_copy=_same_copy_test(site, location, sites),
                           trusted=trusted_hosts(site))
        if ref is None and not force:
            problem = reference_problem(run, key["type"], key.get("pax_version"), prefer)
            return Outcome("unsafe", "reference checksum unknown"
                           + (f": {problem}" if problem else ""), warn=bool(problem))
        if len(good) < min_copies and not force:
            return Outcome("unsafe", f"{len(good)} other verified cop{'y' if len(good) == 1 else 'ies'}"
                           f" ({', '.join(d['host'] for d in good) or 'none'}), "
                           f"{min_copies} required")
        # name the reference site's copy first, then the rest, up to min_copies
        good.sort(key=lambda d: (d.get("host") != (ref or {}).get("host"), str(d.get("host"))))
        named = [] if force else good[:min_copies]
        if named:
            waits = _check_counted(db, run_id, run, named, ref, is_origin(datum, ref), checker,
                                   checked, dry_run, say)
            if waits is not None:
                return waits
        hosts = [d["host"] for d in named]
        if force:
            why = (f"forced by the admin (other verified copies: "
                   f"{', '.join(d['host'] for d in good) or 'none'})")
        else:
            why = f"verified copies at {', '.join(hosts)} ({_ctype(ref)} {ref['checksum'][:16]}...)"
        yield "decided"
        if dry_run:
            say(logging.INFO, f"dry-run: would delete {location}: {why}")
            return Outcome("would-delete", why, hosts)
        if db.apply(lifecycle.mark_deleting(run_id, index, key, status,
                                            [good_spec(d, ref) for d in named],
                                            deleting_by=site.name, deleting_reason=why)):
            say(logging.INFO, f"marked deleting {location}: {why}")
            _crash_point("marked")
            yield "marked"
            break
        say(logging.INFO, "copies changed since the decision; deciding again")
    else:
        return Outcome("lost-race", "the Runs DB kept changing; will try on the next pass")
    outcome = yield from finish_steps(db, site, run_id, key, say=say)
    return outcome


def finish_steps(db, site, run_id, key: dict, *, say: Say = _default_say):
    """Finish a ``deleting`` datum of this site: remove its files if present, then pull it."""
    run = db.run(run_id, PROJECTION)
    _, datum = find_datum(run or {}, key)
    if datum is None or datum.get("status") != "deleting":
        return Outcome("gone", "datum no longer deleting")
    try:
        location = check_deletable_location(site, run, datum, db)
    except paths.UnsafePath as e:
        reason = f"not deleted: {e}"
        say(logging.ERROR, f"error: {reason}")
        db.apply(lifecycle.refused(run_id, key, "deleting", reason))
        return Outcome("refused", str(e))
    try:
        removed = remove_local(location)
    except OSError as e:
        # stays 'deleting' (never counted as good) and is retried next pass; the DB says why
        reason = f"removing {location} failed: {type(e).__name__}: {e}"
        say(logging.ERROR, f"error: {reason}")
        db.apply(lifecycle.delete_failed(run_id, key, reason))
        return Outcome("failed", reason)
    say(logging.INFO, f"removed {location}" if removed else f"files already gone at {location}")
    _crash_point("removed")
    yield "removed"
    if db.apply(lifecycle.deleted(run_id, key)):
        say(logging.INFO, "datum removed from the Runs DB")
        return Outcome("deleted", datum.get("deleting_reason", ""))
    return Outcome("gone", "datum changed before it could be pulled")


def drive(gen):
    """Run a step generator to its end; returns its Outcome."""
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        return stop.value


def delete_copy(db, site, run_id, key, **kw) -> Outcome:
    return drive(delete_steps(db, site, run_id, key, **kw))
