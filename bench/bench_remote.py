"""Remote-engine benchmark: ``nbllm serve`` + ``nbllm.connect`` against the in-process engine, in one run.

    python bench/bench_remote.py            # prints a table
    python bench/bench_remote.py --quick    # fewer tokens, for a smoke run

The server runs in its own process (``nbllm serve``, on 127.0.0.1, a free
port), the client and the in-process reference in this one; runs alternate
so drift on this shared machine hits both alike. Rows, per model (the
embedded model and a generated 25M-param llama):

  * decode tok/s with top_logprobs=10, remote / in-process (target >= 0.9 on the fixture)
  * stepper step latency, remote / in-process
  * time to first token of a repeated long prompt, cold / warm (prefix reuse in the server; target >= 20x)
    -- 2,000 tokens on the fixture; the embedded model's context is 256, so 200 there
  * 8 concurrent clients on one server: total tok/s, p95 request latency, failures (must be 0)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import nbllm  # first: it loads the fast BLAS before mlx.core

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from servers import nbllm_serve


def no_eos(lm: Any) -> dict[int, float]:
    """A logit bias that keeps every run going to max_tokens (both sides alike)."""
    return {int(e): -1e9 for e in lm.tokenizer.eos_token_ids}


def decode_tps(target: Any, prompt: str, n: int, bias: dict[int, float]) -> float:
    stream = target.stream(prompt, raw=True, max_tokens=n, top_logprobs=10, temperature=0, logit_bias=bias)
    first = None
    count = 0
    for _ in stream:
        count += 1
        if first is None:
            first = time.perf_counter()
    assert count == n, (count, n)
    return (n - 1) / (time.perf_counter() - first)


def step_latency(target: Any, prompt: str, steps: int, bias: dict[int, float]) -> float:
    stepper = target.stepper(prompt, raw=True, top_logprobs=10, logit_bias=bias)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        stepper.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def first_token(remote: Any, prompt: str) -> float:
    t = time.perf_counter()
    next(iter(remote.stream(prompt, raw=True, max_tokens=1, temperature=0)))
    return time.perf_counter() - t


def long_prompt(lm: Any, n_tokens: int, salt: int) -> str:
    from nbllm.testing import sample_corpus

    text = f"{salt} " + " ".join(sample_corpus(seed=salt, n_lines=400))
    ids = lm.encode(text, raw=True).ids[:n_tokens]
    return lm.decode(ids)


def concurrent(url: str, clients: int, requests: int, n: int, bias: dict[int, float]) -> dict[str, Any]:
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        remote = nbllm.connect(url, timeout=300)
        for r in range(requests):
            t = time.perf_counter()
            try:
                c = remote.generate(f"Story {i}.{r}: once", raw=True, max_tokens=n, temperature=0, logit_bias=bias)
                assert len(c.tokens) == n
                with lock:
                    latencies.append(time.perf_counter() - t)
            except Exception as err:  # counted, and the row says so
                with lock:
                    failures.append(f"{type(err).__name__}: {err}")
        remote.close()

    tic = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    wall = time.perf_counter() - tic
    lat = sorted(latencies)
    p95 = lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))] if lat else float("nan")
    return {
        "tps": len(lat) * n / wall,
        "p95": p95,
        "failed": len(failures),
        "done": len(lat),
        "first_error": failures[:1],
    }


def bench(label: str, path: Path | None, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    lm = nbllm.load(path)
    bias = no_eos(lm)
    server = nbllm_serve(path, tmp / f"{label}.log")
    try:
        remote = nbllm.connect(server.url, timeout=300)
        remote.caps  # noqa: B018  (probe before timing)
        prompt = "Once upon a time, in a small village by the sea,"
        local_tps, remote_tps, local_step, remote_step = [], [], [], []
        decode_tps(lm, prompt, 8, bias), decode_tps(remote, prompt, 8, bias)  # warm-up
        for _ in range(args.repeats):
            local_tps.append(decode_tps(lm, prompt, args.tokens, bias))
            remote_tps.append(decode_tps(remote, prompt, args.tokens, bias))
            local_step.append(step_latency(lm, prompt, args.steps, bias))
            remote_step.append(step_latency(remote, prompt, args.steps, bias))
        context = lm.context_length or 4096
        n_long = min(2000, context - 56)
        cold, warm = [], []
        for salt in range(args.cold):
            text = long_prompt(lm, n_long, salt + 1)
            cold.append(first_token(remote, text))
            warm.extend(first_token(remote, text) for _ in range(3))
        many = concurrent(server.url, 8, args.requests, args.conc_tokens, bias)
        remote.close()
    finally:
        server.stop()
    return {
        "label": label,
        "params": lm.info.parameters,
        "local_tps": statistics.median(local_tps),
        "remote_tps": statistics.median(remote_tps),
        "local_step": statistics.median(local_step),
        "remote_step": statistics.median(remote_step),
        "long": n_long,
        "cold": statistics.median(cold),
        "warm": statistics.median(warm),
        **{f"c_{k}": v for k, v in many.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    args.tokens, args.steps, args.repeats, args.cold = (32, 8, 1, 1) if args.quick else (128, 20, 3, 2)
    args.requests, args.conc_tokens = (1, 16) if args.quick else (3, 48)
    from nbllm.testing import BENCH_SHAPE, make_model

    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        fixture = make_model(tmp / "bench-llama", "llama", overrides=BENCH_SHAPE)
        rows = [bench("embedded", None, args, tmp), bench("25M fixture", fixture, args, tmp)]
    print(
        f"\nbench_remote · nbllm serve (own process) + nbllm.connect vs in-process · {time.strftime('%Y-%m-%d %H:%M')}"
    )
    print(
        f"{'model':<13} {'params':>7}  {'decode tok/s local/remote':>27} {'ratio':>6}  {'step ms local/remote':>21} {'ratio':>6}"
    )
    for r in rows:
        print(
            f"{r['label']:<13} {r['params'] / 1e6:6.1f}M  {r['local_tps']:12.1f} / {r['remote_tps']:<12.1f} "
            f"{r['remote_tps'] / r['local_tps']:6.2f}  {r['local_step'] * 1e3:9.1f} / {r['remote_step'] * 1e3:<9.1f} "
            f"{r['remote_step'] / r['local_step']:6.2f}"
        )
    print(
        f"\n{'model':<13} {'prompt':>7}  {'TTFT cold s':>11} {'warm s':>8} {'cold/warm':>10}   8 clients: tok/s  p95 s  failed"
    )
    for r in rows:
        print(
            f"{r['label']:<13} {r['long']:>7}  {r['cold']:11.3f} {r['warm']:8.3f} {r['cold'] / r['warm']:10.1f}   "
            f"{r['c_tps']:16.1f} {r['c_p95']:6.2f} {r['c_failed']:>7} ({r['c_done']} requests){r['c_first_error']}"
        )
    print("targets: decode ratio >= 0.9 on the fixture; cold/warm >= 20x; 0 failed")


if __name__ == "__main__":
    main()
