"""``DistributionView``: the next-token distribution, reshaped live by sampler sliders."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ipywidgets as widgets
import numpy as np
from traitlets import Float, Int, observe, validate

from .. import render
from ..decode import piece_of
from ..distribution import Distribution, as_numpy
from ..filters import Shaped, shape_distribution, shape_known
from ..sampling import SamplingParams

__all__ = ["DistributionView"]


class DistributionView(widgets.VBox):
    """Bar chart of a next-token distribution with temperature/top-k/top-p/min-p sliders.

    Moving a slider re-applies the sampler's filters to the stored vector with
    numpy (no model call) and shows which tokens survive each filter, in
    mlx-lm's order: top-p, min-p, top-k, then temperature.

    Args:
        logprobs: Model log-probabilities, shape ``(vocab,)`` (numpy or mlx), or a
            ``Distribution`` (one that knows only its top entries, from a server,
            is drawn with its rest as unknown but bounded; see ``filters.shape_known``).
        label: Token id to text; or an ``LM`` (its tokenizer is used).
        temperature: Initial temperature (0 = greedy).
        top_k: Initial top-k (0 = off).
        top_p: Initial top-p (1 = off).
        min_p: Initial min-p (0 = off).
        k: Rows shown.
        prompt: The ``Prompt`` this distribution follows (shown above the chart: chat
            template or raw continuation, the rendered text a click away); needs an ``LM`` label.
        **kwargs: Passed to ``ipywidgets.VBox``.
    """

    temperature = Float(1.0, help="0 = greedy").tag(sync=True)
    top_k = Int(0, help="0 = off").tag(sync=True)
    top_p = Float(1.0, help="1 = off").tag(sync=True)
    min_p = Float(0.0, help="0 = off").tag(sync=True)
    k = Int(10, help="rows shown").tag(sync=True)
    survivors = Int(0, help="tokens that can still be sampled").tag(sync=True)

    def __init__(
        self,
        logprobs: Any,
        *,
        label: Callable[[int], str] | Any = str,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        k: int = 10,
        prompt: Any = None,
        **kwargs: Any,
    ):
        self._label = _labeler(label)
        self._logprobs, self._top = _vector_or_top(logprobs)
        self.shaped: Shaped | None = None
        self.chosen: int | None = None
        vocab = len(self._top) if self._logprobs is None else self._logprobs.shape[0]
        style = {"description_width": "90px"}
        top_k_max = min(vocab, 200)
        self.sliders = {
            "temperature": widgets.FloatSlider(
                min(max(temperature, 0.0), 2.0), min=0.0, max=2.0, step=0.05, description="temperature", style=style
            ),
            "top_p": widgets.FloatSlider(
                min(max(top_p, 0.01), 1.0), min=0.01, max=1.0, step=0.01, description="top-p", style=style
            ),
            "min_p": widgets.FloatSlider(
                min(max(min_p, 0.0), 1.0), min=0.0, max=1.0, step=0.01, description="min-p", style=style
            ),
            "top_k": widgets.IntSlider(
                min(max(top_k, 0), top_k_max), min=0, max=top_k_max, description="top-k", style=style
            ),
        }
        super().__init__(**kwargs)
        self.k = k
        for name, slider in self.sliders.items():
            widgets.link((slider, "value"), (self, name))
        self._chart = widgets.HTML()
        self._note = widgets.HTML()
        head = [widgets.HTML(_prompt_html(prompt, label))] if prompt is not None else []
        self.children = [*head, self._note, *self.sliders.values(), self._chart]
        self.add_class("nbllm-distribution")
        self.redraw()

    @validate("temperature")
    def _valid_temperature(self, proposal: Any) -> float:
        return min(max(float(proposal["value"]), 0.0), 2.0)

    @validate("top_p")
    def _valid_top_p(self, proposal: Any) -> float:
        return min(max(float(proposal["value"]), 0.01), 1.0)

    @validate("min_p")
    def _valid_min_p(self, proposal: Any) -> float:
        return min(max(float(proposal["value"]), 0.0), 1.0)

    @validate("top_k")
    def _valid_top_k(self, proposal: Any) -> int:
        return min(max(int(proposal["value"]), 0), self.sliders["top_k"].max if hasattr(self, "sliders") else 10**9)

    @property
    def logprobs(self) -> np.ndarray | None:
        """The stored distribution (numpy, float32); ``None`` when only its top entries are known."""
        return self._logprobs

    def set_logprobs(self, logprobs: Any, chosen: int | None = None) -> None:
        """Show a new distribution (e.g. the stepper's next position): a vector or a ``Distribution``."""
        self._logprobs, self._top = _vector_or_top(logprobs)
        self.chosen = chosen
        self.redraw()

    @observe("temperature", "top_k", "top_p", "min_p", "k")
    def _settings_changed(self, change: Any) -> None:
        if hasattr(self, "_chart"):
            self.redraw()

    def redraw(self) -> None:
        """Recompute the survivors from the stored vector and redraw the chart."""
        params = SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p)
        if self._logprobs is None:
            self.shaped = shape_known(self._top, params, k=self.k, label=self._label)
            self._note.value = (
                f"<i>the server returned only its top {len(self._top)} tokens: the sliders reshape those, "
                "the rest stays unknown</i>"
            )
        else:
            self.shaped = shape_distribution(self._logprobs, params, k=self.k, label=self._label)
            self._note.value = ""
        self.survivors = self.shaped.survivors
        self._chart.value = render.distribution_html(self.shaped, chosen=self.chosen)

    def figure(self) -> Any:
        """The current chart as a matplotlib ``Figure``."""
        assert self.shaped is not None
        return render.distribution_figure(self.shaped)

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        data = super()._repr_mimebundle_(**kwargs) or {}
        s = self.shaped
        data["text/plain"] = (
            f"DistributionView({s.survivors} of {s.vocab_size} tokens survive)" if s else "DistributionView()"
        )
        data["text/html"] = self._chart.value
        return data


def _vector_or_top(logprobs: Any) -> tuple[np.ndarray | None, list[tuple[int, float]]]:
    """A full vector as numpy, or (``None``, the known top entries) for a top-k-only distribution."""
    if isinstance(logprobs, Distribution):
        if logprobs.full:
            return logprobs.numpy(), []
        top = logprobs.top(10**6)
        if not top:
            raise ValueError("the server returned no alternatives for this position; nothing to draw")
        return None, top
    return as_numpy(logprobs), []


def _labeler(label: Any) -> Callable[[int], str]:
    if callable(label):
        return label
    tokenizer, pieces = getattr(label, "tokenizer", None), getattr(label, "pieces", None)
    if tokenizer is None:
        raise TypeError(f"label: expected a callable id -> text or an LM, got {type(label).__name__}")
    return lambda i: piece_of(tokenizer, i, pieces if pieces is not None else {})


def _prompt_html(prompt: Any, lm: Any) -> str:
    if not hasattr(lm, "decode"):
        raise TypeError("prompt: showing the prompt needs label=lm (an LM, to decode it)")
    return render.prompt_html("chat template" if prompt.chat else "raw continuation", lm.decode(prompt.ids))
