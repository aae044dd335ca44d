"""The site admin's file tools: ``cax mv``, ``cax rm``, ``cax stray``.

Hand-moving or hand-deleting data behind cax's back is how Runs DBs drift from the disks: a datum
names files that are gone (and may be counted as a good copy), or files sit where no datum names
them. These commands change files and the Runs DB together, refuse paths outside the site's data
directories, and ``rm`` deletes only under the same invariant and protocol as the purge tasks.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time

import click

from cax import deletion, logs, paths
from cax.cli_common import Fatal, load_config, open_db, resolve_host, settings
from cax.runsdb import AmbiguousRun, key_str, lifecycle, redact_uri
from cax.transfer import TransferError, policy
from cax.transfer.base import local_tree

log = logging.getLogger("cax.admin")


class Admin:
    """What every admin command needs: config, this site, the Runs DB, dry-run."""

    def __init__(self, ctx, config_path, host, dry_run):
        root = ctx.find_root()
        if root.obj is None:  # run as cax-mv etc., not under the cax group: set up logging here
            logs.setup("WARNING")
        config_path, host = settings(ctx, config_path, host)
        self.dry_run = bool(dry_run or (root.obj or {}).get("dry_run"))
        self.config = load_config(config_path)
        self.host = resolve_host(self.config, host)
        self.site = self.config.site(self.host)
        self.db = open_db(self.config, self.dry_run)

    def check(self, path, what) -> str:
        """Absolute, normalised, inside the data directories; one-line refusal otherwise."""
        p = os.path.normpath(os.path.abspath(path))
        try:
            paths.check_location(self.site, p)
        except paths.UnsafePath as e:
            raise Fatal(f"{what}: {e}", 2)
        return p

    def datums_at(self, location):
        """(run, datum) pairs of this host whose location is ``location`` (as written or real)."""
        wanted = {location, os.path.realpath(location)}
        spelled = sorted(wanted | {w + "/" for w in wanted})
        q = {"data": {"$elemMatch": {"host": self.host, "location": {"$in": spelled}}}}
        out = []
        for run in self.db.find_runs(q, deletion.PROJECTION):
            for d in run.get("data") or []:
                if d.get("host") == self.host and d.get("location") in spelled:
                    out.append((run, d))
        return out


def _common(f):
    """--config/--host as on every cax command (before or after the name), plus --dry-run."""
    f = click.option("--dry-run", "dry_run", is_flag=True,
                     help="Change nothing; print what would be done and why.")(f)
    f = click.option("--host", "host", default=None,
                     help="Site this cax acts as (default: $CAX_HOST, else the short hostname).")(f)
    f = click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
                     help="Config file (default: $CAX_CONFIG, else ./cax.json, else /etc/cax/cax.json).")(f)
    return f


def _echo_say(level, msg):
    """Each message once, as the command's own output; the log record stays at DEBUG, since
    under ``cax`` (log level INFO, to stderr) it would print the same message a second time."""
    log.debug(msg)
    click.echo(msg, err=level >= logging.WARNING)


# ---- mv -------------------------------------------------------------------------------------
@click.command("mv")
@_common
@click.option("--input", "src", required=True, help="Current location of the data on this site.")
@click.option("--output", "dst", required=True, help="New location (inside the data directories).")
@click.pass_context
def mv(ctx, config_path, host, dry_run, src, dst):
    """Move data on this site and update its datum's location in the Runs DB."""
    a = Admin(ctx, config_path, host, dry_run)
    src, dst = a.check(src, "--input"), a.check(dst, "--output")
    if os.path.islink(src):
        raise Fatal(f"--input {src} is a symlink; move the data it points to instead", 2)
    if not os.path.lexists(src):
        raise Fatal(f"--input {src} does not exist", 2)
    if os.path.lexists(dst):
        raise Fatal(f"--output {dst} already exists; refusing to overwrite it", 2)
    found = a.datums_at(src)
    if not found:
        raise Fatal(f"no datum of site {a.host} has location {src}; "
                         f"nothing to move (see cax stray)", 1)
    if len(found) > 1:
        raise Fatal(f"{len(found)} datums of site {a.host} name {src}; fix the Runs DB first", 1)
    run, datum = found[0]
    key, status = deletion.key_of(datum), datum.get("status")
    label = f"run {run.get('name')} datum {key_str(key)}"
    try:
        # where the purge tasks and cax rm will accept it: a copy moved anywhere else (another
        # type's directory, a sub-directory, another name) could never be deleted again
        paths.check_run_location(a.site, dst, run.get("name"), datum.get("type"),
                                 datum.get("pax_version"))
    except paths.UnsafePath as e:
        raise Fatal(f"--output: {e}", 2)
    if status not in ("transferred", "error"):
        raise Fatal(f"{label} is {status!r} (in flight); try again when it is settled", 1)
    if a.dry_run:
        click.echo(f"dry-run: would move {src} -> {dst} and set the location of {label}")
        return
    # 1. say in the Runs DB that a move is under way: a crash leaves a trace, not a mystery
    if not a.db.apply(lifecycle.moving(run["_id"], key, status, dst)):
        raise Fatal(f"{label} changed meanwhile; nothing moved", 1)
    try:
        _move(src, dst)
    except (OSError, TransferError) as e:
        a.db.apply(lifecycle.move_undone(run["_id"], key, status))
        raise Fatal(f"moving {src} -> {dst} failed: {e}; nothing changed", 1)
    if not a.db.apply(lifecycle.moved(run["_id"], key, status, dst)):
        raise Fatal(f"moved {src} -> {dst} but {label} changed meanwhile; its location was "
                         f"NOT updated (moving_to names the new place)", 1)
    log.debug("run=%s task=mv site=%s datum=%s moved %s -> %s", run.get("name"), a.host,
              key_str(key), src, dst)
    click.echo(f"moved {src} -> {dst}; {label} updated")


def _move(src, dst):
    """Atomic rename on one filesystem; otherwise copied under the copy policy (a partial name,
    checked to hold the source's bytes and files, renamed into place), then the source deleted."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        os.rename(src, dst)
        return
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise

    def copy(partial):
        if os.path.isdir(src):
            shutil.copytree(src, partial, symlinks=True)
        else:
            shutil.copy2(src, partial, follow_symlinks=False)
    policy.write_local(dst, copy, expect=local_tree(src))
    policy.remove_local(src)


# ---- rm -------------------------------------------------------------------------------------
def stdin_is_tty() -> bool:
    return sys.stdin.isatty()


@click.command("rm")
@_common
@click.option("--run", "run_id", required=True, help="Run number or name.")
@click.option("--detector", default=None, metavar="DETECTOR",
              help="The run's detector, where runs of several detectors share the number or name "
                   "(default: whichever detector has it; refused when several do).")
@click.option("--location", required=True, help="Location of this site's copy to delete.")
@click.option("--min-copies", type=click.IntRange(0), default=None,
              help="Other verified copies required (default: the site's purge.min_copies, else 2).")
@click.option("--force", is_flag=True,
              help="Delete even if the invariant does not hold (asks you to type the run name).")
@click.option("--yes-i-know-this-deletes-data", "yes", is_flag=True,
              help="With --force and no terminal: skip the typed confirmation.")
@click.pass_context
def rm(ctx, config_path, host, dry_run, run_id, location, min_copies, force, yes, detector):
    """Delete one copy of a run on this site, and its datum, under the deletion invariant."""
    a = Admin(ctx, config_path, host, dry_run)
    location = a.check(location, "--location")
    detector = detector or (ctx.find_root().obj or {}).get("detector")
    try:
        run = a.db.run_by(number=int(run_id), detector=detector) if run_id.isdigit() \
            else a.db.run_by(name=run_id, detector=detector)
    except AmbiguousRun as e:
        raise Fatal(str(e), 2)
    if run is None:
        raise Fatal(f"no run {run_id!r}{f' of detector {detector!r}' if detector else ''} in the "
                    f"Runs DB", 1)
    datum = next((d for d in run.get("data") or [] if d.get("host") == a.host
                  and isinstance(d.get("location"), str)
                  and os.path.normpath(d["location"]) in (location, os.path.realpath(location))),
                 None)
    if datum is None:
        raise Fatal(f"run {run.get('name')} has no datum of site {a.host} at {location}", 1)
    key = deletion.key_of(datum)
    if min_copies is not None and min_copies < 1 and not force:
        # with no other good copy required, a typo here deletes the last good copy: that is what
        # --force is for, and --force makes the admin type the run name
        raise Fatal(f"--min-copies {min_copies} would allow deleting the last good copy; "
                         f"use --force to delete {location} knowingly", 2)
    if min_copies is None:
        min_copies = (a.site.purge or {}).get("min_copies", 2)
    if force and not a.dry_run:
        if stdin_is_tty():
            typed = click.prompt(f"This deletes {location} even if it is the last good copy. "
                                 f"Type the run name ({run.get('name')}) to confirm",
                                 default="", show_default=False)
            if typed.strip() != run.get("name"):
                raise Fatal("confirmation did not match the run name; nothing deleted", 1)
        elif not yes:
            raise Fatal("--force needs a typed confirmation and stdin is not a terminal; "
                             "add --yes-i-know-this-deletes-data to delete anyway", 2)
    say = lambda level, msg: _echo_say(level, f"run={run.get('name')} datum={key_str(key)} {msg}")  # noqa: E731
    from cax.transfer.pool import ConnectionPool
    pool = ConnectionPool()  # one connection per remote site whose copy is checked
    try:
        outcome = deletion.delete_copy(a.db, a.site, run["_id"], key, min_copies=min_copies,
                                       own_statuses=("transferred", "error"), force=force,
                                       dry_run=a.dry_run, say=say, sites=a.config.sites,
                                       connections=pool,
                                       reverify_days=(a.site.purge or {}).get("reverify_days"))
    finally:
        pool.close()
    if outcome.action in ("deleted", "would-delete"):
        return
    if outcome.action == "unsafe":
        raise Fatal(f"refusing to delete {location}: {outcome.reason} (deleting it could "
                         f"lose the data; --force overrides)", 1)
    raise Fatal(f"{location} not deleted: {outcome.reason}", 1)


# ---- stray ----------------------------------------------------------------------------------
def _newest_change(path) -> float:
    """Newest inode change time (ctime) in the tree: copy tools (rsync -t, cp -p) set an old
    mtime on files they are still writing, but nobody can set ctime, so a copy in progress never
    looks old."""
    newest = os.lstat(path).st_ctime
    if os.path.isdir(path) and not os.path.islink(path):
        for dirpath, dirs, files in os.walk(path, followlinks=False):
            for name in dirs + files:
                try:
                    newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_ctime)
                except FileNotFoundError:
                    pass
    return newest


def _claimed_now(a, p) -> bool:
    """Whether a datum of this site names ``p`` or something inside it right now (its location or
    the target of a move): a copy may have been claimed since the listing began."""
    spellings = {os.path.normpath(p), os.path.realpath(p)}
    rx = "^(" + "|".join(re.escape(x) for x in sorted(spellings)) + ")(/|$)"
    q = {"$or": [{"data": {"$elemMatch": {"host": a.host, field: {"$regex": rx}}}}
                 for field in ("location", "moving_to")]}
    return any(True for _ in a.db.find_runs(q, {"_id": 1}))


def find_strays(roots, claimed, keep=()):
    """Entries under ``roots`` that no datum claims; never descends through symlinks."""
    claimed = set(claimed) | set(keep)
    prefixes = {c + os.sep for c in claimed}
    out = []

    def walk(d):
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            click.echo(f"cannot list {logs.printable(d)}: {e.strerror or e}", err=True)
            return
        for e in entries:
            if e.path in claimed:
                continue
            if e.is_dir(follow_symlinks=False) and any(p.startswith(e.path + os.sep)
                                                       for p in prefixes):
                walk(e.path)
            else:
                out.append(e.path)
    for r in roots:
        walk(r)
    return out


def _parent_inside(p, roots) -> bool:
    """The entry itself may be a symlink out (it is unlinked, never followed); its parent must be
    really inside a data directory, so no symlinked directory on the way leads the delete out."""
    parent = os.path.realpath(os.path.dirname(p))
    return any(parent == r or paths.inside(parent, r) for r in roots)


#: strays deleted at most per ``cax stray --delete`` run: a site normally has a handful (copies
#: abandoned by hand, leftovers of old layouts); many more at once is a reason to look first
STRAY_MAX_DELETE = 20


class StraySightings:
    """When ``cax stray`` first saw each stray of a site: the grace period counts from there.

    A stray has no datum to carry the date, and its ctime alone is not enough: every copy a Runs DB
    forgot (a store emptied or replaced, a wrong collection) has an old ctime, so the first run
    that looks at such a site would delete them all. With sightings, a path goes only after an
    earlier run saw it stray ``stray_grace_days`` before, which gives the admin those days to
    notice the strays listed and fix the Runs DB.

    One small JSON file per (site, Runs DB) in the user state directory
    (``$XDG_STATE_HOME/cax/strays-<site>-<hash>.json``): local to the machine that sees the files,
    outside the data directories (where it would be a stray itself), and per Runs DB because a
    sighting means "claimed by no datum of *this* Runs DB". Each run rewrites it with exactly the
    strays it saw, so a path that was claimed in between starts again from zero. An unreadable file
    is taken as empty: the clock restarts, which delays deletions and never hastens one.
    """

    def __init__(self, config, host):
        from cax import config as cfgmod
        db = (os.path.realpath(config.runs_db) if not config.is_uri()
              else f"{redact_uri(config.runs_db)}\0{config.database}\0{config.collection}")
        ident = hashlib.sha1(f"{host}\0{db}".encode()).hexdigest()[:16]
        self.path = os.path.join(cfgmod.state_dir(), f"strays-{host}-{ident}.json")
        self.host, self.runs_db = host, redact_uri(config.runs_db)

    def load(self) -> dict:
        try:
            with open(self.path, encoding="utf-8") as f:
                seen = json.load(f)["first_seen"]
            return {str(p): float(t) for p, t in seen.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            click.echo(f"note: stray sightings {self.path} unreadable ({type(e).__name__}); "
                       f"every stray counts as first seen now", err=True)
            return {}

    def save(self, first_seen: dict) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"site": self.host, "runs_db": self.runs_db, "first_seen": first_seen}, f,
                      indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def _days(seconds: float) -> str:
    return f"{seconds / 86400:.1f} d"


@click.command("stray")
@_common
@click.option("--delete", is_flag=True,
              help="Delete strays that an earlier cax stray run saw at least the site's "
                   "stray_grace_days ago (and whose files are that old), and mark datums whose "
                   "files are missing 'error'.")
@click.option("--force", is_flag=True,
              help="With --delete: go on although the Runs DB holds no datum of this site, or "
                   "more than half of the site's entries would be strays (what a Runs DB that "
                   "lost its records looks like).")
@click.option("--max-delete", type=click.IntRange(0), default=STRAY_MAX_DELETE, show_default=True,
              help="Delete at most this many strays in one run.")
@click.pass_context
def stray(ctx, config_path, host, dry_run, delete, force, max_delete):
    """List files no datum claims, and datums of this site whose files are missing.

    Every run remembers when it first saw each stray; --delete removes a stray only once an
    earlier run saw it stray_grace_days before, and refuses (exit 2) when the Runs DB looks as if
    it lost this site's records, unless --force.
    """
    a = Admin(ctx, config_path, host, dry_run)
    show = logs.printable  # paths and names come from disks and the Runs DB: one line each
    roots, absent = [], []
    for conf in dict.fromkeys(a.site.dirs.values()):
        if not os.path.isdir(conf):
            # an unmounted disk would make every datum in it look missing: judge nothing there
            click.echo(f"note: data directory {show(conf)} of site {a.host} does not exist (not "
                       f"mounted?); skipped, and its datums are not checked", err=True)
            absent += [os.path.normpath(conf), os.path.realpath(conf)]
    for d in sorted({os.path.realpath(d) for d in a.site.dirs.values()}):
        if os.path.isdir(d) and not any(paths.inside(d, r) for r in roots):
            roots.append(d)
    claimed, missing, deleting, moving = set(), [], [], []
    ndatums, present = 0, set()
    q = {"data": {"$elemMatch": {"host": a.host}}}
    for run in a.db.find_runs(q, deletion.PROJECTION):
        data = run.get("data")
        for d in data if isinstance(data, list) else []:
            if not isinstance(d, dict) or d.get("host") != a.host:
                continue
            ndatums += 1
            if not isinstance(d.get("location"), str):
                continue
            loc = os.path.normpath(d["location"])
            claimed.update({loc, os.path.realpath(loc)})
            if d.get("moving_to"):
                claimed.add(os.path.normpath(d["moving_to"]))
            if any(loc == r or loc.startswith(r.rstrip(os.sep) + os.sep) for r in absent):
                continue
            real = os.path.realpath(loc)
            if os.path.lexists(loc) and any(paths.inside(real, r) for r in roots):
                present.add(real)  # an entry of the data directories that is no stray
            if d.get("status") == "deleting":
                deleting.append((run, d))
            elif d.get("moving_to"):
                moving.append((run, d))   # its files may be at either place: not "missing"
            elif d.get("status") != "transferring" and not os.path.lexists(loc):
                missing.append((run, d))
    keep = []
    if not a.config.is_uri():
        keep += [a.config.runs_db + s for s in ("", "-wal", "-shm", "-journal")]
    if a.config.lock_dir:
        keep.append(os.path.realpath(a.config.lock_dir))
    keep = [os.path.normpath(k) for k in keep]
    strays = find_strays(roots, claimed, keep)
    # A Runs DB that lost this site's records (emptied, replaced by an old backup, the wrong
    # collection) makes the site's data strays: judged by numbers, before anything is touched.
    suspect = ""
    entries = len(strays) + len(present)
    if strays and not ndatums:
        suspect = (f"the Runs DB {a.db.description} holds no datum of site {a.host}, so every "
                   f"entry of its data directories ({len(strays)}) would be a stray")
    elif 2 * len(strays) > entries:
        suspect = (f"{len(strays)} of the {entries} entries in the data directories of site "
                   f"{a.host} would be strays (more than half) for the Runs DB {a.db.description}")
    if suspect and delete and not force:
        raise Fatal(f"refusing to delete strays: {suspect}; a Runs DB that lost its records "
                         f"looks like this: check runs_db, or use --force if they really are "
                         f"strays", 2)
    if suspect:
        click.echo(f"note: {suspect}; sightings not recorded" if not force else f"note: {suspect}",
                   err=True)
    record = not a.dry_run and (not suspect or force)
    sightings = StraySightings(a.config, a.host)
    prior = sightings.load()
    grace_days = a.site.stray_grace_days
    grace = grace_days * 86400
    t = time.time()
    first_seen, ndeleted = {}, 0
    for p in strays:
        age = t - _newest_change(p)
        first = prior.get(p)
        line = f"stray: {show(p)} (age {_days(age)})"
        if first is None:
            first_seen[p] = t
        else:
            first_seen[p] = first
        if not delete:
            click.echo(line)
        elif age < grace:
            click.echo(f"{line}: kept, younger than stray_grace_days={grace_days:g}")
        elif first is None:
            click.echo(f"{line}: kept, first seen now; deleted by a run stray_grace_days="
                       f"{grace_days:g} from now at the earliest")
        elif t - first < grace:
            click.echo(f"{line}: kept, first seen {_days(t - first)} ago, less than "
                       f"stray_grace_days={grace_days:g}")
        elif not _parent_inside(p, roots):
            click.echo(f"{line}: kept, not inside the data directories")
        elif ndeleted >= max_delete:
            click.echo(f"{line}: kept, --max-delete {max_delete} reached")
        elif a.dry_run:
            ndeleted += 1
            click.echo(f"{line}: dry-run: would delete")
        elif _claimed_now(a, p):
            click.echo(f"{line}: kept, a datum of this site names it now")
        else:
            policy.remove_local(p)
            ndeleted += 1
            del first_seen[p]
            log.debug("task=stray site=%s deleted stray %s", a.host, show(p))
            click.echo(f"{line}: deleted")
    if record:
        try:
            sightings.save(first_seen)
        except OSError as e:
            click.echo(f"note: cannot record stray sightings in {sightings.path}: "
                       f"{e.strerror or e}; later runs will count them as first seen then",
                       err=True)
    for run, d in missing:
        key = deletion.key_of(d)
        line = (f"missing: run {show(run.get('name'))} datum {show(key_str(key))} "
                f"({show(d.get('status'))}): {show(d['location'])} does not exist")
        if delete and d.get("status") in ("transferred", "verifying"):
            if a.dry_run:
                line += ": dry-run: would mark it error"
            elif a.db.apply(lifecycle.failed(run["_id"], key, d.get("status"),
                                             f"files missing at {d['location']} (found by cax "
                                             f"stray)")):
                line += ": marked error"
        click.echo(line)
    for run, d in moving:
        key = key_str(deletion.key_of(d))
        where = [x for x in (d["location"], d["moving_to"]) if os.path.lexists(x)]
        click.echo(f"interrupted move: run {show(run.get('name'))} datum {show(key)}: "
                   f"{show(d['location'])} -> {show(d['moving_to'])} (files at "
                   f"{show(', '.join(where)) or 'neither'}); finish it with cax mv, or unset "
                   f"moving_to")
    for run, d in deleting:
        # half-deleted copies are never good copies: the admin should know they are pending
        since = d.get("deleting_time")
        when = f"marked {since:%Y-%m-%d %H:%M} UTC; " if hasattr(since, "strftime") else ""
        click.echo(f"deleting: run {show(run.get('name'))} datum "
                   f"{show(key_str(deletion.key_of(d)))}: {show(d['location'])} ({when}"
                   f"{show(d.get('error') or 'not finished yet')}); the next BufferPurger pass "
                   f"or cax rm finishes it")
    click.echo(f"{len(strays)} stray(s), {len(missing)} datum(s) with missing files"
               + (f", {len(deleting)} copy(ies) being deleted" if deleting else "")
               + (f", {len(moving)} interrupted move(s)" if moving else ""))


# ---- console-script entry points ------------------------------------------------------------
#: the dash aliases run a command without the ``cax`` group, whose ``-h`` they would not inherit
HELP = ["-h", "--help"]


def mv_main():
    mv(prog_name="cax-mv", help_option_names=HELP)


def rm_main():
    rm(prog_name="cax-rm", help_option_names=HELP)


def stray_main():
    stray(prog_name="cax-stray", help_option_names=HELP)


COMMANDS = (mv, rm, stray)
