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
