"""``TrainingView``: fine-tuning in a notebook, with the losses drawn as it trains, tokens/s, and a Stop button.

A running cell cannot receive clicks, so under this view training runs on a
worker thread (on that thread's own MLX stream, as mlx-lm's generation stream
is per thread, which Metal needs) and the cell returns at once; the
``FineTune`` it returns waits for the end when its ``.lm`` is read. Stop sets
the run's flag, which ends it after the current step with the adapters so far.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets
from traitlets import Float, Int, Unicode

from .. import render_training
from ._live import Throttle

# A step's report (nbllm.adapt.finetune.Report), passed on as it is.
Report = Any

__all__ = ["TrainingView"]


class TrainingView(widgets.VBox):
    """Loss curves, a status line (step, losses, tokens/s) and Stop, over one ``finetune`` run.

    Args:
        result: The run's ``FineTune`` (filled in as it trains).
        run: ``run(on_report)`` trains to the end into ``result`` (``nbllm.finetune(..., view="widget")``
            makes both).
        max_rate: Most redraws per second.
    """

    step = Int(0).tag(sync=True)
    steps = Int(0).tag(sync=True)
    train_loss = Float(None, allow_none=True).tag(sync=True)
    val_loss = Float(None, allow_none=True).tag(sync=True)
    tokens_per_second = Float(0.0).tag(sync=True)
    state = Unicode("ready", help="ready, training, stopping…, done, stopped, interrupted or error").tag(sync=True)

    def __init__(
        self, result: Any, run: Callable[[Callable[[Report], None]], Any], *, max_rate: float = 10.0, **kwargs: Any
    ):
        self.result = result
        self._train = run
        self.steps = result.planned
        self.chart = widgets.HTML()
        self.line = widgets.HTML()
        self.stop_button = widgets.Button(description="Stop", button_style="danger", icon="stop", disabled=True)
        self.stop_button.on_click(lambda _: self.stop())
        super().__init__(children=[self.chart, widgets.HBox([self.stop_button, self.line])], **kwargs)
        self.add_class("nbllm-training-view")
        self._throttle = Throttle(max_rate)
        self.thread: threading.Thread | None = None
        self.redraw()

    def start(self, on_report: Callable[[Report], None] | None = None, *, show: bool = True) -> Any:
        """Start training on a worker thread (and display the view); returns the run's ``FineTune``."""
        if self.thread is not None:
            raise RuntimeError("start: this view has already trained; make a new one")
        self.state = "training"
        self.stop_button.disabled = False
        self.thread = threading.Thread(target=self._run, args=(on_report,), daemon=True, name="nbllm-finetune")
        if show:
            from IPython.display import display

            display(self)
        self.thread.start()
        return self.result

    def stop(self) -> None:
        """End training after the current step, keeping the adapters so far."""
        if self.state == "training":
            self.state = "stopping…"
            self.redraw()
        self.result.stop()

    def _run(self, on_report: Callable[[Report], None] | None) -> None:
        def report(r: Report) -> None:
            self._on_report(r)
            if on_report is not None:
                on_report(r)

        try:
            self._train(report)
            self.state = self.result.stopped or "done"
        except BaseException as err:  # kept on the result (wait() raises it); shown here
            self.state = f"error: {type(err).__name__}: {err}"
        finally:
            if self.result.losses.validation:  # the last one is measured after the last step
                self.val_loss = self.result.losses.validation[-1][1]
            self.stop_button.disabled = True
            self.redraw()

    def _on_report(self, r: Report) -> None:
        self.step, self.train_loss, self.tokens_per_second = r.step, r.train_loss, r.tokens_per_second
        if r.val_loss is not None:
            self.val_loss = r.val_loss
        if self._throttle.due():
            self._throttle.begin()
            self.redraw()
            self._throttle.end(len(self.chart.value))

    def redraw(self) -> None:
        """Draw the losses so far and the status line."""
        losses = self.result.losses
        self.chart.value = render_training.losses_svg(list(losses.train), list(losses.validation), self.steps)
        self.line.value = render_training.training_line(
            self.step, self.steps, self.train_loss, self.val_loss, self.tokens_per_second, self.state
        )

    def figure(self) -> Any:
        return self.result.losses.figure()

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        data = super()._repr_mimebundle_(**kwargs) or {}
        data["text/plain"] = repr(self.result)
        data["text/html"] = self.chart.value + self.line.value
        return data
