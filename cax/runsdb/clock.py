"""Time as the Runs DB keeps it: UTC, milliseconds.

Its own module because both the store layer (:mod:`cax.runsdb`) and the transitions
(:mod:`cax.runsdb.lifecycle`) stamp times, and neither may import the other for it.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Optional


def now() -> datetime:
    """Mongo keeps milliseconds; truncating here makes reads compare equal to what was written."""
    t = datetime.now(timezone.utc)
    return t.replace(microsecond=t.microsecond // 1000 * 1000)


def as_utc(t: Optional[datetime]) -> Optional[datetime]:
    """A datetime read back from a store that returns naive UTC (mongomock, old documents) made
    comparable with :func:`now`."""
    return t if t is None or t.tzinfo else t.replace(tzinfo=timezone.utc)
