"""Transfer methods, looked up by the site's ``method`` key."""
from __future__ import annotations

import importlib

from cax.transfer.base import (  # noqa: F401
    DestinationNotAccessible,
    Interrupted,
    NoSpace,
    ServiceUnavailable,
    SourceNotFound,
    TransferError,
    TransferFailed,
    TransferMethod,
    is_partial_name,
    local_leftovers,
    partial_path,
)

METHODS = {
    "local": "cax.transfer.local:LocalMethod",
    "scp": "cax.transfer.scp:ScpMethod",
    "sftp": "cax.transfer.sftp:SftpMethod",
    "rsync": "cax.transfer.rsync:RsyncMethod",
}


def method_class(name: str):
    try:
        module, cls = METHODS[name].split(":")
    except KeyError:
        raise ValueError(f"unknown transfer method {name!r} (known: {', '.join(sorted(METHODS))})")
    return getattr(importlib.import_module(module), cls)


def open_method(site, **kwargs) -> TransferMethod:
    """An unconnected method object for reaching ``site``; use it as a context manager."""
    return method_class(site.method)(site, **kwargs)
