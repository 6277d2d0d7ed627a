"""``StepperWidget``: drive an ``nbllm.Stepper`` with buttons, one token at a time."""

from __future__ import annotations

import contextlib
import html
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets
from traitlets import Bool, Int, Unicode

from .. import render
from ._live import Throttle
from .distribution import DistributionView

if TYPE_CHECKING:
    from ..stepper import Stepper

__all__ = ["StepperWidget"]


class StepperWidget(widgets.VBox):
    """Buttons over a ``Stepper``: Next, Next ×N, Back, Reset, and the alternatives.

    Clicking an alternative takes that token instead of the sampled one (after
    Back, that is a branch). The text so far shows token boundaries, each token
    coloured by probability; the distribution below is the next position's,
    with sliders to explore how the sampler's filters would reshape it.

    Args:
        stepper: The stepper to drive (``nbllm.Stepper`` or ``lm.stepper(...)``).
        k: Alternatives offered as buttons.
        n: Initial value of the ×N box.
        **kwargs: Passed to ``ipywidgets.VBox``.
    """

    text = Unicode("", help="generated text so far").tag(sync=True)
    n_tokens = Int(0, help="generated tokens").tag(sync=True)
    done = Bool(False, help="generation has finished").tag(sync=True)
    status = Unicode("").tag(sync=True)

    def __init__(self, stepper: Stepper, *, k: int = 8, n: int = 10, **kwargs: Any):
        if not hasattr(stepper, "candidates") or not hasattr(stepper, "step"):
            raise TypeError(f"stepper: expected an nbllm.Stepper, got {type(stepper).__name__}")
        self.stepper = stepper
        self.next_button = widgets.Button(description="Next", button_style="primary", tooltip="sample one token")
        self.next_n_button = widgets.Button(description="Next ×N", tooltip="sample N tokens")
        self.n_box = widgets.BoundedIntText(value=n, min=1, max=10_000, layout=widgets.Layout(width="80px"))
        self.back_button = widgets.Button(description="Back", tooltip="undo the last token")
        self.reset_button = widgets.Button(description="Reset", tooltip="back to the prompt")
        self.progress = widgets.IntProgress(layout=widgets.Layout(display="none"))
        self._prompt = widgets.HTML()
        self.mode = widgets.ToggleButtons(
            options=["chat template", "raw continuation"],
            value=stepper.prompt_kind,
            tooltips=["the text as a user message, answered by the model", "the text continued as it is"],
            style={"button_width": "130px"},
        )
        switchable = stepper.source is not None and bool(getattr(stepper.lm.tokenizer, "has_chat_template", False))
        self.mode.layout.display = None if switchable else "none"
        self.mode.observe(lambda change: self._click(lambda: self._switch(change["new"])), "value")
        self._label = widgets.HTML()
        self._text = widgets.HTML()
        self.alternatives = [widgets.Button(layout=widgets.Layout(width="auto")) for _ in range(k)]
        for button in self.alternatives:
            button.on_click(lambda b: self._click(lambda: self._on_alternative(b)))
        params = stepper.params
        self.distribution = DistributionView(
            stepper.distribution,
            label=stepper.lm,
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=params.min_p,
            k=k,
        )
        controls = widgets.HBox(
            [self.next_button, self.next_n_button, self.n_box, self.back_button, self.reset_button, self.progress]
        )
        choices = widgets.HBox(
            [widgets.HTML("<b>choose next:</b>"), *self.alternatives], layout=widgets.Layout(flex_flow="row wrap")
        )
        super().__init__(
            children=[
                widgets.HBox([self.mode, self._prompt]),
                controls,
                self._label,
                self._text,
                choices,
                self.distribution,
            ],
            **kwargs,
        )
        self.add_class("nbllm-stepper")
        self.next_button.on_click(lambda _: self._click(self.next))
        self.next_n_button.on_click(lambda _: self._click(lambda: self.next_n(self.n_box.value)))
        self.back_button.on_click(lambda _: self._click(self.back))
        self.reset_button.on_click(lambda _: self._click(self.reset))
        self.redraw()

    # -- moves (an error shows in the status line and is raised; a click only shows it) --
    def _click(self, move: Any) -> None:
        with contextlib.suppress(Exception):  # a click has no cell to raise into: the status line shows it
            move()

    def next(self) -> None:
        """Sample one token."""
        self._guard(self.stepper.step)

    def next_n(self, n: int) -> None:
        """Sample up to ``n`` tokens (stops at the end), showing progress."""
        throttle = Throttle()
        self.progress.max, self.progress.value, self.progress.layout.display = n, 0, None
        try:
            for i in range(n):
                if self.stepper.done:
                    break
                self._guard(self.stepper.step, redraw=False)
                if throttle.due():
                    throttle.begin()
                    self.progress.value = i + 1
                    self.redraw()
                    throttle.end()
        finally:
            self.progress.layout.display = "none"
            self.redraw()

    def back(self, n: int = 1) -> None:
        """Undo the last ``n`` tokens."""
        self._guard(lambda: self.stepper.back(min(n, len(self.stepper.tokens))))

    def reset(self) -> None:
        """Back to the prompt."""
        self._guard(self.stepper.reset)

    def choose(self, token: int | str) -> None:
        """Take ``token`` (an id, or text: several tokens are taken one after another, and the status says so)."""
        before = len(self.stepper.tokens)
        self._guard(lambda: self.stepper.choose(token))
        taken = self.stepper.tokens[before:]
        if len(taken) > 1:
            self.status = f"took {token!r} as {len(taken)} tokens: " + " ".join(repr(t.piece) for t in taken)
            self.redraw()

    def _switch(self, kind: str) -> None:
        """Start again on the same text with the chat template or as a raw continuation."""
        if kind != self.stepper.prompt_kind:
            self._guard(lambda: setattr(self, "stepper", self.stepper.reprompt(raw=kind == "raw continuation")))

    def branch(self) -> StepperWidget:
        """A new widget over an independent copy of the stepper."""
        return StepperWidget(self.stepper.branch(), k=len(self.alternatives), n=self.n_box.value)

    def _on_alternative(self, button: widgets.Button) -> None:
        token_id = getattr(button, "token_id", None)
        if token_id is not None:
            self.choose(token_id)

    def _guard(self, move: Any, redraw: bool = True) -> None:
        try:
            move()
        except Exception as err:
            user = isinstance(err, (ValueError, RuntimeError))  # a bad move says so; anything else names its type
            self.status = str(err) if user else f"{type(err).__name__}: {err}"
            if redraw:
                self.redraw()
            raise
        self.status = ""
        if redraw:
            self.redraw()

    # -- drawing -----------------------------------------------------------------
    def redraw(self) -> None:
        """Show the stepper's current state."""
        s = self.stepper
        self.text, self.n_tokens, self.done = s.text, len(s.tokens), s.done
        self._prompt.value = render.prompt_html(s.prompt_kind, s.lm.decode(s.prompt.ids))
        if self.mode.value != s.prompt_kind:
            self.mode.value = s.prompt_kind
        self._text.value = render.tokens_html(s.tokens, colored=True, boundaries=True)
        finish = f" · finish: {s.finish_reason}" if s.done else ""
        error = f" · <span style='color:#c00'>{html.escape(self.status)}</span>" if self.status else ""
        self._label.value = f"<span class='nbllm-foot'>prompt {len(s.prompt_ids)} tokens · generated {len(s.tokens)}{finish}</span>{error}"
        for button in (self.next_button, self.next_n_button):
            button.disabled = s.done
        self.back_button.disabled = self.reset_button.disabled = not s.tokens
        candidates = () if s.done else s.candidates(len(self.alternatives))
        for i, button in enumerate(self.alternatives):
            if i < len(candidates):
                alt = candidates[i]
                button.token_id = alt.id
                button.description = f"{alt.piece!r} {alt.prob:.1%}"
                button.tooltip = f"token {alt.id}" + (
                    f" · sampler {alt.sampled_prob:.1%}" if alt.sampled_prob is not None else ""
                )
                button.layout.display = None
            else:
                button.token_id = None
                button.layout.display = "none"
        last = s.tokens[-1].id if s.tokens and s.done else None
        self.distribution.set_logprobs(s.distribution, chosen=last)

    def to_html(self) -> str:
        """Static HTML of the current state."""
        shaped = self.distribution.shaped
        dist = render.distribution_html(shaped, style=False) if shaped else ""
        prompt = render.prompt_html(self.stepper.prompt_kind, self.stepper.lm.decode(self.stepper.prompt.ids))
        return prompt + render.tokens_html(self.stepper.tokens, colored=True, boundaries=True, tooltips="title") + dist

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        data = super()._repr_mimebundle_(**kwargs) or {}
        data["text/plain"] = f"StepperWidget({len(self.stepper.tokens)} tokens: {self.stepper.text!r})"
        data["text/html"] = self.to_html()
        return data
