"""Batch backends against a real private Slurm (tests/slurm.py) and the local backend."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from cax.batch import (
    CANCELLED,
    COMPLETED,
    FAILED,
    GONE,
    PENDING,
    RUNNING,
    TIMEOUT,
    BackendUnavailable,
    Job,
    SubmitError,
    get_backend,
    render_script,
    safe_job_name,
)
from cax.batch.base import walltime_seconds
from tests.waiting import wait_for

# Registering twice is harmless; this keeps the module runnable before conftest registers the plugin.
pytest_plugins = ["tests.slurm"]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINAL = (COMPLETED, FAILED, CANCELLED, TIMEOUT, GONE)


def wait_state(backend, job_id, states, timeout=60.0, interval=0.1):
    """Poll ``backend.status`` until it is one of ``states``; fail with the states seen on timeout."""
    states = (states,) if isinstance(states, str) else tuple(states)
    seen = []

    def reached():
        state = backend.status(job_id)
        if not seen or seen[-1] != state:
            seen.append(state)
        return state if state in states else None
    return wait_for(reached, timeout, f"job {job_id} to be {states}", interval=interval,
                    diagnose=lambda: f"states seen: {seen}")


def prefix():
    return f"caxt_{uuid.uuid4().hex[:8]}_"


@pytest.fixture(params=["local", pytest.param("slurm", marks=pytest.mark.slurm)])
def backend(request, tmp_path):
    if request.param == "slurm":
        request.getfixturevalue("slurm")
        b = get_backend("slurm", script_dir=str(tmp_path / "scripts"))
    else:
        b = get_backend("local", state_dir=str(tmp_path / "state"), max_jobs=2, kill_grace=2)
    submitted = []
    real_submit = b.submit

    def submit(job):
        job_id = real_submit(job)
        submitted.append(job_id)
        return job_id

    b.submit = submit
    yield b
    for job_id in submitted:  # never leave a job behind
        try:
            b.cancel(job_id)
        except Exception:
            pass


def make_job(tmp_path, name, argv, **kw):
    kw.setdefault("log_path", str(tmp_path / f"{name}.log"))
    kw.setdefault("workdir", str(tmp_path))
    return Job(name=name, argv=argv, **kw)


# -- behaviour shared by both backends ----------------------------------------------------------
def test_job_writing_a_file_completes(backend, tmp_path):
    out = tmp_path / "out.txt"
    job = make_job(tmp_path, prefix() + "write", ["/bin/sh", "-c", 'echo "value=$CAX_T" > "$1"; echo to-log', "sh", str(out)],
                   env_setup=["export CAX_T=42"])
    t0 = time.monotonic()
    job_id = backend.submit(job)
    assert isinstance(job_id, str) and job_id
    assert wait_state(backend, job_id, FINAL) == COMPLETED
    print(f"{backend.name}: submit to COMPLETED in {time.monotonic() - t0:.2f} s")
    assert out.read_text() == "value=42\n"
    assert backend.exit_code(job_id) == 0
    assert "to-log" in (tmp_path / f"{job.name}.log").read_text()


def test_exit_3_is_failed_with_code_3(backend, tmp_path):
    job_id = backend.submit(make_job(tmp_path, prefix() + "three", ["/bin/sh", "-c", "echo failing; exit 3"]))
    assert wait_state(backend, job_id, FINAL) == FAILED
    assert backend.exit_code(job_id) == 3


def test_env_setup_failure_fails_the_job(backend, tmp_path):
    out = tmp_path / "never"
    job = make_job(tmp_path, prefix() + "setup", ["touch", str(out)], env_setup=["false"])
    job_id = backend.submit(job)
    assert wait_state(backend, job_id, FINAL) == FAILED
    assert not out.exists()


def test_env_setup_may_read_unset_variables(backend, tmp_path):
    """Setup lines like `export PATH=/x:$UNSET` are everyday site config; only the command runs
    under `set -u`."""
    out = tmp_path / "out.txt"
    job = make_job(tmp_path, prefix() + "unset",
                   ["/bin/sh", "-c", 'echo "$CAX_P" > "$1"', "sh", str(out)],
                   env_setup=["export CAX_P=/opt/x/lib:${CAX_SURELY_UNSET_VARIABLE}"])
    job_id = backend.submit(job)
    assert wait_state(backend, job_id, FINAL) == COMPLETED, (tmp_path / f"{job.name}.log").read_text()
    assert out.read_text() == "/opt/x/lib:\n"


def test_cancel_gives_cancelled(backend, tmp_path):
    job_id = backend.submit(make_job(tmp_path, prefix() + "sleep", ["sleep", "300"]))
    wait_state(backend, job_id, RUNNING)
    backend.cancel(job_id)
    assert wait_state(backend, job_id, FINAL, timeout=30) == CANCELLED
    backend.cancel(job_id)  # cancelling a finished job is harmless
    assert backend.status(job_id) == CANCELLED


def test_queued_lists_own_prefix_only(backend, tmp_path):
    mine, other = prefix(), prefix()
    a = backend.submit(make_job(tmp_path, mine + "a", ["sleep", "300"]))
    b = backend.submit(make_job(tmp_path, other + "b", ["sleep", "300"]))
    wait_state(backend, a, (PENDING, RUNNING))
    wait_state(backend, b, (PENDING, RUNNING))
    assert backend.queued(mine) == [(a, mine + "a")]
    assert backend.queued(other) == [(b, other + "b")]
    assert {a, b} <= {j for j, _ in backend.queued("")}
    backend.cancel(a)
    wait_state(backend, a, CANCELLED, timeout=30)
    assert backend.queued(mine) == []
    assert backend.queued(other) == [(b, other + "b")]


HOSTILE = [
    "$(touch {d}/pwned1)",
    "; touch {d}/pwned2",
    "`touch {d}/pwned3`",
    "x\ntouch {d}/pwned4\n",
    "x' ; touch {d}/pwned5 ; '",
    '" && touch {d}/pwned6 && "',
    "${{IFS}}$(touch${{IFS}}{d}/pwned7)",
    "*",
    "",
    "-n",
    "160315_1432; touch {d}/pwned8",
]


def test_hostile_arguments_stay_literal(backend, tmp_path):
    d = tmp_path / "victim"
    d.mkdir()
    args = [a.format(d=d) for a in HOSTILE]
    out = tmp_path / "argv.json"
    argv = [sys.executable, "-c", "import json, sys; json.dump(sys.argv[2:], open(sys.argv[1], 'w'))", str(out)] + args
    job_id = backend.submit(make_job(tmp_path, prefix() + "hostile", argv))
    assert wait_state(backend, job_id, FINAL) == COMPLETED
    assert json.loads(out.read_text()) == args
    assert sorted(os.listdir(d)) == []


def test_unknown_job_is_gone(backend):
    bogus = "987654" if backend.name == "slurm" else "local-20000101000000000000-0123abcd"
    assert backend.status(bogus) == GONE
    assert backend.exit_code(bogus) is None
    backend.cancel(bogus)  # no error
    for hostile in ("../../etc", "1; touch /nonexistent-cax-dir/x", "-h"):
        assert backend.status(hostile) == GONE


# -- the job script -----------------------------------------------------------------------------
def test_render_script_quotes_every_argument(tmp_path):
    d = tmp_path / "victim"
    d.mkdir()
    args = [a.format(d=d) for a in HOSTILE]
    job = Job(name="t", argv=["printf", "%s\\0"] + args, env_setup=["export A=1"])
    text = render_script(job)
    lines = text.splitlines()
    assert lines[:5] == ["#!/bin/bash", "set -euo pipefail", "set +u", "export A=1", "set -u"]
    script = tmp_path / "s.sh"
    script.write_text(text)
    out = subprocess.run(["/bin/bash", str(script)], capture_output=True, check=True).stdout
    assert out.split(b"\0")[:-1] == [a.encode() for a in args]
    assert os.listdir(d) == []


def test_job_validation():
    with pytest.raises(ValueError):
        Job(name="has space", argv=["true"])
    with pytest.raises(ValueError):
        Job(name="-x", argv=["true"])
    with pytest.raises(ValueError):
        Job(name="ok", argv="echo not-a-list")
    with pytest.raises(ValueError):
        Job(name="ok", argv=[])
    with pytest.raises(ValueError):
        Job(name="ok", argv=["true"], partition="--wrap=x")
    assert safe_job_name("cax", "x; touch -a y") == "cax_x__touch_-a_y"
    Job(name=safe_job_name("-", "$(x)"), argv=["true"])
    assert walltime_seconds(90) == 5400
    assert walltime_seconds("1:30:00") == 5400
    assert walltime_seconds("2:30") == 150
    assert walltime_seconds("1-00:00:00") == 86400
    with pytest.raises(ValueError):
        get_backend("pbs")


# -- Slurm only ---------------------------------------------------------------------------------
@pytest.mark.slurm
def test_slurm_rejected_submission_is_submit_error(slurm, tmp_path):
    b = get_backend("slurm")
    job = make_job(tmp_path, prefix() + "bad", ["true"], partition="nosuchpartition")
    with pytest.raises(SubmitError) as e:
        b.submit(job)
    assert "\n" not in str(e.value)
    assert "partition" in str(e.value).lower()


@pytest.mark.slurm
def test_slurm_unreachable_is_backend_unavailable(slurm, tmp_path):
    from tests.waiting import free_port

    conf = tmp_path / "dead.conf"
    text = open(slurm.conf).read()
    port = free_port()
    lines = [f"SlurmctldPort={port}" if ln.startswith("SlurmctldPort=") else ln for ln in text.splitlines()]
    lines.append("MessageTimeout=2")
    conf.write_text("\n".join(lines) + "\n")
    b = get_backend("slurm", slurm_conf=str(conf), timeout=60)
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailable) as e:
        b.status("1")
    assert "\n" not in str(e.value)
    with pytest.raises(BackendUnavailable):
        b.queued("x")
    with pytest.raises(BackendUnavailable):
        b.submit(make_job(tmp_path, prefix() + "dead", ["true"]))
    print(f"unreachable detected in {time.monotonic() - t0:.1f} s for three calls")


@pytest.mark.slurm
def test_slurm_resources_reach_the_job(slurm, tmp_path):
    b = get_backend("slurm")
    job = make_job(tmp_path, prefix() + "res", ["sleep", "300"], ncpus=2 if (os.cpu_count() or 1) >= 2 else 1,
                   mem_per_cpu=100, walltime=5, partition=slurm.partition)
    job_id = b.submit(job)
    try:
        wait_state(b, job_id, (PENDING, RUNNING))
        info = slurm.run("scontrol", "-o", "show", "job", job_id).stdout
        assert f"JobName={job.name} " in info
        assert "TimeLimit=00:05:00" in info
        assert f"NumCPUs={job.ncpus} " in info
        assert f"StdOut={job.log_path} " in info
    finally:
        b.cancel(job_id)
    assert wait_state(b, job_id, FINAL) == CANCELLED


# -- local only ---------------------------------------------------------------------------------
@pytest.fixture
def local(tmp_path):
    b = get_backend("local", state_dir=str(tmp_path / "state"), max_jobs=1, kill_grace=2)
    yield b
    for job_id, _ in b.queued(""):
        b.cancel(job_id)


def test_local_max_jobs_keeps_others_pending(local, tmp_path):
    p = prefix()
    a = local.submit(make_job(tmp_path, p + "a", ["sleep", "300"]))
    wait_state(local, a, RUNNING)
    b = local.submit(make_job(tmp_path, p + "b", ["touch", str(tmp_path / "b-ran")]))
    # b cannot start while a holds the only slot: it stays PENDING
    for _ in range(10):
        assert local.status(b) == PENDING
        time.sleep(0.1)
    assert local.queued(p) == [(a, p + "a"), (b, p + "b")]
    assert not (tmp_path / "b-ran").exists()
    local.cancel(a)
    assert wait_state(local, a, FINAL, timeout=30) == CANCELLED
    assert wait_state(local, b, FINAL, timeout=30) == COMPLETED
    assert (tmp_path / "b-ran").exists()


def test_local_cancel_pending_job(local, tmp_path):
    a = local.submit(make_job(tmp_path, prefix() + "a", ["sleep", "300"]))
    b = local.submit(make_job(tmp_path, prefix() + "b", ["touch", str(tmp_path / "b-ran")]))
    wait_state(local, a, RUNNING)
    assert local.status(b) == PENDING
    local.cancel(b)
    assert wait_state(local, b, FINAL, timeout=30) == CANCELLED
    local.cancel(a)
    assert wait_state(local, a, FINAL, timeout=30) == CANCELLED
    assert not (tmp_path / "b-ran").exists()


def test_local_walltime_gives_timeout(local, tmp_path):
    job_id = local.submit(make_job(tmp_path, prefix() + "slow", ["sleep", "300"], walltime="0:01"))
    assert wait_state(local, job_id, FINAL, timeout=30) == TIMEOUT


def test_local_killed_wrapper_is_failed(local, tmp_path):
    job_id = local.submit(make_job(tmp_path, prefix() + "victim", ["sleep", "300"]))
    wait_state(local, job_id, RUNNING)
    d = os.path.join(local.jobs_dir, job_id)
    wrapper_pid = int(open(os.path.join(d, "wrapper.pid")).read().split()[0])
    job_pid = int(open(os.path.join(d, "started")).read().split()[0])
    os.kill(wrapper_pid, signal.SIGKILL)
    os.killpg(job_pid, signal.SIGKILL)
    assert wait_state(local, job_id, FINAL, timeout=30) == FAILED
    assert local.exit_code(job_id) is None
    assert local.queued("") == []


def test_local_state_survives_the_submitting_process(tmp_path):
    state = tmp_path / "state"
    flag = tmp_path / "flag"
    code = textwrap.dedent("""
        import json, sys
        from cax.batch import Job, get_backend
        state, flag, tmp = sys.argv[1:4]
        b = get_backend("local", state_dir=state, max_jobs=2)
        quick = b.submit(Job(name="cron_quick", argv=["touch", flag], log_path=tmp + "/q.log"))
        slow = b.submit(Job(name="cron_slow", argv=["sleep", "300"], log_path=tmp + "/s.log"))
        print(json.dumps([quick, slow]))
    """)
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    out = subprocess.run([sys.executable, "-c", code, str(state), str(flag), str(tmp_path)],
                         capture_output=True, text=True, timeout=60, env=env, check=True)
    quick, slow = json.loads(out.stdout)
    b = get_backend("local", state_dir=str(state))
    assert wait_state(b, quick, FINAL) == COMPLETED
    assert flag.exists()
    wait_state(b, slow, RUNNING)
    assert b.queued("cron_") == [(slow, "cron_slow")]
    # cancel from yet another process
    subprocess.run([sys.executable, "-c",
                    "import sys; from cax.batch import get_backend; get_backend('local', state_dir=sys.argv[1]).cancel(sys.argv[2])",
                    str(state), slow], timeout=60, env=env, check=True)
    assert wait_state(b, slow, FINAL, timeout=30) == CANCELLED
    assert b.queued("cron_") == []


def test_slurm_falls_back_to_sacct_for_forgotten_jobs(tmp_path, monkeypatch):
    """Parsing only (real Slurm here has no accounting): stand-in commands on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    forgotten = "#!/bin/sh\necho 'slurm_load_jobs error: Invalid job id specified' >&2\nexit 1\n"
    for name, text in {
        "squeue": forgotten,
        "scontrol": forgotten,
        "sacct": "#!/bin/sh\n[ \"$5\" = 42 ] && echo '42|CANCELLED by 0|0:15'\n[ \"$5\" = 43 ] && echo '43|FAILED|3:0'\nexit 0\n",
    }.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    b = get_backend("slurm")
    assert b.status("42") == CANCELLED
    assert b.exit_code("42") == 143
    assert b.status("43") == FAILED
    assert b.exit_code("43") == 3
    assert b.status("44") == GONE
    assert b.exit_code("44") is None
    assert get_backend("slurm", use_sacct=False).status("43") == GONE
