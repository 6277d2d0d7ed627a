"""Per-position figures of a block of logits, in numpy: log-probabilities of given tokens, ranks, entropy, top k.

On the CPU backend numpy's exp and log run several times faster than MLX's
over a block of positions times the vocabulary, and on Metal the unified
memory makes the copy cheap; the lens and the scorer both use this.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["PositionStats", "position_stats"]


@dataclass(frozen=True)
class PositionStats:
    """For each position: ``logprob`` and ``rank`` of its target token, ``entropy``, the ``top_ids`` and ``top_logprobs``."""

    logprob: np.ndarray
    rank: np.ndarray
    entropy: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray


def position_stats(logits: np.ndarray, targets: np.ndarray, k: int) -> PositionStats:
    """Figures of ``logits`` ``[positions, vocab]`` for ``targets`` ``[positions]``, with the top ``k`` most likely first."""
    x = logits.astype(np.float32, copy=False)
    peak = x.max(axis=-1, keepdims=True)
    e = np.exp(x - peak)
    total = e.sum(axis=-1, keepdims=True)
    lse = (peak + np.log(total))[:, 0]  # log of the normaliser: log p = x - lse
    finite = np.where(np.isfinite(x), x, 0.0)
    entropy = lse - (e * finite).sum(axis=-1) / total[:, 0]  # -sum p log p = lse - E_p[x]
    rows = np.arange(len(targets))
    target_x = x[rows, targets]
    rank = (x > target_x[:, None]).sum(axis=-1)
    if k > 0:
        top = np.argpartition(x, -k, axis=-1)[:, -k:]
        top_x = np.take_along_axis(x, top, axis=-1)
        order = np.argsort(-top_x, axis=-1, kind="stable")
        top, top_lp = np.take_along_axis(top, order, axis=-1), np.take_along_axis(top_x, order, axis=-1) - lse[:, None]
    else:
        top, top_lp = np.zeros((len(targets), 0), np.int64), np.zeros((len(targets), 0), np.float32)
    return PositionStats(target_x - lse, rank, entropy, top, top_lp)
