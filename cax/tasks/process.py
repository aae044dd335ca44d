"""ProcessBatchQueue: turn this site's verified raw data into processed data on its batch system.

The daemon never runs the processor itself: a pass claims the processed datum (status
``processing``, the same conditional ``$push`` every copy uses, so two daemons never submit the same
run twice), submits one batch job per (run, version) and records the job id. The job runs
``cax-process`` (:mod:`cax.processing`), which runs the site's command and records the outcome.

Jobs die without a word (``scancel``, walltime, node failure, OOM killer), so a later pass asks the
backend about every datum still ``processing`` here and marks the ones whose job has ended
``error`` with the job's state and exit code. ``error`` datums produced here are retried (datum
pulled, attempt appended to the run's ``processing_retries`` list) up to ``max_retries``; after that
they stay ``error`` for a human to look at. The retry list, not a counter keyed by version, because
versions contain dots, which Mongo would read as nested field names; the list also keeps each failed
attempt's reason, which pulling the datum would otherwise lose.
"""
from __future__ import annotations

import logging
import os
import shlex
import string
from typing import Optional

from cax import job_credential, paths, python_m
from cax.batch import FINAL_STATES, BackendUnavailable, BatchError, Job, get_backend, safe_job_name
from cax.runsdb import as_utc, lifecycle, now
from cax.runsdb.identity import detector_of, label
from cax.runsdb.lifecycle import ErrorKind
from cax.tasks.base import Task
from cax.transfer.base import partial_path  # noqa: F401 (cax.processing uses it too)

JOB_PREFIX = "cax-proc-"
PLACEHOLDERS = ("name", "number", "input", "output", "version", "ncpus")
DEFAULT_SUBMIT_GRACE = 600.0
HEARTBEAT_SECONDS = 60.0  # cax-process by hand refreshes its datum this often


def check_template(command) -> None:
    """Refuse templates that could reach beyond the fixed values (attributes, indexes, unknown names).

    ``str.format`` allows ``{name.__class__}`` and ``{input[0]}``; the config is trusted, but a typo
    should fail at load time, not in a batch job at 3 a.m.
    """
    if not isinstance(command, list) or not command:
        raise ValueError("must be a non-empty list of arguments")
    for arg in command:
        try:
            parsed = list(string.Formatter().parse(arg))
        except ValueError as e:
            raise ValueError(f"argument {arg!r}: {e}")
        for _text, field, spec, conv in parsed:
            if field is None:
                continue
            if field not in PLACEHOLDERS:
                raise ValueError(f"argument {arg!r}: unknown placeholder {{{field}}} "
                                 f"(known: {', '.join('{' + p + '}' for p in PLACEHOLDERS)})")
            if spec or conv:
                raise ValueError(f"argument {arg!r}: format specs and conversions are not allowed")


def fill_command(command, values: dict) -> list:
    """One argument in, one argument out: run fields are substituted inside an argument and can
    never add, remove or split arguments (no shell ever sees them)."""
    check_template(command)
    fixed = {k: str(values[k]) for k in PLACEHOLDERS}
    return [arg.format_map(fixed) for arg in command]


def settings(site) -> dict:
    """The site's processing section with defaults filled in."""
    p = dict(site.processing or {})
    p.setdefault("backend", "local")
    p.setdefault("versions", [])
    p.setdefault("ncpus", 1)
    p.setdefault("max_retries", site.max_retries)
    p.setdefault("output_dir", site.data_dir("processed"))
    p.setdefault("env_setup", [])
    p.setdefault("submit_grace", DEFAULT_SUBMIT_GRACE)
    if not p.get("log_dir"):
        base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
        p["log_dir"] = os.path.join(base, "cax", "processing-logs", site.name)
    return p


def describe(site) -> str:
    """One line for ``cax config check``: the resolved processing settings, so an admin sees the
    defaults a job will really get (backend, resources, limits) before any job is submitted."""
    if not site.processing:
        return f"processing at {site.name}: none (no processing section)"
    p = settings(site)
    shown = ["backend", "versions", "ncpus", "mem_per_cpu", "walltime", "partition", "account",
             "qos", "reservation", "max_queued", "max_retries", "submit_grace", "output_dir", "log_dir"]
    parts = [f"{k}={','.join(p[k]) if isinstance(p[k], list) else p[k]}" for k in shown
             if p.get(k) is not None]
    if p.get("command"):
        parts.append("command=" + shlex.join(p["command"]).replace("\n", "\\n"))
    return f"processing at {site.name}: " + " ".join(parts)


def open_backend(p: dict):
    """The site's batch backend with only the options that backend understands."""
    if p["backend"] == "slurm":
        opts = {k: p[k] for k in ("script_dir", "extra_args") if p.get(k) is not None}
    else:
        opts = {k: p[k] for k in ("state_dir", "max_jobs") if p.get(k) is not None}
    return get_backend(p["backend"], **opts)


def output_path(site, p: dict, run_name: str, version: str) -> str:
    """``<output_dir>/<version>/<run name>``, or ``<output_dir>/pax_<version>/<run>.root`` where
    the site keeps the classic layout, with the same name checks as every data path."""
    return os.path.join(p["output_dir"], paths.version_dir(site, version),
                        paths.processed_name(site, run_name))




def log_path(p: dict, run_name: str, version: str) -> str:
    return os.path.join(p["log_dir"], f"{run_name}_{version}.log")


def log_tail(path: str, lines: int = 5, limit: int = 4096) -> str:
    """The last lines of a job log on one line, or "" when there is none: a job that died before
    cax-process could record anything (env_setup failed, OOM, walltime) said why only there."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    tail = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(tail)


def job_name(host: str, run_label, version: str) -> str:
    """``run_label``: :func:`cax.runsdb.identity.label` (the number, for a TPC run)."""
    return JOB_PREFIX + safe_job_name(host, run_label, version)


def processed_key(host: str, version: str) -> dict:
    return {"host": host, "type": "processed", "pax_version": version}


def find_datum(run: dict, key: dict) -> Optional[dict]:
    return lifecycle.DatumKey.of(key).find(run)[1]


def retries_of(run: dict, version: str) -> int:
    return sum(1 for r in run.get("processing_retries") or [] if r.get("pax_version") == version)


class ProcessBatchQueue(Task):
    """Submit processing jobs for this site's raw data; find dead jobs; retry failed ones."""

    projection = {"name": 1, "number": 1, "detector": 1, "data": 1, "tags": 1, "trigger": 1,
                  "processing_retries": 1}

    def __init__(self, ctx):
        super().__init__(ctx)
        self.p = settings(self.site) if self.site.processing else None
        self._backend = None
        self._queued = None  # {job name: job id} of the backend's cax-proc jobs, read once a pass
        self._submitted = 0
        self._backend_down = False

    # -- selection --------------------------------------------------------------------------
    def query(self):
        if not self.p or not self.p["versions"] or not self.p.get("command"):
            return None
        versions = self.p["versions"]
        missing = [{"$nor": [{"data": {"$elemMatch": processed_key(self.host, v)}}]} for v in versions]
        new_work = {
            "data": {"$elemMatch": {"host": self.host, "type": "raw", "status": "transferred"}},
            "tags.name": {"$ne": "donotprocess"},
            "$and": [
                {"$or": [{"trigger.events_built": {"$exists": False}},
                         {"trigger.events_built": {"$gt": 0}}]},
                missing[0] if len(missing) == 1 else {"$or": missing},
            ],
        }
        follow_up = {"data": {"$elemMatch": {"host": self.host, "type": "processed",
                                             "pax_version": {"$in": versions},
                                             "status": {"$in": ["processing", "error"]}}}}
        return {"$or": [new_work, follow_up]}

    # -- backend, read lazily: an idle pass costs no squeue ----------------------------------
    def backend(self):
        if self._backend is None:
            self._backend = open_backend(self.p)
        return self._backend

    def queued(self) -> dict:
        if self._queued is None:
            self._queued = {name: job_id for job_id, name in self.backend().queued(JOB_PREFIX)}
        return self._queued

    # -- per run ----------------------------------------------------------------------------
    def each_run(self, run):
        paths.check_name(run.get("name"))
        for version in self.p["versions"]:
            if self.ctx.stop.is_set() or self._backend_down:
                return
            try:
                self.one_version(run, version)
            except BackendUnavailable as e:
                # nothing is decided about any run while the batch system cannot be asked
                self._backend_down = True
                self.log(logging.WARNING, run, f"batch system unavailable, processing skipped "
                         f"this pass: {e}")

    def one_version(self, run, version):
        key = processed_key(self.host, version)
        datum = find_datum(run, key)
        if datum is not None and datum.get("status") == "processing":
            if not self.found_dead(run, key, datum):
                return
            run = self.db.run(run["_id"], self.projection) or run
            datum = find_datum(run, key)
        if datum is not None and datum.get("status") == "error":
            # a run tagged donotprocess since keeps its error: pulling it would hide what happened
            if not self.wants(run) or not self.retry(run, key, datum, version):
                return
            run = self.db.run(run["_id"], self.projection) or run
            datum = find_datum(run, key)
        if datum is None and self.wants(run):
            self.submit(run, key, version)

    def wants(self, run) -> bool:
        if any(t.get("name") == "donotprocess" for t in run.get("tags") or [] if isinstance(t, dict)):
            return False
        events = (run.get("trigger") or {}).get("events_built")
        if events is not None and not events > 0:
            return False
        return self.raw_datum(run) is not None

    def raw_datum(self, run):
        return next((d for d in run.get("data") or [] if d.get("host") == self.host
                     and d.get("type") == "raw" and d.get("status") == "transferred"), None)

    # -- dead jobs --------------------------------------------------------------------------
    def found_dead(self, run, key, datum) -> bool:
        """Mark ``error`` a datum whose job ended without cax-process recording a result.

        Returns True when the datum changed (the caller then re-reads the run)."""
        job_id, job_backend = datum.get("job_id"), datum.get("job_backend")
        if not job_id:
            started = datum.get("creation_time")
            if started is None or (now() - started).total_seconds() < self.p["submit_grace"]:
                return False  # the submitting daemon may still be recording the job id
            # it may have died after submitting: a job of this datum's name is its job
            name = job_name(self.host, label(run), key["pax_version"])
            if datum.get("job_backend") in (None, self.p["backend"]) and name in self.queued():
                adopted = self.queued()[name]
                if not self.dry_run:
                    self.db.apply(lifecycle.job_recorded(
                        run["_id"], key, {"job_id": adopted, "job_backend": self.p["backend"]},
                        expect={"job_id": None}))
                self.log(logging.INFO, run, f"adopted queued job {adopted} ({name}): its "
                         "submitter never recorded the job id", datum=key)
                return False
            reason = "no batch job was recorded for this datum (submitting daemon died?)"
        elif job_backend == "manual":
            beat = datum.get("heartbeat") or datum.get("creation_time")
            stale = max(self.p["submit_grace"], 3 * HEARTBEAT_SECONDS)
            if beat is None or (now() - beat).total_seconds() < stale:
                return False
            reason = (f"cax-process run by hand ({job_id}) stopped updating its heartbeat "
                      f"at {beat.isoformat(timespec='seconds')}")
        elif job_backend != self.p["backend"]:
            self.log(logging.DEBUG, run, f"job {job_id} belongs to backend {job_backend!r}; "
                     "left alone", datum=key)
            return False
        elif job_id in self.queued().values():
            return False  # alive: one squeue a pass answers for every queued job
        else:
            state = self.backend().status(job_id)
            if state not in FINAL_STATES:
                return False
            code = self.backend().exit_code(job_id)
            reason = (f"batch job {job_id} ended {state} (exit code "
                      f"{'unknown' if code is None else code}) without cax-process recording a result")
            tail = log_tail(log_path(self.p, run["name"], key["pax_version"]))
            if tail:  # the Runs DB keeps 500 characters of a reason: the end matters most
                reason += f"; log tail: {tail if len(tail) <= 300 else '...' + tail[-297:]}"
        if self.dry_run:
            self.log(logging.INFO, run, f"dry-run: would mark error: {reason}", datum=key)
            return False
        # a job that never started never read (and removed) its Runs DB password
        job_credential.discard(self.p["log_dir"], job_name(self.host, label(run),
                                                           key["pax_version"]))
        self.record_error(run, key, "processing", reason, kind=ErrorKind.PROCESSING)
        return True

    # -- retries ----------------------------------------------------------------------------
    def retry(self, run, key, datum, version) -> bool:
        """Pull a failed datum so it is submitted again, at most ``max_retries`` times, each after
        the site's ``retry_delay`` (doubled per counted retry), as copies wait.

        Only datums processed here are retried; a failed *copy* of processed data (it has a
        ``source``) belongs to the copy tasks. A submission the batch system refused or could not
        take (``error_kind`` ``submit``) never ran the processor: it is retried after the delay
        without using up a retry, so a mistyped partition or an sbatch outage fixed in the morning
        does not leave every run of the night ``error`` for good."""
        if datum.get("source"):
            return False
        submit_failed = datum.get("error_kind") == "submit"
        done = retries_of(run, version)
        if not submit_failed and done >= self.p["max_retries"]:
            self.log(logging.DEBUG, run, f"failed {done + 1} times, no retries left "
                     f"(max_retries {self.p['max_retries']}); stays error", datum=key)
            return False
        wait = self.site.retry_delay * 2 ** done
        failed_at = as_utc(datum.get("error_time"))
        if failed_at is not None:
            if (now() - failed_at).total_seconds() < wait:
                self.log(logging.DEBUG, run, f"retry waits {wait:.0f} s after the failure at "
                         f"{failed_at.isoformat(timespec='seconds')}", datum=key)
                return False
        if self.dry_run:
            self.log(logging.INFO, run, "dry-run: would submit again" if submit_failed
                     else f"dry-run: would retry (attempt {done + 2})", datum=key)
            return False
        if submit_failed:
            if not self.db.apply(lifecycle.resubmit(run["_id"], key)):
                return False
            self.log(logging.INFO, run, f"submitting again (not counted as a retry) after: "
                     f"{datum.get('error')}", datum=key)
            return True
        attempt = {"pax_version": version, "time": now(), "host": self.host,
                   "error": datum.get("error"), "job_id": datum.get("job_id")}
        # one update: the pull and its record happen together or not at all
        if not self.db.apply(lifecycle.retry_processing(run["_id"], key, attempt)):
            return False
        self.log(logging.INFO, run, f"retry {done + 1} of {self.p['max_retries']} after: "
                 f"{datum.get('error')}", datum=key)
        return True

    # -- submission -------------------------------------------------------------------------
    def submit(self, run, key, version):
        name = job_name(self.host, label(run), version)
        if name in self.queued():
            self.log(logging.DEBUG, run, f"job {name} already queued ({self.queued()[name]})",
                     datum=key)
            return
        limit = self.p.get("max_queued")
        if limit is not None and len(self.queued()) + self._submitted >= limit:
            self.log(logging.DEBUG, run, f"queue full ({limit} cax-proc jobs); waiting", datum=key)
            return
        raw = self.raw_datum(run)
        paths.check_location(self.site, raw.get("location"), "raw")
        location = output_path(self.site, self.p, run["name"], version)
        if self.dry_run:
            self.log(logging.INFO, run, f"dry-run: would submit {name} -> {location}", datum=key)
            return
        datum = dict(key, status="processing", location=location, checksum=None,
                     creation_time=now(), creation_place=self.host, job_backend=self.p["backend"])
        if not self.db.apply(lifecycle.claim_processing(run["_id"], datum)):
            self.log(logging.DEBUG, run, "already claimed by another daemon", datum=key)
            return
        try:
            os.makedirs(self.p["log_dir"], exist_ok=True)
            env = job_credential.for_job(self.ctx.config, self.p["log_dir"], name)
            job = Job(name=name, argv=self.job_argv(run, version), env=env,
                      env_setup=self.p["env_setup"],
                      ncpus=self.p["ncpus"], mem_per_cpu=self.p.get("mem_per_cpu"),
                      walltime=self.p.get("walltime"), partition=self.p.get("partition"),
                      account=self.p.get("account"), qos=self.p.get("qos"),
                      reservation=self.p.get("reservation"),
                      log_path=log_path(self.p, run["name"], version),
                      workdir=self.p["log_dir"])
            job_id = self.backend().submit(job)
        except BackendUnavailable as e:
            job_credential.discard(self.p["log_dir"], name)
            self.record_error(run, key, "processing", f"batch system unavailable: {e}",
                              kind=ErrorKind.SUBMIT)
            raise
        except (BatchError, OSError, ValueError, TypeError) as e:
            job_credential.discard(self.p["log_dir"], name)
            self.record_error(run, key, "processing", f"submit failed: {e}", kind=ErrorKind.SUBMIT)
            return
        self._submitted += 1
        # any status: a fast job may already have moved its datum on
        self.db.apply(lifecycle.job_recorded(run["_id"], key, {"job_id": job_id}, any_status=True))
        self.log(logging.INFO, run, f"submitted {self.p['backend']} job {job_id} ({name})",
                 datum=key)

    def job_argv(self, run, version) -> list:
        """The job runs cax-process for this run; run fields only ever appear as single arguments."""
        return [*python_m("cax.processing"), "--config", self.ctx.config.path,
                "--host", self.host, "--run", str(int(run["number"])),
                "--detector", detector_of(run), "--version", version]

