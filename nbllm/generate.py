"""The token stream: ``stream()`` yields ``Token`` records, ``generate()`` collects them.

Decoding itself is ``mlx_lm.generate_step`` (prefill in chunks, one step
ahead); this module adds what a notebook needs around it: prompts through the
chat template, validated sampling settings, penalties that see the prompt,
stop strings, top-k alternatives, cancellation, cache reuse and stats.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, Sequence, cast

import mlx.core as mx

from .decode import TextAssembler, describe, piece_of
from .sampling import LogitsProcessor, SamplingParams, make_processors, make_token_sampler
from .tokens import Completion, Stats, Token

if TYPE_CHECKING:
    from .model import LM

__all__ = ["TokenStream", "stream", "generate", "CacheLike"]


class CacheLike(Protocol):
    """What ``stream`` needs from a reusable prompt cache (see ``nbllm.PromptCache``)."""

    def prepare(self, ids: list[int], media: Sequence[str] = ()) -> tuple[list[Any], int]:
        """Return mlx-lm cache layers covering ``ids[:n]`` and ``n`` (< len(ids)).

        ``media`` identifies the prompt's images: other images, no reuse.
        """
        ...

    def commit(self, ids: list[int]) -> None:
        """Record that the layers now cover a prefix of ``ids`` (their offset says how much)."""
        ...


class TokenStream:
    """An iterator of ``Token`` records with live ``stats`` and ``cancel()``.

    Iterate it once; the last record has a ``finish_reason``. ``cancel()`` (from
    any thread, e.g. a Stop button) ends the stream after the current token.
    """

    def __init__(self, iterator_factory: Callable[["TokenStream"], Iterator[Token]], prompt_ids: list[int], constraint: Any = None):
        self.prompt_ids = prompt_ids
        self.stats = Stats(prompt_tokens=len(prompt_ids))
        self.constraint = constraint
        self._cancelled = False
        self._it = iterator_factory(self)

    def __iter__(self) -> "TokenStream":
        return self

    def __next__(self) -> Token:
        return next(self._it)

    def cancel(self) -> None:
        """Ask the stream to stop after the current token (``finish_reason='cancelled'``)."""
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def close(self) -> None:
        """Stop now and release the model state (the prompt cache is kept consistent)."""
        close = getattr(self._it, "close", None)
        if close:
            close()


def stream(
    lm: "LM",
    prompt: Any,
    *,
    max_tokens: int = 256,
    top_logprobs: int = 0,
    stop: str | Sequence[str] | None = None,
    system: str | None = None,
    raw: bool = False,
    images: Sequence[Any] | Any | None = None,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    prompt_cache: CacheLike | list[Any] | None = None,
    max_kv_size: int | None = None,
    prefill_step_size: int = 2048,
    progress: Callable[[int, int], None] | None = None,
    constraint: Any = None,
    **options: Any,
) -> TokenStream:
    """Stream a completion token by token.

    Args:
        lm: A loaded model.
        prompt: Text (chat template applied when the model has one), chat
            messages, or token ids.
        max_tokens: Most tokens to generate (>= 1).
        top_logprobs: How many alternatives to attach to each token (0 = none).
        stop: Stop string(s): generation ends when one appears; it is not in the text.
        system: System message (chat template only).
        raw: Plain completion, no chat template.
        images: Image(s) for a vision model: path, URL, PIL image, array or bytes.
        logits_processors: Extra ``processor(tokens, logits) -> logits`` callables.
        prompt_cache: A ``PromptCache`` (prefix reuse) or mlx-lm cache layers.
        max_kv_size: Bound the KV cache (rotating) when no cache is given.
        prefill_step_size: Prompt tokens per prefill chunk.
        progress: ``progress(done, total)`` called during prefill.
        constraint: A structured-output constraint (see ``nbllm.structured``);
            or pass ``schema=``, ``json=``, ``regex=``, ``choices=``, ``grammar=``.
        **options: Sampling settings (``SamplingParams``): temperature, top_k,
            top_p, min_p, xtc_probability, xtc_threshold, repetition_penalty,
            presence_penalty, frequency_penalty, penalty_context, logit_bias, seed.

    Returns:
        A ``TokenStream`` of ``Token`` records.
    """
    params = SamplingParams.from_kwargs(options)
    constraint = _constraint_from(lm, constraint, options)
    if options:
        raise TypeError(f"unexpected argument(s): {', '.join(sorted(options))}")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens: expected an integer >= 1, got {max_tokens!r}")
    if not isinstance(top_logprobs, int) or not 0 <= top_logprobs <= min(100, lm.vocab_size):
        raise ValueError(f"top_logprobs: expected an integer in [0, {min(100, lm.vocab_size)}], got {top_logprobs!r}")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"stop: expected non-empty strings, got {stop!r}")
    ids = lm.encode(prompt, system=system, raw=raw)
    image_list = _as_list(images)
    embeddings = lm.prepare_inputs(ids, image_list)
    if embeddings is not None:
        # Computed here, not lazily: the stream may be iterated on another thread.
        mx.eval(embeddings)
    # Validate everything that can fail before touching the cache.
    extra = list(logits_processors or [])
    make_processors(params, lm.tokenizer, lm.vocab_size)

    continuation = not lm.is_chat(prompt, raw)

    def run(ts: TokenStream) -> Iterator[Token]:
        return _run(lm, ts, ids, embeddings, params, extra, constraint, stops, max_tokens, top_logprobs,
                    prompt_cache, max_kv_size, prefill_step_size, progress, continuation)

    return TokenStream(run, ids, constraint)


def _as_list(images: Any) -> list[Any]:
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


def _constraint_from(lm: "LM", constraint: Any, options: dict[str, Any]) -> Any:
    keys = [k for k in ("schema", "json", "regex", "choices", "grammar") if k in options]
    spec = {k: options.pop(k) for k in keys}
    spec = {k: v for k, v in spec.items() if v is not None and v is not False}
    if not spec:
        return constraint
    if constraint is not None or len(spec) > 1:
        raise ValueError(f"expected at most one of constraint/schema/json/regex/choices/grammar, got {sorted(spec)}")
    from .structured import make_constraint

    return make_constraint(lm, **spec)


def _run(
    lm: "LM", ts: TokenStream, ids: list[int], embeddings: mx.array | None, params: SamplingParams,
    extra: list[LogitsProcessor], constraint: Any, stops: list[str], max_tokens: int, k: int,
    prompt_cache: Any, max_kv_size: int | None, prefill_step_size: int, progress: Any, continuation: bool,
) -> Iterator[Token]:
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    tic = time.perf_counter()
    if constraint is not None:  # before prepare(): nothing may fail between prepare() and the commit() below
        constraint.reset()
        extra = extra + [constraint.processor]
    reusable = hasattr(prompt_cache, "prepare")
    if reusable:
        layers, reused = prompt_cache.prepare(ids, lm.media_key(ids))
    else:
        layers = prompt_cache if prompt_cache is not None else make_prompt_cache(lm.model, max_kv_size=max_kv_size)
        reused = 0
    ts.stats.cached_tokens = reused
    feed = mx.array(ids[reused:])
    if embeddings is not None:
        embeddings = embeddings[reused:]
    procs = make_processors(params, lm.tokenizer, lm.vocab_size, context_prefix=ids[:reused], extra=extra)
    if params.seed is not None:
        mx.random.seed(params.seed)
    steps = generate_step(
        feed, lm.model, max_tokens=max_tokens, sampler=make_token_sampler(params),
        logits_processors=procs or None, prompt_cache=layers, prefill_step_size=prefill_step_size,
        prompt_progress_callback=progress, input_embeddings=embeddings,
    )
    text = TextAssembler(lm.tokenizer, stops, continuation=continuation)
    eos = lm.tokenizer.eos_token_ids
    generated: list[int] = []
    first = 0.0
    try:
        for n, (tok_array, logprobs) in enumerate(steps):
            tok = int(cast(int, tok_array))  # generate_step yields a Python int despite its annotation
            if n == 0:
                first = time.perf_counter()
                ts.stats.time_to_first_token = first - tic
                ts.stats.prompt_tps = len(feed) / max(ts.stats.time_to_first_token, 1e-9)
            generated.append(tok)
            is_eos = tok in eos
            piece = text.add(tok) if not is_eos else ""
            finish = None
            if is_eos:
                finish = "stop"
            elif text.stopped:
                finish = "stop_string"
            elif n + 1 == max_tokens:
                finish = "length"
            elif ts.cancelled:
                finish = "cancelled"
            if finish is not None and finish != "stop_string":
                piece += text.flush()
            logprob, sampled_prob, top = describe(tok, logprobs, params, k, lm.tokenizer, lm.pieces)
            ts.stats.generated_tokens = n + 1
            if n > 0:
                ts.stats.generation_tps = n / (time.perf_counter() - first)
            yield Token(
                id=tok, text=piece, piece=piece_of(lm.tokenizer, tok, lm.pieces), logprob=logprob, index=n,
                top=top, sampled_prob=sampled_prob, forced=bool(constraint is not None and constraint.was_forced(n)),
                special=is_eos, finish_reason=finish,
                masked_prob=constraint.masked_prob(n) if constraint is not None else None,
            )
            if finish is not None:
                break
    finally:
        ts.stats.peak_memory_gb = mx.get_peak_memory() / 1e9
        steps.close()
        if reusable:
            prompt_cache.commit(ids + generated)


def generate(lm: "LM", prompt: Any, **kwargs: Any) -> Completion:
    """Generate to the end and return a ``Completion`` (text, tokens, stats).

    Takes the same arguments as ``stream``. With a structured-output
    constraint, ``Completion.value`` holds the parsed value.
    """
    ts = stream(lm, prompt, **kwargs)
    completion = Completion.from_tokens(ts, ts.stats)
    if ts.constraint is not None:
        completion.value = ts.constraint.finish(completion)
    return completion
