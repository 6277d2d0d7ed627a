"""Speculative decoding over mlx-lm's ``speculative_generate_step``, with each token's part in it named.

A small draft model proposes ``num_draft_tokens`` tokens; the model checks them
in one forward pass and keeps the ones it agrees with, then adds its own. With
greedy sampling the output is exactly the model's own greedy output: the draft
only changes how many model passes it takes. mlx-lm yields each token and
whether the draft proposed it; this module also says, for the model's own
tokens, whether they replaced a rejected proposal, and counts both.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import mlx.core as mx

__all__ = ["DraftCounts", "speculative_steps"]


@dataclass
class DraftCounts:
    """Running totals: draft tokens proposed and accepted, model passes (rounds)."""

    proposed: int = 0
    accepted: int = 0
    rounds: int = 0


def speculative_steps(
    model: Any,
    draft: Any,
    feed: list[int],
    prefix: list[int],
    layers: list[Any],
    *,
    num_draft_tokens: int,
    max_tokens: int,
    sampler: Any,
    processors: list[Any] | None,
    prefill_step_size: int,
    counts: DraftCounts,
) -> Iterator[tuple[int, mx.array, bool, bool | None]]:
    """``(token, logprobs, from_draft, accepted)`` per token.

    Args:
        model: The model (its cache ``layers`` already hold ``prefix``).
        draft: The draft model's engine (``make_layers``, ``call``); its own cache
            is fed ``prefix`` first, so both models see the whole prompt.
        feed: The prompt tokens after the cached prefix.
    """
    from mlx_lm.generate import generation_stream, speculative_generate_step

    draft_layers = draft.make_layers()
    with mx.stream(generation_stream):
        for start in range(0, len(prefix), prefill_step_size):
            draft.call(prefix[start : start + prefill_step_size], draft_layers)
            mx.eval([c.state for c in draft_layers])
    steps = speculative_generate_step(
        mx.array(feed),
        model,
        draft.model,
        num_draft_tokens=num_draft_tokens,
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=processors,
        prompt_cache=layers + draft_layers,
        prefill_step_size=prefill_step_size,
    )
    # A round: the draft proposes min(left, num_draft_tokens) tokens, the model keeps k of them
    # (yielded with from_draft) and adds one of its own: a replacement if k fell short, else a bonus.
    in_round, kept, proposed, done = False, 0, 0, 0
    try:
        for token, logprobs, from_draft in steps:
            if not in_round:
                in_round, kept = True, 0
                proposed = min(max_tokens - done, num_draft_tokens)
                counts.rounds += 1
                counts.proposed += proposed
            accepted: bool | None
            if from_draft:
                kept += 1
                counts.accepted += 1
                accepted = True
            else:
                accepted = None if kept == proposed else False
                in_round = False
            done += 1
            yield int(cast(int, token)), logprobs, bool(from_draft), accepted
    finally:
        steps.close()
