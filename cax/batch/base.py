"""The one interface every batch backend implements (DESIGN.md "Batch backends").

A task describes a job with :class:`Job` and hands it to a backend from :func:`cax.batch.get_backend`.
The backend writes the job script itself (:func:`render_script`): ``#!/bin/bash``,
``set -euo pipefail``, the job's own ``env`` as quoted ``export`` lines, the site's ``env_setup``
lines (under ``set +u``), then the command with every argument quoted by :func:`shlex.quote`.
Arguments come from run documents in a shared database and are treated as hostile: a run name such
as ``x; rm -rf ~`` or ``$(touch /tmp/pwned)`` reaches the command as one literal argument. No
backend ever uses ``shell=True``; every subprocess call takes an argument list.

Status strings (``BatchBackend.status``):

``PENDING``    submitted, not started yet
``RUNNING``    started, not finished
``COMPLETED``  finished with exit code 0
``FAILED``     finished with a non-zero exit code, or died without reporting one
``CANCELLED``  cancelled (``cancel`` or the batch system's operator)
``TIMEOUT``    killed for exceeding its walltime
``GONE``       the backend no longer knows the job (purged from Slurm, unknown id)
"""
from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

PENDING = "PENDING"
RUNNING = "RUNNING"
COMPLETED = "COMPLETED"
FAILED = "FAILED"
CANCELLED = "CANCELLED"
TIMEOUT = "TIMEOUT"
GONE = "GONE"

STATES = (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, GONE)
ACTIVE_STATES = frozenset({PENDING, RUNNING})
FINAL_STATES = frozenset({COMPLETED, FAILED, CANCELLED, TIMEOUT, GONE})

# Job names travel through squeue's whitespace-separated output and into file names: keep them to
# a conservative character set. Use ``safe_job_name`` to build one from untrusted parts.
_NAME_RE = re.compile(r"^[A-Za-z0-9_.:+=@,][A-Za-z0-9_.:+=@,-]{0,199}$")
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.:+=@,-]")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class BatchError(Exception):
    """Base of all batch errors; ``str(err)`` is a one-line reason fit for the Runs DB."""

    def __init__(self, message: str):
        super().__init__(one_line(message))


class BackendUnavailable(BatchError):
    """The batch system cannot be reached now (controller down, command missing, timeout)."""


class SubmitError(BatchError):
    """The batch system refused the job (bad partition, account, limits, ...)."""


def one_line(text: str, limit: int = 400) -> str:
    """Collapse a (possibly multi-line) message to one line of at most ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def safe_job_name(*parts: str) -> str:
    """A valid job name built from (possibly untrusted) parts: unsafe characters become ``_``."""
    name = _UNSAFE_NAME_CHARS.sub("_", "_".join(str(p) for p in parts))[:200]
    if not name or name.startswith("-"):
        name = "_" + name[:199]
    return name


RESOURCE_KEYS = ("mem_per_cpu", "walltime", "partition", "account", "qos", "reservation")
_SLURM_WORD = re.compile(r"^[A-Za-z0-9_.,+][A-Za-z0-9_.,+-]*$")
_MEM = re.compile(r"^[1-9][0-9]*[KMGTkmgt]?$")


def resource_problem(key: str, value) -> Optional[str]:
    """Why ``value`` is not a usable job resource ``key``, or None when it is (or is unset).

    Shared by :class:`Job` and the config loader: a bad walltime or partition found only at submit
    time turns every run into an ``error`` datum, so the config refuses it when it is loaded.
    """
    if value is None:
        return None
    if key == "walltime":
        try:
            seconds = walltime_seconds(value)
        except (ValueError, TypeError):
            seconds = None
        if seconds is None or seconds <= 0:
            return (f"invalid walltime {value!r} (minutes, or MM:SS, HH:MM:SS, D-HH, D-HH:MM, "
                    f"D-HH:MM:SS)")
        return None
    if key == "mem_per_cpu":
        if isinstance(value, bool) or not isinstance(value, (int, str)) or not _MEM.match(str(value)):
            return f"invalid mem_per_cpu {value!r} (megabytes, or a size such as \"2000M\", \"2G\")"
        return None
    if key in ("partition", "account", "qos", "reservation"):
        if not isinstance(value, str) or not _SLURM_WORD.match(value):
            return f"invalid {key} {value!r} (letters, digits and _.,+-; no spaces)"
        return None
    raise KeyError(key)


@dataclass
class Job:
    """One batch job.

    ``argv``: the command as an argument list (``argv[0]`` the program); never a shell string.
    ``env_setup``: trusted shell lines from the site config, run before the command.
    ``mem_per_cpu``: megabytes (int) or a Slurm size string (``"2G"``).
    ``walltime``: minutes (int) or a Slurm time string (``"1:00:00"``, ``"2-00:00:00"``).
    ``reservation``: a Slurm reservation to run in (the local backend has none and ignores it).
    ``log_path``: file receiving the job's stdout and stderr (truncated at start).
    ``workdir``: the job's working directory (default: the submitting process's).
    ``env``: variables the job needs from cax (exported by the script itself, so they reach the
    job whatever the batch system's export policy); never a secret: the script is stored by the
    batch system and readable by its operators. The job does not inherit the Runs DB password.
    """

    name: str
    argv: List[str]
    env_setup: List[str] = field(default_factory=list)
    ncpus: int = 1
    mem_per_cpu: Optional[Union[int, str]] = None
    walltime: Optional[Union[int, str]] = None
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    reservation: Optional[str] = None
    log_path: Optional[str] = None
    workdir: Optional[str] = None
    env: Dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ValueError(
                f"invalid job name {self.name!r}: use letters, digits and _.:+=@,- "
                "(cax.batch.safe_job_name builds one)"
            )
        if isinstance(self.argv, (str, bytes)) or not self.argv:
            raise ValueError("Job.argv must be a non-empty list of arguments, not a string")
        self.argv = [_arg(a) for a in self.argv]
        if isinstance(self.env_setup, str):
            self.env_setup = [self.env_setup]
        self.env_setup = [str(line) for line in self.env_setup]
        for k, v in self.env.items():
            if not isinstance(k, str) or not _ENV_NAME.match(k) or not isinstance(v, str) \
                    or "\0" in v:
                raise ValueError(f"Job.env: invalid variable {k!r}")
        if not isinstance(self.ncpus, int) or self.ncpus < 1:
            raise ValueError(f"Job.ncpus must be a positive int, not {self.ncpus!r}")
        for attr in RESOURCE_KEYS:
            problem = resource_problem(attr, getattr(self, attr))
            if problem:
                raise ValueError(f"Job.{attr}: {problem}")

    def walltime_seconds(self) -> Optional[int]:
        """The walltime in seconds, or None when unset."""
        return walltime_seconds(self.walltime)


def _arg(a) -> str:
    if isinstance(a, bytes):
        a = os.fsdecode(a)
    if isinstance(a, os.PathLike):
        a = os.fspath(a)
    if not isinstance(a, (str, int, float)):
        raise ValueError(f"Job.argv elements must be strings, not {type(a).__name__}")
    a = str(a)
    if "\0" in a:
        raise ValueError("Job.argv elements must not contain NUL")
    return a


def walltime_seconds(walltime) -> Optional[int]:
    """Minutes (int) or a Slurm time string (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``)."""
    if walltime is None:
        return None
    if isinstance(walltime, bool):
        raise ValueError(f"invalid walltime {walltime!r}")
    if isinstance(walltime, (int, float)):
        return int(walltime * 60)
    text = str(walltime).strip()
    m = re.match(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$", text)
    if not m:
        raise ValueError(f"invalid walltime {walltime!r}")
    days, a, b, c = m.groups()
    days = int(days or 0)
    if days:  # D-HH[:MM[:SS]]
        h, mi, s = int(a), int(b or 0), int(c or 0)
    elif c is not None:  # HH:MM:SS
        h, mi, s = int(a), int(b), int(c)
    elif b is not None:  # MM:SS
        h, mi, s = 0, int(a), int(b)
    else:  # MM
        h, mi, s = 0, int(a), 0
    return ((days * 24 + h) * 60 + mi) * 60 + s


def slurm_time(walltime) -> Optional[str]:
    """The walltime as Slurm's ``--time`` value."""
    if walltime is None:
        return None
    seconds = walltime_seconds(walltime)
    minutes = max(1, -(-seconds // 60))
    return str(minutes)


def render_script(job: Job) -> str:
    """The job script text: shebang, strict mode, the job's variables, env_setup lines, the quoted
    command."""
    lines = ["#!/bin/bash", "set -euo pipefail"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(job.env.items())]
    if job.env_setup:
        # site setup scripts (modules, conda, CVMFS) routinely read unset variables, e.g.
        # `export LD_LIBRARY_PATH=/x:$LD_LIBRARY_PATH`; under -u that kills the job before cax-process
        # could say anything. Failing commands still stop the job (-e).
        lines.append("set +u")
        lines += job.env_setup
        lines.append("set -u")
    lines.append("exec " + " ".join(shlex.quote(a) for a in job.argv))
    return "\n".join(lines) + "\n"


def write_script(job: Job, path: str) -> str:
    """Write the job script to a new file ``path`` (mode 0700, refusing to overwrite)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
    with os.fdopen(fd, "w") as f:
        f.write(render_script(job))
    return path


class BatchBackend:
    """Interface of batch backends. Job ids are strings; states are the module constants."""

    name = "base"

    def submit(self, job: Job) -> str:
        """Submit ``job``; return its id. Raises SubmitError or BackendUnavailable."""
        raise NotImplementedError

    def status(self, job_id: str) -> str:
        """One of STATES. Raises BackendUnavailable when the batch system cannot be asked."""
        raise NotImplementedError

    def exit_code(self, job_id: str) -> Optional[int]:
        """The job's exit code once it is known (finished and still remembered), else None."""
        raise NotImplementedError

    def cancel(self, job_id: str) -> None:
        """Cancel a pending or running job; a finished or unknown job is left alone."""
        raise NotImplementedError

    def queued(self, name_prefix: str = "") -> List[Tuple[str, str]]:
        """``[(job_id, name)]`` of this user's pending or running jobs whose name starts with the prefix."""
        raise NotImplementedError
