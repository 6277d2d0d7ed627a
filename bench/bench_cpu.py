"""Linux CPU speed (issue 13): mlx-lm vs nbllm before/after, on SmolLM2-135M's exact shape.

    python bench/bench_cpu.py              # the full table (~30 min on 2 busy cores)
    python bench/bench_cpu.py --quick      # short prompts, one round: a smoke run
    python bench/bench_cpu.py --json out.json

One process per configuration and round (BLAS loading is process-wide), rounds
interleaved so a change in machine load hits every configuration alike; each
figure is the median over rounds. Random weights (speed does not depend on the
values) in a llama with SmolLM2-135M's shape, stored as bf16 like the real
checkpoint; random prompt ids fed to mlx_lm.generate.generate_step, greedy.

Configurations:
  * mlx-lm bf16: raw mlx-lm, stored dtype, MLX's bundled reference BLAS
  * mlx-lm fp32 + OpenBLAS: raw mlx-lm, weights cast to fp32, OpenBLAS preloaded (no shim)
  * nbllm before: nbllm.load (its BLAS setup and fp32 cast) and lm.stream, with this issue's
    changes off: NBLLM_GEMV=0, NBLLM_CPU_ATTENTION=0, prefill in mlx-lm's 2,048-token chunks
  * nbllm after: the same with everything on (the GEMV shim, the C softmax for long prefill,
    the CPU backend's chunk size), exactly what a user's lm.stream runs
  * nbllm after, 1 BLAS thread: OPENBLAS_NUM_THREADS=1 (with --with-threads)
Then a prefill chunk-size sweep at 2,048 and ~3,000 tokens, with the cold time
to first token (first request in a fresh process) after the ~3,000-token prompt.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _standalone(name: str, path: Path) -> Any:
    """A module of nbllm loaded from its file alone: importing it through the package would run
    nbllm/__init__.py, which loads OpenBLAS and the GEMV shim into every process (the mlx-lm rows too)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SMOLLM2_135M: dict[str, Any] = _standalone("nbllm_text_fixture", ROOT / "nbllm" / "testing" / "text.py").SMOLLM2_135M

CONFIGS: dict[str, dict[str, str]] = {  # name -> environment of its process
    "mlx-lm bf16": {},
    "mlx-lm fp32 + OpenBLAS": {},
    "nbllm before": {"NBLLM_GEMV": "0", "NBLLM_CPU_ATTENTION": "0"},
    "nbllm after": {"NBLLM_GEMV": "1"},
    "nbllm after, 1 BLAS thread": {"NBLLM_GEMV": "1", "OPENBLAS_NUM_THREADS": "1"},
}
BASELINE = "mlx-lm fp32 + OpenBLAS"


# -- child processes -----------------------------------------------------------
def build_model(folder: Path) -> None:
    """Save a random-weight SmolLM2-135M-shaped llama (bf16) with a small real tokenizer."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    from nbllm.testing import build_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer(folder)  # only load() needs it: prompts are random ids over the full 49,152 vocabulary
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(SMOLLM2_135M))
    weights = {k: v.astype(mx.bfloat16) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    (folder / "config.json").write_text(json.dumps(SMOLLM2_135M | {"torch_dtype": "bfloat16"}, indent=2))


def _load(config: str, folder: Path) -> tuple[Any, dict[str, Any]]:
    """Set up the process as ``config`` says; return the model and a note of what is active."""
    if config.startswith("nbllm"):
        import nbllm

        lm = nbllm.load(folder)
        return lm, {"blas": nbllm.blas.blas_status()["summary"], "cpu_attention": lm.info.cpu_attention}
    if "OpenBLAS" in config:
        # nbllm's OpenBLAS lookup, without importing nbllm (which would load the shim too)
        path = _standalone("blas_lookup", ROOT / "nbllm" / "blas.py")._find()
        if path is None:
            raise SystemExit("bench_cpu: no OpenBLAS found (apt-get install libopenblas0-pthread)")
        import ctypes

        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    import mlx.core as mx
    import mlx_lm

    model = mlx_lm.load(str(folder))[0]
    assert "nbllm" not in sys.modules, "the mlx-lm rows must run without nbllm (its import loads the GEMV shim)"
    if "fp32" in config:
        model.set_dtype(mx.float32)
    return model, {"blas": "OpenBLAS preloaded, no shim" if "OpenBLAS" in config else "MLX's reference BLAS"}


def _prompt(n: int) -> list[int]:
    import random

    rng = random.Random(n)  # the same ids in every process
    return [rng.randrange(int(SMOLLM2_135M["vocab_size"])) for _ in range(n)]


def run_once(model: Any, n_prompt: int, max_tokens: int, chunk: int) -> dict[str, float | None]:
    """One greedy generation: prefill tok/s (prompt / time to first token), decode tok/s, peak memory.

    ``model`` is an nbllm ``LM`` (run through ``lm.stream``, what users run) or an
    mlx-lm model (run through ``generate_step``); ``chunk`` 0 is the engine's own choice.
    """
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    ids = _prompt(n_prompt)
    mx.reset_peak_memory()
    stamps = []
    if hasattr(model, "stream"):
        steps: Any = model.stream(ids, max_tokens=max_tokens, prefill_step_size=chunk or None, stop=None)
    else:
        steps = generate_step(mx.array(ids), model, max_tokens=max_tokens, prefill_step_size=chunk or 2048)
    start = time.perf_counter()
    for _ in steps:
        stamps.append(time.perf_counter())
    ttft = stamps[0] - start
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None
    return {"ttft": ttft, "prefill": n_prompt / ttft, "decode": decode, "peak_mb": mx.get_peak_memory() / 2**20}


def child(args: argparse.Namespace) -> None:
    import resource

    model, note = _load(args.config, Path(args.folder))
    runs: dict[str, Any] = {}
    if args.cold:  # before any warm-up: the first request this process serves
        runs["cold"] = run_once(model, args.cold, 1, args.chunk)
    run_once(model, 32, 4, args.chunk)  # warm-up
    for n in args.lengths:
        runs[str(n)] = run_once(model, n, args.tokens, args.chunk)
    for rep in range(args.interleave_reps):  # chunk sizes side by side in one process: paired under the same load
        order = args.interleave if rep % 2 == 0 else args.interleave[::-1]
        for n in args.lengths_interleaved:
            for c in order:
                runs.setdefault(f"{n}/{c}", []).append(run_once(model, n, 1, c)["prefill"])
    blas = sys.modules.get("nbllm.blas")  # only the nbllm configurations import it
    note["shim_calls"] = blas.shim_calls() if blas else None
    note["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"runs": runs, **note}))


# -- the parent ------------------------------------------------------------------
def spawn(
    config: str,
    folder: Path,
    lengths: list[int],
    tokens: int,
    chunk: int,
    cold: int = 0,
    extra_env: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NBLLM_", "OPENBLAS_"))}
    env.update(CONFIGS[config], **(extra_env or {}))
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--config",
        config,
        "--folder",
        str(folder),
        "--tokens",
        str(tokens),
        "--chunk",
        str(chunk),
        "--cold",
        str(cold),
        "--lengths",
        *map(str, lengths),
        *(extra_args or []),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"bench_cpu: {config} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _chunk_of(config: str, after_chunk: int = 0) -> int:
    """Prefill chunk per configuration: mlx-lm's 2,048 before this issue, the engine's choice (0) after."""
    return after_chunk if config.startswith("nbllm after") else 2048


def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def paired(args: argparse.Namespace, folder: Path, chunks: list[int], long: int) -> None:
    """Decode ratios taken round by round (configurations seconds apart), and chunk sizes timed in one process."""
    names = [BASELINE, "nbllm before", "nbllm after"]
    rounds: list[dict[str, float]] = []
    for r in range(args.paired):
        rounds.append({c: spawn(c, folder, [256], 64, _chunk_of(c))["runs"]["256"]["decode"] for c in names})
        print(f"  paired round {r + 1}: " + ", ".join(f"{c} {v:.2f}" for c, v in rounds[-1].items()), flush=True)
    extra = [
        "--interleave",
        *map(str, chunks),
        "--interleave-reps",
        str(args.interleave_reps or 1),
        "--lengths-interleaved",
        "2048",
        str(long),
    ]
    sweep = spawn("nbllm after", folder, [], 1, 2048, extra_args=extra)["runs"]
    print(
        f"\nDecode tok/s after a 256-token prompt, 64 greedy tokens, {args.paired} rounds "
        f"(load average {_load_avg()} at the end)"
    )
    for c in names:
        print(
            f"  {c:<24} median {statistics.median(r[c] for r in rounds):5.2f}  runs "
            + " ".join(f"{r[c]:.2f}" for r in rounds)
        )
    for c in names[1:]:
        ratios = [r[c] / r[BASELINE] for r in rounds]
        print(
            f"  {c} / {BASELINE}: median of per-round ratios {statistics.median(ratios):.2f}x  "
            f"({' '.join(f'{x:.2f}' for x in ratios)})"
        )
    ratios = [r["nbllm after"] / r["nbllm before"] for r in rounds]
    print(f"  nbllm after / nbllm before: {statistics.median(ratios):.2f}x ({' '.join(f'{x:.2f}' for x in ratios)})")
    print("\nPrefill tok/s by chunk size, one process, sizes interleaved (order reversed on the 2nd pass)")
    for n in (2048, long):
        print(
            f"  @{n}: "
            + "  ".join(
                f"{c}: {statistics.median(sweep[f'{n}/{c}']):.1f} ({'/'.join(f'{x:.1f}' for x in sweep[f'{n}/{c}'])})"
                for c in chunks
            )
        )
    if args.json:
        args.json.write_text(json.dumps({"rounds": rounds, "sweep": sweep}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short prompts, 8 tokens, one round")
    ap.add_argument("--rounds", type=int, default=3, help="processes per configuration (median over them)")
    ap.add_argument("--bf16-rounds", type=int, default=1, help="rounds for the slow bf16 row")
    ap.add_argument("--sweep-rounds", type=int, default=2, help="rounds for the chunk-size sweep")
    ap.add_argument("--chunks", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument(
        "--after-chunk", type=int, default=0, help="chunk for 'nbllm after' (default: the engine's own choice)"
    )
    ap.add_argument("--with-threads", action="store_true", help="also the OPENBLAS_NUM_THREADS=1 row")
    ap.add_argument("--json", type=Path, help="also save every measurement here")
    ap.add_argument("--folder", type=Path, help="model folder (built if missing)")
    # child-process arguments
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--lengths", type=int, nargs="*", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--tokens", type=int, default=64, help=argparse.SUPPRESS)
    ap.add_argument("--chunk", type=int, default=2048, help=argparse.SUPPRESS)
    ap.add_argument("--cold", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--interleave", type=int, nargs="*", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--interleave-reps", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--lengths-interleaved", type=int, nargs="*", default=[], help=argparse.SUPPRESS)
    ap.add_argument(
        "--paired",
        type=int,
        default=0,
        help="instead of the full run: N rounds of short decode processes (raw fp32, before, after) "
        "and one process timing the chunk sizes side by side; ratios taken round by round",
    )
    args = ap.parse_args()
    if args.child:
        return child(args)

    lengths, tokens, long = ([256, 2048], 64, 3000) if not args.quick else ([64, 256], 8, 512)
    rounds = 1 if args.quick else args.rounds
    sweep_rounds = 1 if args.quick else args.sweep_rounds
    chunks = [c for c in args.chunks if not args.quick or c <= 256] or [256]
    folder = args.folder or Path(tempfile.gettempdir()) / "nbllm-bench-smollm2-135m-shape"
    if not (folder / "model.safetensors").exists():
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); "
                f"import bench_cpu; bench_cpu.build_model(__import__('pathlib').Path({str(folder)!r}))",
            ],
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            raise SystemExit(f"bench_cpu: could not build the model:\n{out.stderr[-3000:]}")
    start_load, t0 = _load_avg(), time.time()
    print(f"load average at start (1/5/15 min): {start_load}  ({os.cpu_count()} CPUs)", flush=True)
    if args.paired:
        return paired(args, folder, chunks, long)

    # 1. chunk sweep (nbllm after: prefill does not touch the shim, every chunk is a one-row-free GEMM)
    sweep: dict[int, list[dict[str, Any]]] = {c: [] for c in chunks}
    for r in range(sweep_rounds):
        for c in chunks:
            sweep[c].append(spawn("nbllm after", folder, [lengths[-1]], 1, c, cold=long))
            print(f"  sweep round {r + 1}: chunk {c} done", flush=True)
    sweep_med = {
        c: {k: _median([s["runs"][k]["prefill"] for s in sweep[c]]) for k in ("cold", str(lengths[-1]))} for c in chunks
    }
    best = max(chunks, key=lambda c: (sweep_med[c][str(lengths[-1])] or 0) + (sweep_med[c]["cold"] or 0))
    after_chunk = args.after_chunk

    # 2. the configurations, interleaved by round
    configs = [c for c in CONFIGS if args.with_threads or "1 BLAS thread" not in c]
    results: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    for r in range(max(rounds, args.bf16_rounds)):
        for config in configs:
            if r >= (args.bf16_rounds if config == "mlx-lm bf16" else rounds):
                continue
            results[config].append(spawn(config, folder, lengths, tokens, _chunk_of(config, after_chunk)))
            print(f"  round {r + 1}: {config} done", flush=True)
    end_load = _load_avg()

    # 3. the tables
    print(
        f"\nSmolLM2-135M shape (30x576, 9/3 heads, MLP 1536, vocab 49,152, tied), random weights stored bf16; "
        f"greedy, {tokens} new tokens; medians of {rounds} processes ({args.bf16_rounds} for bf16)"
    )
    print(f"load average at start: {start_load}; at end: {end_load}; {(time.time() - t0) / 60:.0f} min\n")
    head = f"{'configuration':<28} {'prompt':>6} {'prefill tok/s':>13} {'decode tok/s':>12} {'MLX peak MB':>11} {'max RSS MB':>10}"
    print(head + "\n" + "-" * len(head))
    med: dict[tuple[str, int], dict[str, float | None]] = {}
    for config, procs in results.items():
        for n in lengths:
            m = {k: _median([p["runs"][str(n)][k] for p in procs]) for k in ("prefill", "decode", "peak_mb")}
            m["rss"] = _median([p["max_rss_mb"] for p in procs])
            med[(config, n)] = m
            label = config
            print(
                f"{label:<28} {n:>6} {_fmt(m['prefill']):>13} {_fmt(m['decode']):>12} "
                f"{_fmt(m['peak_mb'], '.0f'):>11} {_fmt(m['rss'], '.0f'):>10}"
            )
    for config, procs in results.items():
        attention = procs[0].get("cpu_attention")
        print(
            f"  {config}: {procs[0]['blas']}; shim calls {procs[0]['shim_calls']}"
            + (f"; attention: {attention}" if attention else "")
            + f"; prefill chunk {_chunk_of(config, after_chunk) or 'the engine default'}"
        )

    print(f"\nRatios to {BASELINE} (targets: decode >= 1.5x, prefill at {lengths[-1]} >= 1.5x)")
    for config in configs:
        if config == BASELINE:
            continue
        parts = []
        for n in lengths:
            for k in ("decode", "prefill"):
                a, b = med[(config, n)][k], med[(BASELINE, n)][k]
                parts.append(f"{k} @{n}: {a / b:.2f}x" if a and b else f"{k} @{n}: -")
        print(f"  {config:<28} " + "  ".join(parts))

    print(
        f"\nPrefill chunk sweep (nbllm after; prefill tok/s, medians of {sweep_rounds} processes; the {long}-token "
        f"prompt is each process's first request (cold: nothing cached, nothing warmed up))"
    )
    print(f"{'chunk':>6} {f'@{lengths[-1]}':>8} {f'@{long} cold':>10} {'cold TTFT s':>11}")
    for c in chunks:
        ttft = _median([s["runs"]["cold"]["ttft"] for s in sweep[c]])
        print(f"{c:>6} {_fmt(sweep_med[c][str(lengths[-1])]):>8} {_fmt(sweep_med[c]['cold']):>10} {_fmt(ttft):>11}")
    import mlx.core as mx

    from nbllm.mlx_engine import prefill_step_for

    default = prefill_step_for(mx.cpu)
    print(f"fastest chunk over both lengths: {best}; the CPU engine's default: {default}")

    try:
        import llama_cpp  # noqa: F401

        print("\nllama-cpp-python is importable, but its GGUF row is not written yet")
    except ImportError:
        print("\nllama-cpp-python not installed: no GGUF row (pip install llama-cpp-python builds it from source)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"load": [start_load, end_load], "results": results, "sweep": sweep, "after_chunk": after_chunk},
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
