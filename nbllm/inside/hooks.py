"""Scoped hooks into an mlx-lm model's forward pass: each decoder layer's output, each attention call's weights.

Both hooks are undone when their ``with`` block ends, however it ends, so a
failed capture leaves the model as it was. Attention is captured around
``mx.fast.scaled_dot_product_attention``, which every mlx-lm attention calls
at run time (through ``mlx_lm.models.base``): one hook for every architecture,
seeing queries and keys after RoPE and query/key norms, with the mask (causal,
sliding window) the model itself passed. Only the thread that opened the
capture is recorded.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

__all__ = ["Decoder", "decoder_of", "capture_layers", "capture_attention", "attention_weights"]


@dataclass(frozen=True)
class Decoder:
    """The parts of a decoder-only model the lens needs.

    Attributes:
        layers: The list of decoder layers the model iterates (patched in place while capturing).
        norm: The final norm applied to the last layer's output.
        head: Hidden state (after the norm) to logits: ``lm_head``, or the tied embedding.
        softcap: Final logit soft-capping (Gemma 2), else ``None``.
    """

    layers: list[Any]
    norm: Callable[[mx.array], mx.array]
    head: Callable[[mx.array], mx.array]
    softcap: float | None = None

    def logits(self, hidden: mx.array) -> mx.array:
        """What the model's output would be if ``hidden`` were its last layer's output."""
        out = self.head(self.norm(hidden))
        if self.softcap:
            out = mx.tanh(out / self.softcap) * self.softcap
        return out


def decoder_of(model: Any) -> Decoder:
    """Find the decoder layers, final norm and head of an mlx-lm model (or nbllm's vision adapter).

    Raises:
        ValueError: The model is not laid out as ``model.model.{layers, norm, embed_tokens}`` plus a head.
    """
    top = model.vlm.language_model if hasattr(model, "vlm") else model
    inner = getattr(top, "model", None)
    layers, norm = getattr(inner, "layers", None), getattr(inner, "norm", None)
    if not isinstance(layers, list) or norm is None:
        raise ValueError(
            f"{type(top).__name__}: expected model.model.layers and model.model.norm (a decoder-only model)"
        )
    if getattr(top, "lm_head", None) is not None and not getattr(top, "tie_word_embeddings", False):
        head = top.lm_head
    elif inner is not None and getattr(inner, "embed_tokens", None) is not None:
        head = inner.embed_tokens.as_linear
    else:
        raise ValueError(f"{type(top).__name__}: found no output head (lm_head or tied embed_tokens)")
    args = getattr(top, "args", None)
    softcap = getattr(args, "final_logit_softcapping", None)
    return Decoder(layers, norm, head, float(softcap) if softcap else None)


class _Recorder:
    """Stands in for one decoder layer: calls it and keeps its output (the residual stream)."""

    def __init__(self, layer: Any, outputs: list[mx.array]):
        self._layer, self._outputs = layer, outputs

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self._layer(*args, **kwargs)
        self._outputs.append(out[0] if isinstance(out, tuple) else out)
        return out

    def __getattr__(self, name: str) -> Any:  # the model reads layer attributes (use_sliding, ...)
        return getattr(self._layer, name)


@contextmanager
def capture_layers(decoder: Decoder) -> Iterator[list[mx.array]]:
    """Within the block, every forward pass appends each decoder layer's output, ``(B, L, hidden)``, in order."""
    outputs: list[mx.array] = []
    original = list(decoder.layers)
    try:
        decoder.layers[:] = [_Recorder(layer, outputs) for layer in original]
        yield outputs
    finally:
        decoder.layers[:] = original


_local = threading.local()
_lock = threading.Lock()
_active = 0
_original_sdpa: Any = None


@contextmanager
def capture_attention() -> Iterator[list[mx.array]]:
    """Within the block, each attention call on this thread appends its weights ``(B, heads, L, S)`` (float32)."""
    global _active, _original_sdpa
    weights: list[mx.array] = []
    with _lock:
        if _active == 0:
            _original_sdpa = mx.fast.scaled_dot_product_attention
            mx.fast.scaled_dot_product_attention = _recording_sdpa  # type: ignore[assignment]
        _active += 1
    previous = getattr(_local, "weights", None)
    _local.weights = weights
    try:
        yield weights
    finally:
        _local.weights = previous
        with _lock:
            _active -= 1
            if _active == 0:
                mx.fast.scaled_dot_product_attention = _original_sdpa


def _recording_sdpa(queries: mx.array, keys: mx.array, values: mx.array, *args: Any, **kwargs: Any) -> mx.array:
    sink = getattr(_local, "weights", None)
    if sink is not None:
        sink.append(
            attention_weights(
                queries, keys, kwargs.get("scale", args[0] if args else 1.0), kwargs.get("mask"), kwargs.get("sinks")
            )
        )
    return _original_sdpa(queries, keys, values, *args, **kwargs)


def attention_weights(queries: mx.array, keys: mx.array, scale: float, mask: Any = None, sinks: Any = None) -> mx.array:
    """softmax(q k^T * scale + mask) as the fused kernel computes it, ``(B, heads, L, S)`` in float32.

    ``queries`` ``(B, heads, L, D)``, ``keys`` ``(B, kv_heads, S, D)`` (grouped-query
    attention: each kv head serves ``heads / kv_heads`` query heads); ``mask`` is
    ``None``, ``"causal"`` (queries are the last ``L`` of ``S`` positions), a boolean
    array (True = attend) or an additive array; ``sinks`` are per-head extra logits.
    """
    heads, kv_heads = queries.shape[1], keys.shape[1]
    if heads != kv_heads:
        keys = mx.repeat(keys, heads // kv_heads, axis=1)
    q, k = queries.astype(mx.float32), keys.astype(mx.float32)
    scores = (q * scale) @ k.transpose(0, 1, 3, 2)
    length, size = q.shape[2], k.shape[2]
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"attention: expected mask 'causal', an array or None, got {mask!r}")
        allowed = mx.arange(size)[None] <= mx.arange(size - length, size)[:, None]
        scores = mx.where(allowed, scores, -mx.inf)
    elif mask is not None:
        scores = mx.where(mask, scores, -mx.inf) if mask.dtype == mx.bool_ else scores + mask.astype(mx.float32)
    if sinks is not None:  # attention sinks: an extra logit per head that takes probability but has no value
        extra = mx.broadcast_to(sinks.astype(mx.float32)[None, :, None, None], (*scores.shape[:3], 1))
        return mx.softmax(mx.concatenate([scores, extra], axis=-1), axis=-1)[..., :-1]
    return mx.softmax(scores, axis=-1)
