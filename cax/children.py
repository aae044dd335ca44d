"""What the processes cax starts inherit, and how cax tells its own processes from strangers.

Environment: a child inherits the whole environment unless told otherwise, and anyone on the host
may read a process's environment in ``ps eww`` (same user) or ``/proc/PID/environ``, for as long as
it runs. cax needs the Runs DB password (the variable named by the config's ``password_env``,
``MONGO_PASSWORD`` by default); its children (ssh, rsync, batch jobs, processors) never do, so every
subprocess cax starts gets :func:`environment`, which leaves those variables out. A batch job that
itself opens the Runs DB gets the password another way (:mod:`cax.job_credential`).

Identity: a pid alone names a process only while it lives; pids are reused. cax records a pid
together with the process's start time (``/proc/PID/stat`` field 22), so "the owner is dead" is
proven, not guessed, before anything of another cax process is removed.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional, Tuple

#: variables no child of cax ever gets; the config's ``password_env`` is added when a config loads
HIDDEN = {"MONGO_PASSWORD"}


def hide(name: str) -> None:
    """Keep the variable ``name`` (a secret) out of every child's environment from now on."""
    HIDDEN.add(name)


def environment(extra: Optional[Mapping[str, str]] = None, base=None) -> dict:
    """The environment for a child: ``base`` (default ``os.environ``) without the secret
    variables, plus ``extra``."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in HIDDEN}
    env.update(extra or {})
    return env


Ident = Tuple[int, str]


def start_time(pid: int) -> Optional[str]:
    """The process's start time (clock ticks since boot), or None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (OSError, ValueError):
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]  # field 22 of stat(5); fields[0] is field 3


def ident(pid: Optional[int] = None) -> Optional[Ident]:
    """``(pid, start time)`` of a process (default: this one), or None if it is gone."""
    pid = os.getpid() if pid is None else pid
    start = start_time(pid)
    return None if start is None else (pid, start)


def alive(who: Optional[Ident]) -> bool:
    """True while the process ``who`` names runs (a reused pid has another start time)."""
    return who is not None and start_time(who[0]) == who[1]
