"""The datum state machine: statuses, error kinds, the one key rule, and every transition.

Every change a task makes to a datum is one of the named transitions below. Each builds a
compare-and-set update (a :class:`Change`: the filter names the datum by its key *and* the status it
must still be in; the update is what the transition writes), and :meth:`cax.runsdb.RunsDB.apply`
executes it: a transition decided on a stale read matches nothing and reports that it did not take
effect. Why one module: the transitions were once written at about 45 places in 8 modules, and they
drifted (a size mismatch written without a kind was never healed). :data:`TRANSITIONS` is the
table the tests and docs/design.rst's "Datum states" section are checked against.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Iterable, Optional, Union

from cax.runsdb.clock import now


class Status(str, Enum):
    """A datum's ``status``; the values are the strings documents hold."""

    TRANSFERRING = "transferring"
    VERIFYING = "verifying"
    TRANSFERRED = "transferred"
    ERROR = "error"
    RETRYING = "retrying"
    DELETING = "deleting"
    PROCESSING = "processing"

    def __str__(self) -> str:
        return self.value


class ErrorKind(str, Enum):
    """An ``error`` datum's ``error_kind``: healing tasks select by kind, never by reason text."""

    FAILED = "failed"                   # a transfer (or another step) failed; nothing landed
    INTERRUPTED = "interrupted"         # SIGTERM/SIGINT ended the copy
    NO_SPACE = "no-space"               # the destination's disk or quota had no room
    STALLED = "stalled"                 # no heartbeat for stalled_after
    UNVERIFIED = "unverified"           # landed under its final name, could not be checksummed
    CHECKSUM = "checksum"               # checksum differs from the reference
    SIZE = "size"                       # size differs from the reference site's copy
    LOST = "lost"                       # files gone, or bytes/file count other than recorded
    CORRUPT = "corrupt"                 # re-hashed where it lies to another checksum
    RETRY_FAILED = "retry-failed"       # a retry could not remove the bad copy's files
    UNSAFE_LOCATION = "unsafe-location"  # a purge refused a location that is not this run's data
    SUBMIT = "submit"                   # the batch system refused or could not take the job
    PROCESSING = "processing"           # the processing job (cax-process) failed

    def __str__(self) -> str:
        return self.value


#: kinds of copies that never reached their final name (only a partial copy may be left)
NOT_LANDED = (ErrorKind.FAILED, ErrorKind.INTERRUPTED, ErrorKind.NO_SPACE)
#: kinds of a copy that landed but is bad where it lies: healed from a good copy elsewhere
#: (RetryBadChecksumTransfer), never counted as good
LANDED_BAD = (ErrorKind.CHECKSUM, ErrorKind.SIZE, ErrorKind.LOST, ErrorKind.CORRUPT)

#: the Runs DB keeps this many characters of a reason
REASON_CHARS = 500


def trim_reason(reason) -> str:
    """One line of at most :data:`REASON_CHARS`: the Runs DB always says what happened, briefly."""
    return " ".join(str(reason).split())[:REASON_CHARS] or "unknown error"


def _now() -> datetime:
    return now()


@dataclass(frozen=True)
class DatumKey:
    """The identity of a datum. One rule everywhere: host, type and pax_version all equal, where
    a missing ``pax_version`` is ``None`` (raw data have none). In a Mongo filter ``pax_version:
    None`` matches a missing field, so :meth:`spec` is the same rule on the server."""

    host: str
    type: str
    pax_version: Optional[str] = None

    @classmethod
    def of(cls, datum: Union[dict, "DatumKey"]) -> "DatumKey":
        if isinstance(datum, DatumKey):
            return datum
        return cls(datum["host"], datum["type"], datum.get("pax_version"))

    def matches(self, datum) -> bool:
        return (isinstance(datum, dict) and datum.get("host") == self.host
                and datum.get("type") == self.type
                and datum.get("pax_version") == self.pax_version)

    def find(self, run: Optional[dict]):
        """(index, datum) of this key's datum in ``run['data']``, or (None, None)."""
        for i, d in enumerate((run or {}).get("data") or []):
            if self.matches(d):
                return i, d
        return None, None

    def spec(self) -> dict:
        """The ``$elemMatch`` fields that select this datum."""
        return {"host": self.host, "type": self.type, "pax_version": self.pax_version}

    def as_dict(self) -> dict:
        """The key as the dict tasks pass around (``pax_version`` only when there is one)."""
        d = {"host": self.host, "type": self.type}
        if self.pax_version is not None:
            d["pax_version"] = self.pax_version
        return d

    def __str__(self) -> str:
        return f"{self.type}@{self.host}" + (f"[{self.pax_version}]" if self.pax_version else "")


@dataclass(frozen=True)
class Change:
    """One compare-and-set update of one run: applied if ``filter`` still matches."""

    transition: str
    what: str
    filter: dict
    update: dict


#: the ``target`` of a transition that changes fields but not the status
SAME = "(same)"


@dataclass(frozen=True)
class Transition:
    """A row of the state machine. ``source``/``target`` None: no datum (claimed, removed);
    ``target`` :data:`SAME`: the status stays."""

    name: str
    source: tuple
    target: Union[Status, str, None]
    kinds: tuple = ()
    sides: tuple = ()
    doc: str = ""


S, K = Status, ErrorKind
_COPY = (S.TRANSFERRING, S.VERIFYING)
_ANY = tuple(S)
# who makes a transition: ``copier`` the daemon that claimed a copy (its owner, which heals it),
# ``destination`` the site holding the datum, ``verifier`` the site checksumming it (the
# destination, or the pusher for a site that runs no cax), ``processor`` the processing site or
# its job, ``purger`` a site's purge (or ``cax rm``), ``admin`` a cax command run by hand
TRANSITIONS = (
    Transition("claim", (None,), S.TRANSFERRING, sides=("copier",),
               doc="a copy is claimed; exactly one claimant wins"),
    Transition("claim_processing", (None,), S.PROCESSING, sides=("processor",),
               doc="a processing job (or cax-process by hand) is claimed"),
    Transition("heartbeat", (S.TRANSFERRING, S.VERIFYING, S.PROCESSING), SAME, sides=(
        "copier", "verifier", "processor"), doc="progress: the status stays"),
    Transition("copied", (S.TRANSFERRING,), S.VERIFYING, sides=("copier",),
               doc="the copy landed under its final name"),
    Transition("verified", (S.VERIFYING,), S.TRANSFERRED, sides=("verifier",),
               doc="the checksum equals the reference (or became it)"),
    Transition("origin_checksummed", (S.TRANSFERRED,), SAME, sides=("verifier",),
               doc="an origin recorded without a checksum gets one"),
    Transition("reference_checked", (S.TRANSFERRED,), SAME, sides=("destination",),
               doc="a copy's checksum was compared with the reference"),
    Transition("rehashed", (S.TRANSFERRED,), SAME, sides=("purger", "destination"),
               doc="re-hashed where it lies and found good"),
    Transition("measured", (S.TRANSFERRED,), SAME, sides=("destination",),
               doc="size and file count recorded; permissions set"),
    Transition("failed", _ANY, S.ERROR, kinds=tuple(K), sides=(
        "copier", "verifier", "destination", "processor", "purger", "admin"),
        doc="any step failed: a one-line reason and a kind"),
    Transition("stalled", _COPY, S.ERROR, kinds=(K.STALLED,), sides=("copier",),
               doc="no progress for stalled_after (compare-and-set on the whole array)"),
    Transition("landed", (S.TRANSFERRING,), S.VERIFYING, sides=("copier",),
               doc="a copy found whole under its final name is verified where it is"),
    Transition("mark_retrying", (S.ERROR,), S.RETRYING, sides=("copier", "destination"),
               doc="exactly one daemon removes a failed copy's files"),
    Transition("retried", (S.RETRYING,), None, sides=("copier", "destination"),
               doc="files removed: the datum is pulled and the run's retries counted"),
    Transition("resubmit", (S.ERROR,), None, kinds=(K.SUBMIT,), sides=("processor",),
               doc="a refused submission is pulled, not counted as a retry"),
    Transition("retry_processing", (S.ERROR,), None, sides=("processor",),
               doc="a failed processing datum is pulled and the attempt recorded"),
    Transition("job_recorded", (S.PROCESSING,), SAME, sides=("processor",),
               doc="the batch job id of a processing datum"),
    Transition("job_ended", (S.PROCESSING,), S.VERIFYING, sides=("processor",),
               doc="the processor's output is in place"),
    Transition("mark_deleting", (S.TRANSFERRED, S.ERROR), S.DELETING, sides=(
        "purger",), doc="only while the copies that make it safe are still good"),
    Transition("delete_failed", (S.DELETING,), SAME, sides=("purger",),
               doc="removing the files failed: stays deleting, the reason recorded"),
    Transition("deleted", (S.DELETING,), None, sides=("purger",),
               doc="files removed: the datum is pulled"),
    Transition("refused", (S.DELETING,), S.ERROR,
               kinds=(K.UNSAFE_LOCATION,), sides=("purger",),
               doc="finishing a deletion refused a location that is not this run's data"),
    Transition("moving", (S.TRANSFERRED, S.ERROR), SAME, sides=("admin",),
               doc="cax mv: a move is under way, then the new location (status stays)"),
)
BY_NAME = {t.name: t for t in TRANSITIONS}


def states_table() -> str:
    """:data:`TRANSITIONS` as the reStructuredText table of docs/design.rst's "Datum states"
    (tests/test_lifecycle.py checks that the page holds exactly this)."""
    def cell(v):
        return "(none)" if v is None else str(v)
    rows = [("transition", "from", "to", "error kinds", "made by", "what")]
    for t in TRANSITIONS:
        kinds = "any" if set(t.kinds) == set(ErrorKind) else ", ".join(map(str, t.kinds)) or "-"
        source = "any" if set(t.source) == set(Status) else ", ".join(cell(x) for x in t.source)
        rows.append((f"``{t.name}``", source, cell(t.target),
                     kinds, ", ".join(t.sides), t.doc))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    rule = "  ".join("=" * w for w in widths)
    lines = [rule, "  ".join(c.ljust(w) for c, w in zip(rows[0], widths)).rstrip(), rule]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows[1:]]
    return "\n".join(lines + [rule])


def _status_match(expected) -> Union[str, dict]:
    if isinstance(expected, (list, tuple, set, frozenset)):
        return {"$in": [str(s) for s in expected]}
    return str(expected)


def _allowed(transition: str, expected) -> None:
    """A transition is only ever built from a from-status of its row: the table is the code."""
    t = BY_NAME.get(transition)
    if t is None or expected is None:
        return
    given = expected if isinstance(expected, (list, tuple, set, frozenset)) else (expected,)
    wrong = [str(s) for s in given if s not in t.source]
    if wrong:
        raise ValueError(f"transition {transition} is not made from {', '.join(wrong)} "
                         f"(cax/runsdb/lifecycle.py TRANSITIONS)")


def _match(key, expected, expect: Optional[dict] = None) -> dict:
    m = DatumKey.of(key).spec()
    if isinstance(key, dict):  # a key dict with more fields: they must still hold too
        m.update({f: v for f, v in key.items() if f not in m})
    if expect:
        m.update(expect)
    if expected is not None:
        m["status"] = _status_match(expected)
    return m


def _set(transition: str, run_id, key, expected, fields: dict, unset: Iterable[str] = (),
         expect: Optional[dict] = None, what: str = "") -> Change:
    """Set fields of one datum, found by key (and ``expect``) in ``expected`` status."""
    _allowed(transition, expected)
    update: dict = {}
    if fields:
        update["$set"] = {f"data.$.{k}": (str(v) if isinstance(v, Enum) else v)
                          for k, v in fields.items()}
    if unset:
        update["$unset"] = {f"data.$.{k}": "" for k in unset}
    k = DatumKey.of(key)
    return Change(transition, what or f"{transition} {k}",
                  {"_id": run_id, "data": {"$elemMatch": _match(key, expected, expect)}}, update)


def _pull(transition: str, run_id, key, expected, expect: Optional[dict] = None,
          also: Optional[dict] = None) -> Change:
    _allowed(transition, expected)
    match = _match(key, expected, expect)
    update = {"$pull": {"data": match}, **(also or {})}
    return Change(transition, f"{transition} {DatumKey.of(key)}",
                  {"_id": run_id, "data": {"$elemMatch": match}}, update)


def _on_array(transition: str, run_id, data_as_read: list, index: int, fields: dict) -> Change:
    """Compare-and-set on the whole ``data`` array as read (matched, never rewritten): for
    decisions that depend on other datums, any change to any copy voids the update."""
    return Change(transition, f"{transition} data.{index}", {"_id": run_id, "data": data_as_read},
                  {"$set": {f"data.{index}.{k}": (str(v) if isinstance(v, Enum) else v)
                            for k, v in fields.items()}})


# ---- claims --------------------------------------------------------------------------------
def claim(run_id, datum: dict, transition: str = "claim") -> Change:
    """Add ``datum`` only if no datum with its key exists: exactly one claimant wins."""
    k = DatumKey.of(datum)
    return Change(transition, f"claim {k}",
                  {"_id": run_id, "data": {"$not": {"$elemMatch": k.spec()}}},
                  {"$push": {"data": datum}})


def claim_processing(run_id, datum: dict) -> Change:
    return claim(run_id, dict(datum, status=str(S.PROCESSING)), "claim_processing")


# ---- a copy's way to transferred -------------------------------------------------------------
def heartbeat(run_id, key, status, **fields) -> Change:
    return _set("heartbeat", run_id, key, status, dict(fields, heartbeat=_now()))


def copied(run_id, key) -> Change:
    return _set("copied", run_id, key, S.TRANSFERRING, {"status": S.VERIFYING, "heartbeat": _now()})


def verified(run_id, key, expected, fields: dict, expect: Optional[dict] = None) -> Change:
    """``verifying`` -> ``transferred`` with the checksum (or an origin's first checksum)."""
    name = "verified" if expected == S.VERIFYING else "origin_checksummed"
    return _set(name, run_id, key, expected, dict(fields, status=S.TRANSFERRED), expect=expect)


def reference_checked(run_id, key, checksum: str) -> Change:
    return _set("reference_checked", run_id, key, S.TRANSFERRED, {"reference_checked": True},
                expect={"checksum": checksum})


def rehashed(run_id, key, checksum: str, **fields) -> Change:
    return _set("rehashed", run_id, key, S.TRANSFERRED, dict(fields, checksum_time=_now()),
                expect={"checksum": checksum})


def measured(run_id, key, fields: dict) -> Change:
    """Facts about a transferred copy (size, files, permissions): the status stays."""
    return _set("measured", run_id, key, S.TRANSFERRED, fields)


# ---- errors ---------------------------------------------------------------------------------
def error_fields(reason, kind) -> dict:
    return {"status": S.ERROR, "error": trim_reason(reason), "error_kind": ErrorKind(kind),
            "error_time": _now()}


def failed(run_id, key, expected, reason, kind=K.FAILED, expect: Optional[dict] = None,
           **fields) -> Change:
    """Mark a datum ``error`` with a one-line reason and its kind."""
    return _set("failed", run_id, key, expected, dict(fields, **error_fields(reason, kind)),
                expect=expect)


def refused(run_id, key, expected, reason) -> Change:
    return _set("refused", run_id, key, expected, error_fields(reason, K.UNSAFE_LOCATION))


def stalled(run_id, data_as_read: list, index: int, reason: str) -> Change:
    return _on_array("stalled", run_id, data_as_read, index, error_fields(reason, K.STALLED))


def landed(run_id, data_as_read: list, index: int) -> Change:
    return _on_array("landed", run_id, data_as_read, index,
                     {"status": S.VERIFYING, "heartbeat": _now()})


# ---- healing --------------------------------------------------------------------------------
def mark_retrying(run_id, data_as_read: list, index: int) -> Change:
    return _on_array("mark_retrying", run_id, data_as_read, index,
                     {"status": S.RETRYING, "retry_time": _now()})


def retried(run_id, key) -> Change:
    """The files are gone: pull the datum and count the retry, in one update."""
    return _pull("retried", run_id, key, S.RETRYING, also={"$inc": {"retries": 1}})


# ---- processing -----------------------------------------------------------------------------
def job_recorded(run_id, key, fields: dict, expect: Optional[dict] = None,
                 any_status: bool = False) -> Change:
    """The job id (and backend) of a processing datum; ``any_status``: a fast job may already
    have moved its datum on."""
    return _set("job_recorded", run_id, key, None if any_status else S.PROCESSING, fields,
                expect=expect)


def job_ended(run_id, key, **fields) -> Change:
    return _set("job_ended", run_id, key, S.PROCESSING,
                dict(fields, status=S.VERIFYING, heartbeat=_now()))


def resubmit(run_id, key) -> Change:
    return _pull("resubmit", run_id, key, S.ERROR, expect={"error_kind": str(K.SUBMIT)})


def retry_processing(run_id, key, attempt: dict) -> Change:
    """Pull a failed processing datum and record the attempt: together or not at all."""
    return _pull("retry_processing", run_id, key, S.ERROR,
                 also={"$push": {"processing_retries": attempt}})


# ---- deletion -------------------------------------------------------------------------------
def mark_deleting(run_id, index: int, key, expected, good: Iterable[dict] = (),
                  **fields) -> Change:
    """Move the datum at ``data.<index>`` (which must still be ``key`` in ``expected``) to
    ``deleting``, only if every copy in ``good`` (``$elemMatch`` specs) is still there.

    Why index addressing: the filter must name several elements of ``data`` (the copies that
    make the delete safe) and the update must touch exactly one other element. ``$`` after
    ``$all`` is rejected by mongomock, the embedded store and real servers alike, and mongomock
    has no ``array_filters``; ``data.<i>.field`` in both filter and ``$set`` is exact on all of
    them (tests/test_purge.py::test_marking_update_semantics). If the array shifted since the
    read, the ``data.<i>`` conditions fail and nothing is written.
    """
    _allowed("mark_deleting", expected)
    k, p = DatumKey.of(key), f"data.{index}"
    filt: dict = {"_id": run_id, **{f"{p}.{f}": v for f, v in k.spec().items()},
                  f"{p}.status": _status_match(expected)}
    good = list(good)
    if good:
        filt["data"] = {"$all": [{"$elemMatch": g} for g in good]}
    update = {"$set": {f"{p}.status": str(S.DELETING), f"{p}.deleting_time": _now(),
                       **{f"{p}.{f}": v for f, v in fields.items()}}}
    return Change("mark_deleting", f"mark {k} deleting", filt, update)


def delete_failed(run_id, key, reason) -> Change:
    return _set("delete_failed", run_id, key, S.DELETING,
                {"error": trim_reason(reason), "error_time": _now()})


def deleted(run_id, key) -> Change:
    return _pull("deleted", run_id, key, S.DELETING)


# ---- cax mv ---------------------------------------------------------------------------------
def moving(run_id, key, expected, dst: str) -> Change:
    return _set("moving", run_id, key, expected, {"moving_to": dst, "moving_time": _now()})


def move_undone(run_id, key, expected) -> Change:
    return _set("moving", run_id, key, expected, {}, unset=["moving_to", "moving_time"])


def moved(run_id, key, expected, dst: str) -> Change:
    return _set("moving", run_id, key, expected, {"location": dst},
                unset=["moving_to", "moving_time"])
