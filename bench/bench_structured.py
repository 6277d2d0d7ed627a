"""Structured-output benchmark: what the constraint costs, on 32K- and ~150K-token vocabularies.

    python bench/bench_structured.py            # prints a table
    python bench/bench_structured.py --quick    # fewer tokens and rounds, for a smoke run

Rows, per vocabulary (and per model shape):
  * decode tok/s constrained (a JSON schema) / unconstrained, same model, same run, target >= 0.9
  * per-token constraint cost: llguidance's mask alone, and the whole processor (mask + mx.where + eval)
  * compile time of a mid-size schema (cold, and from the per-tokenizer cache), tokenizer setup once,
    and outlines-core's index build for the same schema as a reference (first shape only)

The fixture tokenizer (``nbllm.testing.make_model``) is trained on a few hundred
lines, which cannot reach 32K merges. ``big_vocab_model`` trains the same kind
of byte-level BPE on a generated corpus of ~3M pseudo-words drawn Zipf-like from
a 375K-word lexicon (syllable words, numbers, JSON snippets), so it reaches
150K real merges in a few seconds. The models are cached under ``--cache``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import nbllm  # first: fast BLAS before mlx.core

# "tiny" = the test fixture shape (the mask is a large share of a step: worst case);
# "small" = the core bench shape (a step costs milliseconds, like a small real model).
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {},
    "small": {
        "hidden_size": 512,
        "num_hidden_layers": 8,
        "intermediate_size": 1536,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
    },
}

ADDRESS = {
    "type": "object",
    "properties": {
        "street": {"type": "string", "maxLength": 40},
        "city": {"type": "string", "maxLength": 30},
        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
    },
    "required": ["street", "city", "zip"],
}
PERSON = {  # mid-size: nesting, enums, bounds, optional fields, patterns, arrays
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "email": {"type": "string", "pattern": "^[a-z0-9.]+@[a-z0-9]+\\.[a-z]{2,4}$"},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 5},
        "address": ADDRESS,
        "friends": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 20},
                    "since": {"type": "integer", "minimum": 1900, "maximum": 2100},
                },
                "required": ["name"],
            },
            "maxItems": 3,
        },
        "nickname": {"type": ["string", "null"], "maxLength": 20},
    },
    "required": ["name", "age", "role", "score", "active", "tags", "address"],
}
# Long enough that a random model cannot finish before max_tokens: the rate is measured over the same length.
DECODE_SCHEMA = {"type": "array", "items": PERSON, "minItems": 100}


def corpus(n_words: int, lexicon_size: int = 400_000, seed: int = 0) -> list[str]:
    """Generated text with a large, Zipf-distributed word inventory (for BPE training)."""
    from nbllm.testing import sample_corpus

    rng = random.Random(seed)
    cons = [
        "b",
        "c",
        "d",
        "f",
        "g",
        "h",
        "j",
        "k",
        "l",
        "m",
        "n",
        "p",
        "r",
        "s",
        "t",
        "v",
        "w",
        "z",
        "ch",
        "sh",
        "th",
        "st",
        "tr",
        "pl",
        "gr",
    ]
    vowels = ["a", "e", "i", "o", "u", "y", "ai", "ea", "ou", "io"]
    syllables = [c + v for c in cons for v in vowels] + vowels
    lexicon = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(lexicon_size)]
    lexicon = [w.capitalize() if rng.random() < 0.1 else w for w in lexicon]
    weights = [1.0 / (i + 1) ** 0.8 for i in range(len(lexicon))]
    words = rng.choices(lexicon, weights, k=n_words)
    lines, i = [], 0
    while i < len(words):
        k = rng.randint(5, 20)
        tail = rng.choice([".", ",", "!", "?", ":", f' {{"{words[i]}": {rng.randint(0, 99999)}}}'])
        lines.append(" ".join(words[i : i + k]) + tail)
        i += k
    return sample_corpus() + lines


def big_vocab_model(
    path: Path, vocab_size: int, shape: dict[str, Any], arch: str = "llama", n_words: int = 3_000_000
) -> Path:
    """A random-weight model with a ``vocab_size`` byte-level BPE (like ``make_model``, bigger corpus)."""
    import importlib

    import mlx.core as mx
    from mlx.utils import tree_flatten

    from nbllm.testing import ARCHITECTURES, build_tokenizer

    if (path / "model.safetensors").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(
        path, vocab_size=vocab_size, corpus=corpus(n_words, lexicon_size=max(1000, n_words // 8))
    )
    config = dict(ARCHITECTURES[arch], **shape)
    config["vocab_size"] = len(tokenizer)
    config["eos_token_id"] = tokenizer.convert_tokens_to_ids("<|im_end|>")
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    mx.random.seed(0)
    model = module.Model(module.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    if "lm_head.weight" in weights:  # peaked distributions, as make_model does
        weights["lm_head.weight"] = weights["lm_head.weight"] * 6.0
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def decode_ratio(lm: Any, n: int, rounds: int) -> tuple[float, float, float]:
    """Median constrained and unconstrained decode tok/s, and the median of per-round ratios (order alternates)."""
    prompt = "Give me a list of people as JSON."
    free: list[float] = []
    constrained: list[float] = []
    runs: list[tuple[list[float], dict[str, Any]]] = [(free, {}), (constrained, {"schema": DECODE_SCHEMA})]
    for r in range(rounds):
        for rates, kwargs in runs if r % 2 == 0 else runs[::-1]:  # alternate who goes first
            ts = nbllm.stream(lm, prompt, max_tokens=n, temperature=0.8, seed=r, **kwargs)
            got = sum(1 for _ in ts)
            if got != n:
                raise RuntimeError(f"expected {n} tokens, got {got}: the output ended early")
            rates.append(ts.stats.generation_tps)
    ratios = [c / f for c, f in zip(constrained, free)]  # per round: pairs see similar machine load
    return statistics.median(constrained), statistics.median(free), statistics.median(ratios)


def mask_costs(lm: Any, n: int) -> tuple[float, float, float]:
    """Per-token cost over a real constrained token sequence: llguidance mask p50, p99; full processor mean (µs)."""
    import mlx.core as mx
    import numpy as np

    from nbllm.grammar import compile_matcher, output_spec
    from nbllm.structured import make_constraint

    ids = [t.id for t in nbllm.stream(lm, "JSON:", max_tokens=n, temperature=0.8, seed=0, schema=DECODE_SCHEMA)]
    # llguidance alone, through its public API (mask into a bitmask buffer, then consume).
    matcher = compile_matcher(output_spec(schema=DECODE_SCHEMA), lm.tokenizer)
    from nbllm.grammar import ll_tokenizer

    words = np.zeros((ll_tokenizer(lm.tokenizer).vocab_size + 31) // 32, dtype=np.int32)
    times = []
    for tok in ids:
        t = time.perf_counter()
        matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        times.append(time.perf_counter() - t)
        matcher.consume_token(tok)
    times.sort()
    # The whole processor: sync, consume, mask, unpack, mx.where on the logits, evaluated.
    constraint = make_constraint(lm, schema=DECODE_SCHEMA)
    logits = mx.random.normal((1, lm.vocab_size))
    history = mx.array([1] + ids)
    mx.eval(logits, history)
    constraint.reset()
    t = time.perf_counter()
    for i in range(len(ids)):
        mx.eval(constraint.processor(history[: i + 1], logits))
    full = (time.perf_counter() - t) / len(ids)
    return times[len(times) // 2] * 1e6, times[int(len(times) * 0.99)] * 1e6, full * 1e6


def compile_times(lm: Any, repeats: int) -> tuple[float, float]:
    """Cold compile of the mid-size schema (median over variants) and a cached make_constraint (ms)."""
    from nbllm.structured import make_constraint

    cold = []
    for i in range(repeats):
        variant = dict(PERSON, title=f"Person{time.time_ns()}_{i}")  # a new grammar text: misses the cache
        t = time.perf_counter()
        make_constraint(lm, schema=variant)
        cold.append(time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(repeats):
        make_constraint(lm, schema=PERSON)
    return statistics.median(cold) * 1e3, (time.perf_counter() - t) / repeats * 1e3


def outlines_core_compile(lm: Any) -> float:
    """Seconds for outlines-core to build its token index for the same mid-size schema (for reference)."""
    from outlines_core import Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    from nbllm.grammar import ll_tokenizer

    ll = ll_tokenizer(lm.tokenizer)
    eos = min(lm.tokenizer.eos_token_ids)
    pieces: dict[bytes, list[int]] = {}
    for i in range(ll.vocab_size):
        if not ll.is_special_token(i):
            pieces.setdefault(ll.decode_bytes([i]), []).append(i)
    t = time.perf_counter()
    Index(build_regex_from_schema(json.dumps(PERSON)), Vocabulary(eos, pieces))
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=Path("/tmp/nbllm-bench-structured"), help="where models are built")
    ap.add_argument("--tokens", type=int, default=200, help="tokens per decode run")
    ap.add_argument("--rounds", type=int, default=3, help="alternating constrained/unconstrained runs")
    ap.add_argument("--vocab", type=int, nargs="*", default=[32_000, 150_000])
    ap.add_argument("--shape", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-outlines", action="store_true", help="skip the outlines-core compile reference")
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.rounds = 60, 1
    import os

    from nbllm.grammar import ll_tokenizer

    print(
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; {args.tokens} tokens x {args.rounds} rounds"
    )
    print(
        f"{'vocab':>7} {'model':>6} {'free tok/s':>10} {'json tok/s':>10} {'ratio':>6} "
        f"{'mask p50 µs':>11} {'p99 µs':>7} {'proc µs':>8} {'compile ms':>10} {'cached ms':>9} {'tok setup s':>11} "
        f"{'outlines-core s':>15}"
    )
    for vocab in args.vocab:
        for shape in args.shape:
            path = big_vocab_model(args.cache / f"llama-{shape}-{vocab}", vocab, SHAPES[shape])
            lm = nbllm.load(path)
            t = time.perf_counter()
            ll_tokenizer(lm.tokenizer)
            setup = time.perf_counter() - t
            cold, warm = compile_times(lm, 5 if not args.quick else 2)
            a, b, ratio = decode_ratio(lm, args.tokens, args.rounds)
            p50, p99, full = mask_costs(lm, args.tokens)
            ref = "-" if args.no_outlines or shape != args.shape[0] else f"{outlines_core_compile(lm):.2f}"
            print(
                f"{lm.vocab_size:>7} {shape:>6} {b:>10.1f} {a:>10.1f} {ratio:>6.2f} "
                f"{p50:>11.0f} {p99:>7.0f} {full:>8.0f} {cold:>10.1f} {warm:>9.2f} {setup:>11.2f} {ref:>15}"
            )
            sys.stdout.flush()
    print(
        "ratio = constrained / unconstrained decode tok/s (target >= 0.9); mask = llguidance alone; "
        "proc = the whole nbllm processor per token; compile = mid-size schema, cold; cached = from the cache; "
        "tok setup = llguidance tokenizer, once per model; outlines-core s = its index build for the same schema"
    )


if __name__ == "__main__":
    main()
