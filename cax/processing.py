"""``cax-process`` (what a processing job runs) and ``massive-cax`` (reprocessing campaigns).

``cax-process --config C --host H --run N --version V`` runs the site's processing command for one
run and records the result in the Runs DB itself, because only the job knows how its command ended:
the daemon that submitted it may be gone by then. The command writes to a partial path that is
renamed into place only on success, so a half-written output is never taken for data; the datum
then goes ``verifying`` -> ``transferred`` through the same :func:`cax.tasks.checksum.verify` every
copy uses, and its checksum becomes the reference for copies of it elsewhere. A failure ends the datum
``error`` with the exit code and the last lines of the command's output, on one line.

Called by hand (no datum yet), it claims the datum first, so a daemon will not submit the same run
meanwhile.

``massive-cax`` / ``cax massive`` submits one ``cax --once --run N`` job per selected run, never
more than ``max_queued`` cax jobs at a time, as the original cax did for reprocessing campaigns.
"""
from __future__ import annotations

import collections
import logging
import os
import shlex
import socket
import subprocess
import sys
import threading
import time

import click

from cax import children, job_credential, logs, paths, python_m
from cax import config as cfgmod
from cax.batch import BatchError, Job, safe_job_name
from cax.runsdb import RunsDBError, connect, identity, lifecycle, now
from cax.runsdb.lifecycle import ErrorKind
from cax.tasks.base import Context, Task
from cax.tasks.checksum import verify
from cax.transfer import policy
from cax.tasks.process import (
    HEARTBEAT_SECONDS,
    fill_command,
    find_datum,
    open_backend,
    output_path,
    partial_path,
    processed_key,
    settings,
)

log = logging.getLogger("cax.processing")
#: the processing job failed (it ran, or was to run, the processor): retried as max_retries allows
PROCESSING_FAILED = ErrorKind.PROCESSING
TAIL_LINES = 5
MASSIVE_PREFIX = "cax-massive-"


class ProcessRun(Task):
    """A task object for one run, so cax-process logs and records errors exactly like the daemon."""

    def query(self):
        return None


def _own_job_id():
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("CAX_JOB_ID")


def _run_command(argv, beat=None) -> tuple:
    """Run the command (argument list, no shell), pass its output through, keep the last lines.

    ``beat()`` is called every HEARTBEAT_SECONDS meanwhile: a run by hand has no batch system to
    tell the daemon it died, only the heartbeat going stale."""
    tail = collections.deque(maxlen=TAIL_LINES)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=children.environment())
    done = threading.Event()

    def heartbeat():
        while not done.wait(HEARTBEAT_SECONDS):
            try:
                beat()
            except Exception as e:  # a missed beat is no reason to stop processing
                log.warning("heartbeat failed: %s", e)

    beater = threading.Thread(target=heartbeat, daemon=True) if beat else None
    if beater:
        beater.start()
    try:
        for raw in proc.stdout:
            sys.stdout.buffer.write(raw)
            line = raw.decode(errors="replace").strip()
            if line:
                tail.append(line)
        sys.stdout.flush()
        rc = proc.wait()
    finally:
        done.set()
    return (rc if rc >= 0 else 128 - rc), list(tail)


def process(config, host: str, number, version: str, db=None, *, detector=None, name=None,
            ncpus=None) -> int:
    """Process one run (by ``number``, else ``name``, of ``detector`` or of whichever detector has
    it); returns the exit status for cax-process (0: datum ``transferred``). ``ncpus`` overrides
    the site's ``ncpus`` for this run (the classic positional form's NCPU)."""
    site = config.site(host)
    p = settings(site)
    if ncpus is not None:
        p = dict(p, ncpus=ncpus)
    db = db or connect(config)
    task = ProcessRun(Context(config=config, host=host, db=db))
    what = identity.describe(number=number, name=None if number is not None else name,
                             detector=detector)
    try:
        run = db.run_by(number=number, name=name, detector=detector)
    except identity.AmbiguousRun as e:
        log.error("site=%s %s", host, e)
        return 2
    if run is None:
        log.error("site=%s %s not found in the Runs DB", host, what)
        return 1
    key = processed_key(host, version)
    datum = find_datum(run, key)
    me = _own_job_id()
    problem = None
    if version not in p["versions"]:
        problem = f"version {version!r} is not among this site's processing versions {p['versions']}"
    elif not p.get("command"):
        problem = "this site has no processing command configured"
    if problem:
        # the config changed after the job was submitted: say so on the job's datum
        if (me and datum is not None and datum.get("status") == "processing"
                and datum.get("job_id") in (me, None)):
            task.record_error(run, key, "processing", f"cax-process: {problem}",
                              kind=PROCESSING_FAILED)
        else:
            task.log(logging.ERROR, run, problem, datum=key)
        return 2
    if datum is None:
        try:
            location = output_path(site, p, run["name"], version)
        except paths.UnsafePath as e:
            task.log(logging.ERROR, run, f"refused: {e}")
            return 1
        job_id = f"manual:{socket.gethostname()}:{os.getpid()}"
        if not db.apply(lifecycle.claim_processing(run["_id"], dict(
                key, location=location, checksum=None, creation_time=now(), creation_place=host,
                job_backend="manual", job_id=job_id))):
            task.log(logging.ERROR, run, "another cax claimed this datum first", datum=key)
            return 1
        task.log(logging.INFO, run, f"claimed for processing by hand ({job_id})", datum=key)
    elif datum.get("status") != "processing":
        task.log(logging.WARNING if datum.get("status") == "error" else logging.INFO, run,
                 f"nothing to do: datum is {datum.get('status')}"
                 + (f" ({datum.get('error')})" if datum.get("error") else ""), datum=key)
        return 0 if datum.get("status") in ("verifying", "transferred") else 1
    elif datum.get("job_id") and datum["job_id"] != me:
        task.log(logging.ERROR, run, f"datum is being processed by job {datum['job_id']} "
                 f"({datum.get('job_backend')}); not starting a second one", datum=key)
        return 1
    try:
        return _process_owned(task, site, p, run, key, version)
    except Exception as e:  # whatever happens, the Runs DB says so
        task.record_error(run, key, "processing", f"cax-process failed: {type(e).__name__}: {e}",
                          kind=PROCESSING_FAILED)
        return 1


def _process_owned(task, site, p, run, key, version) -> int:
    db = task.db
    try:
        final = output_path(site, p, run["name"], version)
        raw = next((d for d in run.get("data") or [] if d.get("host") == task.host
                    and d.get("type") == "raw" and d.get("status") == "transferred"), None)
        if raw is None:
            task.record_error(run, key, "processing", "no transferred raw data at this site",
                              kind=PROCESSING_FAILED)
            return 1
        source = paths.check_location(site, raw.get("location"), "raw")
    except paths.UnsafePath as e:
        task.record_error(run, key, "processing", f"refused: {e}", kind=PROCESSING_FAILED)
        return 1
    datum = find_datum(run, key) or {}
    if datum.get("location") not in (None, final):
        task.record_error(run, key, "processing", f"datum location {datum.get('location')} is not "
                          f"where this site writes version {version} ({final})",
                          kind=PROCESSING_FAILED)
        return 1
    partial = partial_path(final)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    policy.clear_leftovers(final)  # leftovers of a killed attempt
    argv = fill_command(p["command"], {"name": run["name"], "number": int(run["number"]),
                                       "input": source, "output": partial, "version": version,
                                       "ncpus": p["ncpus"]})
    task.log(logging.INFO, run, f"processing start: {shlex.join(argv)}", datum=key)
    db.apply(lifecycle.heartbeat(run["_id"], key, "processing", started=now()))
    started = time.monotonic()
    try:
        rc, tail = _run_command(argv, beat=lambda: db.apply(lifecycle.heartbeat(run["_id"], key,
                                                                                "processing")))
    except OSError as e:
        task.record_error(run, key, "processing", f"cannot run {argv[0]}: {e.strerror or e}",
                          kind=PROCESSING_FAILED)
        return 127
    seconds = time.monotonic() - started
    if rc != 0:
        policy.remove_local(partial)
        last = " | ".join(tail) if tail else "(no output)"
        task.record_error(run, key, "processing",
                          f"command exited with code {rc} after {seconds:.0f} s; last output: {last}",
                          kind=PROCESSING_FAILED)
        return rc if 0 < rc < 256 else 1
    if not os.path.lexists(partial):
        task.record_error(run, key, "processing",
                          f"command exited 0 after {seconds:.0f} s but wrote nothing to {partial}",
                          kind=PROCESSING_FAILED)
        return 1
    policy.place_local(partial, final, replace=True)  # a re-run replaces its older output
    task.log(logging.INFO, run, f"processing done in {seconds:.1f} s: {final}", datum=key)
    if not db.apply(lifecycle.job_ended(run["_id"], key, processing_seconds=round(seconds, 3))):
        task.log(logging.WARNING, run, "datum changed while processing (marked dead?); "
                 "output left for the next attempt", datum=key)
        return 1
    from cax.checksum import checksum
    verify(task, run["_id"], key, lambda algo: checksum(final, algo))
    after = find_datum(db.run(run["_id"], {"data": 1}) or {}, key) or {}
    return 0 if after.get("status") == "transferred" else 1


#: the classic ``cax-process NAME INPUT HOST VERSION HASH OUTPUT NCPU`` (its processing jobs ran it)
CLASSIC_ARGS = ("NAME", "INPUT", "HOST", "VERSION", "HASH", "OUTPUT", "NCPU")


@click.command("cax-process", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("classic", nargs=-1, metavar="[NAME INPUT HOST VERSION HASH OUTPUT NCPU]")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="Config file (default: $CAX_CONFIG, else ./cax.json, else /etc/cax/cax.json).")
@click.option("--host", default=None, help="Site (default: $CAX_HOST, else the short hostname).")
@click.option("--run", "number", type=int, default=None, help="Run number.")
@click.option("--detector", default=None, metavar="DETECTOR",
              help="The run's detector, where runs of several detectors share the number "
                   "(default: whichever detector has it; refused when several do).")
@click.option("--version", "version", default=None, help="Processor version to produce.")
@click.option("--log", "log_level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def process_cmd(classic, config_path, host, number, detector, version, log_level):
    """Process one run at this site and record the result in the Runs DB (run by processing jobs;
    works by hand too).

    The classic positional form `cax-process NAME INPUT HOST VERSION HASH OUTPUT NCPU` is
    accepted too: the run by name, HOST as --host, VERSION as --version, NCPU for this run. cax
    reads the input from the run's raw datum at the site (not INPUT), writes where the site's
    processing section says (not OUTPUT, where that differs) and records no HASH; one warning
    line says so (docs/processing.rst).
    """
    logs.setup(log_level)
    name = ncpus = None
    try:
        if classic:
            host, name, version, ncpus, classic_paths = _classic_form(classic, host, number,
                                                                      version)
        elif number is None or version is None:
            raise click.UsageError("give --run N and --version V (or the classic positional "
                                   "form NAME INPUT HOST VERSION HASH OUTPUT NCPU)")
    except click.UsageError as e:
        click.echo(f"cax-process: error: {e.format_message()}", err=True)
        sys.exit(2)
    try:
        config = cfgmod.load(config_path)
        host = host or cfgmod.default_host()
        config.site(host)
    except cfgmod.ConfigError as e:
        click.echo(f"cax-process: error: {e}", err=True)
        sys.exit(2)
    if classic:
        _warn_classic_paths(config, host, name, version, *classic_paths)
    try:  # a batch job gets the Runs DB password in a file, never in its environment
        job_credential.adopt(config.password_env)
    except job_credential.CredentialError as e:
        click.echo(f"cax-process: error: {e}", err=True)
        sys.exit(1)
    try:
        sys.exit(process(config, host, number, version, detector=detector, name=name,
                         ncpus=ncpus))
    except RunsDBError as e:
        click.echo(f"cax-process: error: {e}", err=True)
        sys.exit(1)


def _classic_form(args, host, number, version):
    """(host, name, version, ncpus, (input, hash, output)) of the classic positional form."""
    if len(args) != len(CLASSIC_ARGS):
        raise click.UsageError(f"the classic form takes {len(CLASSIC_ARGS)} arguments "
                               f"({' '.join(CLASSIC_ARGS)}), not {len(args)}")
    name, input_, chost, cversion, pax_hash, output, ncpu = args
    if number is not None:
        raise click.UsageError("give the run either as --run or as the classic NAME, not both")
    for flag, given, classic_value in (("--host", host, chost), ("--version", version, cversion)):
        if given is not None and given != classic_value:
            raise click.UsageError(f"{flag} {given} contradicts the classic argument "
                                   f"{classic_value}")
    try:
        ncpus = int(ncpu)
        if ncpus < 1:
            raise ValueError
    except ValueError:
        raise click.UsageError(f"NCPU must be a positive integer, not {ncpu!r}")
    return chost, name, cversion, ncpus, (input_, pax_hash, output)


def _warn_classic_paths(config, host, name, version, input_, pax_hash, output):
    """One warning line for what cax does differently from what the classic arguments say."""
    from cax.tasks.process import output_path
    notes = [f"HASH {pax_hash} is not recorded (cax records the processor version)"]
    site = config.site(host)
    if site.processing:
        try:
            mine = output_path(site, settings(site), name, version)
        except (paths.UnsafePath, KeyError, ValueError):
            mine = None
        if mine and os.path.normpath(output) not in (os.path.dirname(mine), mine):
            notes.append(f"OUTPUT {output} is not used: the output goes to {mine}, as the site's "
                         f"processing section says")
    notes.append(f"INPUT {input_} is not read: cax processes the run's transferred raw datum "
                 f"at {host}")
    log.warning("site=%s cax-process (classic positional form) run %s: %s", host, name,
                "; ".join(notes))


def process_main():
    process_cmd(prog_name="cax-process")


# ---- massive-cax ------------------------------------------------------------------------------
def select_runs(db, host, start=None, stop=None, numbers=(), tags=(), detector=None):
    """Runs with data at this host, narrowed by number range, explicit numbers, tags and
    detector."""
    clauses = [{"data.host": host}]
    if detector is not None:
        clauses.append(identity.detector_clause(detector))
    rng = {}
    if start is not None:
        rng["$gte"] = start
    if stop is not None:
        rng["$lte"] = stop
    if rng:
        clauses.append({"number": rng})
    if numbers:
        clauses.append({"number": {"$in": list(numbers)}})
    if tags:
        clauses.append({"tags.name": {"$in": list(tags)}})
    return list(db.find_runs({"$and": clauses}, {"number": 1, "name": 1, "detector": 1}))


def ambiguous_numbers(runs, numbers) -> list:
    """``run number N is in several detectors (...)`` for each explicitly asked number that
    runs of more than one detector have."""
    out = []
    for n in dict.fromkeys(numbers):
        detectors = sorted({identity.detector_of(r) for r in runs if r.get("number") == n})
        if len(detectors) > 1:
            out.append(f"run number {n} is in several detectors ({', '.join(detectors)})")
    return out


#: the classic massive-cax flags, onto the job resources of the same meaning (docs/upgrading.rst)
MASSIVE_RESOURCES = ("mem_per_cpu", "walltime", "partition", "reservation")


def massive_job(config, host, p, run) -> Job:
    number = int(run["number"])
    label = identity.label(run)
    log_dir = p["log_dir"]
    return Job(name=MASSIVE_PREFIX + safe_job_name(host, label),
               argv=[*python_m("cax"), "--config", config.path, "--host", host,
                     "--once", "--run", str(number), "--detector", identity.detector_of(run)],
               env_setup=p["env_setup"], ncpus=p["ncpus"], mem_per_cpu=p.get("mem_per_cpu"),
               walltime=p.get("walltime"), partition=p.get("partition"), account=p.get("account"),
               qos=p.get("qos"), reservation=p.get("reservation"),
               log_path=os.path.join(log_dir, f"massive_{label}.log"), workdir=log_dir)


def massive_submit(config, host, db, runs, *, max_queued=None, wait=True, interval=60.0,
                   timeout=None, dry_run=False, echo=click.echo, backend=None,
                   resources=None) -> int:
    """Submit the runs' jobs, waiting for room in the queue; returns how many are left unsubmitted.

    Raises ValueError before submitting anything when the site cannot take massive jobs: without
    a processing section the jobs would silently run on this host (the local backend is only the
    default of a section that exists), and a limit of 0 would wait forever."""
    site = config.site(host)
    if not site.processing:
        raise ValueError(f"site {host} has no processing section (set processing.backend)")
    p = settings(site)
    # the classic flags: resources of the massive jobs themselves (the processing jobs these
    # start take the site's processing section, as every processing job does)
    p = dict(p, **{k: v for k, v in (resources or {}).items() if v is not None})
    limit = p.get("max_queued") if max_queued is None else max_queued
    if limit is not None and limit < 1:
        raise ValueError(f"site {host}: processing.max_queued is {limit}, so no job could ever be "
                         f"submitted; pass --max-queued N (at least 1)")
    jobs = [massive_job(config, host, p, r) for r in runs]
    if dry_run:
        for job in jobs:
            res = ", ".join(f"{k}={getattr(job, k)}" for k in MASSIVE_RESOURCES
                            if getattr(job, k) is not None)
            echo(f"would submit {job.name}{f' ({res})' if res else ''}: {shlex.join(job.argv)}")
        return 0
    backend = backend or open_backend(p)
    os.makedirs(p["log_dir"], exist_ok=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    pending = list(jobs)
    failed = 0
    while pending:
        queued = backend.queued("cax-")
        names = {name for _id, name in queued}
        room = None if limit is None else limit - len(queued)
        while pending and (room is None or room > 0):
            job = pending.pop(0)
            if job.name in names:
                echo(f"{job.name}: already queued, skipped")
                continue
            try:
                job.env.update(job_credential.for_job(config, p["log_dir"], job.name))
                job_id = backend.submit(job)
            except (BatchError, OSError) as e:
                job_credential.discard(p["log_dir"], job.name)
                echo(f"{job.name}: submit failed: {e}")
                failed += 1
                continue
            echo(f"submitted {job.name} as {job_id}")
            if room is not None:
                room -= 1
        if not pending:
            break
        if not wait:
            echo(f"queue full ({limit} cax jobs); {len(pending)} run(s) not submitted (--no-wait)")
            break
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            echo(f"timed out waiting for room in the queue; {len(pending)} run(s) not submitted")
            break
        # a silent wait of hours looks like a hang: say what is waited for, once per look
        echo(f"queue full ({len(queued)} cax job(s) queued, limit {limit}); {len(pending)} run(s) "
             f"waiting; looking again in {interval:g} s"
             + ("" if left is None else f" (giving up in {left:.0f} s)"))
        time.sleep(interval if left is None else min(interval, left))  # then look at the queue again
    return len(pending) + failed


@click.command("massive", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="Config file (default: $CAX_CONFIG, else ./cax.json, else /etc/cax/cax.json).")
@click.option("--host", default=None, help="Site (default: $CAX_HOST, else the short hostname).")
@click.option("--start", type=int, default=None, help="First run number.")
@click.option("--stop", type=int, default=None, help="Last run number (inclusive).")
@click.option("--run", "numbers", type=int, multiple=True, help="This run (repeatable).")
@click.option("--detector", default=None, metavar="DETECTOR",
              help="Only runs of this detector (runs without one are 'tpc'; default: every "
                   "detector; a --run number that several detectors have is refused).")
@click.option("--tag", "tags", multiple=True, help="Only runs with this tag (repeatable).")
@click.option("--mem-per-cpu", "--mem_per_cpu", "mem_per_cpu", default=None,
              help="Memory per CPU of each massive job: megabytes or a Slurm size (\"2G\") "
                   "(default: the site's processing mem_per_cpu).")
@click.option("--walltime", default=None,
              help="Walltime of each massive job: minutes or a Slurm time (\"48:00:00\").")
@click.option("--partition", default=None, help="Slurm partition of the massive jobs.")
@click.option("--reservation", default=None, help="Slurm reservation of the massive jobs.")
@click.option("--max-queued", type=click.IntRange(min=1), default=None,
              help="Most cax jobs queued at once (default: the site's processing max_queued).")
@click.option("--no-wait", is_flag=True, help="Stop when the queue is full instead of waiting.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=60.0, show_default=True,
              help="Seconds between looks at the queue while it is full.")
@click.option("--timeout", type=click.FloatRange(min=0), default=None,
              help="Give up waiting for room after this many seconds (default: wait as needed).")
@click.option("--dry-run", is_flag=True, help="List the jobs that would be submitted; submit none.")
@click.option("--once", "classic_once", is_flag=True, hidden=True,
              help="The classic flag (its massive-cax looped for ever without it); cax submits "
                   "the selected runs once and exits.")
@click.pass_context
def massive(ctx, config_path, host, start, stop, numbers, detector, tags, mem_per_cpu, walltime,
            partition, reservation, max_queued, no_wait, interval, timeout, dry_run, classic_once):
    """Submit one `cax --once --run N` batch job per selected run (reprocessing campaigns).

    The classic resource flags (--mem_per_cpu, --walltime, --partition, --reservation) set the
    resources of these jobs; the processing jobs they start use the site's processing section."""
    root = (ctx.find_root().obj or {}) if ctx.parent is not None else {}
    config_path = config_path or root.get("config_path")
    host = host or root.get("host")
    detector = detector or root.get("detector")
    dry_run = dry_run or bool(root.get("dry_run"))
    if ctx.parent is None:
        logs.setup("INFO")
    try:
        config = cfgmod.load(config_path)
        host = host or cfgmod.default_host()
        config.site(host)
    except cfgmod.ConfigError as e:
        raise _Refused(str(e))
    try:
        db = connect(config)
    except RunsDBError as e:
        raise click.ClickException(str(e))
    resources = _massive_resources(config, host, mem_per_cpu=mem_per_cpu, walltime=walltime,
                                   partition=partition, reservation=reservation)
    runs = select_runs(db, host, start, stop, numbers, tags, detector)
    if detector is None:
        ambiguous = ambiguous_numbers(runs, numbers)
        if ambiguous:
            raise _Refused(f"{'; '.join(ambiguous)}; choose one with --detector")
    per = collections.Counter(identity.detector_of(r) for r in runs)
    click.echo(f"{len(runs)} run(s) selected at site {host}"
               + (f" ({', '.join(f'{d}: {n}' for d, n in sorted(per.items()))})"
                  if len(per) > 1 else ""))
    try:
        left = massive_submit(config, host, db, runs, max_queued=max_queued, wait=not no_wait,
                              interval=interval, timeout=timeout, dry_run=dry_run,
                              resources=resources)
    except ValueError as e:
        raise _Refused(str(e))
    sys.exit(1 if left else 0)


def _massive_resources(config, host, **given) -> dict:
    """The classic resource flags that were given, checked as the config's are (exit 2 on a bad
    one); one warning line where this site's backend does not apply them."""
    from cax.batch.base import resource_problem
    out = {}
    for key, value in given.items():
        if value is None:
            continue
        if key == "mem_per_cpu" and value.isdigit():
            value = int(value)  # megabytes, as Slurm (and the classic job scripts) read it
        problem = resource_problem(key, value)
        if problem:
            raise _Refused(f"--{key}: {problem}")
        out[key] = value
    processing = config.site(host).processing or {}
    if out and processing.get("backend", "local") == "local":
        ignored = [k for k in out if k != "walltime"]
        if ignored:
            log.warning("site=%s massive-cax: the local backend has no %s; %s ignored (it "
                        "enforces only the walltime)", host, "/".join(ignored),
                        ", ".join(f"--{k}" for k in ignored))
    return out


class _Refused(click.ClickException):
    """A config the command cannot work with: exit status 2, like every config error of cax."""

    exit_code = 2


def massive_main():
    massive(prog_name="massive-cax")


if __name__ == "__main__":
    process_main()
