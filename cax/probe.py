"""``config check --probe``: does this site's config work here, now.

A config can be valid and still useless: a data directory that was never created (or was
unmounted), a directory cax may not write, a site whose login fails. A pass finds those one run
at a time, each as an error on a datum; the probe finds them before the first pass, one line per
check. It changes nothing: directories are looked at, never created, and a login is a login.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from cax.logs import printable


@dataclass
class Check:
    ok: bool
    line: str


def local_dirs(site) -> list:
    """This host's own data directories: present, directories, writable by this user."""
    out = []
    for dtype, d in sorted(site.dirs.items()):
        what = f"this host {site.name}: {dtype} directory {printable(d)}"
        if not os.path.exists(d):
            out.append(Check(False, f"{what}: does not exist"))
        elif not os.path.isdir(d):
            out.append(Check(False, f"{what}: not a directory"))
        elif not os.access(d, os.W_OK | os.X_OK):
            out.append(Check(False, f"{what}: not writable by this user (uid {os.getuid()})"))
        else:
            out.append(Check(True, f"{what}: ok"))
    return out


def must_reach(config, host) -> list:
    """The sites this host's own options send to or fetch from (what a pass connects to)."""
    site = config.site(host)
    names = list(dict.fromkeys([*(site.upload_options or []), *(site.download_options or [])]))
    return [config.site(n) for n in names if n in config.sites and n != host]


def remote(site) -> list:
    """Log in with the site's method and look at each of its data directories."""
    from cax.transfer import TransferError, open_method
    where = f"site {site.name} ({site.method} {site.hostname or ''}".rstrip() + ")"
    if site.unreachable:
        return [Check(False, f"{where}: not reachable from this cax ({site.unreachable})")]
    try:
        with open_method(site) as m:
            out = [Check(True, f"{where}: login ok")]
            for dtype, d in sorted(site.dirs.items()):
                present = m.exists(d)
                out.append(Check(present, f"{where}: {dtype} directory {printable(d)}: "
                                          f"{'present' if present else 'does not exist'}"))
            return out
    except (TransferError, OSError) as e:
        return [Check(False, f"{where}: {printable(e) or type(e).__name__}")]


def probe(config, host) -> list:
    checks = local_dirs(config.site(host))
    for site in must_reach(config, host):
        checks += remote(site)
    return checks
