"""What one pass did: copies and bytes by direction and method, failures by kind, the sites it
could not reach.

The Runs DB records each datum's state, but "did this pass do everything it could?" is a fact
about the pass, needed in three places: the exit status of ``--once`` for cron (3 when anything
failed), the daemon's heartbeat document that other sites read, and the metrics file. The tasks
add to one report; those three read it.
"""
from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class PassReport:
    #: (direction, method) -> copies / bytes
    copies: Counter = field(default_factory=Counter)
    bytes: Counter = field(default_factory=Counter)
    #: error kind -> failures recorded this pass (interrupted copies are not failures)
    failures: Counter = field(default_factory=Counter)
    retries: int = 0
    #: site -> one-line reason its connection failed this pass
    unreachable: dict = field(default_factory=dict)
    last_error: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def copied(self, direction: str, method: str, nbytes: int) -> None:
        with self._lock:
            self.copies[(direction, method)] += 1
            self.bytes[(direction, method)] += nbytes

    def failed(self, kind: str, line: str) -> None:
        if kind == "interrupted":  # a deliberate stop: retried at once, not a failure
            return
        with self._lock:
            self.failures[kind] += 1
            self.last_error = line

    def retried(self) -> None:
        with self._lock:
            self.retries += 1

    def could_not_reach(self, unreachable: dict) -> None:
        with self._lock:
            self.unreachable.update(unreachable)

    @property
    def total_copies(self) -> int:
        return sum(self.copies.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    @property
    def complete(self) -> bool:
        """Nothing failed and every site the pass needed answered: ``--once`` exits 0."""
        return not self.failures and not self.unreachable
