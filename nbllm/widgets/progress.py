"""``PrefillBar``: a progress bar for the prompt, so a long prompt never looks hung."""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets

from ._live import Throttle

__all__ = ["PrefillBar"]


class PrefillBar(widgets.IntProgress):
    """An ``IntProgress`` that is a ``progress(done, total)`` callback for prefill.

    Shown while a prompt is being processed (redrawn at most ``max_rate`` times a
    second), hidden when it is done or when the prompt is short.

    Args:
        min_total: Prompts with fewer tokens to process show no bar.
        max_rate: Most redraws per second.
        **kwargs: Passed to ``ipywidgets.IntProgress``.
    """

    def __init__(self, *, min_total: int = 0, max_rate: float = 30.0, **kwargs: Any):
        kwargs.setdefault("description", "prompt")
        super().__init__(**kwargs)
        self.layout.display = "none"
        self.min_total = min_total
        self._throttle = Throttle(max_rate)

    def __call__(self, done: int, total: int) -> None:
        if done >= total or total < self.min_total:
            self.layout.display = "none"
            return
        if self._throttle.due():
            self._throttle.begin()
            self.max, self.value = max(total, 1), done
            self.layout.display = None
            self._throttle.end()
