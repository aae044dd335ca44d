"""pytest plugin: a private single-node Slurm for the session (RECIPES.md "A private single-node Slurm").

Register it in tests/conftest.py with ``pytest_plugins = ["tests.slurm"]``; tests then ask for the
session fixture ``slurm`` (a :class:`SlurmCluster`). While the fixture is up, ``SLURM_CONF`` in
``os.environ`` points at its slurm.conf, so sbatch/squeue/... and cax's Slurm backend talk to it.

Everything is private: its own munged (own key, own socket), free TCP ports, state/spool/log
directories in a temporary directory, pid files there. A system munge or Slurm is left alone.
When a binary is missing or a daemon does not come up, ``missing_component`` skips loudly
(fails under CI=true) with the tail of the daemon logs in the reason.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import pytest

from tests.conftest import missing_component
from tests.waiting import free_port, wait_for

SLURM_BINARIES = ["slurmctld", "slurmd", "sinfo", "sbatch", "squeue", "scontrol", "scancel"]
MUNGE_BINARIES = ["munged", "munge", "unmunge"]
START_TIMEOUT = 30.0


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # state is the first field after the ")" closing the command name
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _tail(path: str, lines: int = 8) -> str:
    try:
        with open(path, errors="replace") as f:
            return " | ".join(f.read().splitlines()[-lines:])
    except OSError as e:
        return f"(no {os.path.basename(path)}: {e.strerror})"


def _read_pid(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            text = f.read().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


@dataclass
class SlurmCluster:
    """What the ``slurm`` fixture yields."""

    tmpdir: str
    conf: str
    hostname: str
    partition: str
    env: Dict[str, str]
    jobcomp_log: str
    logs: Dict[str, str]
    pids: Dict[str, int] = field(default_factory=dict)
    start_seconds: float = 0.0

    def run(self, *argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster."""
        return subprocess.run(list(argv), env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=check)

    def log_tails(self) -> str:
        return "; ".join(f"{name}: {_tail(path)}" for name, path in self.logs.items())

    def job_ids(self, states: str = "all") -> List[str]:
        out = self.run("squeue", "-h", "-t", states, "-o", "%i", check=False)
        return out.stdout.split() if out.returncode == 0 else []


def _write_conf(c: SlurmCluster, ctld_port: int, d_port: int, munge_socket: str) -> None:
    t = c.tmpdir
    ncpus = os.cpu_count() or 1
    h = c.hostname
    text = f"""\
ClusterName=caxtest
SlurmctldHost={h}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
StateSaveLocation={t}/state
SlurmdSpoolDir={t}/spool
SlurmctldPidFile={t}/slurmctld.pid
SlurmdPidFile={t}/slurmd.pid
SlurmctldLogFile={t}/ctld.log
SlurmdLogFile={t}/d.log
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={c.jobcomp_log}
MinJobAge=300
NodeName={h} NodeAddr=127.0.0.1 CPUs={ncpus} RealMemory=2000 State=UNKNOWN
PartitionName={c.partition} Nodes={h} Default=YES MaxTime=INFINITE State=UP
"""
    with open(c.conf, "w") as f:
        f.write(text)


def _start(c: SlurmCluster) -> None:
    t = c.tmpdir
    for d in ("state", "spool"):
        os.makedirs(os.path.join(t, d), mode=0o700, exist_ok=True)
    munge_dir = os.path.join(t, "munge")
    os.makedirs(munge_dir, exist_ok=True)
    os.chmod(munge_dir, 0o755)  # munged wants its socket directory searchable by all
    key = os.path.join(munge_dir, "munge.key")
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(1024))
    munge_socket = os.path.join(munge_dir, "munge.sock")
    munge_pidfile = os.path.join(munge_dir, "munged.pid")
    c.logs["munged"] = os.path.join(munge_dir, "munged.log")

    subprocess.run(
        ["munged", f"--key-file={key}", f"--socket={munge_socket}", f"--pid-file={munge_pidfile}",
         f"--log-file={c.logs['munged']}", f"--seed-file={os.path.join(munge_dir, 'munged.seed')}", "-f"],
        env=c.env, capture_output=True, text=True, timeout=30, check=True)
    c.pids["munged"] = wait_for(lambda: _read_pid(munge_pidfile), START_TIMEOUT, "munged's pid file")
    # munge round trip through the private socket
    cred = subprocess.run(["munge", "-n", f"--socket={munge_socket}"], capture_output=True,
                          timeout=30, check=True).stdout
    un = subprocess.run(["unmunge", f"--socket={munge_socket}"], input=cred, capture_output=True,
                        timeout=30)
    if b"Success" not in un.stdout:
        raise RuntimeError(f"private munge round trip failed: {un.stdout!r} {un.stderr!r}")

    ctld_port, d_port = free_port(), free_port()
    while d_port == ctld_port:
        d_port = free_port()
    _write_conf(c, ctld_port, d_port, munge_socket)

    subprocess.run(["slurmctld", "-f", c.conf], env=c.env, capture_output=True, text=True,
                   timeout=60, check=True)
    c.pids["slurmctld"] = wait_for(lambda: _read_pid(os.path.join(t, "slurmctld.pid")),
                                   START_TIMEOUT, "slurmctld's pid file")
    subprocess.run(["slurmd", "-f", c.conf], env=c.env, capture_output=True, text=True,
                   timeout=60, check=True)
    c.pids["slurmd"] = wait_for(lambda: _read_pid(os.path.join(t, "slurmd.pid")),
                                START_TIMEOUT, "slurmd's pid file")

    def idle():
        for name, pid in c.pids.items():
            if not pid_alive(pid):
                raise RuntimeError(f"{name} (pid {pid}) died during start")
        out = c.run("sinfo", "-h", "-n", c.hostname, "-o", "%t", check=False, timeout=10)
        return out.returncode == 0 and out.stdout.strip() == "idle"

    wait_for(idle, START_TIMEOUT, f"sinfo to show node {c.hostname} idle")


def _stop(c: SlurmCluster) -> List[str]:
    """Cancel the cluster's jobs, stop its daemons by pid and wait until they are gone."""
    problems = []
    if c.pids.get("slurmctld") and pid_alive(c.pids["slurmctld"]):
        try:
            ids = c.job_ids("pending,running,suspended,completing,configuring")
            if ids:
                c.run("scancel", *ids, check=False)
                wait_for(lambda: not c.job_ids("pending,running,suspended,completing,configuring"),
                         30, "the fixture's jobs to end")
        except (subprocess.SubprocessError, TimeoutError, OSError) as e:
            problems.append(f"cancelling jobs: {e}")
    for name in ("slurmd", "slurmctld", "munged"):
        pid = c.pids.get(name)
        if not pid or not pid_alive(pid):
            continue
        try:
            os.kill(pid, signal.SIGTERM)
            try:
                wait_for(lambda: not pid_alive(pid), 20, f"{name} (pid {pid}) to stop")
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                wait_for(lambda: not pid_alive(pid), 10, f"{name} (pid {pid}) to die")
                problems.append(f"{name} needed SIGKILL")
        except ProcessLookupError:
            pass
        except TimeoutError as e:
            problems.append(str(e))
    return problems


@pytest.fixture(scope="session")
def slurm():
    missing = [b for b in SLURM_BINARIES + MUNGE_BINARIES if not shutil.which(b)
               and not os.path.exists(os.path.join("/usr/sbin", b))]
    if missing:
        missing_component(f"Slurm fixture: binaries not found: {', '.join(missing)} "
                          "(Debian packages slurm-wlm, munge)")
    path = os.environ.get("PATH", "")
    if "/usr/sbin" not in path.split(":"):
        path = path + ":/usr/sbin"
    tmpdir = tempfile.mkdtemp(prefix="cax-slurm-")  # short: the munge socket path has a length limit
    conf = os.path.join(tmpdir, "slurm.conf")
    env = dict(os.environ, SLURM_CONF=conf, PATH=path)
    cluster = SlurmCluster(
        tmpdir=tmpdir, conf=conf, hostname=socket.gethostname().split(".")[0], partition="debug",
        env=env, jobcomp_log=os.path.join(tmpdir, "jobcomp.log"),
        logs={"slurmctld": os.path.join(tmpdir, "ctld.log"), "slurmd": os.path.join(tmpdir, "d.log")},
    )
    old_conf, old_path = os.environ.get("SLURM_CONF"), os.environ.get("PATH")
    t0 = time.monotonic()
    try:
        _start(cluster)
    except (subprocess.SubprocessError, OSError, RuntimeError, TimeoutError) as e:
        detail = e.stderr.strip() if isinstance(e, subprocess.CalledProcessError) and e.stderr else ""
        reason = f"private Slurm did not start: {e} {detail} -- logs: {cluster.log_tails()}"
        _stop(cluster)
        shutil.rmtree(tmpdir, ignore_errors=True)
        missing_component(reason)
    cluster.start_seconds = time.monotonic() - t0
    os.environ["SLURM_CONF"] = conf
    os.environ["PATH"] = path
    try:
        yield cluster
    finally:
        problems = _stop(cluster)
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf
        if old_path is not None:
            os.environ["PATH"] = old_path
        if problems:
            # keep the directory for post-mortem
            print(f"slurm fixture teardown: {'; '.join(problems)}; logs kept in {tmpdir}")
        else:
            shutil.rmtree(tmpdir, ignore_errors=True)
