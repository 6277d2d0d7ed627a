"""Long prompts' attention on the CPU backend: MLX's matmuls with nbllm's C softmax, checked against MLX's own kernel."""

from __future__ import annotations

import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import nbllm
from nbllm import sdpa

pytestmark = pytest.mark.skipif(sdpa._softmax() is None, reason=f"C softmax not available: {sdpa.softmax_status()}")


@pytest.mark.parametrize("shape", [(1, 9, 3, 512, 700), (1, 4, 2, 40, 40), (2, 4, 4, 33, 100), (1, 8, 1, 64, 64)])
@pytest.mark.parametrize("mask", [None, "causal"])
def test_matches_mlx_attention(shape: tuple[int, ...], mask: str | None) -> None:
    batch, heads, kv_heads, length, size = shape
    q = mx.random.normal((batch, heads, length, 16))
    k, v = mx.random.normal((batch, kv_heads, size, 16)), mx.random.normal((batch, kv_heads, size, 16))
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    with sdpa.cpu_prefill():
        got = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    np.testing.assert_allclose(np.array(got), np.array(expected), atol=2e-6)
    assert mx.fast.scaled_dot_product_attention is sdpa._original  # the hook is gone again


def test_other_attention_keeps_mlx_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(sdpa, "_cpu_attention", lambda *a, **k: calls.append(1))
    q, k = mx.random.normal((1, 4, 40, 16)), mx.random.normal((1, 4, 40, 16))
    window = mx.tril(mx.ones((40, 40), dtype=mx.bool_)) & mx.triu(mx.ones((40, 40), dtype=mx.bool_), -8)
    with sdpa.cpu_prefill():
        for kwargs in ({"mask": window}, {"mask": "causal", "sinks": mx.zeros((4,))}):
            mx.eval(mx.fast.scaled_dot_product_attention(q, k, k, scale=0.25, **kwargs))
        mx.eval(mx.fast.scaled_dot_product_attention(q[:, :, :1], k, k, scale=0.25, mask=None))  # a decode step
    mx.eval(mx.fast.scaled_dot_product_attention(q, k, k, scale=0.25, mask="causal"))  # outside the block
    assert calls == []
    with sdpa.cpu_prefill():
        mx.fast.scaled_dot_product_attention(q, k, k, scale=0.25, mask="causal")
    assert calls == [1]


def test_greedy_tokens_are_the_same_with_and_without_it(any_lm: nbllm.LM) -> None:
    ids = (list(any_lm.encode("the model cache prompt is long " * 40, raw=True).ids) * 3)[:700]
    lib = sdpa._softmax()
    try:
        sdpa._state["lib"] = None
        plain = [t.id for t in any_lm.stream(ids, max_tokens=12, prefill_step_size=256)]
    finally:
        sdpa._state["lib"] = lib
    assert [t.id for t in any_lm.stream(ids, max_tokens=12, prefill_step_size=256)] == plain


def test_turned_off_by_the_environment() -> None:
    code = "import nbllm; from nbllm import sdpa; print(sdpa._softmax() is None, sdpa.softmax_status())"
    env = dict(os.environ, NBLLM_CPU_ATTENTION="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True turned off by NBLLM_CPU_ATTENTION"
