"""Prefill progress as a ``tqdm`` bar, for callers that pass ``progress=True`` outside a live view."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["progress_bar"]


def progress_bar(desc: str = "prefill", min_total: int = 0) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback drawing a ``tqdm.auto`` bar labelled ``desc``.

    One bar per prefill; prefills shorter than ``min_total`` tokens draw nothing.
    """
    state: dict[str, Any] = {"bar": None}

    def report(done: int, total: int) -> None:
        from tqdm.auto import tqdm

        bar = state["bar"]
        if bar is None:
            if total < max(min_total, 1) or done >= total:
                return
            bar = state["bar"] = tqdm(total=total, desc=desc, unit="tok", leave=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return report
