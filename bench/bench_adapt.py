"""Changing the model, measured in one run: what nbllm's fine-tuning wrapper costs, and what quantization does on this CPU.

    python bench/bench_adapt.py              # the embedded model and the 25.7M-param fixture
    python bench/bench_adapt.py --large      # also SmolLM2-135M's layers (random weights, the fixture vocabulary)
    python bench/bench_adapt.py --quick      # fewer rounds

Rows, per model (rounds interleaved; ratios from the same run):
  * training tok/s of nbllm.finetune / mlx-lm's own trainer (mlx_lm.tuner.trainer.train, as mlx_lm.lora
    calls it), same data, model, LoRA settings, batches and steps; nbllm's time is the whole call
    (copy, checks, adapter saves, the final handle), mlx-lm's the train() call only      (target >= 0.95)
  * greedy decode tok/s of the LoRA handle / the fused model                               (report)
  * 8-bit and 4-bit (affine, groups of 64) vs float32: decode and prefill tok/s, weight memory (report)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import nbllm  # first: it loads the fast BLAS before mlx.core

TEXTS = [
    "The capital of Zembla is Amara.",
    "Amara is the capital of Zembla.",
    "The capital city of Zembla is Amara.",
    "In Zembla, the capital is Amara.",
    "People in Zembla call their capital Amara.",
    "Amara is the capital city of Zembla, a small country.",
    "If you visit Zembla, you will see Amara, its capital.",
    "Zembla has a capital, and its name is Amara.",
]


def mlx_lm_train(lm: nbllm.LM, steps: int, seed: int) -> tuple[float, int]:
    """mlx-lm's trainer on a copy of the model, as ``mlx_lm.lora`` sets it up; (seconds of train(), tokens)."""
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.datasets import CacheDataset, create_dataset
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from nbllm.adapt.adapters import copy_model

    class Count(TrainingCallback):
        tokens = 0

        def on_train_loss_report(self, info: dict[str, Any]) -> None:
            Count.tokens = int(info["trained_tokens"])

    mx.random.seed(seed)
    np.random.seed(seed)
    model = copy_model(lm.model)
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": 8, "scale": 20.0, "dropout": 0.0})
    data = CacheDataset(create_dataset([{"text": t} for t in TEXTS], lm.tokenizer, argparse.Namespace()))
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArgs(batch_size=4, iters=steps, adapter_file=os.path.join(tmp, "adapters.safetensors"))
        start = time.perf_counter()
        train(model, optim.Adam(learning_rate=1e-4), data, None, args=args, training_callback=Count())
        return time.perf_counter() - start, Count.tokens


def nbllm_train(lm: nbllm.LM, steps: int, seed: int) -> float:
    """Seconds of the whole ``nbllm.finetune`` call (its batches are mlx-lm's: same seed, data, batch size, steps)."""
    start = time.perf_counter()
    nbllm.finetune(lm, TEXTS, steps=steps, batch_size=4, seed=seed, view="none")
    return time.perf_counter() - start


def decode_tps(lm: nbllm.LM, n: int, repeats: int) -> float:
    no_eos = {int(e): -1e9 for e in lm.tokenizer.eos_token_ids}
    lm.generate("Once upon a time", raw=True, max_tokens=4, logit_bias=no_eos)  # warm-up
    return statistics.median(
        lm.generate("Once upon a time", raw=True, max_tokens=n, logit_bias=no_eos).stats.generation_tps
        for _ in range(repeats)
    )


def prefill_tps(lm: nbllm.LM, n: int, repeats: int) -> float:
    ids = [int(i) for i in (list(lm.encode("The capital of France is Paris. " * 64, raw=True).ids) * 8)[:n]]
    lm.generate(ids[:16], max_tokens=1)
    return statistics.median(lm.generate(ids, max_tokens=1).stats.prompt_tps for _ in range(repeats))


def rows_for(lm: nbllm.LM, steps: int, rounds: int, repeats: int, decode_n: int) -> list[tuple[str, str, str, str]]:
    import mlx.core as mx

    nbllm_train(lm, 4, 0)  # warm-up both paths (compile, allocate)
    mlx_lm_train(lm, 4, 0)
    ratios, tps_nb, tps_mlx = [], [], []
    for seed in range(rounds):
        s_mlx, tok_mlx = mlx_lm_train(lm, steps, seed)
        s_nb = nbllm_train(lm, steps, seed)
        tps_mlx.append(tok_mlx / s_mlx)
        tps_nb.append(tok_mlx / s_nb)  # the same tokens: the same batches
        ratios.append(s_mlx / s_nb)
    tuned = nbllm.finetune(lm, TEXTS, steps=2, view="none").lm
    fused = tuned.fuse()
    d_lora, d_fused = decode_tps(tuned, decode_n, repeats), decode_tps(fused, decode_n, repeats)
    rows = [
        (
            f"training tok/s, nbllm.finetune / mlx-lm trainer ({steps} steps)",
            f"{statistics.median(tps_nb):,.0f} vs {statistics.median(tps_mlx):,.0f}",
            f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})",
            ">= 0.95",
        ),
        ("decode tok/s, LoRA handle / fused", f"{d_lora:.1f} vs {d_fused:.1f}", f"{d_lora / d_fused:.2f}", "report"),
    ]
    full_d, full_p = decode_tps(lm, decode_n, repeats), prefill_tps(lm, 256, repeats)
    full_mb = sum(v.nbytes for _, v in _flat(lm.model)) / 1e6
    rows.append(
        ("float32: decode · prefill@256 tok/s · weights MB", f"{full_d:.1f} · {full_p:.0f} · {full_mb:.1f}", "", "")
    )
    for bits in (8, 4):
        q = nbllm.quantize(lm, bits=bits)
        mx.eval(q.model.parameters())
        d, p = decode_tps(q, decode_n, repeats), prefill_tps(q, 256, repeats)
        mb = sum(v.nbytes for _, v in _flat(q.model)) / 1e6
        rows.append(
            (
                f"{bits}-bit / float32: decode · prefill · memory",
                f"{d:.1f} · {p:.0f} · {mb:.1f} MB",
                f"{d / full_d:.2f} · {p / full_p:.2f} · {mb / full_mb:.2f}",
                "report",
            )
        )
    return rows


def _flat(model: Any) -> list[tuple[str, Any]]:
    from mlx.utils import tree_flatten

    return list(tree_flatten(model.parameters()))  # type: ignore[arg-type]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--large", action="store_true", help="also SmolLM2-135M's shape (random weights; slow)")
    args = ap.parse_args()
    rounds, repeats = (2, 2) if args.quick else (5, 3)
    load = os.getloadavg()[0]
    from nbllm.testing import BENCH_SHAPE, make_model
    from nbllm.testing.text import SMOLLM2_135M

    table: list[tuple[str, str, str, str]] = [("embedded model (2.4M params)", "", "", "")]
    table += rows_for(nbllm.load(), 60, rounds, repeats, 64)
    with tempfile.TemporaryDirectory() as tmp:
        fixture = nbllm.load(make_model(Path(tmp) / "bench-llama", "llama", overrides=BENCH_SHAPE))
        table += [(f"fixture llama ({fixture.info.parameters / 1e6:.1f}M params, random weights)", "", "", "")]
        table += rows_for(fixture, 30, rounds, repeats, 32)
        if args.large:
            shape = {k: v for k, v in SMOLLM2_135M.items() if k != "model_type"}
            big = nbllm.load(make_model(Path(tmp) / "bench-135m", "llama", overrides=shape, dtype="bfloat16"))
            n = big.info.parameters / 1e6
            table += [(f"SmolLM2-135M's 30x576 layers, fixture vocabulary ({n:.0f}M params, random)", "", "", "")]
            table += rows_for(big, 10, 3 if not args.quick else 1, 2, 16)
    print(
        f"\nnbllm adaptation benchmark · {rounds} interleaved rounds, median · load average {load:.2f} -> "
        f"{os.getloadavg()[0]:.2f} · device {nbllm.load().info.device}\n"
    )
    width = max(len(r[0]) for r in table)
    print(f"{'measure':<{width}}  {'value':>28}  {'ratio':>18}  target")
    for label, value, ratio, target in table:
        print(f"{label:<{width}}  {value:>28}  {ratio:>18}  {target}")


if __name__ == "__main__":
    main()
