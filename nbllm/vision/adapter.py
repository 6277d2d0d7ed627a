"""mlx-vlm's language model behind mlx-lm's ``model(ids, cache=, input_embeddings=)`` call.

mlx-lm's ``generate_step`` (and nbllm's step-by-step runs) call the model with
token ids, the KV cache and, during prefill, precomputed input embeddings.
mlx-vlm's language models take ``inputs_embeds=`` and return an output record;
Qwen-VL models also need mRoPE position ids, which for image tokens are 2D
grid positions rather than the cache offset. ``LanguageAdapter`` bridges the
two; ``VisionEngine`` binds each prompt's positions to the cache it is fed
into, so the adapter reads them from there (no global state: two threads may
run two prompts on one model).
"""

from __future__ import annotations

from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn

from ..mlx_engine import MLXEngine
from ..prompt import Prompt

__all__ = ["LanguageAdapter", "VisionEngine", "image_token_ids", "int_list", "source_mentions"]


class LanguageAdapter(nn.Module):
    """mlx-vlm's language model behind mlx-lm's ``model(ids, cache=, input_embeddings=)``."""

    def __init__(self, vlm: nn.Module):
        super().__init__()
        self.vlm = vlm
        self.uses_mrope = callable(getattr(vlm.language_model, "get_rope_index", None))
        self.image_ids = image_token_ids(vlm.config)

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

        out: list[Any] = []
        for c in vlm_cache.make_prompt_cache(self.vlm.language_model):
            if type(c) is vlm_cache.KVCache:
                out.append(lm_cache.KVCache())
            elif type(c) is vlm_cache.RotatingKVCache:
                out.append(lm_cache.RotatingKVCache(max_size=c.max_size, keep=c.keep))
            else:
                out.append(c)
        return out

    def __call__(
        self, inputs: mx.array, cache: list[Any] | None = None, input_embeddings: mx.array | None = None
    ) -> mx.array:
        """Logits ``(1, L, vocab)`` for ``inputs`` ``(1, L)`` (or their ``input_embeddings``)."""
        if input_embeddings is None and inputs.shape[1] > 1 and self._has_image_tokens(inputs):
            raise ValueError(
                "prompt: image tokens need their input embeddings; encode the prompt with lm.encode(prompt, images=...)"
            )
        kwargs = {"position_ids": self._positions(inputs, cache)} if self.uses_mrope else {}
        out = self.vlm.language_model(inputs, inputs_embeds=input_embeddings, cache=cache, **kwargs)
        return out.logits

    def _has_image_tokens(self, inputs: mx.array) -> bool:
        return bool(set(int_list(inputs)) & self.image_ids)

    def _positions(self, inputs: mx.array, cache: list[Any] | None) -> mx.array:
        # mRoPE (Qwen-VL): image tokens get 2D positions, so positions are not
        # the cache offset. Within the bound prompt they come from its plan;
        # after it, decoding continues from offset + rope delta.
        from mlx_vlm.models.base import cache_position_offset

        layer = cache[0] if cache else None
        offset = cache_position_offset(layer) if layer is not None else 0
        n = inputs.shape[1]
        plan = getattr(layer, "nbllm_positions", None)
        delta = int(getattr(layer, "nbllm_rope_delta", 0))
        parts = []
        stop = offset
        if plan is not None and offset < plan.shape[1]:
            stop = min(offset + n, plan.shape[1])
            parts.append(plan[:, offset:stop])
        if offset + n > stop:
            tail = mx.arange(stop, offset + n) + delta
            parts.append(mx.broadcast_to(tail[None], (3, tail.shape[0])))
        positions = mx.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        return positions[:, None, :]


class VisionEngine(MLXEngine):
    """The MLX engine for a ``LanguageAdapter``: binds a prompt's mRoPE positions to its cache."""

    def bind(self, layers: list[Any], prompt: Prompt) -> None:
        if layers:
            # Kept on the first layer: it survives trimming and deep copies (branches), and is per cache.
            layers[0].nbllm_positions = prompt.positions
            layers[0].nbllm_rope_delta = prompt.rope_delta


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
