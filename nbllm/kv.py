"""Operations on mlx-lm's KV cache layers that the prompt cache and the engine share.

mlx-lm's layers know how to update, trim and save themselves; what nbllm adds
is bounding or quantizing a model's default layers, putting back layers that
an interrupted forward pass left one step ahead, and snapshots of the layers
that may stop being trimmable (a rotating window that wrapped).
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["bounded", "trim_ahead", "settle", "snapshot", "restore", "head_dim"]


def bounded(layers: list[Any], max_kv_size: int | None, kv_bits: int | None, kv_group_size: int) -> list[Any]:
    """``layers`` with every plain KV layer rotating at ``max_kv_size``, or quantized to ``kv_bits``.

    Models with their own ``make_cache`` ignore mlx-lm's ``max_kv_size``, so
    the bound is applied here to every layer (and to larger sliding windows).
    """
    from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache

    if max_kv_size is not None:
        size = max_kv_size
        layers = [
            RotatingKVCache(max_size=size, keep=4)
            if type(c) is KVCache
            else RotatingKVCache(max_size=size, keep=c.keep)
            if type(c) is RotatingKVCache and c.max_size > size
            else c
            for c in layers
        ]
    if kv_bits is not None:
        layers = [QuantizedKVCache(group_size=kv_group_size, bits=kv_bits) if type(c) is KVCache else c for c in layers]
    return list(layers)


def trim_ahead(layers: list[Any], n: int) -> bool:
    """Trim layers that hold more than ``n`` tokens back to ``n``; False if one of them cannot be trimmed.

    An interrupt inside a forward pass leaves the layers it already reached
    one step ahead of the others.
    """
    ahead = [c for c in layers if getattr(c, "offset", n) > n]
    if not all(c.is_trimmable() for c in ahead):
        return False
    for c in ahead:
        c.trim(c.offset - n)
    return True


def settle(layers: list[Any]) -> None:
    """Evaluate whatever work is still pending in ``layers``, on the calling thread.

    A step that failed midway leaves lazily built keys and values scheduled on
    this thread's stream; MLX ties streams to threads, so once this thread is
    gone (a chat widget's worker) no other thread could evaluate them.
    """
    import mlx.core as mx

    mx.eval([c.state for c in layers])


def snapshot(layers: list[Any]) -> list[Any] | None:
    """Copies of the layers that may become untrimmable (``None`` in place of the others), or ``None`` if none may."""
    if all(c.is_trimmable() and not hasattr(c, "max_size") for c in layers):
        return None
    return [None if c.is_trimmable() and not hasattr(c, "max_size") else copy.deepcopy(c) for c in layers]


def restore(layers: list[Any], kept: list[Any], n: int) -> bool:
    """Put ``layers`` back to a snapshot ``kept`` taken when they held ``n`` tokens; False if that is not possible."""
    if any(k is None and c.offset < n for c, k in zip(layers, kept)):
        return False
    for i, (c, k) in enumerate(zip(layers, kept)):
        if k is None:
            c.trim(c.offset - n)
        else:
            layers[i] = k
    return True


def head_dim(config: dict[str, Any]) -> int | None:
    """The attention head size from a model config (``None`` if it does not say)."""
    cfg = config.get("text_config") or config
    heads = cfg.get("num_attention_heads")
    return int(cfg.get("head_dim") or (cfg.get("hidden_size", 0) // heads if heads else 0)) or None
