"""Task registry: one class per duty, run in the order of cax.config.DEFAULT_TASKS."""
from __future__ import annotations

import importlib

from cax.config import DEFAULT_TASKS

TASK_NAMES = tuple(DEFAULT_TASKS)

_WHERE = {
    "CopyPush": "cax.tasks.copy",
    "CopyPull": "cax.tasks.copy",
    "AddChecksum": "cax.tasks.checksum",
    "CompareChecksums": "cax.tasks.checksum",
    "RetryStalledTransfer": "cax.tasks.retry",
    "RetryBadChecksumTransfer": "cax.tasks.retry",
    "AddSize": "cax.tasks.size",
    "SetPermission": "cax.tasks.permission",
    "VerifyCopies": "cax.tasks.scrub",
    "ProcessBatchQueue": "cax.tasks.process",
    "PurgeProcessed": "cax.tasks.purge",
    "BufferPurger": "cax.tasks.purge",
}


def task_class(name: str):
    """The class for a task name, or None when this build does not have that task yet."""
    try:
        module = importlib.import_module(_WHERE[name])
    except ModuleNotFoundError:
        return None
    return getattr(module, name, None)
