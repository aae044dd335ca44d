"""Batch backends, looked up by the site's batch ``backend`` name (DESIGN.md "Batch backends")."""
from __future__ import annotations

import importlib

from cax.batch.base import (  # noqa: F401
    ACTIVE_STATES,
    CANCELLED,
    COMPLETED,
    FAILED,
    FINAL_STATES,
    GONE,
    PENDING,
    RUNNING,
    STATES,
    TIMEOUT,
    BackendUnavailable,
    BatchBackend,
    BatchError,
    Job,
    SubmitError,
    render_script,
    safe_job_name,
)

BACKENDS = {
    "slurm": "cax.batch.slurm:SlurmBackend",
    "local": "cax.batch.local:LocalBackend",
}


def backend_class(name: str):
    try:
        module, cls = BACKENDS[name].split(":")
    except KeyError:
        raise ValueError(f"unknown batch backend {name!r} (known: {', '.join(sorted(BACKENDS))})")
    return getattr(importlib.import_module(module), cls)


def get_backend(name: str, **options) -> BatchBackend:
    """A backend instance: ``get_backend('slurm', script_dir=...)``, ``get_backend('local', state_dir=..., max_jobs=2)``."""
    return backend_class(name)(**options)
