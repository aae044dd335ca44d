"""Where a run's data live on a site, and the checks that keep cax inside the data directories.

Run names and locations come from a shared database that any site (or a typo) can write. A name like
``../../etc`` must never turn a copy or a purge into a write or delete outside the site's data
directories, so every path cax acts on is built or checked here.
"""
from __future__ import annotations

import os
import re


class UnsafePath(ValueError):
    """A run name or location that cax refuses to act on; ``str()`` says why in one line."""


_SAFE = re.compile(r"^[A-Za-z0-9_+=,@%:][A-Za-z0-9_+=,@%:.\-]*$")


def check_name(name, what: str = "run name") -> str:
    """Accept only plain names: no ``/``, ``..``, NUL, control characters, leading ``-`` or ``.``."""
    if not isinstance(name, str) or not name:
        raise UnsafePath(f"{what} {name!r} is not a non-empty string")
    if "/" in name or "\0" in name or name.startswith(("-", ".")) or ".." in name \
            or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise UnsafePath(f"refusing unsafe {what} {name!r}")
    if not _SAFE.match(name):
        raise UnsafePath(f"refusing unsafe {what} {name!r} (allowed: letters, digits, _+=,@%:.-)")
    return name


#: ``processed_layout`` values: where a site writes processed data of a version
LAYOUTS = ("version", "classic")
#: the classic cax's version directories: ``<dir_processed>/pax_<version>/<run>.root``
CLASSIC_VERSION_PREFIX = "pax_"
CLASSIC_PROCESSED_SUFFIX = ".root"


def version_dir(site, version) -> str:
    """The directory name this site writes ``version``'s processed data in: the version itself,
    or ``pax_<version>`` where the site keeps the classic layout (``processed_layout``)."""
    name = check_name(str(version), "processor version")
    if getattr(site, "processed_layout", "version") == "classic":
        return CLASSIC_VERSION_PREFIX + name
    return name


def version_dirs(version) -> list:
    """Every directory name ``version``'s processed data may be read from, whatever this site
    writes: the version, and the classic ``pax_<version>`` (a classic Runs DB names those)."""
    name = check_name(str(version), "processor version")
    return [name, CLASSIC_VERSION_PREFIX + name]


def processed_name(site, run_name: str) -> str:
    """The name processing gives a run's output: the run name, or ``<run>.root`` (classic)."""
    check_name(run_name)
    if getattr(site, "processed_layout", "version") == "classic":
        return run_name + CLASSIC_PROCESSED_SUFFIX
    return run_name


def data_path(site, dtype: str, run_name: str, version=None, filename=None) -> str:
    """``<site dir for type>[/<version dir>]/<run name or file name>`` (see :func:`version_dir`)."""
    base = site.data_dir(dtype)
    if not base:
        raise UnsafePath(f"site {site.name!r} has no directory for {dtype!r} data")
    check_name(run_name)
    parts = [base]
    if version is not None:
        parts.append(version_dir(site, version) if dtype == "processed"
                     else check_name(str(version), "processor version"))
    parts.append(check_name(filename, "file name") if filename else run_name)
    return os.path.join(*parts)


def inside(path: str, root: str) -> bool:
    """True if ``path`` lies strictly inside ``root`` after resolving symlinks on both."""
    real = os.path.realpath(path)
    real_root = os.path.realpath(root)
    return real != real_root and real.startswith(real_root.rstrip(os.sep) + os.sep)


def _roots(site, dtype=None) -> list:
    """The data directories to check against, each once (one directory often serves all types)."""
    if dtype and site.data_dir(dtype):
        return [site.data_dir(dtype)]
    return list(dict.fromkeys(site.dirs.values()))


def check_location(site, location, dtype=None) -> str:
    """A datum's location on this site, verified to lie inside one of its data directories.

    Symlinks are resolved, so a link pointing out of the data directory is refused too.
    """
    if not isinstance(location, str) or not location or "\0" in location:
        raise UnsafePath(f"datum location {location!r} is not a path")
    if not os.path.isabs(location):
        raise UnsafePath(f"datum location {location!r} is not absolute")
    roots = _roots(site, dtype)
    if os.path.basename(location.rstrip("/")).startswith("-"):
        raise UnsafePath(f"refusing location {location!r}: name starts with '-'")
    for root in roots:
        if inside(location, root):
            return location
    raise UnsafePath(f"refusing location {location!r}: outside the data directories of site "
                     f"{site.name!r} ({', '.join(roots)})")


def check_remote_location(site, location, dtype=None) -> str:
    """Lexical version of :func:`check_location` for paths on another host (no realpath there)."""
    if not isinstance(location, str) or not location or "\0" in location or "\n" in location:
        raise UnsafePath(f"datum location {location!r} is not a path")
    norm = os.path.normpath(location)
    if not os.path.isabs(norm) or norm != location.rstrip("/") and norm != location:
        raise UnsafePath(f"refusing location {location!r} of site {site.name!r}: not a normal "
                         f"absolute path")
    if os.path.basename(norm).startswith("-"):
        raise UnsafePath(f"refusing location {location!r}: name starts with '-'")
    roots = _roots(site, dtype)
    for root in roots:
        if norm.startswith(os.path.normpath(root) + os.sep):
            return location
    raise UnsafePath(f"refusing location {location!r}: outside the data directories of site "
                     f"{site.name!r} ({', '.join(roots)})")


def _run_dirs(site, dtype: str, version) -> list:
    """(configured directory, sub-directory) pairs a ``dtype``/``version`` copy lives directly in.

    Processed data may also be written under the processing ``output_dir`` (inside the processed
    directory), so both are places a processed copy can legitimately be; in either, a version's
    directory is named after it or, as the classic cax named it, ``pax_<version>``.
    """
    bases = [site.data_dir(dtype)]
    if dtype == "processed":
        bases.append((site.processing or {}).get("output_dir"))
    subs = version_dirs(version) if dtype == "processed" and version is not None else [""]
    out = []
    for b in bases:
        for sub in subs:
            if b and (b, sub) not in out:
                out.append((b, sub))
    return out


def check_run_name(location, run_name, dtype) -> str:
    """The normalised ``location`` if it is a normal path whose last part is ``run_name``'s
    ``dtype`` data (see :func:`check_run_location`); the part of that check that needs no access
    to the filesystem, so it holds for remote locations too."""
    check_name(run_name)
    norm = os.path.normpath(location)
    if location.rstrip("/") != norm:
        raise UnsafePath(f"refusing location {location!r}: not a normal path (., .. or //)")
    name = os.path.basename(norm)
    if dtype == "raw":
        ok = name == run_name
    else:
        rest = name[len(run_name):]
        ok = name.startswith(run_name) and (not rest or not rest[0].isalnum())
    if not ok:
        raise UnsafePath(f"refusing location {location!r}: its last part is not run {run_name}'s "
                         f"{dtype} data")
    return norm


def check_run_location(site, location, run_name, dtype, version=None) -> str:
    """``location`` if it is exactly where this site keeps ``run_name``'s ``dtype`` data.

    Deleting (or moving) a location is only as safe as the location is the run's: a datum that
    names another run's directory, a whole version directory, or a path through a symlinked
    directory inside the data directory would make cax delete data no good-copy count was made
    for. So beyond :func:`check_location` the location must be a normal path (no ``.``, ``..``,
    ``//``), sit directly in the type's (and version's) directory with no symlink below the
    configured directory, and its last part must be the run name (raw) or start with it
    (processed/untriggered files and directories) followed by a non-alphanumeric character.
    """
    check_location(site, location, dtype)
    norm = check_run_name(location, run_name, dtype)
    parent = os.path.dirname(norm)
    wanted = []
    for base, sub in _run_dirs(site, dtype, version):
        for spelling in (base, os.path.realpath(base)):
            expected = os.path.normpath(os.path.join(spelling, sub))
            wanted.append(expected)
            if parent != expected:
                continue
            real = os.path.normpath(os.path.join(os.path.realpath(base), sub, os.path.basename(norm)))
            if os.path.realpath(norm) != real:
                raise UnsafePath(f"refusing location {location!r}: a part of it below {base} is a "
                                 f"symlink")
            return norm
    where = wanted[0] if wanted else "?"
    raise UnsafePath(f"refusing location {location!r}: not directly in {where} (the {dtype} "
                     f"directory{' of version ' + str(version) if version else ''})")
