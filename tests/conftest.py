"""Shared test helpers.

Real components (sshd, Slurm, a MongoDB wire server) are started by fixtures. When one cannot be
started the test skips with a loud reason, except under CI=true, where a missing server is a failure:
CI must never go green by skipping the parts that matter.
"""
import os

import pytest

pytest_plugins = ["tests.backends", "tests.slurm", "tests.sshd", "tests.xrootd"]


def missing_component(reason: str):
    """Skip (locally) or fail (under CI=true) because a real component is not available."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"required test component missing under CI=true: {reason}", pytrace=False)
    pytest.skip(f"SKIPPED FOR LACK OF A REAL COMPONENT: {reason}")
