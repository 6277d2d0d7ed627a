"""Sampling settings: validation, and factories over ``mlx_lm.sample_utils``.

mlx-lm already has the samplers (top-p, min-p, XTC, top-k, temperature) and
the penalty processors. What it lacks, and what this module adds:

* one validated settings record with the allowed range in every error;
* penalties whose context includes the prompt (and any cached prefix), since
  ``generate_step`` only hands processors the tokens it was fed;
* ``logit_bias`` keyed by token text as well as id;
* the distribution the sampler *actually* draws from, for teaching views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import mlx.core as mx

if TYPE_CHECKING:
    import numpy as np

__all__ = ["SamplingParams", "LogitsProcessor", "make_processors", "make_token_sampler", "sampled_logprobs", "sampled_probs"]

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


@dataclass(frozen=True)
class SamplingParams:
    """Validated sampling settings (mlx-lm's names and meanings).

    ``temperature=0`` is greedy. ``top_p``/``min_p``/XTC/``top_k`` filter the
    model distribution (in that order, as mlx-lm does) before temperature.
    Penalties look at the last ``penalty_context`` tokens, prompt included.
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

    def __post_init__(self) -> None:
        _check(self.temperature, "temperature", 0.0, math.inf, "a float >= 0")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k: expected an integer >= 0 (0 = off), got {self.top_k!r}")
        _check(self.top_p, "top_p", 0.0, 1.0, "a float in (0, 1] (1 = off)", open_low=True)
        _check(self.min_p, "min_p", 0.0, 1.0, "a float in [0, 1] (0 = off)")
        _check(self.xtc_probability, "xtc_probability", 0.0, 1.0, "a float in [0, 1]")
        _check(self.xtc_threshold, "xtc_threshold", 0.0, 0.5, "a float in [0, 0.5]")
        if self.repetition_penalty is not None:
            _check(self.repetition_penalty, "repetition_penalty", 0.0, math.inf, "a float > 0 (1 = off)", open_low=True)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value is not None:
                _check(value, name, -math.inf, math.inf, "a finite float")
        if not isinstance(self.penalty_context, int) or self.penalty_context < 1:
            raise ValueError(f"penalty_context: expected an integer >= 1, got {self.penalty_context!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed: expected an integer >= 0 or None, got {self.seed!r}")
        if self.logit_bias is not None and not isinstance(self.logit_bias, Mapping):
            raise ValueError(f"logit_bias: expected a dict of token id or text -> float, got {type(self.logit_bias).__name__}")

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> "SamplingParams":
        """Pop the sampling settings out of ``kwargs`` (``temp`` is accepted for ``temperature``)."""
        if "temp" in kwargs:
            kwargs["temperature"] = kwargs.pop("temp")
        names = {f.name for f in fields(cls)}
        return cls(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _check(value: Any, name: str, lo: float, hi: float, expected: str, open_low: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    ok = ok and (lo < value if open_low else lo <= value) and value <= hi
    if not ok:
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


def make_token_sampler(params: SamplingParams) -> Callable[[mx.array], mx.array]:
    """Return mlx-lm's sampler for these settings (a closure: logprobs -> token)."""
    from mlx_lm.sample_utils import make_sampler

    return make_sampler(
        temp=params.temperature,
        top_p=params.top_p if params.top_p < 1.0 else 0.0,
        min_p=params.min_p,
        top_k=params.top_k,
        xtc_probability=params.xtc_probability,
        xtc_threshold=params.xtc_threshold,
    )


def resolve_logit_bias(bias: Mapping[int | str, float], tokenizer: Any, vocab_size: int) -> dict[int, float]:
    """Turn ``{id or text: bias}`` into ``{id: bias}``; text must be exactly one token."""
    out: dict[int, float] = {}
    for key, value in bias.items():
        if isinstance(key, str):
            ids = tokenizer.encode(key, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"logit_bias: expected {key!r} to be a single token, it encodes to {len(ids)} tokens {ids}")
            key = ids[0]
        if not isinstance(key, int) or not 0 <= key < vocab_size:
            raise ValueError(f"logit_bias: expected token ids in [0, {vocab_size}), got {key!r}")
        out[key] = out.get(key, 0.0) + float(value)
    return out


def make_processors(
    params: SamplingParams,
    tokenizer: Any,
    vocab_size: int,
    context_prefix: Sequence[int] = (),
    extra: Sequence[LogitsProcessor] = (),
) -> list[LogitsProcessor]:
    """Build the logits processors for ``generate_step``.

    Args:
        params: The sampling settings.
        tokenizer: Used to resolve ``logit_bias`` keys given as text.
        vocab_size: The model's output size.
        context_prefix: Token ids the model has seen but ``generate_step`` will
            not pass to processors (a reused cache prefix). Penalties see them.
        extra: User processors, applied after nbllm's own.

    Returns:
        A list of ``processor(tokens, logits) -> logits`` closures.
    """
    from mlx_lm.sample_utils import make_logits_processors

    bias = resolve_logit_bias(params.logit_bias, tokenizer, vocab_size) if params.logit_bias else None
    procs = make_logits_processors(
        logit_bias=bias,
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


def sampled_logprobs(logprobs: mx.array, params: SamplingParams) -> mx.array:
    """The log-distribution the sampler draws from: filters, then temperature.

    Mirrors ``mlx_lm.sample_utils.make_sampler`` (top-p -> min-p -> top-k, then
    ``logprobs / temperature``). XTC is random per step and is left out. Greedy
    gives a one-hot distribution on the argmax.

    Args:
        logprobs: Model log-probabilities after logits processors, shape ``(..., vocab)``.
        params: The sampling settings.
    """
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

    if params.greedy:
        hot = mx.argmax(logprobs, axis=-1, keepdims=True)
        ids = mx.arange(logprobs.shape[-1])
        return mx.where(ids == hot, 0.0, -mx.inf)
    x = logprobs
    if 0.0 < params.top_p < 1.0:
        x = apply_top_p(x, params.top_p)
    if params.min_p > 0.0:
        x = apply_min_p(x, params.min_p)
    if 0 < params.top_k < x.shape[-1]:
        x = apply_top_k(x, params.top_k)
    x = x / params.temperature
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def sampled_probs(logprobs: "np.ndarray", params: SamplingParams, ids: "np.ndarray") -> "np.ndarray":
    """Probabilities of ``ids`` under the sampler's distribution, in numpy.

    The same distribution as ``sampled_logprobs`` (top-p -> min-p -> top-k,
    then temperature), computed on a float32 vector without sorting the whole
    vocabulary when the nucleus is small, so it costs microseconds per token
    rather than a full sort.
    """
    import numpy as np

    lp = logprobs
    if params.greedy:
        return (ids == int(np.argmax(lp))).astype(np.float64)
    keep = np.ones(lp.shape[-1], dtype=bool)
    if 0.0 < params.top_p < 1.0:
        keep &= lp >= _nucleus_threshold(lp, params.top_p)
    if params.min_p > 0.0:
        keep &= lp >= lp.max() + math.log(params.min_p)
    if 0 < params.top_k < lp.shape[-1]:
        top = np.zeros_like(keep)
        top[np.argpartition(-lp, params.top_k - 1)[: params.top_k]] = True
        keep &= top
    scaled = lp[keep].astype(np.float64) / params.temperature
    peak = scaled.max()
    log_z = peak + math.log(np.exp(scaled - peak).sum())
    out = np.exp(lp[ids].astype(np.float64) / params.temperature - log_z)
    return np.where(keep[ids], out, 0.0)


def _nucleus_threshold(lp: "np.ndarray", top_p: float) -> float:
    """Smallest log-probability kept by mlx-lm's ``apply_top_p`` (the nucleus)."""
    import numpy as np

    probs_total = float(np.exp(lp.astype(np.float64)).sum())
    for m in (256, lp.shape[-1]):  # a small head almost always holds the nucleus
        m = min(m, lp.shape[-1])
        head = np.sort(lp[np.argpartition(-lp, m - 1)[:m]] if m < lp.shape[-1] else lp)[::-1]
        mass_before = np.concatenate([[0.0], np.cumsum(np.exp(head.astype(np.float64)))[:-1]])
        kept = int((mass_before < top_p * probs_total).sum())
        if kept < m or m == lp.shape[-1]:
            return float(head[kept - 1])
    raise AssertionError("unreachable")
