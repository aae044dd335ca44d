"""Local backend: jobs run as detached processes on this host (small sites, the demo).

State lives on disk so that a later process (the next ``cax --once`` from cron) sees the jobs an
earlier one submitted: ``<state_dir>/jobs/<job_id>/`` holds

``meta.json``    name, submission time, log path, working directory, walltime
``job.sh``       the job script (cax.batch.base.render_script)
``wrapper.pid``  ``pid starttime`` of the wrapper process (written before ``submit`` returns)
``started``      ``pid starttime`` of the job's process once it got a slot
``exit.json``    ``{"code": N, "cancelled": bool, "timeout": bool}``, written by the wrapper at the end
``cancelled``    marker written by ``cancel``

The wrapper is a small Python process in its own session (``setsid``), not a child of the daemon;
it waits for one of ``max_jobs`` slots (``flock`` on ``<state_dir>/slots/N.lock``; the kernel drops
the lock when the holder dies, so a crash never leaks a slot), runs ``bash job.sh`` in its own
process group with output to ``log_path``, enforces the walltime, and writes ``exit.json``. Jobs
beyond ``max_jobs`` wait as ``PENDING`` (no FIFO guarantee among them). ``cancel`` signals the
wrapper, which terminates the job's process group (SIGTERM, then SIGKILL after ``kill_grace`` s).

A wrapper that vanished without writing ``exit.json`` (killed, host rebooted) makes the job
``FAILED`` (``CANCELLED`` if it had been cancelled); an unknown job id is ``GONE``. Processes are
identified by pid *and* start time, so a reused pid is not taken for the job.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

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
    Job,
    SubmitError,
    one_line,
    write_script,
)

_JOB_ID_RE = re.compile(r"^local-\d{20}-[0-9a-f]{8}$")
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_BOOT = "import sys; sys.path.insert(0, sys.argv[1]); from cax.batch.local import _main; _main(sys.argv[2:])"
SLOT_POLL = 0.2


def default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "cax", "batch-local")


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_ident(path: str) -> Optional[Tuple[int, str]]:
    text = _read(path)
    try:
        pid, start = text.split()
        return int(pid), start
    except (AttributeError, ValueError):
        return None


class LocalBackend(BatchBackend):
    """Jobs as detached processes on this host; see the module docstring.

    Options: ``state_dir`` (default ``$XDG_STATE_HOME/cax/batch-local``), ``max_jobs`` running at
    once (default: the number of CPUs), ``kill_grace`` seconds between SIGTERM and SIGKILL.
    """

    name = "local"

    def __init__(self, state_dir: Optional[str] = None, max_jobs: Optional[int] = None,
                 kill_grace: float = 10.0, launch_timeout: float = 30.0):
        self.state_dir = os.path.abspath(state_dir or default_state_dir())
        self.max_jobs = int(max_jobs or os.cpu_count() or 1)
        if self.max_jobs < 1:
            raise ValueError("max_jobs must be at least 1")
        self.kill_grace = float(kill_grace)
        self.launch_timeout = launch_timeout
        self.jobs_dir = os.path.join(self.state_dir, "jobs")
        self.slots_dir = os.path.join(self.state_dir, "slots")

    # -- helpers --------------------------------------------------------------------------------
    def _job_dir(self, job_id: str) -> Optional[str]:
        job_id = str(job_id)
        if not _JOB_ID_RE.match(job_id):
            return None
        return os.path.join(self.jobs_dir, job_id)

    def _exit_info(self, d: str) -> Optional[dict]:
        text = _read(os.path.join(d, "exit.json"))
        if text is None:
            return None
        try:
            return json.loads(text)
        except ValueError:
            return {"code": None, "cancelled": False, "timeout": False}

    # -- interface ------------------------------------------------------------------------------
    def submit(self, job: Job) -> str:
        try:
            os.makedirs(self.jobs_dir, exist_ok=True)
            os.makedirs(self.slots_dir, exist_ok=True)
            now = time.time()
            stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(now)) + f"{int(now % 1 * 1e6):06d}"
            job_id = f"local-{stamp}-{secrets.token_hex(4)}"
            d = os.path.join(self.jobs_dir, job_id)
            os.mkdir(d, 0o700)
            write_script(job, os.path.join(d, "job.sh"))
            meta = {
                "name": job.name,
                "argv": job.argv,
                "submitted": time.time(),
                "log_path": os.path.abspath(job.log_path) if job.log_path else os.path.join(d, "output.log"),
                "workdir": os.path.abspath(job.workdir) if job.workdir else os.getcwd(),
                "walltime_seconds": job.walltime_seconds(),
                "max_jobs": self.max_jobs,
                "kill_grace": self.kill_grace,
                "slots_dir": self.slots_dir,
            }
            _write_atomic(os.path.join(d, "meta.json"), json.dumps(meta))
        except OSError as e:
            raise BackendUnavailable(f"local batch state directory {self.state_dir}: {e}")
        try:
            # the wrapper and the job inherit this environment: never the Runs DB password
            proc = subprocess.run([sys.executable, "-c", _BOOT, _PACKAGE_ROOT, "launch", d],
                                  env=children.environment(), stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True,
                                  timeout=self.launch_timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SubmitError(f"cannot launch local job: {e}")
        if proc.returncode != 0 or _read_ident(os.path.join(d, "wrapper.pid")) is None:
            raise SubmitError(f"local job launcher failed (exit {proc.returncode}): "
                              f"{one_line(proc.stderr or proc.stdout or 'no output')}")
        return job_id

    def status(self, job_id: str) -> str:
        d = self._job_dir(job_id)
        if d is None or not os.path.isdir(d):
            return GONE
        for _ in range(2):
            info = self._exit_info(d)
            if info is not None:
                if info.get("cancelled"):
                    return CANCELLED
                if info.get("timeout"):
                    return TIMEOUT
                return COMPLETED if info.get("code") == 0 else FAILED
            if children.alive(_read_ident(os.path.join(d, "wrapper.pid"))):
                return RUNNING if os.path.exists(os.path.join(d, "started")) else PENDING
            # the wrapper is gone: look once more for exit.json (it may have finished just now)
        return CANCELLED if os.path.exists(os.path.join(d, "cancelled")) else FAILED

    def exit_code(self, job_id: str) -> Optional[int]:
        d = self._job_dir(job_id)
        if d is None:
            return None
        info = self._exit_info(d)
        return info.get("code") if info else None

    def cancel(self, job_id: str) -> None:
        d = self._job_dir(job_id)
        if d is None or not os.path.isdir(d) or self._exit_info(d) is not None:
            return
        _write_atomic(os.path.join(d, "cancelled"), str(time.time()))
        ident = _read_ident(os.path.join(d, "wrapper.pid"))
        if children.alive(ident):
            try:
                os.kill(ident[0], signal.SIGTERM)
            except ProcessLookupError:
                pass

    def queued(self, name_prefix: str = "") -> List[Tuple[str, str]]:
        try:
            ids = sorted(os.listdir(self.jobs_dir))
        except FileNotFoundError:
            return []
        jobs = []
        for job_id in ids:
            if not _JOB_ID_RE.match(job_id):
                continue
            try:
                name = json.loads(_read(os.path.join(self.jobs_dir, job_id, "meta.json")) or "{}").get("name")
            except ValueError:
                continue
            if name and name.startswith(name_prefix) and self.status(job_id) in (PENDING, RUNNING):
                jobs.append((job_id, name))
        return jobs

    def purge(self, older_than: float = 7 * 86400) -> List[str]:
        """Remove the state of finished jobs submitted more than ``older_than`` seconds ago."""
        removed = []
        now = time.time()
        for job_id in os.listdir(self.jobs_dir) if os.path.isdir(self.jobs_dir) else []:
            if not _JOB_ID_RE.match(job_id):
                continue
            d = os.path.join(self.jobs_dir, job_id)
            try:
                submitted = json.loads(_read(os.path.join(d, "meta.json")) or "{}").get("submitted", 0)
            except ValueError:
                submitted = 0
            if now - submitted > older_than and self.status(job_id) not in (PENDING, RUNNING):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(job_id)
        return removed


# -- the wrapper (runs in its own process: python -c _BOOT ROOT launch JOBDIR) -------------------
class _Cancel(Exception):
    pass


def _main(argv: List[str]) -> None:
    if len(argv) != 2 or argv[0] != "launch":
        sys.exit("usage: launch JOBDIR")
    d = argv[1]
    pid = os.fork()
    if pid:
        # launcher: record the wrapper's identity, then leave (the wrapper is re-parented)
        start = children.start_time(pid)  # /proc/PID exists as soon as fork returns
        if start is None:
            os.waitpid(pid, 0)
            if _read(os.path.join(d, "exit.json")) is None:
                sys.exit("wrapper died at once")
            start = "0"  # finished already; exit.json tells the rest
        _write_atomic(os.path.join(d, "wrapper.pid"), f"{pid} {start}\n")
        os._exit(0)
    os.setsid()
    code = 1
    try:
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        log = os.open(os.path.join(d, "wrapper.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(devnull)
        os.close(log)
        _wrap(d)
        code = 0
    except BaseException as e:  # noqa: BLE001 -- the wrapper must always record an end
        print(f"cax local wrapper: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        if _read(os.path.join(d, "exit.json")) is None:
            try:
                cancelled = os.path.exists(os.path.join(d, "cancelled"))
                _write_atomic(os.path.join(d, "exit.json"),
                              json.dumps({"code": 143 if cancelled else 1, "cancelled": cancelled,
                                          "timeout": False, "error": one_line(str(e))}))
            except OSError:
                pass
    finally:
        os._exit(code)


def _wrap(d: str) -> None:
    meta = json.loads(_read(os.path.join(d, "meta.json")))
    state = {"interruptible": False, "cancel": False}

    def on_signal(signum, frame):
        state["cancel"] = True
        if state["interruptible"]:
            raise _Cancel()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)

    result = {"code": None, "cancelled": False, "timeout": False}
    slot_fd = None
    try:
        state["interruptible"] = True
        slot_fd = _acquire_slot(meta["slots_dir"], int(meta["max_jobs"]))
        state["interruptible"] = False
        if state["cancel"] or os.path.exists(os.path.join(d, "cancelled")):
            raise _Cancel()
        with open(meta["log_path"], "wb") as log:
            env = children.environment({"CAX_JOB_ID": os.path.basename(d),
                                        "CAX_JOB_NAME": meta["name"]})
            child = subprocess.Popen(["/bin/bash", os.path.join(d, "job.sh")], cwd=meta["workdir"],
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     env=env, process_group=0)
        _write_atomic(os.path.join(d, "started"), f"{child.pid} {children.start_time(child.pid)}\n")
        try:
            state["interruptible"] = True
            if state["cancel"]:
                raise _Cancel()
            try:
                child.wait(timeout=meta.get("walltime_seconds"))
            except subprocess.TimeoutExpired:
                state["interruptible"] = False
                result["timeout"] = True
                _terminate(child, float(meta["kill_grace"]))
        except _Cancel:
            state["interruptible"] = False
            result["cancelled"] = True
            _terminate(child, float(meta["kill_grace"]))
        state["interruptible"] = False
        rc = child.returncode
        result["code"] = rc if rc >= 0 else 128 - rc
    except _Cancel:
        state["interruptible"] = False
        result.update(code=143, cancelled=True)
    _write_atomic(os.path.join(d, "exit.json"), json.dumps(result))
    if slot_fd is not None:
        os.close(slot_fd)


def _acquire_slot(slots_dir: str, max_jobs: int) -> int:
    os.makedirs(slots_dir, exist_ok=True)
    while True:
        for i in range(max_jobs):
            fd = os.open(os.path.join(slots_dir, f"{i}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                os.close(fd)
        time.sleep(SLOT_POLL)


def _terminate(child: subprocess.Popen, grace: float) -> None:
    """SIGTERM the job's process group, SIGKILL it after ``grace`` seconds, reap the job."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            pass
        try:
            child.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
