"""The connections of one pass: one per remote site, shared by every task and copy worker.

Each SSH login costs a key exchange, an sshd process and a line in the remote site's auth log, and
sites limit concurrent logins (sshd ``MaxStartups``): a pass with ``max_transfers`` workers, a
verification and a few healed runs must not log in once per thread or per run. Every thread gets its
own method object (its own SFTP session, progress and cancel callbacks) but all of a site's method
objects share the connection of the first one (paramiko channels on one transport; OpenSSH clients
multiplexed on one ControlMaster socket).

A pool is where a pass starts using connections, so it first removes what killed cax processes
left behind (:func:`cax.transfer.ssh.clean_leftovers`: their ControlMaster directories, never a
live one).
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

from cax.transfer import open_method
from cax.transfer.base import ServiceUnavailable, TransferError, TransferMethod

log = logging.getLogger("cax.transfer.pool")


class ConnectionPool:
    def __init__(self, cancel: Optional[Callable[[], bool]] = None):
        from cax.transfer.ssh import clean_leftovers
        clean_leftovers()
        self._cancel = cancel
        self._lock = threading.Lock()
        self._owners: dict = {}  # site name -> the method object owning the site's connection
        self._methods: list = []  # every method object handed out, closed with the pool
        self._failed: dict = {}  # site name -> the TransferError its connection failed with
        self._local = threading.local()

    def failure(self, site) -> Optional[TransferError]:
        """Why ``site`` could not be reached this pass, or None.

        A site that refused us (unknown host key, down, bad credentials) refuses the next run
        too: asking again per run costs a connection timeout each and floods the log.
        """
        return self._failed.get(site.name)

    def unreachable(self) -> dict:
        """site name -> one-line reason, for every site whose connection failed this pass."""
        with self._lock:
            return {name: f"{type(e).__name__}: {e}" for name, e in self._failed.items()}

    def method(self, site) -> TransferMethod:
        """This thread's connected method object for ``site``.

        Connecting is cheap when the site's connection is up, and re-opens it when it was lost.
        A failure to connect is remembered for the rest of the pass and raised again (same type
        and reason) without another attempt.
        """
        if getattr(site, "unreachable", None):
            raise ServiceUnavailable(f"site {site.name} is not reachable from this cax: "
                                     f"{site.unreachable}")
        failed = self._failed.get(site.name)
        if failed is not None:
            raise type(failed)(*failed.args)
        mine = self._local.__dict__.setdefault("methods", {})
        m = mine.get(site.name)
        if m is None:
            with self._lock:
                owner = self._owners.get(site.name)
                shared = owner.share() if owner is not None else {}
                m = open_method(site, cancel=self._cancel, **shared)
                if owner is None and m.features.shares_connection:
                    self._owners[site.name] = m
                self._methods.append(m)
            mine[site.name] = m
        try:
            m.connect()
        except TransferError as e:
            with self._lock:
                self._failed.setdefault(site.name, e)
            raise
        return m

    def close(self) -> None:
        with self._lock:
            methods, self._methods, self._owners = self._methods, [], {}
        self._local = threading.local()
        # sharers first: closing an owner closes the connection under the others
        for m in sorted(methods, key=lambda m: m.owns_connection):
            try:
                m.close()
            except Exception as e:  # noqa: BLE001 - closing must not hide the pass's result
                log.warning("closing the connection to %s failed: %s", m.site.name, e)
