"""The deletion safety invariant and the delete protocol, shared by the purge tasks and ``cax rm``.

Invariant (DESIGN.md "Deletion safety"): a copy's files may be deleted only when at least
``min_copies`` *other* datums of the same type (and version) are ``transferred`` with a checksum equal
to the reference checksum, compared like with like (same ``checksum_type``). It is checked on a fresh
read *and* again by the update that marks the datum ``deleting``: that update names the very copies
that made the decision safe (``$all`` of ``$elemMatch``), so if any of them changed meanwhile (another
site marked it ``deleting``, a checksum task flagged it ``error``) the mark fails and nothing is
deleted. Good copies only ever leave the good set through such a mark, so the number of good copies
never drops below ``min_copies`` (or below what it was, if fewer).

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
import shutil
import signal
from dataclasses import dataclass, field
from typing import Callable, Optional

from cax import paths
from cax.config import same_machine
from cax.runsdb import datum_key, key_str, now, reference, reference_problem

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
    return (datum.get("host") == key["host"] and datum.get("type") == key["type"]
            and datum.get("pax_version") == key.get("pax_version"))


def find_datum(run: dict, key: dict):
    """(index, datum) of the datum with ``key`` in ``run['data']``, or (None, None)."""
    for i, d in enumerate(run.get("data") or []):
        if isinstance(d, dict) and matches(d, key):
            return i, d
    return None, None


def _ctype(d: dict) -> str:
    return d.get("checksum_type") or "sha512"


def is_good(datum: dict, ref: Optional[dict]) -> bool:
    """A verified copy: ``transferred`` with the reference checksum of the same algorithm."""
    return (ref is not None and isinstance(datum, dict) and datum.get("status") == "transferred"
            and bool(datum.get("checksum")) and datum.get("checksum") == ref.get("checksum")
            and _ctype(datum) == _ctype(ref))


def good_copies(run: dict, dtype: str, version, ref: Optional[dict], exclude_host=None,
                same_copy: Optional[Callable[[dict], bool]] = None) -> list:
    """Good copies other than ``exclude_host``'s; ``same_copy(datum)`` True drops a datum that is
    really the excluded copy under another site name."""
    return [d for d in run.get("data") or []
            if isinstance(d, dict) and d.get("type") == dtype and d.get("pax_version") == version
            and d.get("host") != exclude_host and is_good(d, ref)
            and not (same_copy and same_copy(d))]


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


def good_spec(datum: dict, ref: dict) -> dict:
    """The ``$elemMatch`` that is true only while ``datum`` is still a good copy."""
    ctype = _ctype(ref)
    return {"host": datum["host"], "type": datum["type"], "pax_version": datum.get("pax_version"),
            "status": "transferred", "checksum": ref["checksum"],
            "checksum_type": {"$in": [ctype, None]} if ctype == "sha512" else ctype}


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


#: error_kind of a refused deletion: not one the healing tasks retry (a retry would pull the datum
#: and the admin would never see why its copy was not deleted)
REFUSED_KIND = "unsafe-location"


def remove_path(location: str) -> bool:
    """Remove a file or directory tree without following symlinks; False if it was already gone."""
    if not os.path.lexists(location):
        return False
    def gone_already(func, path, exc_info):
        # another daemon of this site finishing the same 'deleting' datum: not an error
        if not issubclass(exc_info[0], FileNotFoundError):
            raise exc_info[1]

    try:
        if os.path.isdir(location) and not os.path.islink(location):
            # rmtree unlinks symlinks inside; it never follows them
            shutil.rmtree(location, onerror=gone_already)
        else:
            os.unlink(location)
    except FileNotFoundError:
        pass
    return True


def delete_steps(db, site, run_id, key: dict, *, min_copies: int,
                 own_statuses=("transferred",), force: bool = False, dry_run: bool = False,
                 say: Say = _default_say, attempts: int = 3, sites: Optional[dict] = None):
    """Delete this site's copy ``key`` of run ``run_id`` under the invariant (generator).

    Yields after the decision (``'decided'``), the mark (``'marked'``), the file removal
    (``'removed'``); returns an :class:`Outcome`. A datum already ``deleting`` skips straight to the
    finish (a dry run only says it would). ``force`` (``cax rm --force`` after a typed
    confirmation) drops the invariant, never the path checks or the protocol. ``sites`` (name ->
    Site, the config's) lets a copy of another site name on this machine at the same path be
    recognised as this very copy. ``min_copies`` below 1 without ``force`` is a caller's bug (it
    would let the last good copy go without the admin's typed confirmation), so it raises.
    """
    if min_copies < 1 and not force:
        raise ValueError(f"min_copies={min_copies} without force: refusing to allow deleting the "
                         f"last good copy")
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
            reason = f"not deleted: {e}"
            if dry_run:
                say(logging.ERROR, f"dry-run: would refuse and mark the datum error: {reason}")
                return Outcome("refused", str(e))
            say(logging.ERROR, f"error: {reason}")
            db.set_error(run_id, key, status, reason, kind=REFUSED_KIND)
            return Outcome("refused", str(e))
        ref = reference(run, key["type"], key.get("pax_version"))
        good = good_copies(run, key["type"], key.get("pax_version"), ref, exclude_host=key["host"],
                           same_copy=_same_copy_test(site, location, sites))
        if ref is None and not force:
            problem = reference_problem(run, key["type"], key.get("pax_version"))
            return Outcome("unsafe", "reference checksum unknown"
                           + (f": {problem}" if problem else ""), warn=bool(problem))
        if len(good) < min_copies and not force:
            return Outcome("unsafe", f"{len(good)} other verified cop{'y' if len(good) == 1 else 'ies'}"
                           f" ({', '.join(d['host'] for d in good) or 'none'}), "
                           f"{min_copies} required")
        # name the reference site's copy first, then the rest, up to min_copies
        good.sort(key=lambda d: (d.get("host") != (ref or {}).get("host"), str(d.get("host"))))
        named = [] if force else good[:min_copies]
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
        if db.mark_deleting(run_id, index, key, status,
                            [good_spec(d, ref) for d in named],
                            deleting_by=site.name, deleting_reason=why):
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
        db.set_error(run_id, key, "deleting", reason, kind=REFUSED_KIND)
        return Outcome("refused", str(e))
    try:
        removed = remove_path(location)
    except OSError as e:
        # stays 'deleting' (never counted as good) and is retried next pass; the DB says why
        reason = f"removing {location} failed: {type(e).__name__}: {e}"
        say(logging.ERROR, f"error: {reason}")
        db.update_datum(run_id, key, "deleting", {"error": " ".join(reason.split())[:500],
                                                  "error_time": now()})
        return Outcome("failed", reason)
    say(logging.INFO, f"removed {location}" if removed else f"files already gone at {location}")
    _crash_point("removed")
    yield "removed"
    if db.pull_datum(run_id, key, "deleting"):
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
