"""Room for a copy: one that found its destination full (``error_kind`` ``no-space``) is sent
again only once the destination's filesystem has room for all of it; re-sending it sooner would
only fill the disk again, and use up a retry each pass."""
from __future__ import annotations

import os
import posixpath
from typing import Optional

from cax.transfer import TransferError
from cax.transfer.base import local_free_bytes, local_tree


def _source_size(task, run, datum) -> Optional[int]:
    """Bytes of the copy: the source datum's recorded size, else measured where it is."""
    src = next((d for d in run.get("data") or [] if isinstance(d, dict)
                and d.get("host") == datum.get("source") and d.get("type") == datum.get("type")
                and d.get("pax_version") == datum.get("pax_version")), None)
    if src is None:
        return None
    if isinstance(src.get("size"), int) and not isinstance(src["size"], bool):
        return src["size"]
    try:
        if src["host"] == task.host:
            return local_tree(src.get("location"))[0]
        return task.connections().method(task.ctx.config.site(src["host"])).size(
            src.get("location"))
    except (TransferError, OSError, TypeError, ValueError):
        return None


def waits_for_space(task, run, datum) -> Optional[str]:
    """Why the copy ``datum`` must wait for space (one line), or None if it may go again now:
    the destination has room for it, or its size cannot be told (a wrong "full" must not keep
    a copy from ever being made)."""
    need = _source_size(task, run, datum)
    if need is None:
        return None
    location = str(datum.get("location") or "")
    try:
        if datum["host"] == task.host:
            where = os.path.dirname(location.rstrip("/"))
            free = local_free_bytes(where)
        else:
            where = posixpath.dirname(location.rstrip("/"))
            site = task.ctx.config.site(datum["host"])
            free = task.connections().method(site).free_bytes(where)
    except (TransferError, OSError) as e:
        return f"retry waits for space at {datum['host']}: free space unknown ({e})"
    if free >= need:
        return None
    return (f"retry waits for space at {datum['host']}: {free} bytes free at {where}, the copy "
            f"needs {need}")
