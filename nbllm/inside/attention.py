"""Attention weights: where each position of a prompt looks, per layer and head, as the model computes them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from ..decode import piece_of
from .hooks import capture_attention
from .run import forward, needs_local

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

__all__ = ["AttentionMap", "attention"]


@dataclass(frozen=True, eq=False)
class AttentionMap:
    """A prompt's attention weights, captured from the model's own attention calls.

    Attributes:
        tokens: The prompt's tokens, as text pieces.
        layers: Per attention layer, ``[heads, positions, positions]`` (float32 numpy):
            row ``q`` is how position ``q`` spreads its attention over positions ``<= q``
            (after RoPE, query/key norms, masks and sliding windows; each row sums to 1).
    """

    tokens: tuple[str, ...]
    layers: tuple[np.ndarray, ...]

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_heads(self) -> int:
        return int(self.layers[0].shape[0]) if self.layers else 0

    def weights(self, layer: int) -> np.ndarray:
        """``[heads, positions, positions]`` for one layer (negative indices count from the last)."""
        return self.layers[layer]

    def aggregate(self, layer: int, how: str = "mean") -> np.ndarray:
        """``[positions, positions]``: the heads' ``mean`` or ``max``."""
        if how not in ("mean", "max"):
            raise ValueError(f"how: expected 'mean' or 'max', got {how!r}")
        w = self.layers[layer]
        return w.mean(axis=0) if how == "mean" else w.max(axis=0)

    def figure(self, layer: int = -1, head: int | None = None, how: str = "mean") -> Figure:
        """A heatmap of one head, or of the heads' ``mean``/``max`` when ``head`` is ``None``."""
        from ..render_inside import attention_figure

        return attention_figure(self, layer=layer, head=head, how=how)


def attention(lm: Any, prompt: Any, **encode: Any) -> AttentionMap:
    """Capture every attention layer's weights over ``prompt`` (one forward pass; the output is unchanged).

    Args:
        lm: A loaded (local MLX) model.
        prompt: Text, messages, ids or a ``Prompt`` (``raw=``, ``system=``, ``images=`` as for ``lm.encode``).

    Returns:
        An ``AttentionMap``.
    """
    import numpy as np

    needs_local(lm, "attention capture")
    prompt = lm.encode(prompt, **encode)
    with capture_attention() as captured:
        forward(lm, prompt)
    mx.eval(captured)
    layers = tuple(np.array(w[0]) for w in captured)
    return AttentionMap(tokens=tuple(piece_of(lm.tokenizer, i, lm.pieces) for i in prompt.ids), layers=layers)
