"""Waiting between passes, optionally woken by the Runs DB's change stream.

Polling every ``interval`` seconds is the default and works everywhere. On a MongoDB server that
offers change streams, ``wake_on_change`` lets a daemon start its next pass within a second of a new
run or a datum state change, instead of up to ``interval`` later. Heartbeats and other field updates
do not wake it (every live copy refreshes its heartbeat), and passes are at least ``min_gap``
seconds apart so a busy Runs DB cannot make a daemon spin.
"""
from __future__ import annotations

import logging
import re
import threading
import time

log = logging.getLogger("cax.wakeup")

_STATE_FIELD = re.compile(r"^(data|references)(\.\d+)?$|\.status$")


def interesting(change: dict) -> bool:
    """A new run, a new or removed datum, or a datum's status change."""
    op = change.get("operationType")
    if op in ("insert", "replace"):
        return True
    if op != "update":
        return False
    desc = change.get("updateDescription") or {}
    fields = list((desc.get("updatedFields") or {})) + list(desc.get("removedFields") or [])
    return any(_STATE_FIELD.search(f) for f in fields)


class Waker:
    def __init__(self, collection, enabled: bool, min_gap: float = 5.0):
        self.collection = collection
        self.enabled = enabled and hasattr(collection, "watch") and \
            type(collection).__module__.startswith("pymongo")
        self.min_gap = min_gap
        self.stream = None

    def _open(self):
        if self.stream is None:
            self.stream = self.collection.watch(max_await_time_ms=500)
        return self.stream

    def wait(self, stop: threading.Event, seconds: float) -> str:
        """Return 'stop', 'change' or 'timeout'."""
        if not self.enabled:
            return "stop" if stop.wait(seconds) else "timeout"
        from pymongo.errors import PyMongoError
        start = time.monotonic()
        deadline = start + seconds
        try:
            stream = self._open()
            while not stop.is_set() and time.monotonic() < deadline:
                change = stream.try_next()  # waits up to max_await_time_ms on the server
                if change is not None and interesting(change):
                    log.info("site=- woken by a Runs DB change (%s)", change.get("operationType"))
                    left = self.min_gap - (time.monotonic() - start)
                    if left > 0 and stop.wait(left):
                        return "stop"
                    return "change"
        except PyMongoError as e:
            log.warning("site=- change stream unavailable (%s); polling every %s s instead",
                        str(e).splitlines()[0][:200], seconds)
            self.enabled = False
            self.close()
            left = deadline - time.monotonic()
            return "stop" if stop.wait(max(left, 0)) else "timeout"
        return "stop" if stop.is_set() else "timeout"

    def close(self):
        if self.stream is not None:
            try:
                self.stream.close()
            except Exception:  # closing a broken stream: nothing left to save
                pass
            self.stream = None
