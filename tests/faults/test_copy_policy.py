"""The one copy policy (cax/transfer/policy.py) and its one local removal (issue 11).

Before it, files were removed by five local helpers that disagreed: processing's own removed
only regular files, links and directories, so debris of a killed attempt that was neither (a
FIFO, a socket) stayed at the output's partial name and made every later attempt of that run
fail."""
import os
import subprocess

from tests.test_process import (  # noqa: F401 - fixtures
    PY,
    RANDOM_OUTPUT,
    VERSION,
    Site,
    _job_pythonpath,
    local_site,
    wire_uri,
)


def test_processing_removes_any_leftover_at_its_partial_name(local_site):
    s = local_site.configure(RANDOM_OUTPUT)
    s.add_run(11)
    out_dir = s.data / VERSION
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / ".160315_0011.cax-partial"
    os.mkfifo(partial)  # what a killed attempt's command may leave
    res = subprocess.run([PY, "-m", "cax.processing", "--config", s.cfg, "--host", s.host,
                          "--version", VERSION, "--run", "11"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, (res.stderr, s.datum(11))
    assert s.status(11) == "transferred"
    assert os.path.isfile(out_dir / "160315_0011" / "out.bin")
    assert not os.path.lexists(partial)
