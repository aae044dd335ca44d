"""Progress display for copies: a bar per copy on a terminal, nothing extra under cron.

Under cron (no TTY) the copy tasks log one line at the start and one at the end of each copy with
size, seconds and MB/s; bars would only fill the mail with carriage returns.
"""
from __future__ import annotations

import sys
import threading

_slots = threading.Lock()
_used: set = set()


class Bar:
    """A tqdm bar on its own terminal line while a copy runs (several copies run at once)."""

    def __init__(self, desc: str, total: int | None):
        from tqdm import tqdm
        with _slots:
            self.slot = next(i for i in range(len(_used) + 1) if i not in _used)
            _used.add(self.slot)
        self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                        position=self.slot, leave=False, file=sys.stderr, dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()
        with _slots:
            _used.discard(self.slot)


def wanted() -> bool:
    return sys.stderr.isatty()
