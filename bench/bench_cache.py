"""Prompt cache and chat benchmark, in one run on one model.

    python bench/bench_cache.py            # prints a table
    python bench/bench_cache.py --quick    # shorter history and fewer turns, for a smoke run

Rows:
  * time to first token of a new user turn after a ~3,000-token history: warm
    (the chat's cache reused) vs cold (a fresh session with the same history), target >= 50x
  * prefix reuse across a 20-turn scripted chat: share of the previous context
    reused each turn, target >= 95% every turn
  * KV bytes held after 200 short turns with max_kv_size set (bounded) vs unset
  * the prompt-cache file fingerprint (a digest of every weight) on a model of
    SmolLM2-135M's shape in fp32: seconds, once per loaded model
Model: a generated 25M-param llama (big enough that prefill dominates); pass
``--model default`` for the embedded default model or ``--model PATH`` for any other.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

SYSTEM = "You are a helpful assistant. Answer briefly."


def pick_model(arg: str | None, tmp: Path) -> Any:
    import nbllm
    from nbllm.loading import DEFAULT_MODEL_PATH
    from nbllm.testing import BENCH_SHAPE, make_model

    if arg == "default":
        if not (DEFAULT_MODEL_PATH / "config.json").exists():
            raise SystemExit(f"no embedded default model at {DEFAULT_MODEL_PATH}")
        return nbllm.load()
    if arg:
        return nbllm.load(arg)
    return nbllm.load(make_model(tmp / "bench-llama", "llama", overrides=BENCH_SHAPE))


def scripted(n: int, seed: int = 1, lines: int = 3) -> list[str]:
    from nbllm.testing import sample_corpus

    corpus = sample_corpus(n * lines, seed=seed)
    return [" ".join(corpus[i * lines : (i + 1) * lines]) for i in range(n)]


def history_of(lm: Any, n_tokens: int) -> list[dict[str, str]]:
    """Scripted user/assistant exchanges; all but the last reply render to at least ``n_tokens``."""
    texts = scripted(400, seed=2)
    msgs: list[dict[str, str]] = []
    while (len(lm.encode(msgs[:-1], system=SYSTEM)) if msgs else 0) < n_tokens:
        k = len(msgs)
        msgs += [
            {"role": "user", "content": texts[k]},
            {"role": "assistant", "content": texts[k + 1] + " " + texts[k + 2]},
        ]
    return msgs


def first_token(chat: Any, text: str) -> tuple[float, int, int]:
    """Wall time from send() to the first token; the exchange is then undone."""
    t = time.perf_counter()
    reply = chat.send(text)
    token = next(reply)
    dt = time.perf_counter() - t
    reply.close()
    prompt = len(reply.prompt_ids)
    chat.undo()
    return dt, token.id, prompt


def ttft(lm: Any, n_tokens: int, repeats: int) -> dict[str, Any]:
    from nbllm import Chat

    history = history_of(lm, n_tokens)
    warm = Chat(lm, SYSTEM, history=history[:-2], max_tokens=8)
    warm.send(history[-2]["content"]).completion()  # the previous turn: the whole history goes through the cache
    question = "Tell me more."  # a short follow-up, as most chat turns are
    warm_t, cold_t, raw_t, same, prompts = [], [], [], [], set()
    for _ in range(repeats):  # interleaved, so drift hits all alike
        dt, warm_tok, prompt = first_token(warm, question)
        warm_t.append(dt)
        cold = Chat.from_json(lm, warm.to_json(), max_tokens=8)  # same history, empty cache
        dt, cold_tok, _ = first_token(cold, question)
        cold_t.append(dt)
        raw_t.append(raw_first_token(lm, warm, question))
        same.append(warm_tok == cold_tok)
        prompts.add(prompt)
    assert len(prompts) == 1, prompts  # every repeat saw the same history
    return {
        "prompt": prompt,
        "warm": statistics.median(warm_t),
        "cold": statistics.median(cold_t),
        "raw": statistics.median(raw_t),
        "same": all(same),
    }


def raw_first_token(lm: Any, chat: Any, text: str) -> float:
    """The same prompt through mlx_lm.stream_generate with no cache (the cold reference)."""
    import mlx_lm

    reply = chat.send(text)
    ids = reply.prompt_ids
    reply.close()  # closed before its first token: the history is unchanged
    t = time.perf_counter()
    next(iter(mlx_lm.stream_generate(lm.model, lm.tokenizer, ids, max_tokens=1)))
    return time.perf_counter() - t


def reuse(lm: Any, turns: int) -> dict[str, float]:
    from nbllm import Chat

    chat = Chat(lm, SYSTEM, max_tokens=32)
    rates = []
    for text in scripted(turns, seed=3):
        chat.send(text).completion()
        if chat.last_stats.reuse_rate is not None:
            rates.append(chat.last_stats.reuse_rate)
    return {"min": min(rates), "mean": statistics.mean(rates), "context": chat.last_stats.prompt_tokens}


def memory(lm: Any, turns: int, max_kv_size: int | None) -> dict[str, Any]:
    from nbllm import Chat

    chat = Chat(lm, SYSTEM, max_tokens=8, max_kv_size=max_kv_size)
    marks: dict[int, int] = {}
    for i, text in enumerate(scripted(turns, seed=4, lines=1), 1):
        chat.send(text).completion()
        if i % (turns // 4) == 0:
            marks[i] = chat.cache.stats.bytes_held
    s = chat.last_stats
    return {"marks": marks, "context": s.prompt_tokens, "ttft": s.time_to_first_token, "reuse": s.reuse_rate}


def fingerprint_seconds() -> tuple[float, float, int]:
    """Seconds to fingerprint a SmolLM2-135M-shaped fp32 llama (random weights), first and second call."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    from nbllm.cache_file import model_fingerprint
    from nbllm.testing.text import SMOLLM2_135M

    model = llama.Model(llama.ModelArgs.from_dict(SMOLLM2_135M))
    mx.eval(model.parameters())

    class Handle:  # what the fingerprint reads of a loaded model
        pass

    lm = Handle()
    lm.model, lm.config = model, SMOLLM2_135M  # type: ignore[attr-defined]
    params = sum(v.size for _, v in tree_flatten(model.parameters()))
    t = time.perf_counter()
    model_fingerprint(lm)
    first = time.perf_counter() - t
    t = time.perf_counter()
    model_fingerprint(lm)
    return first, time.perf_counter() - t, params


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--model",
        default=None,
        help="'default' (the embedded model) or a model folder (default: a generated 25M-param llama)",
    )
    ap.add_argument("--max-kv-size", type=int, default=1024)
    args = ap.parse_args()
    hist, repeats, turns, long_turns = (800, 2, 8, 40) if args.quick else (3000, 3, 20, 200)
    with tempfile.TemporaryDirectory() as tmp:
        lm = pick_model(args.model, Path(tmp))
        t = ttft(lm, hist, repeats)
        r = reuse(lm, turns)
        bounded = memory(lm, long_turns, args.max_kv_size)
        unbounded = memory(lm, long_turns, None)
    fp_first, fp_again, fp_params = fingerprint_seconds()
    print(
        f"\nnbllm prompt cache benchmark · model {lm.name} ({lm.info.parameters / 1e6:.1f}M params, {lm.info.dtype}) · median of {repeats}\n"
    )
    rows = [
        (f"TTFT cold, raw mlx_lm.stream_generate, same {t['prompt']}-token prompt (s)", f"{t['raw']:.3f}", "", ""),
        (
            f"TTFT cold, new turn after {t['prompt']}-token history (s)",
            f"{t['cold']:.3f}",
            f"{t['raw'] / t['cold']:.2f}",
            "~1 vs raw",
        ),
        ("TTFT warm, cache reused (s)", f"{t['warm']:.4f}", f"{t['cold'] / t['warm']:.0f}x", ">= 50x"),
        ("same first token warm and cold", "yes" if t["same"] else "NO", "", "yes"),
        (f"prefix reuse per turn, {turns}-turn chat: min", f"{r['min']:.1%}", "", ">= 95%"),
        (f"prefix reuse per turn, {turns}-turn chat: mean", f"{r['mean']:.1%}", "", ""),
        (
            f"cache fingerprint, every weight of {fp_params / 1e6:.0f}M fp32 params (s)",
            f"{fp_first:.2f}",
            "",
            "once per model",
        ),
        ("  again, same loaded model (s)", f"{fp_again:.4f}", "", ""),
    ]
    for label, m in ((f"max_kv_size={args.max_kv_size}", bounded), ("unbounded", unbounded)):
        for turn, nbytes in m["marks"].items():
            rows.append(
                (f"KV MB after {turn} turns, {label}", f"{nbytes / 1e6:.2f}", "", "bounded" if m is bounded else "")
            )
        rows.append(
            (
                f"  context tokens / TTFT (s) / reuse at turn {long_turns}, {label}",
                f"{m['context']} / {m['ttft']:.3f} / {m['reuse']:.0%}",
                "",
                "",
            )
        )
    print(f"{'measure':<64} {'value':>22} {'ratio':>7}  target")
    for name, value, ratio, target in rows:
        print(f"{name:<64} {value:>22} {ratio:>7}  {target}")


if __name__ == "__main__":
    main()
