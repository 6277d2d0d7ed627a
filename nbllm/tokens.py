"""The records every part of nbllm consumes: ``Token``, ``Alternative``, ``Stats``, ``Completion``."""

from __future__ import annotations

import html
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Alternative", "Token", "Stats", "TurnStats", "Completion"]


@dataclass(frozen=True)
class Alternative:
    """One candidate for a position.

    Attributes:
        id: Token id.
        piece: The token's own text.
        logprob: Log-probability under the model (after logits processors).
        sampled_prob: Probability under the distribution actually sampled from
            (after top-p/min-p/top-k and temperature); ``None`` when not computed.
    """

    id: int
    piece: str
    logprob: float
    sampled_prob: float | None = None

    @property
    def prob(self) -> float:
        """Probability under the model."""
        return math.exp(self.logprob)


@dataclass(frozen=True)
class Token:
    """One generated token, as streamed.

    Attributes:
        id: Token id.
        text: The text this token adds to the output (streaming detokenizer:
            may be empty while a multi-byte character or a possible stop string
            is pending, and may hold text of earlier tokens when it is released).
        piece: The token's own text, decoded alone.
        logprob: Log-probability under the model (after logits processors).
        index: Position in the generated sequence, from 0.
        top: The ``top_logprobs`` most likely alternatives, most likely first.
        sampled_prob: Probability of this token under the sampler actually used.
        forced: True when a constraint allowed only this token.
        special: True for the end-of-sequence token (never part of ``text``).
        finish_reason: ``None`` except on the last record: ``stop`` (EOS or a
            finished constraint), ``length``, ``stop_string`` or ``cancelled``.
        masked_prob: With a constraint, the model probability the mask removed
            at this step (0 = the model only wanted allowed tokens); else ``None``.
        rank: For a scored text (``lm.score``): the token's rank under the model
            (0 = its top choice); else ``None``.
        entropy: For a scored text: entropy of the model's distribution at this position, in nats.
        from_draft: In speculative decoding, the draft model proposed this token and the model accepted it.
        accepted: In speculative decoding, whether the draft's proposal at this
            position was accepted (``False``: this token replaced a rejected one;
            ``None``: the draft proposed nothing here).
    """

    id: int
    text: str
    piece: str
    logprob: float
    index: int = 0
    top: tuple[Alternative, ...] = ()
    sampled_prob: float | None = None
    forced: bool = False
    special: bool = False
    finish_reason: str | None = None
    masked_prob: float | None = None
    rank: int | None = None
    entropy: float | None = None
    from_draft: bool = False
    accepted: bool | None = None

    @property
    def prob(self) -> float:
        """Probability under the model."""
        return math.exp(self.logprob)


@dataclass
class Stats:
    """Timing and size figures for one generation.

    Attributes:
        prompt_tokens: Tokens in the prompt.
        cached_tokens: Prompt tokens reused from a cache (not processed again).
        generated_tokens: Tokens generated (the final EOS included).
        time_to_first_token: Seconds from the call to the first token.
        prompt_tps: Prompt tokens processed per second.
        generation_tps: Generated tokens per second after the first.
        peak_memory_gb: Peak MLX memory in GB.
        draft_proposed: Speculative decoding: tokens the draft proposed.
        draft_accepted: Speculative decoding: of them, the ones the model kept.
        draft_rounds: Speculative decoding: model passes (each checks one round of proposals).
    """

    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    time_to_first_token: float = 0.0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0
    draft_proposed: int = 0
    draft_accepted: int = 0
    draft_rounds: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        """Share of the draft's proposals the model kept (``None`` without a draft)."""
        return self.draft_accepted / self.draft_proposed if self.draft_proposed else None

    @property
    def tokens_per_pass(self) -> float | None:
        """Tokens per model forward pass with a draft (1.0 without one: the speed-up's upper bound)."""
        return self.generated_tokens / self.draft_rounds if self.draft_rounds else None

    def summary(self, finish_reason: str | None = None) -> str:
        """One line for a footer, e.g. ``12 prompt tokens · first token 40 ms · ... · finish: stop``.

        The one formatter of these figures: views, magics and the CLI all use it.
        """
        parts = []
        if self.generated_tokens or self.prompt_tokens:
            reused = f", {self.cached_tokens} cached" if self.cached_tokens else ""
            parts.append(f"{self.prompt_tokens} prompt tokens{reused}")
            parts.append(f"first token {self.time_to_first_token * 1000:.0f} ms")
            parts.append(f"{self.prompt_tps:.1f} prompt tok/s")
            parts.append(f"{self.generated_tokens} tokens at {self.generation_tps:.1f} tok/s")
        parts += self._extra()
        if finish_reason:
            parts.append(f"finish: {finish_reason}")
        return " · ".join(parts)

    def _extra(self) -> list[str]:
        if self.acceptance_rate is None:
            return []
        return [f"draft {self.acceptance_rate:.0%} accepted, {self.tokens_per_pass:.2f} tokens per pass"]


@dataclass
class TurnStats(Stats):
    """``Stats`` of one chat reply plus how much of the earlier conversation was reused.

    Attributes:
        context_tokens: Tokens the cache held before the turn.
        reuse_rate: ``cached_tokens / context_tokens`` (``None`` on a first turn).
        finish_reason: How the reply ended.
        dropped_messages: Oldest messages left out of this turn's prompt because
            the history outgrew the model's context (or ``max_kv_size``).
    """

    context_tokens: int = 0
    reuse_rate: float | None = None
    finish_reason: str | None = None
    dropped_messages: int = 0

    def _extra(self) -> list[str]:
        out = super()._extra()
        if self.reuse_rate is not None:
            out.append(f"reused {self.reuse_rate:.0%} of {self.context_tokens} context tokens")
        if self.dropped_messages:
            out.append(f"{self.dropped_messages} oldest messages dropped to fit the context")
        return out


@dataclass
class Completion:
    """A finished generation: the text, every token record, and stats.

    Attributes:
        text: The generated text (stop strings and EOS excluded).
        tokens: The token records as streamed (a final EOS record included).
        stats: Timing figures.
        value: The parsed value when a structured-output constraint was given.
        ended: How the stream ended when no token says so (e.g. cancelled during prefill).
    """

    text: str
    tokens: list[Token]
    stats: Stats = field(default_factory=Stats)
    value: Any = None
    ended: str | None = None

    @property
    def finish_reason(self) -> str | None:
        """How generation ended: the last token's reason (or ``cancelled`` before any token)."""
        last = self.tokens[-1].finish_reason if self.tokens else None
        return last or self.ended

    @classmethod
    def from_tokens(cls, tokens: Iterable[Token], stats: Stats, ended: str | None = None) -> Completion:
        toks = list(tokens)
        return cls(text="".join(t.text for t in toks), tokens=toks, stats=stats, ended=ended)

    def __str__(self) -> str:
        return self.text

    def _repr_html_(self) -> str:
        return (
            f"<div style='white-space:pre-wrap'>{html.escape(self.text)}</div>"
            f"<div style='color:#888;font-size:smaller'>{html.escape(self.stats.summary(self.finish_reason))}</div>"
        )
