"""Handing the Runs DB password to a batch job without its environment or command line.

A processing job (``cax-process``) and a massive-cax job (``cax --once --run N``) record their
results in the Runs DB themselves, so they need its password when the URI names a user. The
environment is the wrong carrier: a job's environment is readable by anyone who can see the job
(``ps eww``, ``/proc/PID/environ``, ``scontrol show job`` with ``--export``), and the job's own
children (the processor) would inherit it. So :mod:`cax.children` keeps the password variable out
of every child, and the submitting daemon writes the password to a file only the user can read:

- ``<log_dir>/.credentials/<job name>.cred``, directory 0700, file 0600, written atomically; the
  job's working and log directory, so a node that can run the job can read it;
- the job gets the file's *path* in ``CAX_CREDENTIAL_FILE`` (exported by the job script: a path is
  no secret);
- the job reads it at start (:func:`adopt`), removes it at once, and puts the password in its own
  process's ``os.environ`` under the configured name -- set after start, so not in its
  ``/proc/PID/environ``, and not passed on (:mod:`cax.children`);
- a file whose job never started (cancelled while pending, refused submission) is removed by the
  daemon when it records the job's end (:func:`discard`).

A job Slurm requeues after it started finds no file: it cannot open the Runs DB, says so in its
log, and its datum ends ``error`` (then retried with a new job and a new file) -- nothing is lost.
"""
from __future__ import annotations

import logging
import os
import secrets
import stat
from typing import Optional
from urllib.parse import urlsplit

log = logging.getLogger("cax.job_credential")

ENV = "CAX_CREDENTIAL_FILE"
SUBDIR = ".credentials"


class CredentialError(Exception):
    """The credential file cannot be used; ``str()`` is one line for the job's log."""


def needs_password(runs_db: str) -> bool:
    """Whether opening ``runs_db`` takes the password variable (as cax.runsdb.connect does)."""
    if not runs_db.startswith(("mongodb://", "mongodb+srv://")):
        return False
    parts = urlsplit(runs_db)
    return parts.username is not None and parts.password is None


def path_for(log_dir: str, job_name: str) -> str:
    return os.path.join(log_dir, SUBDIR, job_name + ".cred")


def for_job(config, log_dir: str, job_name: str) -> dict:
    """The job's ``env`` entry naming a fresh credential file, or ``{}`` when the job needs no
    password (the Runs DB URI names no user, or carries its password) or this cax has none to pass
    on (the variable is unset)."""
    password = os.environ.get(config.password_env)
    if password is None or not needs_password(config.runs_db):
        return {}
    path = path_for(log_dir, job_name)
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise OSError(f"{directory} is not a directory of this user; refusing to write the "
                      f"Runs DB password there")
    os.chmod(directory, 0o700)
    tmp = f"{path}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(password)
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    return {ENV: path}


def discard(log_dir: str, job_name: str) -> None:
    """Remove the job's credential file if it is still there (the job never read it)."""
    _unlink(path_for(log_dir, job_name))


def adopt(password_env: str) -> Optional[str]:
    """In a job: take the password from the file ``CAX_CREDENTIAL_FILE`` names into this process's
    ``os.environ[password_env]`` and remove the file; returns the file's path, or None when this
    process was given none."""
    path = os.environ.pop(ENV, None)
    if not path:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise CredentialError(f"credential file {path} is gone (read by an earlier start of this "
                              f"job?); cannot open the Runs DB")
    except OSError as e:
        raise CredentialError(f"cannot read credential file {path}: {e.strerror or e}")
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise CredentialError(f"credential file {path} is not private to this user "
                                  f"(mode {stat.S_IMODE(st.st_mode):o}); refusing it")
        with os.fdopen(fd, "r") as f:
            fd = None
            os.environ[password_env] = f.read()
    finally:
        if fd is not None:
            os.close(fd)
        _unlink(path)
    return path


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("could not remove credential file %s: %s", path, e.strerror or e)
