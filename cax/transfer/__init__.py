"""Transfer methods, looked up by the site's ``method`` key in one registry (:data:`METHODS`):
a new method is a class implementing :class:`cax.transfer.base.TransferMethod` and one line here
(the conformance suite, tests/test_transfer_contract.py, runs every registered method)."""
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
    Features,
    TransferMethod,
    is_partial_name,
    partial_path,
)

METHODS = {
    "local": "cax.transfer.local:LocalMethod",
    "scp": "cax.transfer.scp:ScpMethod",
    "sftp": "cax.transfer.sftp:SftpMethod",
    "rsync": "cax.transfer.rsync:RsyncMethod",
    "gfal": "cax.transfer.gfal:GfalMethod",
}
#: other names of a method: the classic cax's (``gfal-copy``), accepted in configs
ALIASES = {"gfal-copy": "gfal"}


def method_class(name: str):
    name = ALIASES.get(name, name)
    try:
        module, cls = METHODS[name].split(":")
    except KeyError:
        raise ValueError(f"unknown transfer method {name!r} (known: {', '.join(sorted(METHODS))})")
    return getattr(importlib.import_module(module), cls)


def open_method(site, **kwargs) -> TransferMethod:
    """An unconnected method object for reaching ``site``; use it as a context manager."""
    return method_class(site.method)(site, **kwargs)


def local_method(site, **kwargs) -> TransferMethod:
    """The method for data on this filesystem (a site's own copies, whatever method other
    sites use to reach them)."""
    return method_class("local")(site, **kwargs)


def features(site) -> Features:
    """What the method reaching ``site`` declares it can do (no connection needed); nothing
    for a site no method of this cax reaches (Site.unreachable)."""
    if getattr(site, "unreachable", None):
        return Features(remote_checksum=False)
    return method_class(site.method).features
