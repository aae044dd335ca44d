"""SetPermission: give new data here the site's group and mode, so the analysis group can read it.

A failure is recorded on the datum as ``permissions_error`` (one line) and the datum keeps its status:
the copy is still good data, and turning it ``error`` would drop it from the good copies that purges
elsewhere rely on. A datum with ``permissions_error`` is not retried until an admin clears the field.
"""
from __future__ import annotations

import grp
import logging
import os
import stat

from cax import paths
from cax.deletion import key_of
from cax.runsdb import lifecycle, now
from cax.tasks.base import Task


def dir_mode(mode: int) -> int:
    """Directories need execute wherever read is granted, or nobody can enter them."""
    return mode | ((mode & 0o444) >> 2)


def apply(location: str, gid, mode) -> int:
    """chown/chmod the tree without following symlinks; returns how many entries were changed."""
    n = 0

    def one(path, is_dir):
        nonlocal n
        if gid is not None:
            os.chown(path, -1, gid, follow_symlinks=False)
        if mode is not None:
            os.chmod(path, dir_mode(mode) if is_dir else mode)
        n += 1

    if os.path.islink(location):
        raise OSError(f"{location} is a symlink; not changing it")
    if not os.path.isdir(location):
        one(location, False)
        return n
    one(location, True)
    for dirpath, dirs, files in os.walk(location, followlinks=False):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                continue
            one(p, stat.S_ISDIR(st.st_mode))
    return n


class SetPermission(Task):
    projection = {"name": 1, "number": 1, "data": 1}

    def __init__(self, ctx):
        super().__init__(ctx)
        self.gid = None
        self.gid_error = None
        if self.site.group:
            try:
                self.gid = grp.getgrnam(self.site.group).gr_gid
            except KeyError:
                self.gid_error = f"unknown group {self.site.group!r}"

    def query(self):
        if not self.site.group and self.site.mode is None:
            return None
        return {"data": {"$elemMatch": {"host": self.host, "status": "transferred",
                                        "permissions_set": {"$ne": True},
                                        "permissions_error": None}}}

    def each_location(self, run, datum):
        if (datum.get("host") != self.host or datum.get("status") != "transferred"
                or datum.get("permissions_set") or datum.get("permissions_error")):
            return
        key = key_of(datum)
        try:
            location = paths.check_location(self.site, datum.get("location"), datum["type"])
            if self.gid_error:
                raise OSError(self.gid_error)
            if self.dry_run:
                self.log(logging.INFO, run, f"dry-run: would set group {self.site.group} mode "
                         f"{oct(self.site.mode) if self.site.mode is not None else '-'} on "
                         f"{location}", datum=key)
                return
            n = apply(location, self.gid, self.site.mode)
        except (OSError, paths.UnsafePath) as e:
            reason = lifecycle.trim_reason(f"setting permissions failed: {e}")
            self.log(logging.ERROR, run, reason, datum=key)
            self.db.apply(lifecycle.measured(run["_id"], key, {"permissions_error": reason,
                                                               "permissions_error_time": now()}))
            return
        if self.db.apply(lifecycle.measured(run["_id"], key, {"permissions_set": True})):
            self.log(logging.INFO, run, f"permissions set on {n} entries", datum=key)
