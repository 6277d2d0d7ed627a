"""Where a CPU decode step and a long prefill spend their time (issue 13), on SmolLM2-135M's shape.

    python bench/profile_cpu.py                 # every part, each in its own processes
    python bench/profile_cpu.py --what decode   # one part: ops, decode or attention

Parts (fp32 weights through nbllm.load, the model bench_cpu.py builds):
  * ops: MLX's cost per tiny op on the CPU stream (graph build + dispatch), the floor under ~600 ops per step
  * decode: one decode step vs the same weights' matmuls alone (BLAS only) vs building the step's graph in
    Python, with the shim off/on and 1 or 2 OpenBLAS threads
  * attention: one layer at prefill, its seven projections vs mx.fast.scaled_dot_product_attention, for
    chunk sizes against the keys already cached
Medians of several repeats; load average printed at start and end.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
FOLDER = Path(tempfile.gettempdir()) / "nbllm-bench-smollm2-135m-shape"


def _time(fn: Callable[[], Any], repeats: int = 7) -> float:
    """Median seconds of ``fn`` (after one untimed call)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def part_ops() -> dict[str, float]:
    import mlx.core as mx

    import nbllm  # noqa: F401  (same process setup as the other parts)

    x = mx.zeros((576,))
    mx.eval(x)

    def chain(n: int) -> Callable[[], None]:
        def run() -> None:
            y = x
            for _ in range(n):
                y = y * 1.0001
            mx.eval(y)

        return run

    def build(n: int) -> Callable[[], None]:
        def run() -> None:
            y = x
            for _ in range(n):
                y = y * 1.0001

        return run

    n = 600
    return {"us_per_op_total": _time(chain(n)) / n * 1e6, "us_per_op_python_build": _time(build(n)) / n * 1e6}


def part_decode() -> dict[str, Any]:
    import mlx.core as mx
    import mlx.nn as nn
    from bench_cpu import _prompt
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    import nbllm  # first: it loads the shim and OpenBLAS before mlx.core

    model = nbllm.load(FOLDER).model
    prompt = mx.array(_prompt(256))

    def decode() -> None:
        stamps = [time.perf_counter() for _ in generate_step(prompt, model, max_tokens=33)]
        decode.ms = (stamps[-1] - stamps[0]) / 32 * 1e3  # type: ignore[attr-defined]

    per_token = []
    for _ in range(3):
        decode()
        per_token.append(decode.ms)  # type: ignore[attr-defined]

    # the same weights' matmuls for one token, nothing else (embedding as the tied head)
    weights = [m.weight for _, m in model.named_modules() if isinstance(m, nn.Linear)]
    weights.append(model.model.embed_tokens.weight)
    xs = {w.shape[1]: mx.random.normal((1, w.shape[1])) for w in weights}
    mx.eval(list(xs.values()))
    blas_only = _time(lambda: mx.eval([xs[w.shape[1]] @ w.T for w in weights]), 5)

    # building one step's graph in Python (no evaluation)
    cache = make_prompt_cache(model)
    mx.eval(model(prompt[None], cache=cache))
    token = mx.array([[1]])
    build = _time(lambda: model(token, cache=cache), 5)
    mb = sum(w.size * w.itemsize for w in weights) / 2**20
    return {
        "ms_per_token": statistics.median(per_token),
        "ms_blas_only": blas_only * 1e3,
        "ms_python_build": build * 1e3,
        "weight_mb": mb,
        "gb_per_s_blas": mb / 1024 / blas_only,
        "blas": nbllm.blas.blas_status()["summary"],
    }


def part_attention() -> dict[str, Any]:
    import mlx.core as mx
    import mlx.nn as nn

    import nbllm  # first: it loads the shim and OpenBLAS before mlx.core

    layer = nbllm.load(FOLDER).model.model.layers[0]
    linears = [m for _, m in layer.named_modules() if isinstance(m, nn.Linear)]
    out: dict[str, Any] = {}
    for L, S in [(2048, 2048), (1024, 1024), (512, 512), (256, 256), (952, 3000), (512, 3000), (256, 3000)]:
        x = {m.weight.shape[1]: mx.random.normal((L, m.weight.shape[1])) for m in linears}
        q, k, v = mx.random.normal((1, 9, L, 64)), mx.random.normal((1, 3, S, 64)), mx.random.normal((1, 3, S, 64))
        mx.eval(list(x.values()), q, k, v)
        proj = _time(lambda: mx.eval([x[m.weight.shape[1]] @ m.weight.T for m in linears]), 3)
        sdpa = _time(lambda: mx.eval(mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask="causal")), 3)
        out[f"L={L} S={S}"] = {"ms_projections": proj * 1e3, "ms_attention": sdpa * 1e3}
    out["blas"] = nbllm.blas.blas_status()["summary"]
    return out


PARTS: dict[str, Callable[[], Any]] = {"ops": part_ops, "decode": part_decode, "attention": part_attention}
RUNS = {  # part -> environments, one process each
    "ops": [{}],
    "decode": [
        {"NBLLM_GEMV": "0"},
        {"NBLLM_GEMV": "1"},
        {"NBLLM_GEMV": "0", "OPENBLAS_NUM_THREADS": "1"},
        {"NBLLM_GEMV": "1", "OPENBLAS_NUM_THREADS": "1"},
    ],
    "attention": [{}, {"OPENBLAS_NUM_THREADS": "1"}],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--what", choices=sorted(PARTS), nargs="*", default=["ops", "decode", "attention"])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(PARTS[args.child]()))
        return
    if not (FOLDER / "model.safetensors").exists():
        raise SystemExit(f"profile_cpu: run bench/bench_cpu.py first (it builds the model in {FOLDER})")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    for part in args.what:
        for extra in RUNS[part]:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("NBLLM_", "OPENBLAS_"))} | extra
            out = subprocess.run([sys.executable, __file__, "--child", part], capture_output=True, text=True, env=env)
            if out.returncode != 0:
                raise SystemExit(f"profile_cpu: {part} {extra} failed:\n{out.stderr[-3000:]}")
            result = json.loads(out.stdout.strip().splitlines()[-1])
            if "blas" in result and "reference" in str(result["blas"]):
                raise SystemExit(f"profile_cpu: {part} ran on the reference BLAS: {result['blas']}")
            print(f"\n== {part} {extra or ''}")
            print(json.dumps(result, indent=1), flush=True)
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
