"""mlx-vlm's language model behind mlx-lm's ``model(ids, cache=, input_embeddings=)`` call.

mlx-lm's ``generate_step`` (and nbllm's stepper) call the model with token
ids, the KV cache and, during prefill, precomputed input embeddings. mlx-vlm's
language models take ``inputs_embeds=`` and return an output record; Qwen-VL
models also need mRoPE position ids, which for image tokens are 2D grid
positions rather than the cache offset. ``LanguageAdapter`` bridges the two.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn

__all__ = ["LanguageAdapter", "image_token_ids", "int_list", "PLAN_BOOK_SIZE"]

PLAN_BOOK_SIZE = 8


@dataclass
class _Plan:
    """mRoPE positions of one prepared prompt, found again from its embeddings."""

    key: int
    ids: list[int]
    embeddings: mx.array  # (P, hidden)
    positions: mx.array  # (3, P)
    delta: int  # position - index for every token after the last image

    def window(self, start: int, n: int) -> mx.array:
        stop = min(start + n, len(self.ids))
        parts = [self.positions[:, start:stop]] if stop > start else []
        if start + n > stop:
            tail = mx.arange(max(start, stop), start + n) + self.delta
            parts.append(mx.broadcast_to(tail[None], (3, tail.shape[0])))
        return mx.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]


class LanguageAdapter(nn.Module):
    """mlx-vlm's language model behind mlx-lm's ``model(ids, cache=, input_embeddings=)``."""

    def __init__(self, vlm: nn.Module):
        super().__init__()
        self.vlm = vlm
        lm = vlm.language_model
        self.uses_mrope = callable(getattr(lm, "get_rope_index", None))
        self.image_ids = image_token_ids(vlm.config)
        self._plans: deque[_Plan] = deque(maxlen=PLAN_BOOK_SIZE)
        self._keys = itertools.count()

    @property
    def layers(self) -> list[Any]:
        """The language model's decoder layers (mlx-lm sizes default caches by them)."""
        return list(self.vlm.language_model.layers)

    def make_cache(self) -> list[Any]:
        """The language model's cache layout, as mlx-lm cache layers (what ``make_prompt_cache`` returns).

        mlx-vlm's own KV classes store a different state layout, so mlx-lm's
        ``save_prompt_cache``/``load_prompt_cache`` (and nbllm's PromptCache)
        could not round-trip them; the plain and rotating KV caches are swapped
        for mlx-lm's equivalents, anything else is kept as mlx-vlm made it.
        """
        from mlx_lm.models import cache as lm_cache
        from mlx_vlm.models import cache as vlm_cache

        layers = vlm_cache.make_prompt_cache(self.vlm.language_model)
        out: list[Any] = []
        for c in layers:
            if type(c) is vlm_cache.KVCache:
                out.append(lm_cache.KVCache())
            elif type(c) is vlm_cache.RotatingKVCache:
                out.append(lm_cache.RotatingKVCache(max_size=c.max_size, keep=c.keep))
            else:
                out.append(c)
        return out

    def __call__(self, inputs: mx.array, cache: list[Any] | None = None, input_embeddings: mx.array | None = None) -> mx.array:
        """Logits ``(1, L, vocab)`` for ``inputs`` ``(1, L)`` (or their ``input_embeddings``)."""
        kwargs = {}
        if self.uses_mrope:
            kwargs["position_ids"] = self._positions(inputs, cache, input_embeddings)
        elif input_embeddings is None and inputs.shape[1] > 1 and self._has_image_tokens(inputs):
            raise ValueError("prompt: image tokens need the input embeddings from lm.prepare_inputs(ids, images)")
        out = self.vlm.language_model(inputs, inputs_embeds=input_embeddings, cache=cache, **kwargs)
        return out.logits

    def remember(self, ids: list[int], embeddings: mx.array, positions: mx.array, delta: int) -> None:
        """Keep a prepared prompt's mRoPE positions ``(3, len(ids))`` for its prefill."""
        mx.eval(embeddings, positions)  # now: the prefill may run on another thread
        self._plans.append(_Plan(next(self._keys), ids, embeddings, positions, delta))

    def _has_image_tokens(self, inputs: mx.array) -> bool:
        return bool(set(int_list(inputs)) & self.image_ids)

    def _positions(self, inputs: mx.array, cache: list[Any] | None, embeddings: mx.array | None) -> mx.array:
        # mRoPE (Qwen-VL): image tokens get 2D positions, so positions are not
        # the cache offset. Prefill reads them from the prompt's plan; decode
        # continues from offset + delta, kept on the cache (survives trim/deepcopy).
        from mlx_vlm.models.base import cache_position_offset

        layer = cache[0] if cache else None
        offset = cache_position_offset(layer) if layer is not None else 0
        n = inputs.shape[1]
        if embeddings is not None:
            plan = self._find(inputs, embeddings[0], offset, getattr(layer, "nbllm_plan", None))
            if layer is not None:
                layer.nbllm_plan, layer.nbllm_rope_delta = plan.key, plan.delta
            positions = plan.window(offset, n)
        else:
            if n > 1 and self._has_image_tokens(inputs):
                raise ValueError("prompt: image tokens need the input embeddings from lm.prepare_inputs(ids, images)")
            start = offset + int(getattr(layer, "nbllm_rope_delta", 0))
            positions = mx.broadcast_to(mx.arange(start, start + n)[None], (3, n))
        return positions[:, None, :]

    def _find(self, inputs: mx.array, embeddings: mx.array, offset: int, bound: int | None) -> _Plan:
        chunk = int_list(inputs)
        plans = sorted(self._plans, key=lambda p: (p.key != bound, -p.key))
        hits = [p for p in plans if p.ids[offset : offset + len(chunk)] == chunk]
        for plan in hits:
            if len(hits) == 1 or mx.array_equal(plan.embeddings[offset : offset + len(chunk)], embeddings).item():
                return plan
        raise ValueError(
            "input_embeddings: expected embeddings from lm.prepare_inputs (the last "
            f"{PLAN_BOOK_SIZE} prepared prompts are kept), got embeddings for an unknown prompt"
        )


def int_list(array: mx.array) -> list[int]:
    """An integer array's values as a flat Python list."""
    return [int(v) for v in cast(list, array.reshape(-1).tolist())]


def image_token_ids(config: Any) -> set[int]:
    """The placeholder token ids image features replace (``image_token_id`` / ``image_token_index``)."""
    found = set()
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            found.add(value)
    return found


def source_mentions(cls: type, name: str) -> bool:
    """Whether ``name`` appears in the source of ``cls`` (to detect what an mlx-vlm model needs)."""
    import inspect

    try:
        return name in inspect.getsource(cls)
    except (OSError, TypeError):
        return False
