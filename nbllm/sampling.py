"""Sampling settings: validation, and factories over ``mlx_lm.sample_utils``.

mlx-lm already has the samplers (top-p, min-p, XTC, top-k, temperature) and
the penalty processors. What it lacks, and what this module adds:

* one validated settings record, with the allowed range in every error;
* penalties whose context includes the prompt (and any cached prefix), since
  ``generate_step`` only hands processors the tokens it was fed;
* ``logit_bias`` keyed by token text as well as id;
* a sampler that cannot leave MLX's global random state broken when it fails
  (mlx-lm's filters are compiled over that state).

What the sampler actually draws from, for the teaching views, is computed in
numpy by ``nbllm.filters``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import mlx.core as mx

__all__ = [
    "SamplingParams",
    "LogitsProcessor",
    "make_processors",
    "make_token_sampler",
    "resolve_logit_bias",
    "SEED_MAX",
]

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]
SEED_MAX = 2**64 - 1  # mx.random.seed takes an unsigned 64-bit integer
_INT_MAX = 2**31 - 1


@dataclass(frozen=True)
class SamplingParams:
    """Validated sampling settings (mlx-lm's names and meanings).

    ``temperature=0`` is greedy. ``top_p``/``min_p``/XTC/``top_k`` filter the
    model distribution (in that order, as mlx-lm does) before temperature.
    Penalties look at the last ``penalty_context`` tokens, prompt included.
    ``xtc_special_tokens`` (newline and end-of-sequence ids, filled in for the
    model when a request is built) are never removed by XTC, as in mlx-lm.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    penalty_context: int = 64
    logit_bias: Mapping[int | str, float] | None = field(default=None, hash=False)
    seed: int | None = None
    xtc_special_tokens: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _check(self.temperature, "temperature", 0.0, math.inf, "a finite float >= 0")
        _check_int(self.top_k, "top_k", 0, _INT_MAX, "an integer >= 0 (0 = off)")
        _check(self.top_p, "top_p", 0.0, 1.0, "a float in (0, 1] (1 = off)", open_low=True)
        _check(self.min_p, "min_p", 0.0, 1.0, "a float in [0, 1] (0 = off)")
        _check(self.xtc_probability, "xtc_probability", 0.0, 1.0, "a float in [0, 1]")
        _check(self.xtc_threshold, "xtc_threshold", 0.0, 0.5, "a float in [0, 0.5]")
        if self.repetition_penalty is not None:
            _check(
                self.repetition_penalty,
                "repetition_penalty",
                0.0,
                math.inf,
                "a finite float > 0 (1 = off)",
                open_low=True,
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value is not None:
                _check(value, name, -math.inf, math.inf, "a finite float")
        _check_int(self.penalty_context, "penalty_context", 1, _INT_MAX, "an integer >= 1")
        if self.seed is not None:
            _check_int(self.seed, "seed", 0, SEED_MAX, f"an integer in [0, {SEED_MAX}] or None")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, Mapping):
                raise ValueError(
                    f"logit_bias: expected a dict of token id or text -> float, got {type(self.logit_bias).__name__}"
                )
            for key, value in self.logit_bias.items():
                _check(value, f"logit_bias[{key!r}]", -math.inf, math.inf, "a finite float")

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> SamplingParams:
        """Pop the sampling settings out of ``kwargs`` (``temp`` is accepted for ``temperature``)."""
        if "temp" in kwargs:
            kwargs["temperature"] = kwargs.pop("temp")
        names = {f.name for f in fields(cls)} - {"xtc_special_tokens"}
        return cls(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})

    def check_vocab(self, vocab_size: int) -> None:
        """Raise if a setting does not fit a vocabulary of ``vocab_size`` tokens."""
        if self.top_k > vocab_size:
            raise ValueError(
                f"top_k: expected an integer in [0, {vocab_size}] (the vocabulary size; 0 = off), got {self.top_k}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _check(value: Any, name: str, lo: float, hi: float, expected: str, open_low: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (lo < value if open_low else lo <= value) and value <= hi
    if not ok:
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


def _check_int(value: Any, name: str, lo: int, hi: int, expected: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


def make_token_sampler(params: SamplingParams, vocab_size: int) -> Callable[[mx.array], mx.array]:
    """mlx-lm's sampler for these settings (a closure: logprobs -> token).

    mlx-lm's filters are compiled over MLX's global random state; a failure
    inside one (an interrupt while it compiles) leaves that state unusable for
    every later random draw in the process. The closure checks for that and
    reseeds, so one failed call never breaks the next.
    """
    from mlx_lm.sample_utils import make_sampler

    sampler = make_sampler(
        temp=params.temperature,
        top_p=params.top_p if params.top_p < 1.0 else 0.0,
        min_p=params.min_p,
        top_k=params.top_k if params.top_k < vocab_size else 0,  # all of them: no filter (mlx-lm wants < vocab)
        xtc_probability=params.xtc_probability,
        xtc_threshold=params.xtc_threshold,
        xtc_special_tokens=list(params.xtc_special_tokens),
    )
    if params.greedy:
        return sampler

    def sample(logprobs: mx.array) -> mx.array:
        try:
            return sampler(logprobs)
        except BaseException:
            repair_random_state()
            raise

    return sample


def repair_random_state() -> None:
    """Reseed MLX's global generator if a failed compiled call left it without a value."""
    import os

    try:
        mx.eval(mx.random.state[0])  # type: ignore[index]
    except RuntimeError:
        mx.random.seed(int.from_bytes(os.urandom(8), "little"))


def resolve_logit_bias(bias: Mapping[int | str, float], tokenizer: Any, vocab_size: int) -> dict[int, float]:
    """Turn ``{id or text: bias}`` into ``{id: bias}``; text must be exactly one token."""
    out: dict[int, float] = {}
    for key, value in bias.items():
        if isinstance(key, str):
            ids = tokenizer.encode(key, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(
                    f"logit_bias: expected {key!r} to be a single token, it encodes to {len(ids)} tokens {ids}"
                )
            key = ids[0]
        if not isinstance(key, int) or isinstance(key, bool) or not 0 <= key < vocab_size:
            raise ValueError(f"logit_bias: expected token ids in [0, {vocab_size}) or one-token strings, got {key!r}")
        out[key] = out.get(key, 0.0) + float(value)
    return out


def make_processors(
    params: SamplingParams,
    logit_bias: Mapping[int, float] | None = None,
    context_prefix: Sequence[int] = (),
    extra: Sequence[LogitsProcessor] = (),
) -> list[LogitsProcessor]:
    """Build the logits processors for a decode loop.

    Args:
        params: The sampling settings.
        logit_bias: ``{token id: bias}`` (see ``resolve_logit_bias``).
        context_prefix: Token ids the model has seen but the loop will not pass
            to processors (a reused cache prefix). Penalties see them.
        extra: User processors and the constraint, applied after nbllm's own.

    Returns:
        A list of ``processor(tokens, logits) -> logits`` closures.
    """
    from mlx_lm.sample_utils import make_logits_processors

    procs = make_logits_processors(
        logit_bias=dict(logit_bias) if logit_bias else None,
        repetition_penalty=params.repetition_penalty,
        repetition_context_size=params.penalty_context,
        presence_penalty=params.presence_penalty,
        presence_context_size=params.penalty_context,
        frequency_penalty=params.frequency_penalty,
        frequency_context_size=params.penalty_context,
    )
    prefix = list(context_prefix)[-params.penalty_context :]
    if prefix and procs:
        prefix_arr = mx.array(prefix, dtype=mx.uint32)
        procs = [_with_prefix(p, prefix_arr) for p in procs]
    return procs + list(extra)


def _with_prefix(processor: LogitsProcessor, prefix: mx.array) -> LogitsProcessor:
    def call(tokens: mx.array, logits: mx.array) -> mx.array:
        return processor(mx.concatenate([prefix, tokens.astype(prefix.dtype)]), logits)

    return call
