"""What the classic cax's ``cax.json`` means, in this cax's terms.

The classic cax ran at XENON1T's sites for years; its config files (the 2016 list form with
``receive``, the 2018 form with ``method``, the ruciax/tsm variants) must load unchanged. Each
place where this cax does something different from what the file asked for is warned about once
at load, naming the site and the key. The mapping lives here so :mod:`cax.config` stays about
validating the current form.
"""
from __future__ import annotations

import json
from typing import Optional

#: Methods of the classic cax that this cax does not offer: a site using one of them is loaded
#: as *not reachable from this cax* (its datums are other sites' business). One place on
#: purpose: when cax gains a method, it leaves this set (``gfal-copy`` did: :data:`RENAMED_METHODS`).
UNREACHABLE_METHODS = frozenset({"tsm", "lcg-cp", "rucio"})

#: classic method names whose work a method of this cax does under its own name
RENAMED_METHODS = {"gfal-copy": "gfal"}

#: hostnames that mean "this machine": a site without a method there is reached with ``local``
LOCAL_HOSTNAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def resolve_method(raw: dict, offered) -> tuple[str, Optional[str], list[str]]:
    """(method, why the site is unreachable or None, warnings) for one classic site object.

    ``method`` wins over ``receive`` (its 2016 name). A site without either (or with ``null``,
    as the classic DAQ sites wrote it) is reached with scp when it has a hostname of its own:
    the classic cax reached every remote site with scp, and ``local`` there would copy from
    another machine's path on this disk.
    """
    warnings = []
    method = raw.get("method") if raw.get("method") is not None else raw.get("receive")
    method = RENAMED_METHODS.get(method, method)
    hostname = raw.get("hostname", "localhost")
    if not hostname:  # null, or "" (the classic rucio-catalogue pseudo-site)
        reason = f"no hostname ({'null' if hostname is None else repr(hostname)})"
        if method in UNREACHABLE_METHODS:
            reason = f"method {method!r} and {reason}"
        return method or "local", reason, warnings
    if method in UNREACHABLE_METHODS:
        return method, f"method {method!r} is not offered by this cax (it offers "\
                       f"{', '.join(offered)})", warnings
    if method is None:
        if hostname in LOCAL_HOSTNAMES:
            return "local", None, warnings
        key = "receive" if "receive" in raw else "method"
        warnings.append(f"key {key!r}: no method given; the site (hostname {hostname!r}) is "
                        f"reached with scp, as the classic cax did")
        return "scp", None, warnings
    return method, None, warnings


#: classic task names whose work a cax task does under its new name
RENAMED_TASKS = {"SCPPush": "CopyPush", "SCPPull": "CopyPull"}

_CORRECTIONS = ("wrote detector corrections into the Runs DB; corrections are made by other "
                "tools now")
#: classic tasks whose work this cax does not do, and why: skipped, never mapped onto another
#: task (ClearDAQBuffer is not BufferPurger: mapping it would delete data)
NOT_DONE_TASKS = {
    "ClearDAQBuffer": "dropped the untriggered buffer held in MongoDB at the DAQ; cax does not "
                      "touch that buffer",
    "AddElectronLifetime": _CORRECTIONS,
    "AddGains": _CORRECTIONS,
    "AddSlowControlInformation": _CORRECTIONS,
    "ProcessBatchQueueHax": "made hax minitrees; minitrees are made by other tools now",
    "RucioRule": "managed Rucio rules; this cax has no rucio method",
}


#: copies the classic BufferPurger required before deleting a site's raw data: at least three
#: verified copies in all, this one included ("we are deleting third")
CLASSIC_PURGE_OTHER_COPIES = 2


def purge_days(days: int) -> tuple[dict, str]:
    """(purge settings, warning) for the classic integer ``purge``: an age in days, not a number
    of copies. The classic BufferPurger deleted a site's raw data once the run was ``days`` old
    and at least three verified copies existed; reading the number as ``min_copies`` made a
    ``purge: 2`` site delete runs an hour after they started."""
    settings = {"older_than_days": days, "min_copies": CLASSIC_PURGE_OTHER_COPIES,
                "types": ["raw"]}
    return settings, (f"key 'purge': classic {days} means raw data older than {days} days with "
                      f"{CLASSIC_PURGE_OTHER_COPIES} other verified copies (purge: "
                      f"{{\"older_than_days\": {days}, \"min_copies\": "
                      f"{CLASSIC_PURGE_OTHER_COPIES}}})")


#: good copies elsewhere the classic ``pax_version_purge`` needs here when the site sets no
#: ``purge`` of its own: the classic PurgeProcessed counted none, and one is the least that never
#: deletes the last good copy
CLASSIC_VERSION_PURGE_OTHER_COPIES = 1


def version_purge(value, purge: Optional[dict], current=()) -> tuple[Optional[dict], list]:
    """(purge settings, warnings) with the classic ``pax_version_purge`` folded in.

    The classic PurgeProcessed deleted this site's processed data of the one version the key
    named (a string such as ``"v6.8.0"``; empty or null: none), whatever the run's age and
    without counting copies. Here the version is retired (``purge.versions``) under the
    invariant; a site with no ``purge`` of its own purges nothing else (``types: []``). A version
    that is also ``current`` here (``pax_versions``, ``processing.versions``) is not retired:
    processing would make it again and the purge remove it again, every pass."""
    if not value:
        return purge, []
    named = [value] if isinstance(value, str) else [v for v in value if v]
    notes = [f"key 'pax_version_purge': {v!r} is also a current version here (pax_versions/"
             f"processing.versions); not purged" for v in named if v in current]
    named = [v for v in named if v not in current]
    if not named:
        return purge, notes
    if purge is None:
        purge = {"types": [], "min_copies": CLASSIC_VERSION_PURGE_OTHER_COPIES}
    versions = list(purge.get("versions") or [])
    purge = dict(purge, versions=versions + [v for v in named if v not in versions])
    shown = {k: purge[k] for k in ("versions", "types", "min_copies") if k in purge}
    n = purge.get("min_copies", 2)
    return purge, notes + [
        f"key 'pax_version_purge': classic {value!r} means processed data of "
        f"{', '.join(named)} are purged here once {n} other verified "
        f"cop{'y exists' if n == 1 else 'ies exist'} (purge: {json.dumps(shown)}); the classic "
        f"cax deleted them without counting copies"]


def map_tasks(names, known) -> tuple[list, list, list]:
    """(task names for this cax, warnings, unknown names) for a classic ``task_list``."""
    tasks, warnings, unknown = [], [], []
    for name in names:
        if name in known:
            tasks.append(name)
        elif name in RENAMED_TASKS:
            tasks.append(RENAMED_TASKS[name])
            warnings.append(f"classic task {name!r} runs as {RENAMED_TASKS[name]!r}")
        elif name in NOT_DONE_TASKS:
            warnings.append(f"classic task {name!r} skipped: it {NOT_DONE_TASKS[name]}")
        else:
            unknown.append(name)
    return tasks, warnings, unknown


def from_extended_json(value):
    """``value`` with MongoDB extended JSON (mongoexport's ``{"$date": ...}``, ``{"$oid": ...}``,
    ``{"$numberLong": ...}``) turned into the Python values pymongo would have read: a classic
    Runs DB is exported that way. Raises ValueError naming what does not convert."""
    from bson import json_util

    def walk(v):
        if isinstance(v, list):
            return [walk(x) for x in v]
        if isinstance(v, dict):
            v = {k: walk(x) for k, x in v.items()}
            if any(isinstance(k, str) and k.startswith("$") for k in v):
                try:
                    return json_util.object_hook(v)
                except Exception as e:  # bson raises several types for one bad value
                    raise ValueError(f"extended JSON {v!r} does not convert: {e}") from None
        return v

    return walk(value)
