"""Training-only fast math for MLX on a CPU without fast exp kernels.

On this project's 2-core x86 machine, MLX's CPU ``exp`` runs at ~20 ns per
element (a 2048 x 3072 ``mx.exp`` takes ~135 ms, an add ~5 ms), so the
softmaxes of attention and of the loss, and the SiLU/GELU of the MLPs, took
more time than all the matmuls of a training step (2.4M-parameter Llama,
batch 8 x 256: 1.9 s per step, of which ~0.6 s matmuls).

``fast_exp`` computes exp as 2^n * p(f) with a compiled degree-5 polynomial
(relative error < 1e-4; its gradient is defined as exp's, d exp = exp * dx),
~4x faster here. The functions below are the same formulas as the stock
ones they stand in for, written with it. They are swapped in only while
training (``patched``); the models are mlx-lm's / mlx-vlm's own classes, the
saved weights are ordinary, and evaluation runs the stock functions.

Import this module after the BLAS library is loaded (it imports mlx.core).
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager

import mlx.core as mx

__all__ = ["fast_exp", "fast_softmax", "fast_attention", "fast_swiglu", "fast_gelu_fast",
           "fast_cross_entropy", "patched"]

_LOG2E = 1.4426950408889634


@mx.compile
def _exp_poly(x):
    # 2^t = 2^n * 2^f, n = floor(t), f in [0, 1): a polynomial for 2^f, and 2^n
    # written straight into the float's exponent bits
    t = mx.clip(x * _LOG2E, -126.0, 126.0)
    n = mx.floor(t)
    f = t - n
    p = 1.0 + f * (0.69314718 + f * (0.24022652 + f * (0.05550411 + f * (0.00961813 + f * 0.00133336))))
    return p * mx.view((n.astype(mx.int32) + 127) << 23, mx.float32)


@mx.custom_function
def fast_exp(x):
    return _exp_poly(x)


@fast_exp.vjp
def _fast_exp_vjp(primals, cotangent, output):
    return cotangent * output


def fast_softmax(s):
    e = fast_exp(s - mx.stop_gradient(mx.max(s, axis=-1, keepdims=True)))
    return e / e.sum(axis=-1, keepdims=True)


_CAUSAL: dict = {}


def fast_attention(queries, keys, values, cache=None, scale=1.0, mask=None, sinks=None):
    """``scaled_dot_product_attention`` for training (no cache, no sinks, no GQA):
    softmax(q k^T * scale + mask) v, with queries [B, H, L, D], keys [B, H, S, D]."""
    if keys.shape[1] != queries.shape[1]:  # grouped-query attention: repeat the kv heads
        rep = queries.shape[1] // keys.shape[1]
        keys, values = mx.repeat(keys, rep, axis=1), mx.repeat(values, rep, axis=1)
    s = (queries * scale) @ keys.swapaxes(-1, -2)  # [B, H, L, S]
    if isinstance(mask, str):  # "causal"
        L, S = s.shape[-2:]
        if (L, S) not in _CAUSAL:
            _CAUSAL[(L, S)] = mx.where(mx.arange(S - L, S)[:, None] >= mx.arange(S)[None], 0.0, -1e9)
        s = s + _CAUSAL[(L, S)]
    elif mask is not None:
        s = mx.where(mask, s, -1e9) if mask.dtype == mx.bool_ else s + mask
    return fast_softmax(s) @ values


def fast_swiglu(gate, x):
    """silu(gate) * x."""
    return gate / (1.0 + fast_exp(-gate)) * x


def fast_gelu_fast(x):
    """``nn.GELU(approx="fast")``: x * sigmoid(1.702 x)."""
    return x / (1.0 + fast_exp(-1.702 * x))


def fast_cross_entropy(logits, targets, reduction="mean"):
    """``nn.losses.cross_entropy(logits, targets, reduction=...)`` ("mean" or "none")."""
    m = mx.stop_gradient(mx.max(logits, axis=-1, keepdims=True))
    lse = mx.log(fast_exp(logits - m).sum(axis=-1)) + m[..., 0]
    ce = lse - mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return ce.mean() if reduction == "mean" else ce


@contextmanager
def patched(replacements):
    """Swap module attributes while the block runs: ``{"mlx_lm.models.llama":
    {"swiglu": fast_swiglu}}``; the originals are restored afterwards."""
    saved = []
    try:
        for mod_name, attrs in replacements.items():
            mod = importlib.import_module(mod_name)
            for name, fn in attrs.items():
                saved.append((mod, name, getattr(mod, name)))
                setattr(mod, name, fn)
        yield
    finally:
        for mod, name, fn in reversed(saved):
            setattr(mod, name, fn)
