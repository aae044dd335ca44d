"""Slurm backend: sbatch / squeue / scontrol / scancel through subprocess with argument lists.

The client commands find the cluster the usual way (``SLURM_CONF`` in the environment, else the
system's configuration); ``slurm_conf=`` overrides it for this backend only.

State: ``squeue -h -j ID -o %T`` while Slurm remembers the job (pending, running, and finished jobs
for ``MinJobAge`` seconds), the exit code from ``scontrol show job ID`` (``ExitCode=N:M``). A job Slurm
no longer knows is looked up with ``sacct`` when accounting is available, else it is ``GONE``.
"""
from __future__ import annotations

import getpass
import os
import re
import subprocess
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

from cax import children
from cax.batch.base import (
    CANCELLED,
    COMPLETED,
    FAILED,
    GONE,
    PENDING,
    RUNNING,
    TIMEOUT,
    BackendUnavailable,
    BatchBackend,
    BatchError,
    Job,
    SubmitError,
    one_line,
    slurm_time,
    write_script,
)

# Slurm job states (squeue %T / scontrol JobState) to cax states
STATE_MAP: Dict[str, str] = {
    "PENDING": PENDING,
    "REQUEUED": PENDING,
    "REQUEUE_HOLD": PENDING,
    "REQUEUE_FED": PENDING,
    "RESV_DEL_HOLD": PENDING,
    "SPECIAL_EXIT": PENDING,
    "CONFIGURING": RUNNING,
    "RUNNING": RUNNING,
    "COMPLETING": RUNNING,
    "SUSPENDED": RUNNING,
    "STOPPED": RUNNING,
    "SIGNALING": RUNNING,
    "STAGE_OUT": RUNNING,
    "RESIZING": RUNNING,
    "COMPLETED": COMPLETED,
    "CANCELLED": CANCELLED,
    "TIMEOUT": TIMEOUT,
    "DEADLINE": TIMEOUT,
    "FAILED": FAILED,
    "NODE_FAIL": FAILED,
    "BOOT_FAIL": FAILED,
    "OUT_OF_MEMORY": FAILED,
    "PREEMPTED": FAILED,
    "REVOKED": CANCELLED,
}
QUEUED_STATES = "PENDING,RUNNING,CONFIGURING,COMPLETING,SUSPENDED,REQUEUED"

_JOB_ID_RE = re.compile(r"^\d+(_\d+)?$")
_UNREACHABLE = (
    "unable to contact slurm controller",
    "socket timed out",
    "connection refused",
    "could not establish a configuration source",
    "zero bytes were transmitted",
    "communication connection failure",
    "slurm_persist_conn",
    "munge",
    "authentication",
    "unable to establish",
    "slurmctld not responding",
)
_UNKNOWN_JOB = ("invalid job id", "unknown job", "job not found")


class SlurmBackend(BatchBackend):
    """Jobs on a Slurm cluster.

    Options: ``script_dir`` keeps the submitted job scripts there (default: a temporary file,
    removed once sbatch has read it: Slurm stores its own copy); ``slurm_conf`` overrides
    ``SLURM_CONF``; ``user`` whose jobs ``queued`` lists (default: the current user, ``"*"`` for
    everyone); ``extra_args``: further sbatch options (trusted, from the site config);
    ``timeout``: seconds allowed to each Slurm command; ``use_sacct``: ask accounting (``sacct``)
    about jobs slurmctld has forgotten (after ``MinJobAge``) before calling them ``GONE``.
    """

    name = "slurm"

    def __init__(self, script_dir: Optional[str] = None, slurm_conf: Optional[str] = None,
                 user: Optional[str] = None, extra_args: Sequence[str] = (), timeout: float = 60,
                 use_sacct: bool = True):
        self.script_dir = script_dir
        self.slurm_conf = slurm_conf
        self.user = user or getpass.getuser()
        self.extra_args = [str(a) for a in extra_args]
        self.timeout = timeout
        self.use_sacct = use_sacct

    # -- plumbing -------------------------------------------------------------------------------
    def _env(self):
        # os.environ as it is now (SLURM_CONF included) without the Runs DB password: sbatch
        # exports its own environment to the job by default (--export=ALL)
        return children.environment(None if self.slurm_conf is None
                                    else {"SLURM_CONF": self.slurm_conf})

    def _run(self, argv: List[str]) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(argv, env=self._env(), capture_output=True, text=True,
                                  timeout=self.timeout, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise BackendUnavailable(f"{argv[0]} not found: is Slurm installed on this host?")
        except subprocess.TimeoutExpired:
            raise BackendUnavailable(f"{argv[0]} did not answer within {self.timeout:.0f} s")
        except OSError as e:
            raise BackendUnavailable(f"cannot run {argv[0]}: {e}")

    @staticmethod
    def _message(proc: subprocess.CompletedProcess) -> str:
        text = (proc.stderr or "").strip() or (proc.stdout or "").strip() or "no output"
        return one_line(text)

    def _unreachable(self, proc: subprocess.CompletedProcess) -> bool:
        text = ((proc.stderr or "") + (proc.stdout or "")).lower()
        return any(s in text for s in _UNREACHABLE)

    @staticmethod
    def _unknown_job(proc: subprocess.CompletedProcess) -> bool:
        text = ((proc.stderr or "") + (proc.stdout or "")).lower()
        return any(s in text for s in _UNKNOWN_JOB)

    # -- interface ------------------------------------------------------------------------------
    def sbatch_argv(self, job: Job, script: str) -> List[str]:
        argv = ["sbatch", "--parsable", f"--job-name={job.name}"]
        if job.log_path:
            argv.append(f"--output={os.path.abspath(job.log_path)}")
        argv.append(f"--cpus-per-task={job.ncpus}")
        if job.mem_per_cpu is not None:
            argv.append(f"--mem-per-cpu={job.mem_per_cpu}")
        if job.walltime is not None:
            argv.append(f"--time={slurm_time(job.walltime)}")
        for opt in ("partition", "account", "qos", "reservation"):
            value = getattr(job, opt)
            if value:
                argv.append(f"--{opt}={value}")
        if job.workdir:
            argv.append(f"--chdir={os.path.abspath(job.workdir)}")
        argv += self.extra_args
        argv.append(script)
        return argv

    def submit(self, job: Job) -> str:
        if self.script_dir:
            os.makedirs(self.script_dir, exist_ok=True)
            fd, script = tempfile.mkstemp(prefix=f"{job.name}.", suffix=".sh", dir=self.script_dir)
            keep = True
        else:
            fd, script = tempfile.mkstemp(prefix=f"cax-{job.name}.", suffix=".sh")
            keep = False
        os.close(fd)
        os.unlink(script)
        try:
            write_script(job, script)
            proc = self._run(self.sbatch_argv(job, script))
        finally:
            if not keep:
                try:
                    os.unlink(script)
                except FileNotFoundError:
                    pass
        if proc.returncode != 0:
            cls = BackendUnavailable if self._unreachable(proc) else SubmitError
            raise cls(f"sbatch failed (exit {proc.returncode}): {self._message(proc)}")
        first = (proc.stdout or "").strip().splitlines()
        job_id = first[0].split(";")[0].strip() if first else ""
        if not _JOB_ID_RE.match(job_id):
            raise SubmitError(f"sbatch printed no job id: {self._message(proc)}")
        return job_id

    def _slurm_state(self, job_id: str) -> Optional[str]:
        """Slurm's state word for the job, or None when Slurm does not know it."""
        proc = self._run(["squeue", "-h", "-j", job_id, "-o", "%T"])
        if proc.returncode == 0:
            words = proc.stdout.split()
            if words:
                return words[0].upper()
        elif not self._unknown_job(proc):
            raise BackendUnavailable(f"squeue failed (exit {proc.returncode}): {self._message(proc)}")
        info = self._show_job(job_id)
        if info:
            return info.get("JobState", "").upper() or None
        acct = self._sacct(job_id)
        return acct[0] if acct else None

    def _sacct(self, job_id: str) -> Optional[Tuple[str, str]]:
        """``(state, exit code "N:M")`` from accounting, for jobs slurmctld has forgotten; None when
        there is no accounting (sacct missing or disabled) or it does not know the job either."""
        if not self.use_sacct:
            return None
        try:
            proc = self._run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobID,State,ExitCode"])
        except BackendUnavailable:
            return None
        if proc.returncode != 0:
            return None
        for line in proc.stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 3 and parts[0] == job_id and parts[1]:
                return parts[1].split()[0].upper(), parts[2]
        return None

    def _show_job(self, job_id: str) -> Dict[str, str]:
        proc = self._run(["scontrol", "-o", "show", "job", job_id])
        if proc.returncode != 0:
            if self._unknown_job(proc):
                return {}
            raise BackendUnavailable(f"scontrol failed (exit {proc.returncode}): {self._message(proc)}")
        info = {}
        for m in re.finditer(r"(?:^|\s)([A-Za-z/:]+)=(\S*)", proc.stdout.split("\n")[0]):
            info.setdefault(m.group(1), m.group(2))
        return info

    def status(self, job_id: str) -> str:
        job_id = str(job_id)
        if not _JOB_ID_RE.match(job_id):
            return GONE
        state = self._slurm_state(job_id)
        if state is None:
            return GONE
        state = state.split()[0].rstrip("+")
        return STATE_MAP.get(state, FAILED if state else GONE)

    def exit_code(self, job_id: str) -> Optional[int]:
        job_id = str(job_id)
        if not _JOB_ID_RE.match(job_id):
            return None
        info = self._show_job(job_id)
        if not info:
            acct = self._sacct(job_id)
            if acct:
                info = {"JobState": acct[0], "ExitCode": acct[1]}
        state = STATE_MAP.get(info.get("JobState", "").upper().rstrip("+"))
        if state not in (COMPLETED, FAILED, CANCELLED, TIMEOUT):
            return None
        m = re.match(r"^(\d+):(\d+)$", info.get("ExitCode", ""))
        if not m:
            return None
        code, sig = int(m.group(1)), int(m.group(2))
        return code if code or not sig else 128 + sig

    def cancel(self, job_id: str) -> None:
        job_id = str(job_id)
        if not _JOB_ID_RE.match(job_id):
            return
        proc = self._run(["scancel", job_id])
        if proc.returncode != 0 and not self._unknown_job(proc) and "already completing" not in proc.stderr.lower():
            raise BackendUnavailable(f"scancel failed (exit {proc.returncode}): {self._message(proc)}")

    def queued(self, name_prefix: str = "") -> List[Tuple[str, str]]:
        argv = ["squeue", "-h", "-o", "%i %j", "-t", QUEUED_STATES]
        if self.user != "*":
            argv += ["-u", self.user]
        proc = self._run(argv)
        if proc.returncode != 0:
            raise BackendUnavailable(f"squeue failed (exit {proc.returncode}): {self._message(proc)}")
        jobs = []
        for line in proc.stdout.splitlines():
            parts = line.strip().split(None, 1)
            if len(parts) == 2 and parts[1].startswith(name_prefix):
                jobs.append((parts[0], parts[1]))
        return jobs


__all__ = ["SlurmBackend", "BatchError", "STATE_MAP"]
