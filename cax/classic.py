"""What the classic cax's ``cax.json`` means, in this cax's terms.

The classic cax ran at XENON1T's sites for years; its config files (the 2016 list form with
``receive``, the 2018 form with ``method``, the ruciax/tsm variants) must load unchanged. Each
place where this cax does something different from what the file asked for is warned about once
at load, naming the site and the key. The mapping lives here so :mod:`cax.config` stays about
validating the current form.
"""
from __future__ import annotations

from typing import Optional

#: Methods of the classic cax that this cax does not offer: a site using one of them is loaded
#: as *not reachable from this cax* (its datums are other sites' business). One place on
#: purpose: when cax gains a method (a ``gfal`` one is planned), it leaves this set.
UNREACHABLE_METHODS = frozenset({"tsm", "gfal-copy", "lcg-cp", "rucio"})

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
