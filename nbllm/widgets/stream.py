"""``StreamView``: live text of a token stream, each token coloured by probability."""

from __future__ import annotations

import html
from collections.abc import Iterable
from typing import Any

import ipywidgets as widgets
from traitlets import Bool, Int, Unicode, observe

from .. import render
from ..tokens import Completion, Stats, Token
from ._live import Throttle
from .progress import PrefillBar

__all__ = ["StreamView"]


class StreamView(widgets.VBox):
    """A live view of generated tokens.

    Feed it ``Token`` records (``feed``) or a whole stream (``consume``);
    redraws are coalesced (at most ``max_rate`` per second, and at most ~5%
    of the time). Hover or click a token to see its top alternatives
    (requires ``top_logprobs`` > 0 on the stream); grammar-forced tokens
    are underlined.

    Args:
        colored: Colour each token by its probability.
        boundaries: Outline each token.
        max_rate: Most redraws per second.
        **kwargs: Passed to ``ipywidgets.VBox``.
    """

    colored = Bool(True, help="colour tokens by probability").tag(sync=True)
    boundaries = Bool(False, help="outline token boundaries").tag(sync=True)
    n_tokens = Int(0, help="tokens received").tag(sync=True)
    status = Unicode("", help="'', 'prefill', 'generating', 'done', 'cancelled' or 'interrupted'").tag(sync=True)
    finish_reason = Unicode(None, allow_none=True).tag(sync=True)
    text = Unicode("", help="text so far (as of the last redraw)")

    def __init__(self, *, colored: bool = True, boundaries: bool = False, max_rate: float = 30.0, **kwargs: Any):
        self.tokens: list[Token] = []
        self.stats: Stats | None = None
        self._spans: list[str] = []
        self._chunks: list[str] = []
        self._throttle = Throttle(max_rate)
        self._progress = PrefillBar(max_rate=max_rate)
        self._html = widgets.HTML(render.tokens_html([]))
        self._foot = widgets.HTML("")
        super().__init__(
            children=[self._progress, self._html, self._foot], colored=colored, boundaries=boundaries, **kwargs
        )
        self.add_class("nbllm-stream-view")

    # -- feeding ---------------------------------------------------------------
    def feed(self, token: Token) -> None:
        """Add one token; the view redraws when an update is due."""
        self.tokens.append(token)
        self._chunks.append(token.text)
        if self._throttle.due():
            self.redraw()

    def progress(self, done: int, total: int) -> None:
        """Prompt-processing progress (a ``stream(progress=...)`` callback)."""
        if done < total:
            self.status = "prefill"
        self._progress(done, total)

    def consume(self, stream: Iterable[Token]) -> Completion:
        """Feed every token of ``stream`` and return its ``Completion``.

        Args:
            stream: A ``TokenStream`` or ``ChatReply`` (or any iterable of ``Token``).

        Returns:
            The stream's completion (``value`` parsed when it has a constraint).

        Raises:
            KeyboardInterrupt: re-raised after the view shows what arrived (the stream is closed).
        """
        self.status = "generating"
        try:
            for token in stream:
                self.feed(token)
        except BaseException as err:
            close = getattr(stream, "close", None)
            if close:
                close()
            self.finish(
                getattr(stream, "stats", None), "interrupted" if isinstance(err, KeyboardInterrupt) else "error"
            )
            raise
        stats = getattr(stream, "stats", None)
        self.finish(stats)
        completion = getattr(stream, "completion", None)
        return (
            completion()
            if completion is not None
            else Completion.from_tokens(self.tokens, Stats(generated_tokens=len(self.tokens)))
        )

    def finish(self, stats: Stats | None, reason: str | None = None) -> None:
        """Final redraw with the stats footer."""
        self.stats = stats
        self.finish_reason = reason or (self.tokens[-1].finish_reason if self.tokens else None)
        self.status = (
            reason
            if reason in ("interrupted", "error")
            else ("cancelled" if self.finish_reason == "cancelled" else "done")
        )
        self._progress.layout.display = "none"
        self.redraw()  # the last tokens before the footer that says generation ended
        self._foot.value = f"<div class='nbllm-foot'>{html.escape(_summary(stats, self.finish_reason))}</div>"

    def clear(self) -> None:
        """Forget all tokens."""
        self.tokens, self._spans, self._chunks = [], [], []
        self.stats, self.finish_reason, self.status = None, None, ""
        self._foot.value = ""
        self._throttle.reset()
        self.redraw()

    # -- drawing ---------------------------------------------------------------
    def redraw(self) -> None:
        """Render the tokens not drawn yet and push the view to the frontend."""
        self._throttle.begin()
        for token in self.tokens[len(self._spans) :]:
            self._spans.append(render.token_span(token, colored=self.colored, boundaries=self.boundaries))
        self._html.value = render.STYLE + "<div class='nbllm nbllm-stream'>" + "".join(self._spans) + "</div>"
        self.text = "".join(self._chunks)
        self.n_tokens = len(self.tokens)
        self._throttle.end(sent_bytes=len(self._html.value) + len(self.text))

    @observe("colored", "boundaries")
    def _restyle(self, change: Any) -> None:
        self._spans = []
        if hasattr(self, "_html"):
            self.redraw()

    def to_html(self) -> str:
        """Static HTML of the current state (browser tooltips, no CSS popups needed)."""
        return render.tokens_html(
            self.tokens,
            colored=self.colored,
            boundaries=self.boundaries,
            tooltips="title",
            footer=_summary(self.stats, self.finish_reason),
        )

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        data = super()._repr_mimebundle_(**kwargs) or {}
        data["text/plain"] = self.text or "".join(self._chunks) or "StreamView(no tokens yet)"
        data["text/html"] = self.to_html()
        return data


def _summary(stats: Stats | None, finish_reason: str | None) -> str:
    return stats.summary(finish_reason) if stats is not None else (f"finish: {finish_reason}" if finish_reason else "")
