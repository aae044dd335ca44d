"""What counts as a good copy, and what every copy is compared with: the reference checksum.

These rules decide what may be deleted (cax/deletion.py), what a copy is verified against
(AddChecksum), what AddSize compares sizes with and what healing copies from, so they live in one
place beside the transitions (cax/runsdb/lifecycle.py) that act on them.
"""
from __future__ import annotations

from typing import Callable, Optional


def _legacy_origins(run: dict, dtype: str, version: Optional[str]) -> list:
    return [d for d in run.get("data") or []
            if isinstance(d, dict) and d.get("type") == dtype and d.get("pax_version") == version
            and d.get("checksum") and not d.get("source")]


def reference(run: dict, dtype: str, version: Optional[str] = None) -> Optional[dict]:
    """The reference checksum of a run's data: ``{checksum, checksum_type, host}`` or None.

    It is the checksum recorded by the first site that verified the data (run-level
    ``references``). Runs DBs written by older cax have none: there the origin datum (transferred,
    with a checksum, and not a copy, i.e. no ``source``) stands in, but only when every datum
    without ``source`` that has a checksum (whatever its status) agrees: older cax did not write
    ``source`` on copies either, so a bad copy may look like an origin, and trusting whichever is
    listed first could make the bad copy the reference and the only true copy deletable.
    Disagreement means unknown (:func:`reference_problem` says why).
    """
    for ref in run.get("references") or []:
        if ref.get("type") == dtype and ref.get("pax_version") == version:
            return ref
    origins = _legacy_origins(run, dtype, version)
    if len({(d["checksum"], d.get("checksum_type") or "sha512") for d in origins}) > 1:
        return None
    d = next((d for d in origins if d.get("status") == "transferred"), None)
    if d is None:
        return None
    return {"checksum": d["checksum"], "checksum_type": d.get("checksum_type") or "sha512",
            "host": d.get("host")}


def reference_problem(run: dict, dtype: str, version: Optional[str] = None) -> str:
    """Why the reference is unknown, in one line; '' when it is known or simply not recorded."""
    if any(r.get("type") == dtype and r.get("pax_version") == version
           for r in run.get("references") or []):
        return ""
    origins = _legacy_origins(run, dtype, version)
    if len({(d["checksum"], d.get("checksum_type") or "sha512") for d in origins}) > 1:
        return (f"no recorded reference and the copies without 'source' disagree "
                f"({', '.join(str(d.get('host')) for d in origins)}): which one is the original is "
                f"unknown; record the reference (run field 'references') by hand")
    return ""


def expected_checksum(run: dict, datum: dict) -> Optional[dict]:
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
                if d.get("checksum") and d.get("status") == "transferred":
                    return {"checksum": d["checksum"],
                            "checksum_type": d.get("checksum_type", "sha512"),
                            "host": d.get("host")}
                break
            d = by_host.get(d["source"])
    return reference(run, dtype, version)


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


def good_spec(datum: dict, ref: dict) -> dict:
    """The ``$elemMatch`` that is true only while ``datum`` is still a good copy."""
    ctype = _ctype(ref)
    return {"host": datum["host"], "type": datum["type"], "pax_version": datum.get("pax_version"),
            "status": "transferred", "checksum": ref["checksum"],
            "checksum_type": {"$in": [ctype, None]} if ctype == "sha512" else ctype}
