"""Core engine benchmark: nbllm vs raw mlx-lm on the same model, in one run.

    python bench/bench_core.py            # prints a table
    python bench/bench_core.py --quick    # fewer tokens, for a smoke run

Rows:
  * decode tok/s of nbllm.stream / mlx_lm.stream_generate (top_logprobs 0 and 10), target >= 0.97
  * Stepper.step() rate / raw decode rate, target >= 0.9
  * Linux CPU: prefill and decode tok/s with and without the fast-BLAS fix (fp32), target >= 10x prefill
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbllm  # first: it loads the fast BLAS before mlx.core


def bench_model(root: Path) -> Path:
    from nbllm.testing import BENCH_SHAPE, make_model

    return make_model(root / "bench-llama", "llama", overrides=BENCH_SHAPE)


def _rate(fn, n_tokens: int) -> float:
    t = time.perf_counter()
    got = fn()
    dt = time.perf_counter() - t
    assert got == n_tokens, (got, n_tokens)
    return n_tokens / dt


def decode_rates(path: Path, prompt_len: int, n: int, repeats: int) -> dict[str, float]:
    import mlx.core as mx
    import mlx_lm

    lm = nbllm.load(path)
    ids = (list(lm.encode("The quick brown fox jumps over the lazy dog. ", raw=True).ids) * 64)[:prompt_len]
    eos = mx.array(sorted(lm.tokenizer.eos_token_ids))

    def no_eos(tokens: mx.array, logits: mx.array) -> mx.array:
        # every run generates exactly n tokens, on both sides
        logits[:, eos] = -mx.inf
        return logits

    procs = [no_eos]

    def raw() -> int:
        return sum(
            1 for _ in mlx_lm.stream_generate(lm.model, lm.tokenizer, ids, max_tokens=n, logits_processors=procs)
        )

    def ours(k: int):
        return lambda: sum(1 for _ in nbllm.stream(lm, ids, max_tokens=n, top_logprobs=k, logits_processors=procs))

    def stepper() -> int:
        st = lm.stepper(ids, top_logprobs=10, logits_processors=procs)
        t = time.perf_counter()
        for _ in range(n):
            st.step()
        stepper.elapsed = time.perf_counter() - t  # type: ignore[attr-defined]
        return n

    def raw_decode_only() -> int:
        # decode rate excluding prefill, as the stepper's figure is
        first = None
        count = 0
        for r in mlx_lm.stream_generate(lm.model, lm.tokenizer, ids, max_tokens=n + 1, logits_processors=procs):
            count += 1
            if first is None:
                first = time.perf_counter()
        raw_decode_only.elapsed = time.perf_counter() - first  # type: ignore[attr-defined]
        return count - 1

    results: dict[str, list[float]] = {k: [] for k in ("raw", "k0", "k10", "step", "raw_decode")}
    _rate(raw, n)  # warm-up
    for _ in range(repeats):  # interleave so drift hits all alike
        results["raw"].append(_rate(raw, n))
        results["k0"].append(_rate(ours(0), n))
        results["k10"].append(_rate(ours(10), n))
        stepper()
        results["step"].append(n / stepper.elapsed)  # type: ignore[attr-defined]
        raw_decode_only()
        results["raw_decode"].append(n / raw_decode_only.elapsed)  # type: ignore[attr-defined]
    return {k: statistics.median(v) for k, v in results.items()}


_BLAS_CHILD = r"""
import json, sys, time
import nbllm, mlx.core as mx
lm = nbllm.load(sys.argv[1], dtype=None if sys.argv[4] == "keep" else "auto")
ids = (list(lm.encode("The quick brown fox jumps over the lazy dog. ", raw=True).ids) * 64)[:int(sys.argv[2])]
from mlx_lm.models.cache import make_prompt_cache
def prefill():
    c = make_prompt_cache(lm.model); t = time.perf_counter()
    mx.eval(lm.model(mx.array(ids)[None], cache=c)); return len(ids) / (time.perf_counter() - t)
prefill()
p = max(prefill() for _ in range(3))
c = lm.generate(ids, max_tokens=int(sys.argv[3]), logit_bias={e: -1e9 for e in lm.tokenizer.eos_token_ids})
print(json.dumps({"blas": nbllm.blas.blas_status(), "prefill": p, "decode": c.stats.generation_tps, "dtype": lm.info.dtype}))
"""


def blas_rates(path: Path, bf16: Path, prompt_len: int, n: int) -> dict[str, dict]:
    out = {}
    runs = (
        ("stock", path, "auto", {"NBLLM_BLAS": "0"}),
        ("openblas", path, "auto", {}),
        ("bf16", bf16, "keep", {}),
        ("bf16_fp32", bf16, "auto", {}),
    )
    for label, model, dtype, env in runs:
        proc = subprocess.run(
            [sys.executable, "-c", _BLAS_CHILD, str(model), str(prompt_len), str(n), dtype],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            check=True,
        )
        out[label] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default=None, help="model folder (default: a generated 25M-param llama)")
    args = ap.parse_args()
    n, prompt_len, repeats = (32, 64, 2) if args.quick else (128, 256, 3)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.model) if args.model else bench_model(Path(tmp))
        r = decode_rates(path, prompt_len, n, repeats)
        from nbllm.testing import BENCH_SHAPE, make_model

        bf16 = make_model(Path(tmp) / "bench-llama-bf16", "llama", overrides=BENCH_SHAPE, dtype="bfloat16")
        b = blas_rates(path, bf16, prompt_len, n) if sys.platform.startswith("linux") else {}
    print(
        f"\nnbllm core benchmark · model {path.name} · prompt {prompt_len} tok · {n} generated · median of {repeats}\n"
    )
    rows = [
        ("decode tok/s  mlx_lm.stream_generate", r["raw"], "", ""),
        ("decode tok/s  nbllm.stream top_logprobs=0", r["k0"], r["k0"] / r["raw"], ">= 0.97"),
        ("decode tok/s  nbllm.stream top_logprobs=10", r["k10"], r["k10"] / r["raw"], ">= 0.97"),
        ("decode tok/s  mlx-lm, decode only", r["raw_decode"], "", ""),
        ("step/s        Stepper.step() top_logprobs=10", r["step"], r["step"] / r["raw_decode"], ">= 0.9"),
    ]
    if b:
        s, o = b["stock"], b["openblas"]
        rows += [
            (f"prefill tok/s stock BLAS ({s['dtype']})", s["prefill"], "", ""),
            (f"prefill tok/s OpenBLAS ({o['dtype']})", o["prefill"], o["prefill"] / s["prefill"], ">= 10"),
            ("decode tok/s  stock BLAS", s["decode"], "", ""),
            ("decode tok/s  OpenBLAS", o["decode"], o["decode"] / s["decode"], ""),
            ("prefill tok/s bf16 weights kept bf16", b["bf16"]["prefill"], "", ""),
            (
                "prefill tok/s bf16 weights cast to fp32 (auto)",
                b["bf16_fp32"]["prefill"],
                b["bf16_fp32"]["prefill"] / b["bf16"]["prefill"],
                "",
            ),
            ("decode tok/s  bf16 weights kept bf16", b["bf16"]["decode"], "", ""),
            (
                "decode tok/s  bf16 weights cast to fp32 (auto)",
                b["bf16_fp32"]["decode"],
                b["bf16_fp32"]["decode"] / b["bf16"]["decode"],
                "",
            ),
        ]
    print(f"{'measure':<48} {'value':>10} {'ratio':>8}  target")
    for name, value, ratio, target in rows:
        ratio_s = f"{ratio:8.2f}" if ratio != "" else " " * 8
        print(f"{name:<48} {value:10.1f} {ratio_s}  {target}")
    if b:
        print(f"\nOpenBLAS: {b['openblas']['blas']}")


if __name__ == "__main__":
    main()
