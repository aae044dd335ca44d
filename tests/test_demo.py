"""README command one's demo, as a user runs it: it must end with every copy verified."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_moves_every_run_to_every_site(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, XDG_STATE_HOME=str(tmp_path / "state"))
    proc = subprocess.run([sys.executable, "-m", "cax", "demo", str(tmp_path / "demo")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "every run is transferred at all three sites with equal checksums" in proc.stdout
    table = proc.stdout.split("$ cax --config")[-1]
    assert table.count("processed@v1.0:transferred") == 3
    assert table.count("all equal (3)") == 3
    again = subprocess.run([sys.executable, "-m", "cax", "demo", str(tmp_path / "demo")], env=env,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "already holds a demo" in again.stderr


def test_demo_and_its_jobs_run_beside_a_folder_named_cax(tmp_path):
    """The working directory (and a job's) may hold a folder named cax, e.g. a checkout or a
    backup: the commands cax starts must still run this cax, not that folder."""
    work = tmp_path / "work"
    for where in (work, work / "demo" / "logs"):  # the demo's jobs run in its log_dir
        (where / "cax").mkdir(parents=True)
        (where / "cax" / "__init__.py").write_text("raise ImportError('the wrong cax')\n")
    env = dict(os.environ, PYTHONPATH=ROOT, XDG_STATE_HOME=str(tmp_path / "state"))
    # -P for the first command, as a console script (.venv/bin/cax) has it; the rest is cax's
    proc = subprocess.run([sys.executable, "-P", "-m", "cax", "demo", "demo", "--runs", "1"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "the wrong cax" not in proc.stdout + proc.stderr
    assert proc.stdout.split("$ cax --config")[-1].count("processed@v1.0:transferred") == 1


def test_readme_tour_commands_work_after_the_demo(tmp_path):
    """Every command of README's short tour, as printed, after the demo (the checksum line
    pointed at demo/archive/RUN while the demo keeps raw data under demo/archive/raw/)."""
    import shlex
    text = open(os.path.join(ROOT, "README.rst"), encoding="utf-8").read()
    tour = text.split("A short tour", 1)[1].split("Running it for real", 1)[0]
    commands = [shlex.split(line.split("#", 1)[0]) for line in tour.splitlines()
                if line.startswith("    cax ")]
    assert len(commands) >= 5
    env = dict(os.environ, PYTHONPATH=ROOT, XDG_STATE_HOME=str(tmp_path / "state"))
    subprocess.run([sys.executable, "-m", "cax", "demo", "demo"], cwd=tmp_path, env=env,
                   capture_output=True, text=True, timeout=300, check=True)
    for argv in commands:
        proc = subprocess.run([sys.executable, "-m", *argv], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, (argv, proc.stdout, proc.stderr)
