"""Reference figures computed with mlx-lm's own code, for tests to compare nbllm against."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from nbllm.sampling import SamplingParams


def mlx_lm_distribution(lp: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution ``mlx_lm.sample_utils.make_sampler`` draws from, built from mlx-lm's filter functions.

    XTC fires at random; its two cases are computed with mlx-lm's ``apply_xtc``
    forced on (probability 1) and mixed with the case without it.
    """
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, apply_xtc

    x = mx.array(lp)[None]
    if params.greedy:
        out = np.zeros(lp.shape[-1])
        out[int(np.argmax(lp))] = 1.0
        return out

    def chain(xtc: bool) -> np.ndarray:
        y = x
        if 0 < params.top_p < 1:
            y = apply_top_p(y, params.top_p)
        if params.min_p != 0:
            y = apply_min_p(y, params.min_p)
        if xtc:
            y = apply_xtc(y, 1.0, params.xtc_threshold, list(params.xtc_special_tokens))
        if 0 < params.top_k < lp.shape[-1]:
            y = apply_top_k(y, params.top_k)
        return np.asarray(mx.softmax(y / params.temperature, axis=-1)[0]).astype(np.float64)

    p = params.xtc_probability
    if p <= 0:
        return chain(False)
    return (1 - p) * chain(False) + p * chain(True)
