"""A plain forward pass over a whole prompt through the model's engine, keeping every position's logits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx

from ..mlx_engine import generation_stream
from ..prompt import Prompt
from ..sdpa import cpu_prefill

__all__ = ["forward", "needs_local"]


def needs_local(lm: Any, what: str) -> Any:
    """``lm``'s engine if it runs the model in this process; else a clear error (a server shows only its outputs)."""
    engine = getattr(lm, "engine", None)
    if not hasattr(engine, "call") or not hasattr(engine, "make_layers"):
        raise ValueError(
            f"{what} needs a local MLX model (loaded with nbllm.load); {getattr(lm, 'name', lm)!r} runs elsewhere"
        )
    return engine


def forward(
    lm: Any, prompt: Prompt, chunk: int | None = None, each: Callable[[int, mx.array], None] | None = None
) -> mx.array:
    """Logits ``[positions, vocab]`` for every position of ``prompt`` (position ``i`` predicts token ``i + 1``).

    Args:
        lm: A local model.
        prompt: The encoded prompt (its image embeddings and mRoPE positions are fed as they are).
        chunk: Feed this many tokens at a time through a KV cache (``None``: all at once).
        each: ``each(start, logits)`` is called per chunk instead of keeping the logits (returns an empty array).
    """
    engine = needs_local(lm, "reading the model's internals")
    layers = engine.make_layers()
    engine.bind(layers, prompt)
    step = chunk or len(prompt)
    kept = []
    with mx.stream(generation_stream()), cpu_prefill():
        for start in range(0, len(prompt), step):
            ids = list(prompt.ids[start : start + step])
            emb = prompt.embeddings[start : start + len(ids)] if prompt.embeddings is not None else None
            logits = engine.call(ids, layers, emb)[0]
            if each is not None:
                each(start, logits)
            else:
                kept.append(logits)
            mx.eval([c.state for c in layers])
    return mx.concatenate(kept, axis=0) if kept else mx.zeros((0,))
