"""Per-position figures of a block of logits, in numpy: log-probabilities of given tokens, ranks, entropy, top k.

On the CPU backend numpy (and the C softmax, where built) run several times faster than MLX
over a block of positions times the vocabulary, and on Metal the unified
memory makes the copy cheap; the lens and the scorer both use this.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..sdpa import softmax_rows

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
    peak = x.max(axis=-1)
    all_finite = bool(np.isfinite(x).all())
    p = np.array(x, dtype=np.float32, order="C")
    if all_finite and softmax_rows(p):  # glibc's vector expf: several times numpy's exp over a vocabulary
        lse = peak - np.log(p.max(axis=-1))  # the top token's p is exp(peak - lse)
    else:
        np.exp(np.subtract(x, peak[:, None], out=p), out=p)
        total = p.sum(axis=-1)
        lse = peak + np.log(total)  # log of the normaliser: log p = x - lse
        p /= total[:, None]
    # -sum p log p = lse - E_p[x]; masked (-inf) logits have p = 0 and add nothing
    finite = x if all_finite else np.where(np.isfinite(x), x, 0.0)
    entropy = lse - np.einsum("ij,ij->i", p, finite)
    rows = np.arange(len(targets))
    target_x = x[rows, targets]
    rank = (x > target_x[:, None]).sum(axis=-1)
    top = _top_ids(x, k, all_finite)
    return PositionStats(target_x - lse, rank, entropy, top, np.take_along_axis(x, top, axis=-1) - lse[:, None])


def _top_ids(x: np.ndarray, k: int, all_finite: bool) -> np.ndarray:
    """Each row's ``k`` largest entries' indices, largest first (ties: lowest index first)."""
    if k > 16 or not all_finite:  # a partial sort; for a few, repeated argmax is several times faster
        top = np.argpartition(x, -k, axis=-1)[:, -k:]
        order = np.lexsort((top, -np.take_along_axis(x, top, axis=-1)), axis=-1)
        return np.take_along_axis(top, order, axis=-1)
    rows = np.arange(len(x))
    rest = x.copy()
    out = np.empty((len(x), k), dtype=np.int64)
    for j in range(k):
        out[:, j] = rest.argmax(axis=-1)
        rest[rows, out[:, j]] = -np.inf
    return out
