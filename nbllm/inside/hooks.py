"""Scoped hooks into an mlx-lm model's forward pass: each decoder layer's output, each attention call's weights.

Both hooks are undone when their ``with`` block ends, however it ends, so a
failed capture leaves the model as it was. Attention is captured by
``nbllm.sdpa`` around ``mx.fast.scaled_dot_product_attention``, which every
mlx-lm attention calls at run time: one hook for every architecture, seeing
queries and keys after RoPE and query/key norms, with the mask (causal,
sliding window) the model itself passed. Only the thread that opened the
capture is recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from ..sdpa import capture as capture_attention  # the attention hook lives with the C softmax's dispatch

__all__ = ["Decoder", "decoder_of", "capture_layers", "capture_attention"]


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
