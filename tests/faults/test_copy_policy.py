"""The one copy policy (cax/transfer/policy.py) and its one local removal (issue 11).

Before it, files were removed by five local helpers that disagreed: processing's own removed
only regular files, links and directories, so debris of a killed attempt that was neither (a
FIFO, a socket) stayed at the output's partial name and made every later attempt of that run
fail; and ``cax mv`` across filesystems wrote to a random temporary name that no later move
cleared."""
import os
import shutil
import subprocess
import tempfile

import pytest

from cax.admin import _move
from cax.transfer.base import local_tree, partial_path
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


def test_mv_across_filesystems_goes_through_the_copy_policy(tmp_path):
    """``cax mv`` to another filesystem copies to the partial name (cleared of a killed move's
    leftovers first), renames into place only a whole copy, then removes the original."""
    other = tempfile.mkdtemp(dir="/dev/shm")
    try:
        if os.stat(other).st_dev == os.stat(tmp_path).st_dev:
            pytest.skip("/dev/shm is on the same filesystem as the test's tmp_path")
        src = tmp_path / "run"
        (src / "sub").mkdir(parents=True)
        (src / "a.bin").write_bytes(os.urandom(4096))
        (src / "sub" / "b.bin").write_bytes(b"b" * 10)
        os.symlink("a.bin", src / "link")
        want = local_tree(str(src))
        dst = os.path.join(other, "raw", "run")
        os.makedirs(partial_path(dst) + "/junk")  # a killed move's leftover
        _move(str(src), dst)
        assert local_tree(dst) == want and os.path.islink(os.path.join(dst, "link"))
        assert not os.path.lexists(src)
        assert os.listdir(os.path.dirname(dst)) == ["run"]
    finally:
        shutil.rmtree(other, ignore_errors=True)
