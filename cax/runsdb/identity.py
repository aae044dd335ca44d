"""Which run a number or a name means: a run is identified by (detector, number) and (detector, name).

The classic Runs DB holds TPC and muon-veto runs that share numbers, so a number alone may name
two runs. A run without a ``detector`` field (the oldest documents) belongs to the default
detector ``tpc``, as the classic cax took it (its tasks selected ``{'detector': 'tpc'}``). A number
or name given without a detector is looked up in every detector: one match is that run; matches in
several detectors are refused in one line naming them, never one of them picked silently.

The unique indexes on (number, detector) and (name, detector) are made by
:meth:`cax.runsdb.RunsDB.ensure_indexes`; :func:`duplicates` says what stops one being made.
"""
from __future__ import annotations

from typing import Iterable, Optional

#: the detector of a run document without one (the classic cax's only detector at first)
DEFAULT_DETECTOR = "tpc"

#: the run fields a unique identity index covers, each together with ``detector``
IDENTITY_FIELDS = ("number", "name")


class AmbiguousRun(ValueError):
    """A number or name that matches more than one run; ``str()`` is one line saying which."""


def detector_of(run: dict) -> str:
    d = run.get("detector")
    return d if isinstance(d, str) and d else DEFAULT_DETECTOR


def detector_clause(detector: str) -> dict:
    """The filter for runs of ``detector``; documents without one count as the default."""
    if detector == DEFAULT_DETECTOR:
        return {"detector": {"$in": [DEFAULT_DETECTOR, None]}}
    return {"detector": detector}


def query(*, number=None, name=None, detector: Optional[str] = None) -> dict:
    clauses = []
    if number is not None:
        clauses.append({"number": number})
    if name is not None:
        clauses.append({"name": name})
    if detector is not None:
        clauses.append(detector_clause(detector))
    if not clauses:
        raise ValueError("a run is looked up by number or name")
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}


def describe(*, number=None, name=None, detector: Optional[str] = None) -> str:
    what = f"run number {number}" if number is not None else f"run name {name!r}"
    return what + (f" of detector {detector!r}" if detector is not None else "")


def choose(matches: list, what: str) -> Optional[dict]:
    """The one run among ``matches``, None for none; :class:`AmbiguousRun` for several."""
    if len(matches) <= 1:
        return matches[0] if matches else None
    detectors = sorted({detector_of(r) for r in matches})
    if len(detectors) > 1:
        raise AmbiguousRun(f"{what} is in several detectors ({', '.join(detectors)}); choose one "
                           f"with --detector")
    names = ", ".join(sorted(str(r.get("name")) for r in matches))
    raise AmbiguousRun(f"{what} matches {len(matches)} runs of detector {detectors[0]!r} "
                       f"({names}): the Runs DB holds duplicates; fix them first")


def label(run: dict) -> str:
    """The run in job and log file names: its number for the default detector (the names cax
    always used), ``<detector>_<number>`` for the others, so two detectors' jobs never share one."""
    number = run.get("number")
    detector = detector_of(run)
    return str(number) if detector == DEFAULT_DETECTOR else f"{detector}_{number}"


def duplicates(runs: Iterable[dict], field: str) -> dict:
    """``{(detector, value): [names]}`` of the identities that more than one run holds."""
    seen: dict = {}
    for r in runs:
        value = r.get(field)
        if value is None:
            continue
        seen.setdefault((detector_of(r), repr(value) if field == "name" else str(value)),
                        []).append(str(r.get("name")))
    return {k: v for k, v in seen.items() if len(v) > 1}


def duplicates_line(dups: dict, field: str, limit: int = 5) -> str:
    """The duplicates in one line: ``tpc number 5 (a, b); ...`` (the first ``limit``)."""
    items = sorted(dups.items(), key=lambda kv: kv[0])
    shown = "; ".join(f"{det} {field} {value} ({', '.join(sorted(names))})"
                      for (det, value), names in items[:limit])
    more = f"; and {len(items) - limit} more" if len(items) > limit else ""
    return f"{len(items)} {field}(s) held by several runs of one detector: {shown}{more}"
