"""Inside-the-model benchmark, in one run: what reading the model's internals costs.

    python bench/bench_inside.py                 # the embedded model and a 25.7M-param fixture
    python bench/bench_inside.py --quick         # fewer repeats

Rows, per model (median of the repeats, ratios within the same run):
  * logit lens of a 256-token prompt / a plain forward pass of it        (target <= 2x)
  * attention capture of the same prompt / a plain forward pass           (target <= 2x)
  * score() tokens/s / prefill tokens/s of the same text                  (target >= 0.8)
  * speculative greedy decode tok/s / plain greedy, and the acceptance rate, with a draft
    that shares the tokenizer (the shipped draft for the embedded model when there is one;
    else the model as its own draft, which shows the machinery's cost at 100% acceptance)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nbllm  # first: it loads the fast BLAS before mlx.core


def timed(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up: compile, allocate
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def rows_for(lm: nbllm.LM, draft: nbllm.LM, draft_name: str, repeats: int) -> list[tuple[str, str, str, str]]:
    import mlx.core as mx

    from nbllm.inside.run import forward

    base = list(lm.encode(" ".join(["The capital of France is Paris and the river is long."] * 40), raw=True).ids)
    ids = (base * 4)[:256]
    prompt = lm.encode(ids)

    def plain() -> None:
        mx.eval(forward(lm, prompt))

    t_plain = timed(plain, repeats)
    t_lens = timed(lambda: lm.logit_lens(prompt), repeats)
    t_attn = timed(lambda: lm.attention(prompt), repeats)
    t_score = timed(lambda: lm.score(prompt), repeats)
    cache_free = {int(e): -1e9 for e in lm.tokenizer.eos_token_ids}
    n = 64

    def decode(**kw: Any) -> tuple[float, Any]:
        c = lm.generate("Once upon a time", raw=True, max_tokens=n, logit_bias=cache_free, **kw)
        return c.stats.generation_tps, c

    plain_tps = statistics.median(decode()[0] for _ in range(repeats))
    spec = [decode(draft_model=draft) for _ in range(repeats)]
    spec_tps = statistics.median(s[0] for s in spec)
    same = [t.id for t in spec[0][1].tokens] == [t.id for t in decode()[1].tokens]
    rate = spec[0][1].stats.acceptance_rate or 0.0
    return [
        ("plain forward, 256 tokens (ms)", f"{t_plain * 1000:.1f}", "", ""),
        ("logit lens / forward", f"{t_lens * 1000:.1f} ms", f"{t_lens / t_plain:.2f}x", "<= 2x"),
        ("attention capture / forward", f"{t_attn * 1000:.1f} ms", f"{t_attn / t_plain:.2f}x", "<= 2x"),
        ("score tok/s / prefill tok/s", f"{255 / t_score:.0f} tok/s", f"{t_plain / t_score:.2f}", ">= 0.8"),
        (
            f"speculative decode / plain ({draft_name})",
            f"{spec_tps:.1f} vs {plain_tps:.1f} tok/s",
            f"{spec_tps / plain_tps:.2f}",
            "> 1 with a trained draft",
        ),
        ("  acceptance rate · same greedy tokens", f"{rate:.0%} · {'yes' if same else 'NO'}", "", "yes"),
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    repeats = 3 if args.quick else 7
    load = os.getloadavg()[0]
    from nbllm.loading import ASSETS
    from nbllm.testing import BENCH_SHAPE, make_model

    embedded = nbllm.load()
    draft_path = ASSETS / "default-draft"
    if (draft_path / "config.json").exists():
        draft, draft_name = nbllm.load(draft_path), "shipped draft"
    else:
        draft, draft_name = embedded, "the model itself"
    table: list[tuple[str, str, str, str]] = [("embedded model", "", "", "")]
    table += rows_for(embedded, draft, draft_name, repeats)
    with tempfile.TemporaryDirectory() as tmp:
        fixture = nbllm.load(make_model(Path(tmp) / "bench-llama", "llama", overrides=BENCH_SHAPE))
        table += [(f"25.7M-param fixture ({fixture.info.parameters / 1e6:.1f}M)", "", "", "")]
        table += rows_for(fixture, fixture, "the model itself", repeats)
    print(
        f"\nnbllm inside-the-model benchmark · median of {repeats} · load average {load:.2f} -> {os.getloadavg()[0]:.2f}\n"
    )
    width = max(len(r[0]) for r in table)
    print(f"{'measure':<{width}}  {'value':>24}  {'ratio':>7}  target")
    for label, value, ratio, target in table:
        print(f"{label:<{width}}  {value:>24}  {ratio:>7}  {target}")


if __name__ == "__main__":
    main()
