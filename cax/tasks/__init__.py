"""Task registry: one class per duty, and the order a pass runs them in (DESIGN.md).

``cax.config`` validates ``task_list`` against these names; this module needs nothing from the
config, so the two do not import each other.
"""
from __future__ import annotations

import importlib

#: Default task order (DESIGN.md); a site's ``task_list`` narrows it and keeps this order.
TASK_NAMES = (
    "CopyPush",
    "CompareChecksums",
    "RetryStalledTransfer",
    "RetryBadChecksumTransfer",
    "CopyPull",
    "CopyThirdParty",
    "AddChecksum",
    "AddSize",
    "SetPermission",
    "VerifyCopies",
    "ProcessBatchQueue",
    "PurgeProcessed",
    "BufferPurger",
)

_WHERE = {
    "CopyPush": "cax.tasks.copy",
    "CopyPull": "cax.tasks.copy",
    "CopyThirdParty": "cax.tasks.copy",
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
