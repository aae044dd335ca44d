"""Classic command lines and runs of several detectors in processing (issue 12, items 4-6).

The classic processing jobs ran ``cax-process NAME INPUT HOST VERSION HASH OUTPUT NCPU``; its
``massive-cax`` took ``--mem_per_cpu/--walltime/--partition/--reservation``. Both were refused
("Got unexpected extra arguments", "No such option"). Processing jobs and massive jobs were named
and looked up by run number alone, so a TPC and a muon-veto run with one number shared a job
name (the second was "already queued") and cax-process could not tell them apart.
"""
from __future__ import annotations

import os
import subprocess

import pytest
from click.testing import CliRunner

from cax.batch import Job
from cax.batch.slurm import SlurmBackend
from cax.checksum import checksum
from cax.processing import massive
from tests.test_process import COPY, PY, REPO_ROOT, VERSION, Site, wait_until


@pytest.fixture(autouse=True)
def _job_pythonpath(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.fixture
def site(tmp_path, wire_uri):
    s = Site(tmp_path, wire_uri, "local")
    yield s
    s.cleanup()


def datum(s, number, detector):
    run = s.db.run_by(number=number, detector=detector)
    return next((d for d in run.get("data") or [] if d.get("type") == "processed"), None)


def test_cax_process_classic_positional_form(site):
    s = site.configure(COPY)
    raw = s.add_run(40)
    name = "160315_0040"
    cmd = [PY, "-m", "cax.processing", "--config", s.cfg,
           name, raw, s.host, VERSION, "0123abcd", "/somewhere/else", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    d = datum(s, 40, "tpc")
    assert d["status"] == "transferred" and d["checksum"] == checksum(raw)
    warned = [ln for ln in res.stderr.splitlines() if "classic positional form" in ln]
    assert len(warned) == 1, res.stderr
    assert "HASH 0123abcd is not recorded" in warned[0]
    assert "OUTPUT /somewhere/else is not used" in warned[0]
    assert not os.path.exists("/somewhere/else")
    # a wrong number of arguments, or one contradicting an option, is one line, exit 2
    res = subprocess.run(cmd[:-1], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "takes 7 arguments" in res.stderr, res.stderr
    res = subprocess.run(cmd + ["--version", "v9"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "--version v9 contradicts" in res.stderr, res.stderr
    res = subprocess.run(cmd[:-1] + ["0"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "NCPU must be a positive integer" in res.stderr, res.stderr


def test_processing_jobs_of_two_detectors_sharing_a_number(site):
    """Before: both jobs were named cax-proc-<host>_50_<version> (the second never submitted),
    and cax-process --run 50 could not tell the runs apart."""
    s = site.configure(COPY)
    s.add_run(50)
    s.add_run(50, name="160315_0050_MV", detector="muon_veto")
    s.run_pass()
    names = sorted(name for _i, name, _a in s.jobs())
    assert len(names) == 2 and names[0] != names[1], names
    assert any("muon_veto_50" in n for n in names), names
    for detector in ("tpc", "muon_veto"):
        wait_until(lambda: (datum(s, 50, detector) or {}).get("status") in ("transferred", "error"),
                   60, f"the {detector} job", diagnose=s.diagnostics)
        assert datum(s, 50, detector)["status"] == "transferred", datum(s, 50, detector)
    # by hand without --detector: refused in one line naming both
    res = subprocess.run([PY, "-m", "cax.processing", "--config", s.cfg, "--host", s.host,
                          "--run", "50", "--version", VERSION], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2
    assert "run number 50 is in several detectors (muon_veto, tpc)" in res.stderr, res.stderr


def test_massive_two_detectors_and_classic_resource_flags(site):
    s = site.configure(COPY)
    s.add_run(60)
    s.add_run(60, name="160315_0060_MV", detector="muon_veto")
    runner = CliRunner()
    res = runner.invoke(massive, ["--config", s.cfg, "--host", s.host, "--run", "60", "--dry-run"])
    assert res.exit_code == 2
    assert "run number 60 is in several detectors (muon_veto, tpc); choose one with --detector" \
        in res.output, res.output
    res = runner.invoke(massive, ["--config", s.cfg, "--host", s.host, "--start", "60",
                                  "--stop", "60", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "2 run(s) selected" in res.output and "(muon_veto: 1, tpc: 1)" in res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("would submit")]
    assert len(lines) == 2 and len({ln.split()[2] for ln in lines}) == 2, lines
    assert any("--run 60 --detector muon_veto" in ln for ln in lines)
    assert any("--run 60 --detector tpc" in ln for ln in lines)
    res = runner.invoke(massive, ["--config", s.cfg, "--host", s.host, "--run", "60",
                                  "--detector", "muon_veto", "--mem_per_cpu", "2000",
                                  "--walltime", "48:00:00", "--partition", "xenon1t",
                                  "--reservation", "xenon1t_shift", "--dry-run"])
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("would submit")]
    assert len(lines) == 1 and "--detector muon_veto" in lines[0]
    assert ("(mem_per_cpu=2000, walltime=48:00:00, partition=xenon1t, "
            "reservation=xenon1t_shift)") in lines[0], lines
    res = runner.invoke(massive, ["--config", s.cfg, "--host", s.host, "--start", "60",
                                  "--once", "--dry-run"])  # the classic --once: what cax does
    assert res.exit_code == 0 and res.output.count("would submit") == 2, res.output
    res = runner.invoke(massive, ["--config", s.cfg, "--host", s.host, "--start", "60",
                                  "--walltime", "forever", "--dry-run"])
    assert res.exit_code == 2 and "--walltime: invalid walltime 'forever'" in res.output


def test_massive_resource_flags_reach_sbatch_and_the_local_backend_says_what_it_ignores(
        site, caplog):
    from cax.processing import _massive_resources, massive_job
    from cax import config as cfgmod
    from cax.tasks.process import settings
    s = site.configure(COPY)
    config = cfgmod.load(s.cfg)
    with caplog.at_level("WARNING", logger="cax.processing"):
        res = _massive_resources(config, s.host, mem_per_cpu="2000", walltime="48:00:00",
                                 partition="xenon1t", reservation="shift")
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "--mem_per_cpu, --partition, --reservation ignored" in said[0], said
    p = dict(settings(config.site(s.host)), **res)
    job = massive_job(config, s.host, p, {"number": 70, "detector": "muon_veto"})
    assert job.name.endswith("muon_veto_70") and job.log_path.endswith("massive_muon_veto_70.log")
    argv = SlurmBackend(script_dir=str(s.tmp)).sbatch_argv(job, "job.sh")
    assert {"--mem-per-cpu=2000", "--time=2880", "--partition=xenon1t",
            "--reservation=shift"} <= set(argv), argv
    with pytest.raises(ValueError, match="invalid reservation"):
        Job(name="x", argv=["true"], reservation="a b")


@pytest.mark.parametrize("how", ["--runs-db", "CAX_RUNS_DB", "config"])
def test_status_on_a_runs_db_path_that_does_not_exist_is_an_error(tmp_path, how):
    """Not an empty table: one line naming the path and where it was named, exit 1 (the line
    used to say "fix 'runs_db' in <config>" also when --runs-db or $CAX_RUNS_DB named it)."""
    import json
    import sys
    missing = tmp_path / "typo.runsdb"
    cfg = tmp_path / "cax.json"
    cfg.write_text(json.dumps({"runs_db": str(missing) if how == "config" else "other.runsdb",
                               "sites": [{"name": "a", "directory": str(tmp_path)}]}))
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    env.pop("CAX_RUNS_DB", None)
    args = [sys.executable, "-m", "cax", "--config", str(cfg)]
    if how == "--runs-db":
        args += ["--runs-db", str(missing)]
    elif how == "CAX_RUNS_DB":
        env["CAX_RUNS_DB"] = str(missing)
    res = subprocess.run(args + ["status"], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 1 and res.stdout == "", (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot use Runs DB {missing}: it does not exist" in lines[0]
    fix = {"--runs-db": "fix --runs-db", "CAX_RUNS_DB": "fix $CAX_RUNS_DB",
           "config": f"fix 'runs_db' in {cfg}"}[how]
    assert lines[0].endswith(fix), lines[0]
    assert not missing.exists()
