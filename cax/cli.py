"""The ``cax`` command line.

``cax`` alone runs the daemon loop for this host; subcommands inspect and feed the Runs DB. Exit
status: 0 when cax ran (``--once``: the pass did everything it could), 1 when the Runs DB cannot be
used (or was lost during a ``--once`` pass) or another daemon holds the site, 2 for config and
usage errors, 3 when a ``--once`` pass recorded a failure or could not reach a site it needed
(each failure is in the Runs DB: ``cax status``).
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
from datetime import datetime, timezone

import click

from cax import __version__
from cax import config as cfgmod
from cax import logs
from cax.cli_common import Fatal, check_reach, load_config, open_db, resolve_host
from cax.cli_common import settings as _settings

log = logging.getLogger("cax")

LEVELS = click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False)


class Seconds(click.FloatRange):
    """FloatRange lets NaN through (every comparison with it is false)."""

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if value != value:
            self.fail("nan is not a number of seconds", param, ctx)
        return value


def _common(f):
    """--config and --host are accepted before or after the subcommand name."""
    f = click.option("--host", "host", default=None,
                     help="Site this cax acts as (default: $CAX_HOST, else the short hostname).")(f)
    f = click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
                     help="Config file (default: $CAX_CONFIG, else ./cax.json, else "
                          "/etc/cax/cax.json; never the example packaged with cax).")(f)
    return f


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@_common
@click.option("--once", is_flag=True, help="Run one pass of every task, then exit (for cron).")
@click.option("--run", "run_number", type=int, default=None, help="Only act on the run with this number.")
@click.option("--name", "run_name", default=None, help="Only act on the run with this name.")
@click.option("--detector", default=None, metavar="DETECTOR",
              help="The detector of --run/--name (runs of several detectors may share a number or "
                   "a name; runs without one are 'tpc'). Default: whichever detector has it; "
                   "refused when several do. Alone: only that detector's runs.")
@click.option("--interval", type=Seconds(0, cfgmod.MAX_INTERVAL), default=None,
              help="Seconds between passes of the daemon (default: config 'interval', else 60).")
@click.option("--log", "log_level", type=LEVELS, default=None,
              help="Log level (default INFO; -q is WARNING, -v is DEBUG).")
@click.option("-q", "--quiet", is_flag=True, help="Log warnings and errors only.")
@click.option("-v", "--verbose", is_flag=True, help="Log everything (DEBUG).")
@click.option("--log-file", type=click.Path(dir_okay=False), default=None,
              help="Also write the log to this file (default: stderr only); it is reopened "
                   "when logrotate moves it, and on SIGHUP.")
@click.option("--log-format", type=click.Choice(logs.FORMATS), default="text", show_default=True,
              help="text: one line per event; json: one JSON object per event, with run, task, "
                   "site and datum as fields.")
@click.option("--disable-database-update", "--dry-run", "dry_run", is_flag=True,
              help="Change nothing (no Runs DB writes, no file changes); log each action instead.")
@click.option("--disable_database_update", "classic_no_db", is_flag=True, hidden=True,
              help="The classic spelling: a dry run here (see docs/upgrading.rst).")
@click.option("--runs-db", "runs_db", default=None, metavar="URI_OR_PATH",
              help="Runs DB to use: a mongodb:// URI or an embedded store's path (wins over "
                   "$CAX_RUNS_DB, which wins over the config's runs_db).")
@click.option("--strict", is_flag=True,
              help="Unknown config keys are errors, not warnings (also: \"strict\": true).")
@click.option("--ncpu", type=click.IntRange(1), default=None,
              help="CPUs per processing job at this host (overrides processing 'ncpus').")
@click.version_option(__version__, "--version", prog_name="cax")
@click.pass_context
def cli(ctx, config_path, host, once, run_number, run_name, detector, interval, log_level, quiet,
        verbose, log_file, log_format, dry_run, classic_no_db, runs_db, strict, ncpu):
    """cax moves experiment data between sites, verifies and processes them, and purges buffers,
    coordinating every site through the Runs DB.

    Without a subcommand it runs the daemon loop for this host: `cax --once` from cron, `cax` as a
    long-running daemon (SIGTERM/SIGINT stop it cleanly), `cax --config test.json --dry-run --once`
    to see what a new config would do. SIGHUP re-reads the config and reopens the log file.

    Under cron (--once, no terminal, no log level asked for) a pass that did nothing prints
    nothing, so cron mails only when something happened.

    \b
    Exit status:
      0  the pass did everything it could (a daemon: stopped cleanly)
      1  the Runs DB cannot be used, or another cax serves this site
      2  a config or usage error
      3  --once: a failure was recorded, or a site this pass needed did not answer
    """
    if sum(bool(x) for x in (log_level, quiet, verbose)) > 1:
        raise Fatal("--log, -q and -v: give one of them", 2)
    level = log_level or ("WARNING" if quiet else "DEBUG" if verbose else "INFO")
    idle_quiet = (once and log_level is None and not verbose and ctx.invoked_subcommand is None
                  and not sys.stderr.isatty())
    try:
        logs.setup(level, log_file, log_format, quiet_when_idle=idle_quiet)
    except OSError as e:
        raise Fatal(f"cannot open log file {log_file}: {e.strerror or e}", 2)
    if classic_no_db:
        # the classic cax still copied and deleted without recording it, leaving a Runs DB that
        # no longer says where the data are; here nothing changes and nothing is recorded
        log.warning("site=- --disable_database_update (classic): a dry run here; the classic cax "
                    "moved and deleted data without recording it, this cax changes nothing")
        dry_run = True
    if runs_db == "":
        raise Fatal("--runs-db: empty; give a mongodb:// URI or a path", 2)
    if detector == "":
        raise Fatal("--detector: empty; give a detector name such as 'tpc'", 2)
    ctx.obj = {"config_path": config_path, "host": host, "dry_run": dry_run, "runs_db": runs_db,
               "strict": strict, "detector": detector}
    if ctx.invoked_subcommand is not None:
        return
    from cax.daemon import AlreadyRunning, SiteLock, run_loop
    from cax.tasks.base import Context, run_filter

    config = load_config(config_path)
    try:  # a massive-cax job gets the Runs DB password in a file, never in its environment
        from cax import job_credential
        job_credential.adopt(config.password_env)
    except job_credential.CredentialError as e:
        raise Fatal(str(e), 1)
    host = resolve_host(config, host)
    _ready(config, host, ncpu)
    scope = " ".join(f"{k} {v}" for k, v in (("run", run_number), ("name", run_name),
                                             ("detector", detector)) if v is not None)
    lock = SiteLock(config, host, scope)
    try:
        lock.acquire()
    except AlreadyRunning as e:
        raise Fatal(str(e), 1)
    db = None
    try:
        # a dry run of a new config may start from no store; a real pass never does
        db = open_db(config, dry_run, missing_ok=True)
        if detector is None and (run_number is not None or run_name is not None):
            detector = _only_detector(db, run_number, run_name)
        rf = run_filter(run_number, run_name, config.datasets_for(host), detector)
        context = Context(config=config, host=host, db=db, dry_run=dry_run, run_filter=rf)
        log.info("site=%s cax %s starting: config %s, Runs DB %s, tasks %s%s", host, __version__,
                 config.path, db.description, ",".join(config.tasks_for(host)),
                 " (dry run: nothing will change)" if dry_run else "",
                 extra={} if dry_run else logs.ROUTINE)  # a dry run always says it is one

        def reload():
            new = load_config(config_path)
            new.site(host)  # this host must still be in it
            _ready(new, host, ncpu)
            if new.runs_db != config.runs_db:
                from cax.runsdb import redact_uri
                raise Fatal(f"it names another Runs DB ({redact_uri(new.runs_db)}); "
                            f"restart cax to change the Runs DB")
            context.run_filter = run_filter(run_number, run_name, new.datasets_for(host),
                                            detector)
            return new, new.interval if interval is None else interval

        code = run_loop(context, once=once, reload=reload,
                        interval=config.interval if interval is None else interval)
        if code:  # run_loop logged why in one line
            ctx.exit(code)
    finally:
        if db is not None:
            db.close()
        lock.release()


def _ready(config, host, ncpu) -> None:
    """What the daemon checks of a config at start and on SIGHUP: it can do this host's work, it
    names a Runs DB, and ``--ncpu`` applied."""
    check_reach(config, host)
    if not config.runs_db_named:
        raise Fatal(f"{config.path}: a classic list config names no Runs DB; name one with "
                    f"--runs-db URI_OR_PATH, ${cfgmod.RUNS_DB_ENV}, or the object form's "
                    f"\"runs_db\"", 2)
    if ncpu is not None:
        site = config.site(host)
        if site.processing is None:
            log.warning("site=%s --ncpu %d ignored: this site does not process data", host, ncpu)
        else:
            site.processing["ncpus"] = ncpu
            from cax.tasks.process import describe
            log.info("site=%s --ncpu %d: %s", host, ncpu, describe(site))


def _only_detector(db, number, name):
    """The one detector that has this run (pinned, so a run of another detector added meanwhile
    is not acted on), None when none has it; exit 2 when several do."""
    from cax.runsdb.identity import describe
    detectors = db.detectors_of(number=number, name=name)
    if len(detectors) > 1:
        raise Fatal(f"{describe(number=number, name=name)} is in several detectors "
                    f"({', '.join(detectors)}); choose one with --detector", 2)
    return detectors[0] if detectors else None


# ---- status ---------------------------------------------------------------------------------
def _cell(data, host):
    here = [d for d in data if d.get("host") == host]
    if not here:
        return "-"
    parts = []
    for d in sorted(here, key=lambda d: (d.get("type") != "raw", str(d.get("pax_version")))):
        version = f"@{d['pax_version']}" if d.get("pax_version") else ""
        label = "" if d.get("type") == "raw" else f"{d.get('type')}{version}:"
        parts.append(label + str(d.get("status")))
    return logs.printable(",".join(parts))


def _readable(run: dict) -> dict:
    """The run with only the ``data`` and ``references`` entries status can show (objects), and
    one warning line naming the others: any tool may write the Runs DB, and one odd entry must
    neither crash the table nor hide the other runs."""
    lists, items, out = [], [], dict(run)
    for field in ("data", "references"):
        value = run.get(field)
        if value is not None and not isinstance(value, list):
            lists.append(f"{field} is not a list")
        items += [f"{field}[{i}]" for i, d in enumerate(value if isinstance(value, list) else [])
                  if not isinstance(d, dict)]
        out[field] = [d for d in value if isinstance(d, dict)] if isinstance(value, list) else []
    if items:
        verb = "is not an object" if len(items) == 1 else "are not objects"
        lists.append(f"{', '.join(items)} {verb}")
    if lists:
        click.echo(f"cax: warning: run {logs.printable(run.get('name'))}: {', '.join(lists)}; "
                   f"skipped", err=True)
    return out


@cli.command()
@_common
@click.option("--json", "as_json", is_flag=True, help="Print the runs as JSON instead of a table.")
@click.pass_context
def status(ctx, config_path, host, as_json):
    """Show every run and the status of its copies at each site."""
    from cax.runsdb.copies import comparable, reference
    config_path, host = _settings(ctx, config_path, host)
    config = load_config(config_path)
    db = open_db(config)
    from cax.runsdb.identity import detector_of
    runs = [_readable(r) for r in db.find_runs({}, {"number": 1, "name": 1, "detector": 1,
                                                     "data": 1, "references": 1})]
    if as_json:
        fields = ("host", "type", "status", "location", "checksum", "checksum_type", "size",
                  "pax_version", "error")
        out = [{"number": r.get("number"), "name": r.get("name"), "detector": detector_of(r),
                "data": [{k: d.get(k) for k in fields if k in d or k in fields[:7]}
                         for d in r["data"]]} for r in runs]
        click.echo(json.dumps(out, indent=1, default=str))
        return
    hosts = list(config.sites)
    for r in runs:
        for d in r["data"]:
            if d.get("host") not in hosts:
                hosts.append(d.get("host"))
    # runs of several detectors may share a number: then each row says its detector
    several = len({detector_of(r) for r in runs}) > 1
    header = ["number", "name"] + (["detector"] if several else []) \
        + [logs.printable(h) for h in hosts] + ["raw checksum"]
    rows = []
    for r in runs:
        data = r["data"]
        ref = reference(r, "raw", prefer=config.reference_sites)
        if ref:
            # a classic Rucio/tape record's adler32 or MD5 says nothing either way
            good = [d for d in data if d.get("type") == "raw" and d.get("status") == "transferred"
                    and comparable(d)]
            same = all(d.get("checksum") == ref.get("checksum") for d in good)
            verdict = ("no transferred copy" if not good
                       else f"{'all equal' if same else 'MISMATCH'} ({len(good)})")
            summary = f"{logs.printable(str(ref.get('checksum'))[:12])} {verdict}"
        else:
            summary = "-"
        rows.append([logs.printable(r.get("number")), logs.printable(r.get("name"))]
                    + ([logs.printable(detector_of(r))] if several else [])
                    + [_cell(data, h) for h in hosts] + [summary])
    widths = [max(len(x) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    for line in [header] + rows:
        click.echo("  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip())
    if not rows:
        click.echo("(no runs)")
    from cax import heartbeat
    daemons = heartbeat.lines(db.heartbeats())
    if daemons:
        click.echo("")
        for line in daemons:
            click.echo(line)


# ---- runs add -------------------------------------------------------------------------------
@cli.group()
def runs():
    """Manage run documents in the Runs DB."""


def _utc(value, what):
    from cax.runsdb import as_utc
    if isinstance(value, datetime):
        return as_utc(value)
    if isinstance(value, str):
        try:
            t = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{what} {value!r} is not an ISO-8601 date-time")
        return as_utc(t).astimezone(timezone.utc)
    raise ValueError(f"{what} must be an ISO-8601 string, not {type(value).__name__}")


INT64 = (-(1 << 63), (1 << 63) - 1)


def _check_keys(value, where: str) -> None:
    """MongoDB refuses these field names; say which one instead of a bson traceback later."""
    if isinstance(value, dict):
        for k, v in value.items():
            at = f"{where}.{k}" if where else str(k)
            if not isinstance(k, str) or k.startswith("$") or "\0" in k or k == "":
                raise ValueError(f"key {at!r}: field names must not be empty, start with '$' "
                                 f"or contain NUL")
            _check_keys(v, at)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_keys(v, f"{where}[{i}]")
    elif isinstance(value, int) and not isinstance(value, bool) \
            and not INT64[0] <= value <= INT64[1]:
        raise ValueError(f"key {where!r}: {value} does not fit a 64-bit integer")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"key {where!r}: {value} is not a finite number")


def validate_run(doc, config=None) -> dict:
    """Check a run document from a user; returns it with dates as UTC datetimes.

    Everything the tasks later rely on is checked here, so a bad document is one line at
    ``runs add`` time instead of a run the daemons trip over (or act on wrongly) for ever.
    ``config`` (when given) is what the datums' ``host`` must name.
    """
    from cax.config import DATA_TYPES
    from cax.paths import UnsafePath, check_name
    from cax.runsdb import STATUSES
    from cax.runsdb.copies import CLASSIC_HOSTS, CLASSIC_STATUSES, placeholder
    if not isinstance(doc, dict):
        raise ValueError("a run document must be a JSON object")
    _check_keys(doc, "")
    if not isinstance(doc.get("number"), int) or isinstance(doc.get("number"), bool):
        raise ValueError(f"'number' must be an integer, not {doc.get('number')!r}")
    try:
        check_name(doc.get("name"))
    except UnsafePath as e:
        raise ValueError(f"'name': {e}")
    if "detector" in doc and (not isinstance(doc["detector"], str) or not doc["detector"]):
        raise ValueError("'detector' must be a non-empty string (e.g. 'tpc')")
    if doc.get("start") is None:
        raise ValueError("'start' is required (an ISO-8601 date-time)")
    doc = dict(doc)
    from cax.runsdb.identity import DEFAULT_DETECTOR
    doc.setdefault("detector", DEFAULT_DETECTOR)  # the classic cax's reading of an old document
    for k in ("start", "end"):
        if k in doc and doc[k] is not None:
            doc[k] = _utc(doc[k], f"'{k}'")
    data = doc.setdefault("data", [])
    if not isinstance(data, list):
        raise ValueError("'data' must be a list")
    seen = set()
    data = doc["data"] = [dict(d) if isinstance(d, dict) else d for d in data]
    for i, d in enumerate(data):
        if not isinstance(d, dict) or not all(isinstance(d.get(k), str) for k in ("host", "type", "status")):
            raise ValueError(f"data[{i}] needs string 'host', 'type' and 'status'")
        # the classic Rucio and tape movers wrote records for hosts no config need name
        if config is not None and d["host"] not in config.sites \
                and d["host"] not in CLASSIC_HOSTS:
            raise ValueError(f"data[{i}].host {d['host']!r} is not a site of the config "
                             f"(known: {', '.join(config.sites)})")
        site = config.sites.get(d["host"]) if config is not None else None
        reached = d["host"] not in CLASSIC_HOSTS and not (site is not None and site.unreachable)
        if d["type"] not in DATA_TYPES:
            raise ValueError(f"data[{i}].type must be one of {', '.join(DATA_TYPES)}, "
                             f"not {d['type']!r}")
        if d["status"] not in STATUSES + CLASSIC_STATUSES:
            raise ValueError(f"data[{i}].status must be one of "
                             f"{', '.join(STATUSES + CLASSIC_STATUSES)}, not {d['status']!r}")
        loc = d.get("location")
        # where cax reads the files, a path; a classic record elsewhere (a Rucio DID, "n/a")
        # or of a copy that wrote nothing ("n/a" after a failed transfer) is kept as written
        classic_record = isinstance(loc, str) and "\0" not in loc and (
            not reached or (placeholder(loc) and d["status"] not in ("transferred", "verifying")))
        if not classic_record and (not isinstance(loc, str) or not os.path.isabs(loc)
                                   or "\0" in loc):
            raise ValueError(f"data[{i}].location must be an absolute path, not {loc!r}")
        key = (d["host"], d["type"], d.get("pax_version"))
        if key in seen:
            raise ValueError(f"data[{i}] repeats the datum {d['type']}@{d['host']}")
        seen.add(key)
        if "creation_time" in d:
            d["creation_time"] = _utc(d["creation_time"], f"data[{i}].creation_time")
    return doc


@runs.command("add")
@_common
@click.argument("source", type=click.File("rb"))
@click.pass_context
def runs_add(ctx, config_path, host, source):
    """Insert run documents from a JSON FILE (one object or a list; '-' reads stdin)."""
    from cax.runsdb import DuplicateKeyError, RunsDBLost
    config_path, _ = _settings(ctx, config_path, host)
    config = load_config(config_path)
    try:
        docs = cfgmod.strict_json(cfgmod.utf8_text(source.read(), source.name))
    except cfgmod.ConfigError as e:
        raise Fatal(str(e), 2)
    except RecursionError:
        raise Fatal(f"{source.name}: {cfgmod.TOO_DEEP}", 2)
    except json.JSONDecodeError as e:
        raise Fatal(f"{source.name}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}", 2)
    except cfgmod.DuplicateKey as e:
        key, _name, line = e.args
        raise Fatal(f"{source.name}: key {key!r} appears twice in the object starting at "
                    f"line {line}", 2)
    docs = docs if isinstance(docs, list) else [docs]
    dry_run = ctx.find_root().obj.get("dry_run")
    db = open_db(config, dry_run, create=True, missing_ok=True)
    added = failed = 0
    for i, doc in enumerate(docs):
        label = f"run #{i + 1}"
        if isinstance(doc, dict):
            label = f"run #{i + 1} {doc.get('number')!r} ({doc.get('name')!r})"
        try:
            from cax.classic import from_extended_json
            doc = validate_run(from_extended_json(doc), config)
            label = f"run #{i + 1} {doc['number']!r} ({doc['name']!r}, {doc['detector']})"
            # asked first, dry run or not: the unique index does not know that a run without
            # 'detector' is a TPC run, and is missing where the Runs DB already held duplicates
            taken = db.identity_taken(doc)
            if taken:
                raise ValueError(taken)
            others = [d for d in db.detectors_of(name=doc["name"]) if d != doc["detector"]]
            db.insert_run(doc)
            added += 1
            if others:  # allowed, but data paths are made from the name alone
                click.echo(f"cax: warning: {source.name}: {label}: detector "
                           f"{', '.join(map(repr, others))} has a run with this name too: their "
                           f"data would share one path at every site, so only the first is "
                           f"copied; give one of them another name", err=True)
        except ValueError as e:
            failed += 1
            click.echo(f"cax: error: {source.name}: {label}: {e}", err=True)
        except DuplicateKeyError:
            failed += 1
            click.echo(f"cax: error: {source.name}: {label}: a run of this detector with this "
                       f"number or name already exists", err=True)
        except RunsDBLost:
            raise  # no later document can be added either: one line (main), exit 1
        except Exception as e:  # anything else the Runs DB refuses: still one line, go on
            failed += 1
            msg = " ".join(str(e).split())[:300]
            click.echo(f"cax: error: {source.name}: {label}: Runs DB refused it: "
                       f"{type(e).__name__}: {msg}", err=True)
    click.echo(f"{'would add' if dry_run else 'added'} {added} run(s), rejected {failed}")
    if failed:
        sys.exit(1)


# ---- config check ---------------------------------------------------------------------------
@cli.group("config")
def config_group():
    """Inspect the configuration."""


@config_group.command("check")
@_common
@click.option("--probe", is_flag=True,
              help="Also check that this host's data directories exist and are writable and "
                   "that every site it pushes to or pulls from answers (a login, and its data "
                   "directories looked at); one line per check, exit 1 if any fails. Changes "
                   "nothing.")
@click.pass_context
def config_check(ctx, config_path, host, probe):
    """Validate the config, then print the resolved sites and this host's tasks.

    A missing data directory of this host is a warning (the config may be checked on another
    machine); --probe makes it, and every site this host must reach, a real check."""
    config_path, host = _settings(ctx, config_path, host)
    config = load_config(config_path)
    # a host asked for by name must be a site; only the hostname fallback may be a mere remark
    asked = host is not None or bool(os.environ.get("CAX_HOST"))
    host = resolve_host(config, host) if asked else cfgmod.default_host()
    click.echo(f"config {config.path}: OK")
    from cax.runsdb import redact_uri
    click.echo(f"Runs DB: {redact_uri(config.runs_db)} (database {config.database!r}, "
               f"collection {config.collection!r})")
    for s in config.sites.values():
        dirs = ", ".join(f"{t}={d}" for t, d in s.dirs.items())
        if s.unreachable:
            click.echo(f"site {s.name}: not reachable from this cax ({s.unreachable})")
            continue
        click.echo(f"site {s.name}: method={s.method} host={s.hostname}:{s.port} {dirs}; "
                   f"pushes to {s.upload_options or '-'}; pulls from {s.download_options or '-'}; "
                   f"purge={s.purge or 'off'}")
    if host in config.sites:
        check_reach(config, host, itself=False)
    if host in config.sites and config.site(host).unreachable:
        click.echo(f"this host: {host}: not reachable from this cax ({config.site(host).unreachable})"
                   f"; a cax daemon started as {host} exits 2")
    elif host in config.sites:
        click.echo(f"this host: {host}; tasks: {', '.join(config.tasks_for(host))}")
        from cax.tasks.process import describe
        click.echo(describe(config.site(host)))
        from cax import probe as probing
        if probe:
            checks = probing.probe(config, host)
            for c in checks:
                click.echo(f"probe: {'ok  ' if c.ok else 'FAIL'} {c.line}")
            failed = sum(not c.ok for c in checks)
            if failed:
                raise Fatal(f"--probe: {failed} of {len(checks)} checks failed", 1)
        else:
            for c in probing.local_dirs(config.site(host)):
                if not c.ok:
                    click.echo(f"cax: warning: {c.line} (a pass would fail; see --probe)",
                               err=True)
    elif probe:
        raise Fatal(f"--probe: {host} is not a site in the config (use --host)", 2)
    else:
        click.echo(f"this host: {host} is not a site in the config (use --host); "
                   f"known: {', '.join(config.sites)}")


# ---- db -------------------------------------------------------------------------------------
@cli.group("db")
def db_group():
    """Create the embedded Runs DB (a MongoDB Runs DB is set up on its server).

    cax opens an embedded store only if it exists and is a cax store: a missing file (a typo in
    runs_db) or an emptied one is an error, never a new empty Runs DB, in which every copy at a
    site would look like a stray to `cax stray --delete`. A new installation starts with
    `cax db init`; `cax runs add` also creates the store when there is none.
    """


@db_group.command("init")
@_common
@click.argument("path", required=False, type=click.Path(dir_okay=False))
@click.pass_context
def db_init(ctx, config_path, host, path):
    """Create an empty Runs DB at PATH (default: the config's runs_db).

    Refuses (exit 2) when anything exists at that path: an existing store is never replaced. For
    the packaged config the store is $XDG_STATE_HOME/cax/cax.runsdb, and that directory is
    created; any other missing directory is reported (it is more likely a typo than a wish).
    """
    from cax.runsdb import RunsDBError, StoreExists, init_embedded
    config = None
    if path is None:
        config_path, _ = _settings(ctx, config_path, host)
        config = load_config(config_path)
        if config.is_uri():
            from cax.runsdb import redact_uri
            raise Fatal(f"runs_db of {config.path} is the MongoDB URI {redact_uri(config.runs_db)}; "
                        f"cax db init makes embedded stores only (give a PATH)", 2)
    try:
        target = init_embedded(config, os.path.abspath(path) if path else None)
    except StoreExists as e:
        raise Fatal(str(e), 2)
    except RunsDBError as e:
        raise Fatal(str(e), 1)
    click.echo(f"created an empty Runs DB at {target}")


# ---- checksum -------------------------------------------------------------------------------
@cli.command("checksum")
@click.argument("path", type=click.Path(exists=True))
@click.option("--type", "algorithm", default="sha512", show_default=True,
              help="Checksum algorithm.")
def checksum_cmd(path, algorithm):
    """Print the checksum cax records for a file or directory (to verify a copy by hand)."""
    from cax.checksum import checksum
    try:
        click.echo(f"{checksum(path, algorithm)}  {path}")
    except ValueError as e:
        raise Fatal(str(e), 2)


# ---- demo -----------------------------------------------------------------------------------
@cli.command()
@click.argument("directory", default="demo", type=click.Path(file_okay=False))
@click.option("--runs", "nruns", default=3, show_default=True, help="How many runs to create.")
def demo(directory, nruns):
    """Create three local sites (daq -> buffer -> archive) in DIRECTORY and move data through them."""
    from cax.demo import main as demo_main
    sys.exit(demo_main(directory, nruns))


def main():
    from cax.runsdb import RunsDBError
    try:
        cli(prog_name="cax")
    except RunsDBError as e:  # lost during a command (the daemon loop handles its own)
        click.echo(f"cax: error: {e}", err=True)
        sys.exit(1)


def _register_subcommands():
    """Commands that live with the code they drive (imported last: they import tasks)."""
    from cax import admin
    from cax.processing import massive
    cli.add_command(massive)
    for command in admin.COMMANDS:
        cli.add_command(command)


def status_main():
    """``cax-status``: ``cax status`` under its own name, warnings only."""
    logs.setup("WARNING")
    status(prog_name="cax-status", help_option_names=["-h", "--help"])


_register_subcommands()

