"""``TextView``: a token stream as plain text, for terminals and frontends without widgets.

The same interface as ``StreamView`` (``progress``, ``consume``), so the
magics route a stream to either without knowing which: text is written as it
comes (flushed at most ``max_rate`` times a second), then the stats line, and
with ``probs`` a table of the tokens with their probabilities.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TextIO

from .. import render
from ..tokens import Completion, Stats, Token
from ._live import Throttle

__all__ = ["TextView", "TokenTable"]


class TokenTable:
    """Tokens with probabilities: HTML where a frontend renders it, a text table elsewhere."""

    def __init__(self, tokens: list[Token]):
        self.tokens = tokens

    def _repr_html_(self) -> str:
        return render.tokens_html(self.tokens, colored=True, tooltips="title")

    def __repr__(self) -> str:
        return render.tokens_table(self.tokens)


class TextView:
    """Write a stream's text to ``out`` as it arrives; stats and (with ``probs``) a token table at the end.

    Args:
        probs: Show the token table afterwards.
        stats: Write the stats line.
        max_rate: Most flushes per second.
        out: Where to write (default ``sys.stdout`` at write time).
    """

    def __init__(self, *, probs: bool = False, stats: bool = True, max_rate: float = 30.0, out: TextIO | None = None):
        from ..progress import progress_bar

        self.probs, self.show_stats, self._out = probs, stats, out
        self.tokens: list[Token] = []
        self._throttle = Throttle(max_rate)
        self._bar = progress_bar(desc="prompt", min_total=256)

    @property
    def out(self) -> TextIO:
        return self._out or sys.stdout

    def progress(self, done: int, total: int) -> None:
        """Prompt-processing progress: a tqdm bar for prompts of 256 tokens or more."""
        self._bar(done, total)

    def consume(self, stream: Iterable[Token]) -> Completion:
        """Write every token of ``stream`` and return its ``Completion`` (see ``StreamView.consume``)."""
        out = self.out
        try:
            for token in stream:
                self.tokens.append(token)
                out.write(token.text)
                if self._throttle.due():  # terminals buffer by line: show tokens as they come
                    self._throttle.begin()
                    out.flush()
                    self._throttle.end()
        except BaseException:
            close = getattr(stream, "close", None)
            if close:
                close()
            out.write("\n")
            raise
        out.write("\n")
        stats = getattr(stream, "stats", None)
        finish = getattr(stream, "finish_reason", None)
        if self.show_stats and stats is not None:
            out.write(f"[{stats.summary(finish)}]\n")
        out.flush()
        if self.probs:
            from IPython.display import display

            display(TokenTable(self.tokens))
        completion = getattr(stream, "completion", None)
        return completion() if completion is not None else Completion.from_tokens(self.tokens, stats or Stats())
