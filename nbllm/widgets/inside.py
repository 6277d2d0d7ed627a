"""Views of the inside-the-model records: logit lens, attention, surprise, comparison.

Each holds its record and redraws through ``nbllm.render_inside`` when a
control changes; nothing here runs the model. Each has an HTML fallback for
frontends without widgets and a ``figure()`` for static reports.
"""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets

from .. import render_inside

__all__ = ["LogitLensView", "AttentionView", "SurpriseView", "CompareView"]


class _Static(widgets.VBox):
    """A view whose whole picture is one HTML block."""

    def _html(self) -> str:
        raise NotImplementedError

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        data = super()._repr_mimebundle_(**kwargs) or {}
        data["text/html"] = self._html()
        data["text/plain"] = f"{type(self).__name__}()"
        return data


class LogitLensView(_Static):
    """Layers by positions; each cell shows what that layer predicts there (hover for its top tokens).

    Args:
        lens: From ``lm.logit_lens(prompt)``.
        by: Colour by ``"prob"`` (of the token the full model predicts) or ``"entropy"``.
    """

    def __init__(self, lens: Any, *, by: str = "prob", **kwargs: Any):
        self.lens = lens
        self.colour = widgets.ToggleButtons(options=[("P(final token)", "prob"), ("entropy", "entropy")], value=by)
        self.chart = widgets.HTML()
        super().__init__(children=[self.colour, self.chart], **kwargs)
        self.add_class("nbllm-lens-view")
        self.colour.observe(lambda _: self.redraw(), "value")
        self.redraw()

    def redraw(self) -> None:
        self.chart.value = self._html()

    def _html(self) -> str:
        return render_inside.lens_html(self.lens, by=self.colour.value)

    def figure(self) -> Any:
        return self.lens.figure(by=self.colour.value)


class AttentionView(_Static):
    """Where each position looks: pick a layer and a head (or the heads' mean or max).

    Args:
        amap: From ``lm.attention(prompt)``.
        layer: Initial layer (default the last).
        lines: Draw token-to-token lines for weights at or above this.
    """

    def __init__(self, amap: Any, *, layer: int = -1, lines: float = 0.1, **kwargs: Any):
        self.amap, self.lines = amap, lines
        self.layer = widgets.Dropdown(
            options=list(range(amap.n_layers)), value=layer % amap.n_layers, description="layer"
        )
        heads = [("mean of heads", "mean"), ("max of heads", "max")] + [(f"head {h}", h) for h in range(amap.n_heads)]
        self.head = widgets.Dropdown(options=heads, value="mean", description="heads")
        self.chart = widgets.HTML()
        super().__init__(children=[widgets.HBox([self.layer, self.head]), self.chart], **kwargs)
        self.add_class("nbllm-attention-view")
        for control in (self.layer, self.head):
            control.observe(lambda _: self.redraw(), "value")
        self.redraw()

    def _pick(self) -> tuple[int | None, str]:
        value = self.head.value
        return (None, value) if isinstance(value, str) else (int(value), "mean")

    def redraw(self) -> None:
        self.chart.value = self._html()

    def _html(self) -> str:
        head, how = self._pick()
        return render_inside.attention_html(self.amap, layer=self.layer.value, head=head, how=how, lines=self.lines)

    def figure(self) -> Any:
        head, how = self._pick()
        return self.amap.figure(layer=self.layer.value, head=head, how=how)


class SurpriseView(_Static):
    """A scored text coloured by how likely the model found each token (red = surprising)."""

    def __init__(self, scored: Any, **kwargs: Any):
        self.scored = scored
        super().__init__(children=[widgets.HTML(self._html())], **kwargs)
        self.add_class("nbllm-surprise-view")

    def _html(self) -> str:
        return render_inside.surprise_html(self.scored)

    def figure(self) -> Any:
        return render_inside.surprise_figure(self.scored)


class CompareView(_Static):
    """Two runs side by side, the first difference marked, each token coloured by the other side's probability."""

    def __init__(self, comparison: Any, **kwargs: Any):
        self.comparison = comparison
        super().__init__(children=[widgets.HTML(self._html())], **kwargs)
        self.add_class("nbllm-compare-view")

    def _html(self) -> str:
        return render_inside.compare_html(self.comparison)

    def figure(self) -> Any:
        return self.comparison.figure()
