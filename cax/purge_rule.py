"""Which of a site's copies its ``purge`` settings ask to go: one rule for the purgers and the puller.

BufferPurger and PurgeProcessed start deletions of what this rule selects (each deletion then
under the invariant of :mod:`cax.deletion`). CopyPull asks the same rule before it fetches: a copy
the site would purge in the same pass, because the copies elsewhere already make it deletable, is
not pulled, or a site would pull a run and remove it again on every pass (the classic CopyPull
skipped such downloads too). One place, so the two can never disagree about what "would purge"
means.
"""
from __future__ import annotations

import shutil
from datetime import timedelta
from cax.runsdb import as_utc, now
from cax.runsdb.copies import good_copies, reference

#: what a site without ``purge.types`` purges
DEFAULT_TYPES = ("raw",)


class PurgeRule:
    """A site's purge settings, read once. ``settings`` None: the site starts no deletion."""

    def __init__(self, site):
        self.site = site
        self.settings = site.purge
        s = self.settings or {}
        #: data types BufferPurger purges; ``[]`` purges none (only retired versions go)
        self.types = list(s["types"]) if s.get("types") is not None else list(DEFAULT_TYPES)
        self.min_copies = s.get("min_copies", 2)
        self.days = s.get("older_than_days") or 0
        self.min_free_fraction = s.get("min_free_fraction") or 0
        #: processed versions that go regardless of the run's age (PurgeProcessed)
        self.retired = list(s.get("versions") or [])
        self.current = set(site.pax_versions) | set((site.processing or {}).get("versions") or [])
        #: every processed version that is not current goes; off while nothing is current
        self.old_versions = bool(s.get("old_versions")) and bool(self.current)

    @property
    def enabled(self) -> bool:
        return self.settings is not None

    # -- what is selected -------------------------------------------------------------------
    def buffers(self, dtype) -> bool:
        """BufferPurger's part: this type goes once the run is old enough."""
        return self.enabled and dtype in self.types

    def retires(self, dtype, version) -> bool:
        """PurgeProcessed's part: this processed version goes regardless of age."""
        if not self.enabled or dtype != "processed" or version is None:
            return False
        return version in self.retired or (self.old_versions and version not in self.current)

    def old_enough(self, run) -> bool:
        if not self.days:
            return True
        start = run.get("start")
        if start is None:
            return False
        return as_utc(start) < now() - timedelta(days=self.days)

    def free_fraction(self, dtype: str, would_free: int = 0) -> float:
        """Free fraction of the ``dtype`` directory's disk (plus ``would_free`` bytes a dry run
        already counted as gone); raises OSError when it cannot be read."""
        usage = shutil.disk_usage(self.site.data_dir(dtype))
        return min(1.0, (usage.free + would_free) / usage.total) if usage.total else 1.0

    def space_allows(self, dtype: str) -> bool:
        """Whether ``min_free_fraction`` lets BufferPurger delete now (always, when unset; never
        when the free space cannot be read)."""
        if not self.min_free_fraction:
            return True
        try:
            return self.free_fraction(dtype) < self.min_free_fraction
        except OSError:
            return False

    # -- the puller's question --------------------------------------------------------------
    def would_purge(self, run, dtype, version) -> str:
        """Why this site's purge would take a copy of ``run``'s ``dtype``/``version`` data the
        moment it had one (the good copies elsewhere already make it deletable), or ''.

        Asked before a pull: the copy does not exist here yet, so every good copy counts as
        "other". The purge itself decides again, copy by copy, under the invariant."""
        if self.retires(dtype, version):
            why = f"version {version} is retired here (purge.versions/old_versions)"
        elif self.buffers(dtype) and self.old_enough(run) and self.space_allows(dtype):
            why = f"{dtype} data" + (f" older than {self.days:g} days" if self.days else "") \
                  + " are purged here"
        else:
            return ""
        ref = reference(run, dtype, version)
        if ref is None:
            return ""
        good = good_copies(run, dtype, version, ref, exclude_host=self.site.name)
        if len(good) < self.min_copies:
            return ""
        return f"{why} and {len(good)} verified copies exist elsewhere " \
               f"({', '.join(sorted(d['host'] for d in good))}; min_copies {self.min_copies})"

