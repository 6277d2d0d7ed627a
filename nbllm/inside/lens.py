"""The logit lens: what each layer already predicts, read through the model's own final norm and head.

The residual stream after decoder layer ``i`` is what layer ``i + 1`` reads; the
model's output is its final norm and output head applied to the last one. The
lens applies that same norm and head to every layer's stream, giving a
next-token distribution per layer and position. The last layer's is exactly
the model's own output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from ..decode import piece_of
from ..tokens import Alternative
from .hooks import capture_layers, decoder_of
from .run import forward, needs_local
from .stats import position_stats

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

__all__ = ["LogitLens", "logit_lens"]

_BLOCK = 1 << 24  # logits per block of layers: 64 MB of float32


@dataclass(frozen=True, eq=False)
class LogitLens:
    """Next-token distributions read at every layer and position of a prompt (numpy arrays).

    Attributes:
        tokens: The prompt's tokens, as text pieces.
        ids: Their ids.
        predicted: ``[positions]``: the token the full model predicts after each position.
        final_prob: ``[n_layers, positions]``: probability, at each layer, of ``predicted``.
        final_rank: ``[n_layers, positions]``: its rank there (0 = the layer's top token).
        entropy: ``[n_layers, positions]``: entropy of each layer's distribution, in nats.
        top_ids: ``[n_layers, positions, k]``: each cell's most likely tokens.
        top_probs: ``[n_layers, positions, k]``: their probabilities.
    """

    tokens: tuple[str, ...]
    ids: tuple[int, ...]
    predicted: np.ndarray
    final_prob: np.ndarray
    final_rank: np.ndarray
    entropy: np.ndarray
    top_ids: np.ndarray
    top_probs: np.ndarray
    label: Callable[[int], str]

    @property
    def n_layers(self) -> int:
        return int(self.final_prob.shape[0])

    def top(self, layer: int, position: int) -> tuple[Alternative, ...]:
        """The cell's top tokens, most likely first (``layer=-1``: the model's own output)."""
        import math

        ids, probs = self.top_ids[layer, position], self.top_probs[layer, position]
        return tuple(
            Alternative(int(i), self.label(int(i)), math.log(max(float(p), 1e-45))) for i, p in zip(ids, probs)
        )

    def figure(self, by: str = "prob") -> Figure:
        """Layers by positions, coloured by ``prob`` (of the final prediction) or ``entropy``."""
        from ..render_inside import lens_figure

        return lens_figure(self, by=by)


def logit_lens(lm: Any, prompt: Any, *, top_k: int = 5, **encode: Any) -> LogitLens:
    """Read the next-token distribution at every layer of ``lm`` for ``prompt``.

    Args:
        lm: A loaded (local MLX) model.
        prompt: Text, messages, ids or a ``Prompt`` (``raw=``, ``system=``, ``images=`` as for ``lm.encode``).
        top_k: Tokens kept per cell.

    Returns:
        A ``LogitLens``.
    """
    import numpy as np

    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= min(100, lm.vocab_size):
        raise ValueError(f"top_k: expected an integer in [1, {min(100, lm.vocab_size)}], got {top_k!r}")
    needs_local(lm, "the logit lens")
    decoder = decoder_of(lm.model)
    prompt = lm.encode(prompt, **encode)
    with capture_layers(decoder) as streams:
        logits = forward(lm, prompt)  # the model's own output, [positions, vocab]
    predicted = np.asarray(mx.argmax(logits, axis=-1))
    rows: dict[str, list[Any]] = {k: [] for k in ("prob", "rank", "entropy", "ids", "lps")}
    n, positions = len(streams), len(prompt)
    group = max(1, _BLOCK // (positions * lm.vocab_size))  # layers read at once (one head matmul, bounded memory)
    for first in range(0, n, group):
        layers = range(first, min(first + group, n))
        # the last layer's lens is the model's own output, already computed
        block = mx.concatenate([logits if i == n - 1 else decoder.logits(streams[i][0]) for i in layers])
        got = position_stats(np.asarray(block.astype(mx.float32)), np.tile(predicted, len(layers)), top_k)
        for key, value in (
            ("prob", np.exp(got.logprob)),
            ("rank", got.rank),
            ("entropy", got.entropy),
            ("ids", got.top_ids),
            ("lps", got.top_logprobs),
        ):
            rows[key].extend(np.split(value, len(layers)))
    pieces = tuple(piece_of(lm.tokenizer, i, lm.pieces) for i in prompt.ids)
    return LogitLens(
        tokens=pieces,
        ids=tuple(prompt.ids),
        predicted=np.array(predicted),
        final_prob=np.stack(rows["prob"]),
        final_rank=np.stack(rows["rank"]),
        entropy=np.stack(rows["entropy"]),
        top_ids=np.stack(rows["ids"]),
        top_probs=np.exp(np.stack(rows["lps"])),
        label=lambda i: piece_of(lm.tokenizer, i, lm.pieces),
    )
