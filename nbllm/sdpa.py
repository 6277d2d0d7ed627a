"""One scoped hook around ``mx.fast.scaled_dot_product_attention``, which every mlx-lm (and mlx-vlm) attention calls.

Two things use it, each only on the threads that ask, only while they ask:

* ``capture()``: record each call's attention weights (``nbllm.inside``);
* ``cpu_prefill()``: on the CPU backend, compute long prompts' attention with
  MLX's matmuls and nbllm's C softmax (``_cpu_softmax.c``) instead of MLX's CPU
  softmax, whose exp is the larger half of a long prefill there. Only causal or
  unmasked attention over at least ``MIN_QUERIES`` queries takes this path;
  decode steps, sliding windows and attention sinks keep MLX's kernel.

The hook is installed while any thread uses it and removed after, so outside
those calls ``mx.fast`` is MLX's own. ``NBLLM_CPU_ATTENTION=0`` turns the fast
path off (for comparisons).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx

__all__ = ["capture", "cpu_prefill", "attention_weights", "softmax_status", "MIN_QUERIES"]

MIN_QUERIES = 32  # shorter blocks (decode, speculative checks) gain nothing from the copies
_local = threading.local()
_lock = threading.Lock()
_users = 0
_original: Any = None


@contextmanager
def _installed() -> Iterator[None]:
    global _users, _original
    with _lock:
        if _users == 0:
            _original = mx.fast.scaled_dot_product_attention
            mx.fast.scaled_dot_product_attention = _dispatch  # type: ignore[assignment]
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                mx.fast.scaled_dot_product_attention = _original


@contextmanager
def capture() -> Iterator[list[mx.array]]:
    """Within the block, each attention call on this thread appends its weights ``(B, heads, L, S)`` (float32)."""
    weights: list[mx.array] = []
    previous = getattr(_local, "weights", None)
    with _installed():
        _local.weights = weights
        try:
            yield weights
        finally:
            _local.weights = previous


@contextmanager
def cpu_prefill() -> Iterator[None]:
    """Within the block, this thread's long causal attention on the CPU backend uses the C softmax."""
    if _softmax() is None or mx.default_device() != mx.cpu:
        yield
        return
    previous = getattr(_local, "fast", False)
    with _installed():
        _local.fast = True
        try:
            yield
        finally:
            _local.fast = previous


def _dispatch(queries: mx.array, keys: mx.array, values: mx.array, *args: Any, **kwargs: Any) -> mx.array:
    scale = kwargs.get("scale", args[0] if args else 1.0)
    mask, sinks = kwargs.get("mask"), kwargs.get("sinks")
    sink = getattr(_local, "weights", None)
    if sink is not None:
        sink.append(attention_weights(queries, keys, scale, mask, sinks))
    plain = mask is None or (isinstance(mask, str) and mask == "causal")  # a mask array (a window) stays with MLX
    if getattr(_local, "fast", False) and plain and sinks is None and queries.shape[2] >= MIN_QUERIES:
        return _cpu_attention(queries, keys, values, scale, causal=mask is not None)
    return _original(queries, keys, values, *args, **kwargs)


def _cpu_attention(queries: mx.array, keys: mx.array, values: mx.array, scale: float, causal: bool) -> mx.array:
    """softmax(q k^T * scale) v with MLX's matmuls and the C softmax; query heads grouped per kv head (GQA)."""
    import numpy as np

    batch, heads, length, dim = queries.shape
    kv_heads, size = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    q = (queries.astype(mx.float32) * scale).reshape(batch, kv_heads, group * length, dim)
    scores = np.array(q @ keys.astype(mx.float32).swapaxes(-1, -2))  # (B, kv_heads, group*L, S), a writable copy
    lib = _softmax()
    assert lib is not None
    lib.nbllm_softmax_rows(scores.ctypes.data, batch * heads, length, size, int(causal))
    out = mx.array(scores) @ values.astype(mx.float32)  # (B, kv_heads, group*L, D)
    return out.reshape(batch, heads, length, dim).astype(queries.dtype)


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


_HERE = Path(__file__).resolve().parent
_state: dict[str, Any] = {}


def _softmax() -> Any:
    """The C softmax library, or ``None`` (not built, turned off, not Linux); loaded once."""
    if "lib" in _state:
        return _state["lib"]
    lib, reason = None, f"C softmax for causal attention over {MIN_QUERIES}+ queries (prefill)"
    setting = os.environ.get("NBLLM_CPU_ATTENTION", "1").strip().lower()
    hits = sorted(_HERE.glob("_cpu_softmax*.so"))
    note = _HERE / "_cpu_softmax.build-error.txt"
    if setting in {"0", "off", "false", "no"}:
        reason = "turned off by NBLLM_CPU_ATTENTION"
    elif not hits:
        why = (
            note.read_text().strip().splitlines()[0] if note.exists() else "not built (not Linux, or built without it)"
        )
        reason = f"C softmax missing: {why}"
    else:
        try:
            lib = ctypes.CDLL(str(hits[0]))
            lib.nbllm_softmax_rows.argtypes = [
                ctypes.c_void_p,
                ctypes.c_long,
                ctypes.c_long,
                ctypes.c_long,
                ctypes.c_int,
            ]
            lib.nbllm_softmax_rows.restype = None
        except OSError as err:
            lib, reason = None, f"could not load {hits[0].name}: {err}"
    _state.update(lib=lib, reason=reason)
    return lib


def softmax_rows(x: Any) -> bool:
    """Each row of a C-contiguous float32 numpy matrix of finite values replaced by its softmax, with the C
    library; ``False`` (``x`` untouched) where the library is not there."""
    lib = _softmax()
    if lib is None:
        return False
    lib.nbllm_softmax_rows(x.ctypes.data, 1, x.shape[0], x.shape[1], 0)
    return True


def softmax_status() -> str:
    """Whether long prompts' CPU attention uses the C softmax, and why not if it does not."""
    _softmax()
    return str(_state["reason"])
