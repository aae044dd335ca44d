"""What counts as a good copy, and what every copy is compared with: the reference checksum.

These rules decide what may be deleted (cax/deletion.py), what a copy is verified against
(AddChecksum), what AddSize compares sizes with and what healing copies from, so they live in one
place beside the transitions (cax/runsdb/lifecycle.py) that act on them.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, Optional

from cax.checksum import ALGORITHMS

#: what the classic cax wrote where it had no checksum (or no location): ``"n/a"`` after a failed
#: tape or Rucio transfer, ``"NA"`` for a Rucio download in flight. Such a value is no checksum.
PLACEHOLDERS = frozenset({"", "n/a", "na", "none", "null", "-"})

#: classic statuses of records cax does not act on (the Rucio and tape movers wrote them); a
#: datum in one of them is never a good copy and is never changed by cax
CLASSIC_STATUSES = ("failed", "RSEreupload")

#: hosts only the classic cax's Rucio and tape movers wrote records for
CLASSIC_HOSTS = ("rucio-catalogue", "tsm-server")

_HEX = re.compile(r"[0-9a-fA-F]+")


def placeholder(value) -> bool:
    """A classic stand-in for a missing value (``None``, ``"n/a"``, ...)."""
    return value is None or (isinstance(value, str) and value.strip().lower() in PLACEHOLDERS)


def checksum_of(datum: dict) -> Optional[str]:
    """The datum's checksum, or None when it has none (a placeholder is none)."""
    value = datum.get("checksum") if isinstance(datum, dict) else None
    return None if placeholder(value) or not isinstance(value, str) else value


def _ctype(d: dict) -> str:
    """The checksum's algorithm. cax always writes ``checksum_type``; a datum without one was
    written by an older tool: sha512 (the classic cax's own checksum) unless the value has the
    shape of the classic Rucio adler32 (8 hex digits) or tape MD5 (32): those are named as
    foreign types that equal no algorithm of cax, so they are never compared with a reference,
    never become one, and never make a good copy look bad."""
    ctype = d.get("checksum_type")
    if ctype:
        return ctype
    value = checksum_of(d)
    if value is not None and _HEX.fullmatch(value):
        if len(value) == 8:
            return "adler32 (classic Rucio)"
        if len(value) == 32:
            return "md5 (classic tape)"
    return "sha512"


def comparable(datum: dict) -> bool:
    """Whether cax can compare the datum's checksum with a reference: it has one, of an
    algorithm cax computes."""
    return checksum_of(datum) is not None and _ctype(datum) in ALGORITHMS


def unverifiable(datum: dict) -> bool:
    """A ``transferred`` record whose checksum cax cannot compare (a classic Rucio or tape
    record: adler32, MD5, ``"n/a"`` or none): a copy cax can neither verify nor count, unless a
    site's ``purge.count_unverified_at`` names its host."""
    return isinstance(datum, dict) and datum.get("status") == "transferred" \
        and not comparable(datum)


def _legacy_origins(run: dict, dtype: str, version: Optional[str]) -> list:
    """Datums without ``source`` whose checksum cax can compare; the sha512 ones only when there
    are any (a checksum of another algorithm says nothing about them)."""
    found = [d for d in run.get("data") or []
             if isinstance(d, dict) and d.get("type") == dtype and d.get("pax_version") == version
             and not d.get("source") and comparable(d)]
    sha = [d for d in found if _ctype(d) == "sha512"]
    return sha or found


def _as_ref(d: dict) -> dict:
    return {"checksum": checksum_of(d), "checksum_type": _ctype(d), "host": d.get("host")}


def _preferred(run: dict, dtype: str, version: Optional[str], prefer: Iterable[str]):
    """The verified sha512 of the first configured reference site that has one."""
    for host in prefer or ():
        for d in run.get("data") or []:
            if (isinstance(d, dict) and d.get("host") == host and d.get("type") == dtype
                    and d.get("pax_version") == version and d.get("status") == "transferred"
                    and comparable(d) and _ctype(d) == "sha512"):
                return d
    return None


def reference(run: dict, dtype: str, version: Optional[str] = None,
              prefer: Iterable[str] = ()) -> Optional[dict]:
    """The reference checksum of a run's data: ``{checksum, checksum_type, host}`` or None.

    It is the checksum recorded by the first site that verified the data (run-level
    ``references``). Runs DBs written by older tools have none. There the verified sha512 of the
    first configured reference site (``prefer``: the sites with ``"reference": true``, as the
    classic cax compared every copy with its DAQ's "master" checksum) stands in; else the origin
    datum (transferred, with a checksum, and not a copy, i.e. no ``source``), but only when every
    datum without ``source`` that has a comparable checksum (whatever its status) agrees: older
    tools did not write ``source`` on copies either, so a bad copy may look like an origin, and
    trusting whichever is listed first could make the bad copy the reference and the only true
    copy deletable. Checksums of another algorithm (Rucio's adler32, the tape's MD5) and
    placeholders (``"n/a"``) are no evidence either way. Disagreement means unknown
    (:func:`reference_problem` says why).
    """
    for ref in run.get("references") or []:
        if ref.get("type") == dtype and ref.get("pax_version") == version:
            return ref
    d = _preferred(run, dtype, version, prefer)
    if d is not None:
        return _as_ref(d)
    origins = _legacy_origins(run, dtype, version)
    if len({(checksum_of(d), _ctype(d)) for d in origins}) > 1:
        return None
    d = next((d for d in origins if d.get("status") == "transferred"), None)
    if d is None:
        return None
    return _as_ref(d)


def reference_problem(run: dict, dtype: str, version: Optional[str] = None,
                      prefer: Iterable[str] = ()) -> str:
    """Why the reference is unknown, in one line; '' when it is known or simply not recorded."""
    if any(r.get("type") == dtype and r.get("pax_version") == version
           for r in run.get("references") or []):
        return ""
    if _preferred(run, dtype, version, prefer) is not None:
        return ""
    origins = _legacy_origins(run, dtype, version)
    if len({(checksum_of(d), _ctype(d)) for d in origins}) > 1:
        return (f"no recorded reference and the copies without 'source' disagree "
                f"({', '.join(str(d.get('host')) for d in origins)}): which one is the original is "
                f"unknown; record the reference (run field 'references') by hand, or name the "
                f"site whose checksum is the reference (site key 'reference')")
    return ""


def _describe(d: dict) -> str:
    value = checksum_of(d)
    if value is None:
        what = "no checksum" if d.get("checksum") is None else f"checksum {d['checksum']!r}"
    else:
        what = f"{_ctype(d)} {value[:12]}"
    source = f", from {d['source']}" if d.get("source") else ""
    return f"{d.get('type')}@{d.get('host')} ({d.get('status')}, {what}{source})"


def unknown_reference(run: dict, dtype: str, version: Optional[str] = None,
                      prefer: Iterable[str] = ()) -> str:
    """One line saying why no copy of this data can be verified or made, naming every datum
    involved; '' when the reference is known."""
    if reference(run, dtype, version, prefer) is not None:
        return ""
    involved = [d for d in run.get("data") or []
                if isinstance(d, dict) and d.get("type") == dtype
                and d.get("pax_version") == version]
    why = reference_problem(run, dtype, version, prefer) or (
        "no recorded reference and no verified checksum cax can compare (sha512) on a datum "
        "without 'source'")
    return (f"reference checksum of {dtype}" + (f" {version}" if version else "")
            + f" unknown: {why}; datums: {'; '.join(_describe(d) for d in involved) or 'none'}")


def expected_checksum(run: dict, datum: dict, prefer: Iterable[str] = ()) -> Optional[dict]:
    """What a copy of (or copied from) ``datum`` must hash to: ``{checksum, checksum_type, host}``.

    Raw data have one truth, the run's reference. Processed data are not bit-reproducible: every
    site that produces a version is the origin of its own output, so a processed datum is held to
    the origin it descends from (following ``source`` back to a datum without one), and to the
    run's reference only where that chain is broken (an origin purged meanwhile).
    """
    dtype, version = datum.get("type"), datum.get("pax_version")
    if dtype == "processed":
        by_host = {d.get("host"): d for d in run.get("data") or []
                   if d.get("type") == dtype and d.get("pax_version") == version}
        d, seen = datum, set()
        while d is not None and d.get("host") not in seen:
            seen.add(d.get("host"))
            if not d.get("source"):
                if comparable(d) and d.get("status") == "transferred":
                    return _as_ref(d)
                break
            d = by_host.get(d["source"])
    return reference(run, dtype, version, prefer)


def is_good(datum: dict, ref: Optional[dict]) -> bool:
    """A verified copy: ``transferred`` with the reference checksum of the same algorithm."""
    return (ref is not None and isinstance(datum, dict) and datum.get("status") == "transferred"
            and checksum_of(datum) is not None and datum.get("checksum") == ref.get("checksum")
            and _ctype(datum) == _ctype(ref))


def counted(datum: dict, ref: Optional[dict], trusted: Iterable[str] = ()) -> bool:
    """A copy that counts toward ``min_copies``: a good copy, or a ``transferred`` record cax
    cannot verify (:func:`unverifiable`) at a host the site trusts (``purge.count_unverified_at``).
    A record at a trusted host whose comparable checksum differs from the reference is bad, and
    never counts."""
    return is_good(datum, ref) or (
        ref is not None and unverifiable(datum) and datum.get("host") in set(trusted or ()))


def good_copies(run: dict, dtype: str, version, ref: Optional[dict], exclude_host=None,
                same_copy: Optional[Callable[[dict], bool]] = None,
                trusted: Iterable[str] = ()) -> list:
    """Good copies other than ``exclude_host``'s; ``same_copy(datum)`` True drops a datum that is
    really the excluded copy under another site name. ``trusted`` hosts' unverifiable records
    count too (see :func:`counted`)."""
    trusted = tuple(trusted or ())
    return [d for d in run.get("data") or []
            if isinstance(d, dict) and d.get("type") == dtype and d.get("pax_version") == version
            and d.get("host") != exclude_host and counted(d, ref, trusted)
            and not (same_copy and same_copy(d))]


def good_spec(datum: dict, ref: dict) -> dict:
    """The ``$elemMatch`` that is true only while ``datum`` is still a good copy (for a trusted
    record cax cannot verify: while it is still ``transferred`` with the checksum it had)."""
    if unverifiable(datum):
        return {"host": datum["host"], "type": datum["type"],
                "pax_version": datum.get("pax_version"), "status": "transferred",
                "checksum": datum.get("checksum")}
    ctype = _ctype(ref)
    return {"host": datum["host"], "type": datum["type"], "pax_version": datum.get("pax_version"),
            "status": "transferred", "checksum": ref["checksum"],
            "checksum_type": {"$in": [ctype, None]} if ctype == "sha512" else ctype}
