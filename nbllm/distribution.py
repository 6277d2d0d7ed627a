"""``Distribution``: one position's next-token distribution, as an engine reports it.

The full log-probability vector (local models) or only its top entries (a
server's ``top_logprobs``). What the sampler draws from, given the settings,
is computed by ``nbllm.filters``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

__all__ = ["Distribution", "as_numpy"]


class Distribution:
    """One position's next-token distribution, as an engine reports it.

    Args:
        logprobs: The full log-probability vector ``(vocab,)`` after logits
            processors (mlx or numpy; converted to numpy once, when first read).
        top: Or only the most likely entries, ``[(token id, logprob), ...]``,
            when the engine returns no more (what is not returned is unknown).
        vocab_size: Vocabulary size when ``logprobs`` is not given.
    """

    __slots__ = ("_numpy", "_source", "_top", "vocab_size")

    def __init__(
        self, logprobs: Any = None, *, top: Sequence[tuple[int, float]] | None = None, vocab_size: int | None = None
    ):
        if logprobs is None and top is None:
            raise ValueError("Distribution: expected logprobs or top entries, got neither")
        self._source = logprobs
        self._numpy: np.ndarray | None = None
        self._top = None if top is None else sorted(((int(i), float(v)) for i, v in top), key=lambda e: -e[1])
        self.vocab_size = int(logprobs.shape[-1]) if logprobs is not None else vocab_size

    @property
    def full(self) -> bool:
        """Whether the whole vector is known."""
        return self._source is not None

    @property
    def source(self) -> Any:
        """The vector as the engine gave it (an ``mx.array`` for local models), or ``None``."""
        return self._source

    def numpy(self) -> np.ndarray | None:
        """The full vector as float32 numpy (``None`` when only top entries are known)."""
        if self._numpy is None and self._source is not None:
            self._numpy = as_numpy(self._source)
        return self._numpy

    def logprob(self, token: int) -> float | None:
        """Log-probability of ``token`` (``None`` if the engine did not report it)."""
        lp = self.numpy()
        if lp is not None:
            return float(lp[token])
        return next((v for i, v in self._top or () if i == token), None)

    def top(self, k: int) -> list[tuple[int, float]]:
        """The ``k`` most likely ``(id, logprob)`` pairs, most likely first (fewer if unknown)."""
        lp = self.numpy()
        if lp is None:
            return list(self._top or ())[:k]
        k = min(k, lp.shape[-1])
        if k <= 0:
            return []
        import numpy as np

        idx = np.argpartition(-lp, k - 1)[:k]
        idx = idx[np.argsort(-lp[idx], kind="stable")]
        return [(int(i), float(lp[i])) for i in idx]


def as_numpy(logprobs: Any) -> np.ndarray:
    """A float32 numpy vector of an mlx or numpy distribution (no copy when already float32)."""
    import numpy as np

    if type(logprobs).__module__.startswith("mlx"):
        import mlx.core as mx

        if logprobs.dtype != mx.float32:
            logprobs = logprobs.astype(mx.float32)
    return np.asarray(logprobs, dtype=np.float32).reshape(-1)
