"""Coalescing live updates: at most ~30 per second, and redraws take at most ~5% of the time.

The budget is half the 10% a live view may cost, leaving room for the
per-token bookkeeping and the final redraw.
"""

from __future__ import annotations

import time

__all__ = ["Throttle"]

# Shipping an update (JSON, ZMQ, the kernel's IOPub thread) costs time the
# redraw itself does not see; measured here at roughly 50 ns per byte.
SEND_SECONDS_PER_BYTE = 50e-9


class Throttle:
    """Decide when a live view may redraw.

    A redraw is due when at least ``1 / max_rate`` seconds have passed since
    the last one started, and long enough that redrawing costs at most
    ``budget`` of the wall time (a redraw that took ``c`` seconds waits
    ``c / budget`` before the next one), so big outputs slow down their own
    refresh rate instead of the decode loop.

    Args:
        max_rate: Most redraws per second.
        budget: Largest fraction of time spent redrawing.
    """

    def __init__(self, max_rate: float = 30.0, budget: float = 0.05):
        if max_rate <= 0 or not 0 < budget <= 1:
            raise ValueError(f"expected max_rate > 0 and budget in (0, 1], got {max_rate!r}, {budget!r}")
        self.period = 1.0 / max_rate
        self.budget = budget
        self._next = 0.0
        self._start = 0.0
        self.redraws = 0

    def due(self) -> bool:
        """True when a redraw may start now (call ``begin``/``end`` around it)."""
        return time.perf_counter() >= self._next

    def begin(self) -> None:
        self._start = time.perf_counter()

    def end(self, sent_bytes: int = 0) -> None:
        """Close a redraw; ``sent_bytes`` charges the cost of shipping it to the frontend."""
        now = time.perf_counter()
        cost = now - self._start + sent_bytes * SEND_SECONDS_PER_BYTE
        self._next = self._start + max(self.period, cost / self.budget)
        self.redraws += 1

    def reset(self) -> None:
        self._next = 0.0
